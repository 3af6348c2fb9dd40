"""Tile geometry in global (unsharded) coordinates (SPEC.md 4.3).

A tensor is viewed as a matrix: 2-D tensors as themselves, 1-D tensors (and 0-D scalars) as one
row, tensors with more dimensions as ``(prod(shape[:-1]), shape[-1])``. A matrix of shape
``(R, C)`` is cut into tiles of ``th x tw`` where ``th`` is the largest divisor of ``R`` that is at
most ``tile_max`` (likewise ``tw`` for ``C``); so 1-D tensors become segments of the largest
divisor ``<= tile_max``. Tiles are numbered row-major over the tile grid, and the in-tile index of
element ``(r, c)`` of a tile is ``r * tw + c``. Because the grid is defined on the *global* shape,
a rank that owns an aligned slice produces exactly the tiles the full tensor would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.errors import EncodeError


def largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest divisor of ``n`` that is ``<= limit`` (``n >= 1``, ``limit >= 1``)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class TileGeometry:
    """How one tensor of a given global shape is tiled."""

    shape: tuple[int, ...]
    rows: int
    cols: int
    tile_rows: int
    tile_cols: int

    @property
    def grid_rows(self) -> int:
        return self.rows // self.tile_rows

    @property
    def grid_cols(self) -> int:
        return self.cols // self.tile_cols

    @property
    def num_tiles(self) -> int:
        return self.grid_rows * self.grid_cols

    @property
    def tile_len(self) -> int:
        return self.tile_rows * self.tile_cols

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(rows, cols)`` matrix view of a tensor shape (see module docstring)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return math.prod(shape[:-1]), shape[-1]


def tile_geometry(shape: tuple[int, ...] | torch.Size, tile_max: int) -> TileGeometry:
    """Tile geometry of a tensor with global shape ``shape``."""
    shape = tuple(int(s) for s in shape)
    rows, cols = matrix_shape(shape)
    if rows <= 0 or cols <= 0:
        raise EncodeError(f"cannot tile an empty tensor of shape {shape}")
    return TileGeometry(
        shape=shape,
        rows=rows,
        cols=cols,
        tile_rows=largest_divisor_at_most(rows, tile_max),
        tile_cols=largest_divisor_at_most(cols, tile_max),
    )


def kept_per_tile(geom: TileGeometry, config: SparseLoCoConfig) -> int:
    """Number of values kept in each tile of length ``L`` (the same for every tile)."""
    length = geom.tile_len
    if config.topk_rule == "min_k":
        return min(config.k, length)
    # Python's round() is half-to-even; fixed here so every implementation agrees.
    return min(length, max(1, round(length * config.k / config.density_tile)))


@dataclass(frozen=True)
class TileBlock:
    """A rectangle of the tile grid: grid rows ``[row0, row1)`` x grid cols ``[col0, col1)``."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def num_tiles(self) -> int:
        return (self.row1 - self.row0) * (self.col1 - self.col0)


def full_block(geom: TileGeometry) -> TileBlock:
    """The block covering the whole tile grid."""
    return TileBlock(0, geom.grid_rows, 0, geom.grid_cols)


def slice_block(
    geom: TileGeometry, local_shape: tuple[int, ...], offset: tuple[int, ...], name: str = ""
) -> TileBlock:
    """The tile block owned by a rank holding ``local_shape`` at ``offset`` of the global tensor.

    Slices must line up with the tile grid (megatron's TP splits of 64-multiple dimensions do);
    otherwise the rank cannot encode alone and must gather first.
    """
    shape = geom.shape
    if len(local_shape) != len(shape) or len(offset) != len(shape):
        raise EncodeError(
            f"tensor {name!r}: slice of rank {len(local_shape)} with offset {offset} does not "
            f"match global shape {shape}"
        )
    for d, (size, off, full) in enumerate(zip(local_shape, offset, shape, strict=True)):
        if off < 0 or size <= 0 or off + size > full:
            raise EncodeError(
                f"tensor {name!r}: slice [{off}, {off + size}) of dim {d} is outside {shape}"
            )
    if len(shape) == 0:
        return full_block(geom)
    if len(shape) == 1:
        r0, r1, c0, c1 = 0, 1, offset[0], offset[0] + local_shape[0]
    elif len(shape) == 2:
        r0, r1 = offset[0], offset[0] + local_shape[0]
        c0, c1 = offset[1], offset[1] + local_shape[1]
    else:
        if tuple(local_shape) != shape:
            raise EncodeError(
                f"tensor {name!r}: slices of tensors with more than 2 dimensions are not "
                f"supported (global {shape}, local {tuple(local_shape)})"
            )
        return full_block(geom)
    th, tw = geom.tile_rows, geom.tile_cols
    if r0 % th or r1 % th or c0 % tw or c1 % tw:
        raise EncodeError(
            f"tensor {name!r}: slice rows [{r0}, {r1}) cols [{c0}, {c1}) does not line up with "
            f"{th}x{tw} tiles of the global shape {shape}; gather it before encoding"
        )
    return TileBlock(r0 // th, r1 // th, c0 // tw, c1 // tw)


def to_tiles(matrix: torch.Tensor, geom: TileGeometry) -> torch.Tensor:
    """Cut a matrix (a whole tile block, shape ``(gr*th, gc*tw)``) into ``(gr*gc, th*tw)`` rows."""
    th, tw = geom.tile_rows, geom.tile_cols
    r, c = matrix.shape
    return matrix.reshape(r // th, th, c // tw, tw).permute(0, 2, 1, 3).reshape(-1, th * tw)


def flat_positions(
    indices: torch.Tensor, geom: TileGeometry, block: TileBlock, rel: bool
) -> torch.Tensor:
    """Row-major flat positions of in-tile ``indices`` (``(T, k)`` over ``block``'s tiles).

    With ``rel`` the positions are inside the block's own matrix (a rank's local slice),
    otherwise inside the global matrix.
    """
    th, tw = geom.tile_rows, geom.tile_cols
    gc = block.col1 - block.col0
    device = indices.device
    t = torch.arange(indices.shape[0], device=device, dtype=torch.int64).unsqueeze(1)
    gi, gj = t // gc, t % gc
    if not rel:
        gi, gj = gi + block.row0, gj + block.col0
    ncols = gc * tw if rel else geom.cols
    row = gi * th + torch.div(indices, tw, rounding_mode="floor")
    col = gj * tw + indices % tw
    return (row * ncols + col).reshape(-1)


def global_positions(indices: torch.Tensor, geom: TileGeometry) -> torch.Tensor:
    """:func:`flat_positions` for the whole tile grid (``rel=False``), in fewer passes.

    Position = the tile's top-left corner + a per-in-tile-index offset read from an ``L``-entry
    table; the same integers as :func:`flat_positions`.
    """
    th, tw, gc, cols = geom.tile_rows, geom.tile_cols, geom.grid_cols, geom.cols
    device = indices.device
    lane = torch.arange(geom.tile_len, device=device, dtype=torch.int64)
    in_tile = torch.div(lane, tw, rounding_mode="floor") * cols + lane % tw
    t = torch.arange(indices.shape[0], device=device, dtype=torch.int64)
    corner = torch.div(t, gc, rounding_mode="floor") * (th * cols) + (t % gc) * tw
    return (corner.unsqueeze(1) + in_tile[indices]).reshape(-1)
