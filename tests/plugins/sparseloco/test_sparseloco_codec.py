"""Selection, the reference quantiser and error feedback (SPEC 4.2-4.6)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import covenant.plugins.sparseloco as sl
from covenant.plugins.sparseloco.codec import select_topk


def ref_quantize(v: np.ndarray, sigmas: float = 1.5) -> tuple[list[float], np.ndarray]:
    """Independent reference quantiser: exact rational sums, float32 elementwise arithmetic."""
    v = v.astype(np.float32).reshape(-1)
    n = v.size
    shift = np.float32(float(sum(Fraction(float(x)) for x in v) / n))
    c = (v - shift).astype(np.float32)
    sq = (c * c).astype(np.float32)
    sigma = math.sqrt(float(sum(Fraction(float(x)) for x in sq) / (n - 1))) if n > 1 else math.inf
    scale = np.float32(sigmas * sigma)
    if scale == 0 or not np.isfinite(scale):
        scale = np.float32(1.0)
    q = np.clip(np.round(c / scale + np.float32(2)), 0, 3).astype(np.uint8)
    lut = []
    for b in range(4):
        sel = c[q == b]
        lut.append(
            float(np.float32(float(sum(Fraction(float(x)) for x in sel) / sel.size)))
            if sel.size
            else 0.0
        )
    return [float(shift), *lut], q


def production_quantize(v: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """The production code path (plain float32 torch reductions)."""
    shift = v.mean()
    c = v - shift
    scale = 6 * (c.norm() / math.sqrt(v.numel() - 1)) / 4
    q = torch.round(c / scale + 2).clamp(0, 3).to(torch.int64)
    lut = [float(c[q == b].mean()) if bool((q == b).any()) else 0.0 for b in range(4)]
    return [float(shift), *lut], q


def _encode_one(x: torch.Tensor, cfg: sl.SparseLoCoConfig | None = None) -> sl.TensorPiece:
    return sl.encode_tensors({"t": x}, cfg)["t"]


def test_topk_is_largest_magnitude_sorted_and_canonical_on_ties() -> None:
    g = torch.Generator().manual_seed(0)
    tiles = torch.randn(5, 4096, generator=g)
    idx, vals = select_topk(tiles, 64)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    ref = torch.topk(tiles.abs(), 64, dim=1).values
    assert torch.equal(vals.abs().sort(dim=1).values, ref.sort(dim=1).values)
    # all-equal magnitudes: the lowest indices win (canonical on any device)
    tie = torch.tensor([[0.5, -0.5, 0.5, 0.5, 0.0, 0.5]])
    idx, vals = select_topk(tie, 3)
    assert idx.tolist() == [[0, 1, 2]]
    zeros = torch.zeros(2, 16)
    assert select_topk(zeros, 4)[0].tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("shape", [(128, 128), (48, 40), (100,), (7, 13)])
def test_reference_quantiser_matches_independent_implementation(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 0.01 + 0.001
    p = _encode_one(x)
    assert p.codes is not None
    table, q = ref_quantize(_kept(p, x))
    assert list(p.table) == table
    assert np.array_equal(p.codes.reshape(-1).numpy(), q)


def _kept(p: sl.TensorPiece, x: torch.Tensor) -> np.ndarray:
    """The kept values in piece order, read from the dense input."""
    from covenant.plugins.sparseloco.tiling import flat_positions

    pos = flat_positions(p.indices, p.geometry, p.block, rel=False)
    return x.reshape(-1)[pos].numpy()


def test_reference_quantiser_close_to_production_float32_path() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 256, generator=g)
    p = _encode_one(x)
    kept = torch.from_numpy(_kept(p, x))
    table, q = production_quantize(kept)
    assert p.codes is not None
    agree = (p.codes.reshape(-1).to(torch.int64) == q).float().mean().item()
    assert agree > 0.999
    np.testing.assert_allclose(p.table, table, rtol=1e-5, atol=1e-7)


def test_reference_bins_are_asymmetric() -> None:
    # round(c/scale + 2), scale = 1.5 sigma: bin 0 is c < -2.25 sigma, bin 1 [-2.25, -0.75),
    # bin 2 [-0.75, 0.75), bin 3 everything >= 0.75 sigma (clamped): two levels below the
    # middle bin, one above. Top-k values are bimodal, so negatives land in bin 1, positives in 3.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 128, generator=g)
    p = _encode_one(x)
    assert p.codes is not None
    shift, *lut = p.table
    kept = torch.from_numpy(_kept(p, x))
    codes = p.codes.reshape(-1)
    assert bool((codes[kept < shift] <= 1).all()) and bool((codes[kept > shift] == 3).all())
    assert lut[1] < 0 < lut[3]
    sym = _encode_one(x, sl.SparseLoCoConfig(quantizer="symmetric"))
    _, *slut = sym.table
    assert slut[0] < slut[1] < 0 < slut[2] < slut[3]  # two levels each side
    err_ref = (p.to_dense() - x).norm()
    err_sym = (sym.to_dense() - x).norm()
    assert err_sym < err_ref  # the symmetric option is a real alternative, compared in the bench


def test_quantiser_edge_cases() -> None:
    # one kept value: n - 1 = 0 -> scale 1.0; the value decodes exactly (shift = value, lut[2] = 0)
    p = _encode_one(torch.tensor([3.25]))
    assert (
        p.table == (3.25, 0.0, 0.0, 0.0, 0.0) and p.codes is not None and p.codes.tolist() == [[2]]
    )
    # all kept values equal: sigma 0 -> scale 1.0, every code 2, empty bins decode to 0
    p = _encode_one(torch.full((64, 64), -0.5))
    assert p.table == (-0.5, 0.0, 0.0, 0.0, 0.0)
    assert p.codes is not None and bool((p.codes == 2).all())
    assert torch.equal(p.to_dense()[p.to_dense() != 0], torch.full((64,), -0.5))
    # zeros everywhere
    p = _encode_one(torch.zeros(64, 64))
    assert p.table == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_encode_rejects_nonfinite_and_non_float() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(128, 128)
        x[70, 3] = bad
        with pytest.raises(sl.EncodeError, match="NaN"):
            sl.encode({"w": x})
    x = torch.zeros(64, 64)
    x[:8, :8] = float("nan")  # more non-finite values than k in one tile
    with pytest.raises(sl.EncodeError, match="NaN"):
        sl.encode({"w": x}, sl.SparseLoCoConfig(k=4))
    with pytest.raises(sl.EncodeError, match="floating"):
        sl.encode({"w": torch.ones(64, 64, dtype=torch.int64)})


def test_ef_identity_residual_plus_decoded() -> None:
    g = torch.Generator().manual_seed(4)
    e_old, delta = torch.randn(128, 192, generator=g), torch.randn(128, 192, generator=g)
    cfg = sl.SparseLoCoConfig()
    piece, e_new = sl.compress_step(e_old, delta, cfg)
    fed = cfg.beta * e_old + delta
    torch.testing.assert_close(e_new + piece.to_dense(), fed, rtol=0, atol=1e-6)
    untouched = piece.to_dense() == 0
    assert torch.equal(e_new[untouched], fed[untouched])


def test_ef_lossless_when_everything_is_kept() -> None:
    g = torch.Generator().manual_seed(5)
    cfg = sl.SparseLoCoConfig(k=4096, quantizer="none", beta=0.0)
    delta = torch.randn(128, 192, generator=g)
    piece, e_new = sl.compress_step(torch.randn(128, 192, generator=g), delta, cfg, name="t")
    assert torch.equal(piece.to_dense(), delta)
    assert torch.equal(e_new, torch.zeros_like(delta))
    shapes = {"t": delta.shape}
    assert torch.equal(sl.decode(sl.pack_payload({"t": piece}, cfg), shapes, cfg)["t"], delta)


def test_outer_lr_factor_option() -> None:
    e, d = torch.zeros(64, 64), torch.ones(64, 64)
    cfg_off = sl.SparseLoCoConfig(k=4096, quantizer="none", beta=0.5)
    cfg_on = sl.SparseLoCoConfig(k=4096, quantizer="none", beta=0.5, ef_outer_lr_factor=True)
    assert torch.equal(sl.compress_step(e, d, cfg_off, outer_lr=0.4)[0].to_dense(), d)
    assert torch.equal(sl.compress_step(e, d, cfg_on, outer_lr=0.4)[0].to_dense(), d * 0.4)


def test_compress_step_checks_shapes() -> None:
    with pytest.raises(sl.EncodeError, match="error buffer"):
        sl.compress_step(torch.zeros(64, 64), torch.zeros(64, 32))
