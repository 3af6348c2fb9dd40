"""Collectives among one peer's ranks, and its sync sample: what every outer step needs.

Global rank 0 of a peer does the I/O and hands decisions (small values it made itself) and
peer payloads (raw bytes, never unpickled) to the other ranks; an apply is agreed with
:func:`all_ok`. Every function is a no-op for a peer that runs as one process. The SparseLoCo
and DiLoCo outer steps (and a third party's) share these rather than each keep a copy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from covenant.engine.protocols import (
    Codec,
    ModelRuntime,
    ParamShard,
    PayloadRejected,
    Upload,
    UploadRejection,
    WindowContext,
)

if TYPE_CHECKING:
    from covenant.engine.services import Services

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# Rank 0's I/O of a window, shared by every outer step
# --------------------------------------------------------------------------------------------


def upload_at_window_end(
    services: Services, ctx: WindowContext, payload: bytes, codec: str
) -> dict[str, Any]:
    """Rank 0: wait for the window's end, then sign and upload ``payload`` with the window's
    data receipt, unless the upload interval has already closed (SPEC section 1). A plugin may
    replace or withhold the payload first (``covenant_payload``); the deadline is checked with
    the time before it ran, so a deliberately late peer really uploads late. Returns metrics."""
    exchange, chain = services.exchange, services.chain
    out: dict[str, Any] = {"uploaded": 0.0}
    t0 = time.perf_counter()
    chain.wait_for_block((ctx.window + 1) * chain.blocks_per_window)
    out["wait_s"] = time.perf_counter() - t0
    _lo, hi = exchange.upload_interval(ctx.window)
    now = chain.block_timestamp(int(chain.block()))
    replaced = services.hook.covenant_payload(ctx=ctx, payload=payload, services=services)
    if replaced is not None:
        payload = bytes(replaced)
    t1 = time.perf_counter()
    if now > hi:
        log.warning(
            "window %d: upload interval closed before the upload; not uploading", ctx.window
        )
    elif payload:
        try:
            exchange.put_gradient(
                ctx.window,
                payload,
                codec=codec,
                receipt=ctx.extras.get("receipt"),
                sizes={"payload": len(payload)},
            )
            out["uploaded"] = 1.0
        except Exception as exc:  # a failed PUT is an error for this window, not the run
            log.warning("window %d: upload failed: %s", ctx.window, exc)
    out["upload_s"] = time.perf_counter() - t1
    return out


def gather_listed(
    services: Services, window: int, codec: Codec, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """Rank 0: the peer list in force, its peers' verified uploads (polled until the interval
    closes), each validated by ``codec``, and the ones to aggregate (``PeerList.select``).

    Returns the window's plan: metrics, ``skip_reason`` when there is nothing to aggregate, the
    unusable uploads' reasons, and ``blobs``/``sizes`` (the chosen payloads, ascending uid)."""
    exchange = services.exchange
    t0 = time.perf_counter()
    out: dict[str, Any] = {"peers": 0.0, "rejected": 0.0, "bytes_down": 0.0, "sizes": []}
    peers = exchange.peer_list(window)
    if peers is None or not peers.gather:
        out["skip_reason"] = "no peer list in force"
        out["gather_s"] = time.perf_counter() - t0
        return out
    cap = codec.max_payload_bytes(shapes)
    usable: dict[int, Upload] = {}
    rejected: dict[int, str] = {}
    for outcome in exchange.fetch_gradients(window, peers.uids, max_bytes=cap, codec=codec.name):
        if isinstance(outcome, UploadRejection):
            rejected[outcome.uid] = outcome.reason
            continue
        try:
            codec.validate(outcome.payload, shapes)
        except PayloadRejected as exc:
            rejected[outcome.uid] = exc.reason
            continue
        usable[outcome.uid] = outcome
    chosen = peers.select(usable)
    out["peers"] = float(len(chosen))
    out["rejected"] = float(sum(1 for u in peers.gather if u in rejected))
    out["gathered"] = ",".join(str(u) for u in chosen)
    if rejected:
        reasons = ", ".join(f"{u}:{r}" for u, r in sorted(rejected.items()))
        out["rejected_reasons"] = reasons  # in metrics.jsonl with the window's line
        log.info("window %d: unusable uploads: %s", window, reasons)
    if not chosen:
        out["skip_reason"] = "no usable upload from the peer list"
    blobs = [usable[u].payload for u in chosen]
    out["blobs"] = blobs
    out["sizes"] = [len(b) for b in blobs]
    out["bytes_down"] = float(sum(out["sizes"]))
    out["gather_s"] = time.perf_counter() - t0
    return out


def distribute(
    window: int, plan_on_rank0: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], list[bytes]]:
    """Run ``plan_on_rank0`` on global rank 0 (a failure there becomes a ``skip_reason``, so
    every rank moves on), then give its plan (small, made here) and its ``blobs`` (peer bytes,
    as raw uint8 broadcasts, never pickled) to every rank. Collective."""
    blobs: list[bytes] | None = None
    plan: dict[str, Any] | None = None
    if rank() == 0:
        try:
            plan = plan_on_rank0()
        except Exception as exc:  # rank 0's I/O failed: every rank must still move on
            log.warning("window %d: gather failed: %s", window, exc, exc_info=True)
            plan = {"skip_reason": f"gather failed: {exc}", "sizes": []}
        blobs = plan.pop("blobs", [])
    plan = broadcast_obj(plan)
    assert plan is not None
    return plan, broadcast_bytes(blobs, plan["sizes"])


__all__ = [
    "all_ok",
    "broadcast_bytes",
    "broadcast_obj",
    "contributes",
    "distribute",
    "gather_listed",
    "gather_to_rank0",
    "local_index",
    "rank",
    "sync_pairs",
    "sync_values",
    "upload_at_window_end",
    "world",
]
