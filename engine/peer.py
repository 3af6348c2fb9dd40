"""Collectives among one peer's ranks, and its sync sample: what every outer step needs.

Global rank 0 of a peer does the I/O and hands decisions (small values it made itself) and
peer payloads (raw bytes, never unpickled) to the other ranks; an apply is agreed with
:func:`all_ok`. Every function is a no-op for a peer that runs as one process. The SparseLoCo
and DiLoCo outer steps (and a third party's) share these rather than each keep a copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from covenant.engine.protocols import ModelRuntime, ParamShard

SYNC_POSITIONS = (10, 11)  # SPEC section 6: flat positions of every tensor with >= 12 elements


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def broadcast_obj(value: Any) -> Any:
    """Rank 0's small, locally made value on every rank (never peer bytes)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_bytes(blobs: list[bytes] | None, sizes: list[int]) -> list[bytes]:
    """Rank 0's byte strings on every rank, as raw uint8 tensors (nothing is unpickled)."""
    if world() == 1:
        return list(blobs or [])
    out = []
    for i, n in enumerate(sizes):
        buf = (
            torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8)
            if rank() == 0 and blobs is not None
            else torch.empty(n, dtype=torch.uint8)
        )
        dist.broadcast(buf, src=0)
        out.append(buf.numpy().tobytes())
    return out


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` is true on every rank."""
    if world() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_to_rank0(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (locally made) on rank 0, ``None`` elsewhere."""
    if world() == 1:
        return [value]
    got: list[Any] | None = [None] * world() if rank() == 0 else None
    dist.gather_object(value, got, dst=0)
    return got


def contributes(model: ModelRuntime, shard: ParamShard) -> bool:
    """Whether this rank's copy of ``shard`` goes into the peer's upload (one copy of each)."""
    par = model.parallel
    return par.dp_rank == 0 and (not shard.replicated_over_tp or par.tp_rank == 0)


def local_index(shard: ParamShard, pos: int) -> tuple[int, ...] | None:
    """The local index of global flat position ``pos`` if this shard owns it."""
    shape = shard.global_shape
    idx: tuple[int, ...]
    if len(shape) == 1:
        idx = (pos,)
    elif len(shape) == 2:
        idx = divmod(pos, shape[1])
    else:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), shape))
    local = tuple(i - o for i, o in zip(idx, shard.offsets, strict=True))
    if all(0 <= x < n for x, n in zip(local, shard.local_shape, strict=True)):
        return local
    return None


def sync_values(
    model: ModelRuntime, params: Mapping[str, torch.Tensor], shards: Mapping[str, ParamShard]
) -> dict[str, dict[int, float]]:
    """This rank's share of the sync sample: name -> {position: value}."""
    out: dict[str, dict[int, float]] = {}
    for name, p in params.items():
        shard = shards[name]
        if not contributes(model, shard) or math.prod(shard.global_shape) < 12:
            continue
        for pos in SYNC_POSITIONS:
            local = local_index(shard, pos)
            if local is not None:
                out.setdefault(name, {})[pos] = float(p.detach()[local])
    return out


def sync_pairs(values: Mapping[str, Mapping[int, float]]) -> dict[str, list[float]]:
    return {n: [v[10], v[11]] for n, v in values.items() if 10 in v and 11 in v}


__all__ = [
    "all_ok",
    "broadcast_bytes",
    "broadcast_obj",
    "contributes",
    "gather_to_rank0",
    "local_index",
    "rank",
    "sync_pairs",
    "sync_values",
    "world",
]
