"""Tile geometry and per-tile k (SPEC 4.3-4.4)."""

from __future__ import annotations

import pytest

from covenant.plugins.sparseloco import EncodeError, SparseLoCoConfig
from covenant.plugins.sparseloco.tiling import (
    TileBlock,
    kept_per_tile,
    largest_divisor_at_most,
    slice_block,
    tile_geometry,
)


@pytest.mark.parametrize(
    ("n", "limit", "want"),
    [(4096, 64, 64), (48, 64, 48), (100, 64, 50), (97, 64, 1), (200, 64, 50), (1, 64, 1)],
)
def test_largest_divisor(n: int, limit: int, want: int) -> None:
    assert largest_divisor_at_most(n, limit) == want


def test_geometry_2d_1d_and_nd() -> None:
    g = tile_geometry((2048, 8192), 64)
    assert (g.tile_rows, g.tile_cols, g.num_tiles) == (64, 64, 32 * 128)
    g1 = tile_geometry((100,), 64)
    assert (g1.rows, g1.cols, g1.tile_rows, g1.tile_cols, g1.num_tiles) == (1, 100, 1, 50, 2)
    g3 = tile_geometry((3, 4, 64), 64)
    assert (g3.rows, g3.cols, g3.tile_rows, g3.tile_cols) == (12, 64, 12, 64)
    g0 = tile_geometry((), 64)
    assert g0.num_tiles == 1 and g0.tile_len == 1
    with pytest.raises(EncodeError):
        tile_geometry((0, 4), 64)


def test_k_rules() -> None:
    default = SparseLoCoConfig()
    assert kept_per_tile(tile_geometry((64, 64), 64), default) == 64
    assert kept_per_tile(tile_geometry((48, 40), 64), default) == 64  # 48x40 tile still keeps 64
    assert kept_per_tile(tile_geometry((64,), 64), default) == 64  # a norm segment sent whole
    assert kept_per_tile(tile_geometry((50,), 64), default) == 50
    dens = SparseLoCoConfig(topk_rule="density")
    assert kept_per_tile(tile_geometry((64, 64), 64), dens) == 64
    assert kept_per_tile(tile_geometry((48, 40), 64), dens) == 30  # round(1920*64/4096)
    assert kept_per_tile(tile_geometry((64,), 64), dens) == 1


def test_slice_blocks() -> None:
    g = tile_geometry((256, 128), 64)
    assert slice_block(g, (64, 128), (128, 0)) == TileBlock(2, 3, 0, 2)
    assert slice_block(g, (256, 64), (0, 64)) == TileBlock(0, 4, 1, 2)
    with pytest.raises(EncodeError, match="line up"):
        slice_block(g, (32, 128), (0, 0))
    with pytest.raises(EncodeError, match="outside"):
        slice_block(g, (64, 128), (224, 0))
    g1 = tile_geometry((4096,), 64)
    assert slice_block(g1, (1024,), (2048,)) == TileBlock(0, 1, 32, 48)
