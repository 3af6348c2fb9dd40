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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from covenant.engine.protocols import (
    Codec,
    ModelRuntime,
    ParamShard,
    PayloadRejected,
    PeerList,
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


def all_gather_obj(value: Any) -> list[Any]:
    """Every rank's ``value`` (small, locally made) on every rank, in rank order."""
    if world() == 1:
        return [value]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, value)
    return out


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


def fetch_listed(
    services: Services,
    window: int,
    codec: Codec,
    shapes: Mapping[str, tuple[int, ...]],
    names: Collection[str] | None = (),
) -> dict[str, Any]:
    """Rank 0: the peer list in force and its peers' verified uploads (polled until the interval
    closes), each checked by ``codec.validate(..., names)``: by default the structure only
    (framing, checksum, header, sizes); :func:`gather_checked` splits the per-tensor checks
    across the peer's ranks.

    Returns the plan (small values made here): ``listed`` (the :class:`PeerList`, or ``None``
    with a ``skip_reason``), ``candidates`` (uids whose upload passed, ascending) with their
    ``sizes`` and ``blobs``, ``rejected`` (uid -> reason) and ``gather_s``."""
    exchange = services.exchange
    t0 = time.perf_counter()
    plan: dict[str, Any] = {"listed": None, "candidates": [], "sizes": [], "rejected": {}}
    blobs: dict[int, bytes] = {}
    peers = exchange.peer_list(window)
    if peers is None or not peers.gather:
        plan["skip_reason"] = "no peer list in force"
    else:
        plan["listed"] = peers
        cap = codec.max_payload_bytes(shapes)
        for outcome in exchange.fetch_gradients(
            window, peers.uids, max_bytes=cap, codec=codec.name
        ):
            if isinstance(outcome, UploadRejection):
                plan["rejected"][outcome.uid] = outcome.reason
                continue
            try:
                codec.validate(outcome.payload, shapes, names=names)
            except PayloadRejected as exc:
                plan["rejected"][outcome.uid] = exc.reason
                continue
            blobs[outcome.uid] = outcome.payload
    plan["candidates"] = sorted(blobs)
    plan["sizes"] = [len(blobs[u]) for u in plan["candidates"]]
    plan["blobs"] = [blobs[u] for u in plan["candidates"]]
    plan["gather_s"] = time.perf_counter() - t0
    return plan


def validation_share(shapes: Mapping[str, tuple[int, ...]], ranks: int, me: int) -> set[str]:
    """The tensors rank ``me`` of ``ranks`` checks in every gathered payload: the largest tensor
    first to the least-loaded rank (ties to the lower rank), the same answer on every rank."""
    load = [0] * ranks
    share: set[str] = set()
    for name in sorted(shapes, key=lambda n: (-math.prod(shapes[n]), n)):
        r = min(range(ranks), key=lambda i: (load[i], i))
        load[r] += math.prod(shapes[name])
        if r == me:
            share.add(name)
    return share


