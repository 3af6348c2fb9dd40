"""Aggregation: median-norm clipping, contributor mean, non-finite handling (SPEC 4.8)."""

from __future__ import annotations

import pytest
import torch

import covenant.plugins.sparseloco as sl
from covenant.plugins.sparseloco.aggregation import lower_median

SHAPES = {"w": (128, 128), "n": (64,)}


def _peer(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def _dense_reference(payloads: list[bytes], cfg: sl.SparseLoCoConfig) -> dict[str, torch.Tensor]:
    """Straightforward dense float64 version of the rule, for comparison."""
    decoded = [sl.decode(p, SHAPES, cfg) for p in payloads]
    out = {}
    for n in SHAPES:
        vs = [d[n].double() for d in decoded]
        norms = torch.stack([v.norm() for v in vs])
        med = torch.median(norms)  # lower middle for even counts
        if cfg.clip_to_median:
            vs = [
                v * torch.clamp(med / (nm + cfg.norm_eps), max=1.0)
                for v, nm in zip(vs, norms, strict=True)
            ]
        total = torch.stack(vs).sum(0)
        if cfg.mean_over_selectors:
            count = torch.stack([(d[n] != 0).double() for d in decoded]).sum(0)
            out[n] = torch.where(count > 0, total / count.clamp(min=1), 0.0)
        else:
            out[n] = total / len(vs)
    return out


@pytest.mark.parametrize("n_peers", [1, 2, 3, 4])
@pytest.mark.parametrize(("clip", "mean"), [(True, True), (False, True), (True, False)])
def test_matches_dense_reference(n_peers: int, clip: bool, mean: bool) -> None:
    cfg = sl.SparseLoCoConfig(clip_to_median=clip, mean_over_selectors=mean)
    payloads = [sl.encode(_peer(i, 0.5 * (i + 1))) for i in range(n_peers)]
    got = sl.aggregate(payloads, SHAPES, cfg)
    ref = _dense_reference(payloads, cfg)
    for n in SHAPES:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-6, atol=1e-7)


def test_lower_median_for_even_counts() -> None:
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert lower_median([5.0]) == 5.0
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    t = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert float(torch.median(t)) == lower_median(t.tolist())


def test_large_peer_is_clipped_to_median() -> None:
    small = [sl.encode(_peer(i, 1.0)) for i in range(2)]
    huge = sl.encode(_peer(9, 1000.0))
    agg = sl.aggregate([*small, huge], SHAPES)
    assert float(agg["w"].abs().max()) < 10.0
    unclipped = sl.aggregate([*small, huge], SHAPES, sl.SparseLoCoConfig(clip_to_median=False))
    assert float(unclipped["w"].abs().max()) > 100.0


def test_mean_over_selectors_not_sum_over_peers() -> None:
    a = {"w": torch.zeros(128, 128), "n": torch.ones(64)}
    b = {"w": torch.zeros(128, 128), "n": torch.ones(64)}
    a["w"][:64] = 1.0
    b["w"][64:] = 1.0
    cfg = sl.SparseLoCoConfig(k=4096, quantizer="none", clip_to_median=False)
    pa, pb = sl.encode(a, cfg), sl.encode(b, cfg)
    agg = sl.aggregate([pa, pb], SHAPES, cfg)
    # with k = tile size every coordinate is selected by both peers, zeros included
    assert torch.equal(agg["w"], torch.full((128, 128), 0.5))
    # two peers selecting disjoint coordinates: each value keeps its own size
    cfg_k = sl.SparseLoCoConfig(k=1, quantizer="none", clip_to_median=False)
    x = torch.zeros(64, 64)
    x[0, 0] = 2.0
    y = torch.zeros(64, 64)
    y[1, 1] = 4.0
    shapes = {"t": (64, 64)}
    agg = sl.aggregate([sl.encode({"t": x}, cfg_k), sl.encode({"t": y}, cfg_k)], shapes, cfg_k)
    assert agg["t"][0, 0] == 2.0 and agg["t"][1, 1] == 4.0 and int((agg["t"] != 0).sum()) == 2
    sum_cfg = cfg_k.model_copy(update={"mean_over_selectors": False})
    agg = sl.aggregate([sl.encode({"t": x}, cfg_k), sl.encode({"t": y}, cfg_k)], shapes, sum_cfg)
    assert agg["t"][0, 0] == 1.0 and agg["t"][1, 1] == 2.0


def test_nonfinite_aggregate_error_or_skip() -> None:
    cfg = sl.SparseLoCoConfig(
        k=4096, quantizer="none", clip_to_median=False, mean_over_selectors=False
    )
    big = {"w": torch.full((128, 128), 3e38), "n": torch.ones(64)}
    payloads = [sl.encode(big, cfg)] * 2
    with pytest.raises(sl.AggregationError) as info:
        sl.aggregate(payloads, SHAPES, cfg)
    assert info.value.tensor == "w"
    skip = cfg.model_copy(update={"on_nonfinite": "skip"})
    out = sl.aggregate(payloads, SHAPES, skip)
    assert set(out) == {"n"} and torch.equal(out["n"], torch.ones(64))


def test_bad_payload_names_its_peer() -> None:
    good = sl.encode(_peer(0, 1.0))
    bad = bytearray(good)
    bad[-1] ^= 1
    with pytest.raises(sl.PayloadChecksumError) as info:
        sl.aggregate([good, bytes(bad)], SHAPES)
    assert info.value.peer == 1


def test_aggregate_is_deterministic_and_order_defined() -> None:
    payloads = [sl.encode(_peer(i, 1.0 + i)) for i in range(3)]
    a = sl.aggregate(payloads, SHAPES)
    b = sl.aggregate(payloads, SHAPES)
    assert all(torch.equal(a[n], b[n]) for n in SHAPES)
    assert sl.aggregate([], SHAPES) == {}


def test_zero_eps_with_an_all_zero_peer_is_defined() -> None:
    """norm_eps = 0 is allowed; an all-zero peer (norm 0) must not divide by zero or give NaN."""
    from covenant.plugins.sparseloco.aggregation import clip_factors

    assert clip_factors([0.0, 2.0, 4.0], 0.0) == [1.0, 1.0, 0.5]
    assert clip_factors([0.0, 0.0, 0.0], 0.0) == [1.0, 1.0, 1.0]  # median 0: 0/0 is 1, not NaN
    assert clip_factors([0.0, float("inf")], 0.0) == [1.0, 0.0]
    cfg = sl.SparseLoCoConfig(norm_eps=0.0)
    zero = {n: torch.zeros(s) for n, s in SHAPES.items()}
    live = _peer(1, 1.0)
    for peers in ([zero], [zero, zero], [zero, live], [live, zero, zero]):
        got = sl.aggregate([sl.encode(p) for p in peers], SHAPES, cfg)
        assert all(bool(torch.isfinite(t).all()) for t in got.values())
    alone = sl.aggregate([sl.encode(live)], SHAPES, cfg)
    mixed = sl.aggregate([sl.encode(zero), sl.encode(live)], SHAPES, cfg)
    assert set(mixed) == set(alone)
