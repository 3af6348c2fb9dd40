"""Layout-agnostic encoding: slices of any TP/DP split give the full tensor's bytes."""

from __future__ import annotations

import threading

import pytest
import torch

import covenant.plugins.sparseloco as sl

SHAPES = {"fc1": (256, 128), "fc2": (128, 256), "norm": (256,), "odd": (96, 40)}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.02 for n, s in SHAPES.items()}


def _split(name: str, x: torch.Tensor, parts: int, dim: int) -> list[sl.TensorSlice]:
    """megatron-style split: column-parallel weights split dim 0, row-parallel dim 1."""
    if name == "odd":  # not divisible into tile-aligned parts: replicated on every rank
        return [sl.TensorSlice(x, tuple(x.shape), (0, 0))] * parts
    d = dim if x.dim() == 2 else 0
    size = x.shape[d] // parts
    out = []
    for r in range(parts):
        local = x.narrow(d, r * size, size)
        offset = [0] * x.dim()
        offset[d] = r * size
        out.append(sl.TensorSlice(local, tuple(x.shape), tuple(offset)))
    return out


def _sharded_payload(
    tensors: dict[str, torch.Tensor], parts: int, cfg: sl.SparseLoCoConfig | None = None
) -> bytes:
    ranks: list[dict[str, sl.TensorSlice]] = [{} for _ in range(parts)]
    for name, x in tensors.items():
        dim = 0 if name in ("fc1", "norm") else 1
        for r, s in enumerate(_split(name, x, parts, dim)):
            ranks[r][name] = s
    per_rank = sl.encode_slices_lockstep(ranks, cfg)
    # replicated tensors: every rank holds the full piece; take rank 0's (the others are equal)
    pieces = []
    for name in tensors:
        got = [r[name] for r in per_rank]
        if name == "odd":
            assert all(
                sl.pack_payload({name: g}, cfg) == sl.pack_payload({name: got[0]}, cfg) for g in got
            )
            pieces.append(got[0])
        else:
            pieces.extend(got)
    return sl.pack_payload(sl.merge(pieces), cfg)


@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("quantizer", ["reference", "symmetric"])
def test_slices_give_identical_bytes(parts: int, quantizer: str) -> None:
    cfg = sl.SparseLoCoConfig(quantizer=quantizer)  # type: ignore[arg-type]
    tensors = _tensors(1)
    assert _sharded_payload(tensors, parts, cfg) == sl.encode(tensors, cfg)


def test_payload_is_independent_of_dict_order() -> None:
    tensors = _tensors(2)
    assert sl.encode(dict(reversed(list(tensors.items())))) == sl.encode(tensors)


def test_encode_slices_with_a_real_reduce_callable() -> None:
    """Ranks in threads, each calling encode_slices with a barrier-based all-reduce."""
    x = _tensors(3)["fc1"]
    parts = 4
    slices = _split("fc1", x, parts, 0)
    barrier = threading.Barrier(parts)
    box: list[torch.Tensor | None] = [None] * parts
    results: list[sl.TensorPiece | None] = [None] * parts
    calls = [0] * parts

    def make_reduce(rank: int) -> sl.Reduce:
        def reduce(v: torch.Tensor) -> torch.Tensor:
            calls[rank] += 1
            box[rank] = v
            barrier.wait()
            total = torch.stack([b for b in box if b is not None]).sum(0)
            barrier.wait()
            return total

        return reduce

    def run(rank: int) -> None:
        results[rank] = sl.encode_slices({"fc1": slices[rank]}, None, make_reduce(rank))["fc1"]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert calls == [3] * parts  # three rounds: sum, sum of squares, bins
    merged = sl.merge([r for r in results if r is not None])
    assert sl.pack_payload(merged) == sl.encode({"fc1": x})


def test_compress_steps_on_slices_match_full() -> None:
    g = torch.Generator().manual_seed(4)
    e, d = torch.randn(256, 128, generator=g), torch.randn(256, 128, generator=g)
    full_piece, full_err = sl.compress_step(e, d, name="w")
    pieces, errs = [], []
    ranks = []
    for r in range(2):
        rows = slice(r * 128, (r + 1) * 128)
        ranks.append((e[rows], d[rows], (r * 128, 0)))
    # run both ranks in lockstep through the public reduce hook (threads)
    barrier = threading.Barrier(2)
    box: list[torch.Tensor | None] = [None, None]
    out: list[tuple[sl.TensorPiece, torch.Tensor] | None] = [None, None]

    def run(r: int) -> None:
        def reduce(v: torch.Tensor) -> torch.Tensor:
            box[r] = v
            barrier.wait()
            s = torch.stack([b for b in box if b is not None]).sum(0)
            barrier.wait()
            return s

        el, dl, off = ranks[r]
        out[r] = sl.compress_step(el, dl, name="w", shape=(256, 128), offset=off, reduce=reduce)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for item in out:
        assert item is not None
        pieces.append(item[0])
        errs.append(item[1])
    assert torch.equal(torch.cat(errs), full_err)
    assert sl.pack_payload(sl.merge(pieces)) == sl.pack_payload({"w": full_piece})


def test_merge_rejects_overlap_gaps_and_disagreement() -> None:
    x = _tensors(5)["fc1"]
    a, b = _split("fc1", x, 2, 0)
    pa, pb = (r["fc1"] for r in sl.encode_slices_lockstep([{"fc1": a}, {"fc1": b}]))
    with pytest.raises(sl.EncodeError, match="uncovered"):
        sl.merge([pa])
    with pytest.raises(sl.EncodeError, match="overlap"):
        sl.merge([pa, pa, pb])
    with pytest.raises(sl.EncodeError, match="merge"):
        sl.pack_payload({"fc1": pa})
    lone = sl.encode_slice("fc1", a.local, a.shape, a.offset)  # stats of its half only
    with pytest.raises(sl.EncodeError, match="disagree"):
        sl.merge([lone, pb])


def test_misaligned_slice_is_rejected() -> None:
    x = torch.randn(256, 128)
    with pytest.raises(sl.EncodeError, match="line up"):
        sl.encode_slice("w", x[:100], (256, 128), (0, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_give_identical_bytes_and_aggregate() -> None:
    tensors = _tensors(6)
    tensors["ties"] = torch.zeros(128, 128)
    tensors["ties"][:, 64:] = 0.5
    cpu = sl.encode(tensors)
    gpu = sl.encode({n: t.cuda() for n, t in tensors.items()})
    assert cpu == gpu
    shapes = {n: t.shape for n, t in tensors.items()}
    payloads = [
        sl.encode({n: t * (i + 1) + 0.01 * i for n, t in tensors.items()}) for i in range(3)
    ]
    agg_cpu = sl.aggregate(payloads, shapes)
    agg_gpu = sl.aggregate(payloads, shapes, device="cuda")
    assert all(torch.equal(agg_cpu[n], agg_gpu[n].cpu()) for n in shapes)