def gather_checked(
    services: Services | None,
    window: int,
    codec: Codec,
    shapes: Mapping[str, tuple[int, ...]],
    fetch: Callable[[], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[bytes]]:
    """The payloads to aggregate this window, the same on every rank. Collective.

    Rank 0 fetches the listed peers' uploads and checks their structure (``fetch``, by default
    :func:`fetch_listed`); a failure there becomes a ``skip_reason``, so every rank moves on.
    Then, until the choice is stable: the chosen uploads not yet received reach every rank (raw
    uint8 broadcasts, never unpickled), each rank checks its :func:`validation_share` of their
    tensors, the ranks share what failed, and :meth:`PeerList.select` chooses again without it
    (a reserve peer stands in for a gather peer whose upload failed). The per-tensor checks thus
    cost ``1/ranks`` of a whole payload on each rank instead of all of it on rank 0, and a
    reserve upload is only broadcast when it is needed. A one-process peer checks everything
    while fetching, so a ``fetch`` given for one must check whole uploads (``fetch_listed``
    with ``names=None``, as the built-in outer steps do). Returns the window's metrics and the
    chosen payloads, ascending uid."""
    alone = world() == 1
    if fetch is None:
        assert services is not None

        def fetch() -> dict[str, Any]:
            return fetch_listed(services, window, codec, shapes, names=None if alone else ())

    plan: dict[str, Any] | None = None
    blobs: dict[int, bytes] = {}
    if rank() == 0:
        try:
            plan = fetch()
        except Exception as exc:  # rank 0's I/O failed: every rank must still move on
            log.warning("window %d: gather failed: %s", window, exc, exc_info=True)
            plan = {"skip_reason": f"gather failed: {exc}", "listed": None}
            plan.update(candidates=[], sizes=[], rejected={}, blobs=[])
        blobs = dict(zip(plan["candidates"], plan.pop("blobs"), strict=True))
    plan = broadcast_obj(plan)
    assert plan is not None
    peers: PeerList | None = plan["listed"]
    sizes = dict(zip(plan["candidates"], plan["sizes"], strict=True))
    rejected: dict[int, str] = dict(plan["rejected"])
    have: dict[int, bytes] = {}
    chosen: list[int] = []
    t0 = time.perf_counter()
    mine = validation_share(shapes, world(), rank())
    while peers is not None:
        chosen = peers.select([u for u in sizes if u not in rejected])
        new = [u for u in chosen if u not in have]
        if not new:
            break
        got = broadcast_bytes(
            [blobs[u] for u in new] if rank() == 0 else None, [sizes[u] for u in new]
        )
        failed: dict[int, str] = {}
        for uid, blob in zip(new, got, strict=True):
            have[uid] = blob
            if alone:
                continue  # checked whole while fetching
            try:
                codec.validate(blob, shapes, names=mine)
            except PayloadRejected as exc:
                failed[uid] = exc.reason
            except Exception as exc:  # a codec bug must not leave the other ranks waiting
                failed[uid] = f"validation_error: {type(exc).__name__}"
        for part in all_gather_obj(failed):
            for uid, reason in part.items():
                rejected.setdefault(uid, reason)
    out: dict[str, Any] = {
        "peers": float(len(chosen)),
        "rejected": float(sum(1 for u in (peers.gather if peers else ()) if u in rejected)),
        "gathered": ",".join(str(u) for u in chosen),
        "gather_s": float(plan["gather_s"]) if "gather_s" in plan else 0.0,
        "validate_s": time.perf_counter() - t0,
    }
    if "skip_reason" in plan:
        out["skip_reason"] = plan["skip_reason"]
    elif not chosen:
        out["skip_reason"] = "no usable upload from the peer list"
    if rejected:
        reasons = ", ".join(f"{u}:{r}" for u, r in sorted(rejected.items()))
        out["rejected_reasons"] = reasons  # in metrics.jsonl with the window's line
        if rank() == 0:
            log.info("window %d: unusable uploads: %s", window, reasons)
    payloads = [have[u] for u in chosen]
    out["bytes_down"] = float(sum(len(b) for b in payloads))
    return out, payloads


def share_uploads(uploads: Sequence[Upload]) -> list[bytes]:
    """Rank 0's ``uploads`` (already verified: the validator's, a joiner's replay) as payload
    bytes on every rank, ascending uid (raw uint8 broadcasts, never unpickled). Collective."""
    blobs = [u.payload for u in sorted(uploads, key=lambda u: u.uid)] if rank() == 0 else None
    sizes = broadcast_obj([len(b) for b in blobs] if blobs is not None else None)
    return broadcast_bytes(blobs, sizes)


def aggregate_agreed(
    services: Services | None,
    ctx: WindowContext,
    codec: Codec,
    payloads: list[bytes],
    shapes: Mapping[str, tuple[int, ...]],
    owned: list[ParamShard],
    skip_reason: str = "",
) -> tuple[dict[str, torch.Tensor], str]:
    """Every rank aggregates its own slices of ``payloads``; a plugin may decline the result
    (``covenant_apply_aggregate``); then the ranks agree. Collective.

    Returns ``(update, "")`` on every rank when all ranks may apply, else ``({}, reason)`` on
    every rank (the reason is this rank's, or ``skip_reason``): the apply commits on all ranks
    or on none."""
    update: dict[str, torch.Tensor] = {}
    reason = skip_reason
    if payloads:
        try:
            update = codec.aggregate(payloads, shapes, owned=owned)
        except Exception as exc:  # any failure on any rank: every rank skips
            reason = f"aggregate failed on rank {rank()}: {exc}"
            log.warning("outer step: %s", reason)
            update = {}
    if update and services is not None and services.hook.covenant_apply_aggregate(ctx=ctx) is False:
        reason = "a plugin declined to apply the aggregate"
    if all_ok(bool(update) and not reason):
        return update, ""
    reason = reason or "a rank failed to aggregate"
    if payloads:
        log.warning("window %d: nothing applied (%s)", ctx.window, reason)
    return {}, reason


def put_sync_sample(services: Services | None, window: int, values: dict[str, Any]) -> None:
    """Gather every rank's sync values (:func:`sync_values`) and upload the sample
    ``debug/{window}/{uid}`` from rank 0. Collective; a failed upload costs sync score, not the
    window."""
    parts = gather_to_rank0(values)
    if rank() != 0 or parts is None or services is None:
        return
    merged = {k: v for part in parts for k, v in part.items()}
    try:
        services.exchange.put_sync_sample(window, sync_pairs(merged))
    except Exception as exc:
        log.warning("window %d: sync sample upload failed: %s", window, exc)


__all__ = [
    "aggregate_agreed",
    "all_gather_obj",
    "all_ok",
    "broadcast_bytes",
    "broadcast_obj",
    "contributes",
    "fetch_listed",
    "gather_checked",
    "gather_to_rank0",
    "local_index",
    "put_sync_sample",
    "rank",
    "share_uploads",
    "sync_pairs",
    "sync_values",
    "upload_at_window_end",
    "world",
]
