"""``selection = "random"``: a uniformly random k-subset per tile (the study's random-k ablation),
through the unchanged wire format and residual; the default stays top-k byte for byte."""

from __future__ import annotations

import pytest
import torch

import covenant.plugins.sparseloco as sl
from covenant.plugins.sparseloco.codec import encode_tensors

RANDOM = sl.SparseLoCoConfig(selection="random", quantizer="none")


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(128, 192, generator=g), "n": torch.randn(64, generator=g)}


def test_default_is_topk_and_unchanged() -> None:
    assert sl.SparseLoCoConfig().selection == "topk"
    t = tensors()
    assert sl.encode(t) == sl.encode(t, sl.SparseLoCoConfig(selection="topk"))


def test_random_subsets_are_valid_tiles() -> None:
    t = tensors()
    torch.manual_seed(0)
    pieces = encode_tensors(t, RANDOM)
    w = pieces["w"]
    assert w.indices.shape == (6, 64)  # 2 x 3 tiles of 64 x 64, k = 64
    for row in w.indices:
        assert torch.equal(row, torch.sort(row).values)
        assert len(set(row.tolist())) == 64 and int(row.max()) < 4096
    dense = w.to_dense()
    kept = dense != 0
    assert int(kept.sum()) == 6 * 64
    assert torch.equal(dense[kept], t["w"][kept])  # the values are the tensor's, unquantised
    # not the top-k: the kept magnitudes are typical ones, far below the tiles' largest
    top = encode_tensors(t, sl.SparseLoCoConfig(quantizer="none"))["w"].to_dense()
    assert float(dense.abs().sum()) < 0.5 * float(top.abs().sum())
    # a 64-element norm segment is sent whole, as with top-k (min(k, L) per tile)
    assert torch.equal(pieces["n"].to_dense(), t["n"])


def test_random_payload_goes_through_the_normal_decoder() -> None:
    t = tensors()
    cfg = sl.SparseLoCoConfig(selection="random")
    torch.manual_seed(1)
    payload = sl.encode(t, cfg)
    shapes = {n: tuple(x.shape) for n, x in t.items()}
    sl.validate_payload(payload, shapes)
    assert len(payload) == sl.expected_payload_size(shapes)  # same size as top-k
    decoded = sl.decode(payload, shapes)
    assert int((decoded["w"] != 0).sum()) <= 6 * 64


def test_random_draws_follow_the_generator() -> None:
    t = tensors()
    torch.manual_seed(5)
    a = encode_tensors(t, RANDOM)["w"].indices
    torch.manual_seed(5)
    b = encode_tensors(t, RANDOM)["w"].indices
    c = encode_tensors(t, RANDOM)["w"].indices
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_selection_is_uniform() -> None:
    x = {"t": torch.randn(8, 8)}  # one tile of 64, keep 16
    cfg = sl.SparseLoCoConfig(selection="random", quantizer="none", k=16)
    counts = torch.zeros(64)
    torch.manual_seed(2)
    for _ in range(400):
        counts[encode_tensors(x, cfg)["t"].indices.reshape(-1)] += 1
    assert float(counts.sum()) == 400 * 16
    assert float(counts.min()) > 60 and float(counts.max()) < 140  # expected 100 each


def test_residual_keeps_what_was_not_sent() -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(64, 64, generator=g)
    torch.manual_seed(4)
    piece, err = sl.compress_step(torch.zeros(64, 64), delta, RANDOM, name="w")
    sent = piece.to_dense()
    assert torch.equal(err + sent, delta)
    assert int((err == 0).sum()) == 64  # exactly the sent coordinates were removed


def test_non_finite_anywhere_is_refused() -> None:
    t = tensors()
    t["w"][100, 7] = float("nan")  # random-k may well not pick it: checked regardless
    for _ in range(3):
        with pytest.raises(sl.EncodeError, match="NaN"):
            encode_tensors(t, RANDOM)
