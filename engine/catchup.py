"""Catch-up: bring a late, restarted or stale peer to the run's current model (SPEC section 9).

Before a miner trains window ``w`` it must hold the weights after window ``w - 1``. When its own
state is older (``last`` = the last window it finished) it:

1. loads the lead validator's latest checkpoint when it has no state or is more than
   ``[outer] catch_up_max_windows`` behind (downloads resume; every file is checked against the
   manifest the validator signed before anything is loaded; any TP/PP layout loads it);
2. replays every later window's aggregate record in order: re-downloads the uploads it lists,
   checks their hashes, applies them through the outer step (``OuterStep.apply``, the same code
   that applies a live window); a record that is not published yet is waited for, never skipped;
3. compares its sync sample with the validator's for the last window both have; if they differ
   by more than ``sync_tolerance``, it reloads the checkpoint and replays again (a few times),
   then says so loudly rather than train on a model nobody else holds.

Only global rank 0 talks to storage; decisions and the downloaded checkpoint folder (on the
peer's own disk) reach the other ranks through :func:`covenant.engine.window.agree`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covenant.engine.errors import CovenantError
from covenant.engine.protocols import (
    AggregateRecord,
    ModelRuntime,
    OuterStep,
    Upload,
    UploadRejection,
    WindowContext,
)
from covenant.engine.window import OuterConfig, PeerState, agree

if TYPE_CHECKING:
    from covenant.engine.services import Services

log = logging.getLogger(__name__)

RECORD_POLL_S = 1.0


class CatchUpError(CovenantError):
    """The peer could not be brought to the run's model (no checkpoint, a record never came)."""


def sync_values(model: ModelRuntime) -> dict[str, tuple[float, float]]:
    """This rank's values at global flat positions 10 and 11 (whole tensors only)."""
    out = {}
    for shard in model.layout():
        if shard.local_shape != shard.global_shape or math.prod(shard.global_shape) < 12:
            continue
        flat = model.local_parameters()[shard.name].detach().reshape(-1)
        out[shard.name] = (float(flat[10]), float(flat[11]))
    return out


def catch_up(
    services: Services | None,
    model: ModelRuntime,
    outer: OuterStep,
    state: PeerState,
    target: int,
    cfg: OuterConfig,
    work_dir: Path,
    *,
    inner_steps: int,
    record_wait_s: float = 600.0,
    sleep: Any = time.sleep,
) -> dict[str, float]:
    """Bring ``model`` to the weights after window ``target - 1``; updates ``state``.

    Collective over the peer's ranks; ``services`` is used on global rank 0 only. Returns
    metrics (windows replayed, checkpoint loaded, seconds).
    """
    t0 = time.perf_counter()
    metrics: dict[str, float] = {"checkpoint": -1.0, "replayed": 0.0, "reloads": 0.0}
    cap = _payload_cap(outer, model)
    for attempt in range(cfg.catch_up_retries + 1):
        behind = None if state.last_window is None else target - 1 - state.last_window
        if behind is not None and behind <= 0:
            break
        if behind is None or behind > cfg.catch_up_max_windows or attempt > 0:
            info = agree(lambda: _fetch_checkpoint(services, work_dir))
            if info is None:
                if state.last_window is None:
                    log.info("no checkpoint published yet: starting from the seeded weights")
                    break
            else:
                window, outer_step, path = info
                if state.last_window is None or window > state.last_window or attempt > 0:
                    model.load_full_weights(path)
                    state.finish(window, max(0, outer_step - 1), applied=True)
                    state.outer_step = outer_step
                    metrics["checkpoint"] = float(window)
                    _reset_outer(outer)
                    log.info("loaded checkpoint of window %d (outer step %d)", window, outer_step)
        replayed = _replay(
            services, model, outer, state, target, inner_steps, record_wait_s, sleep, cap
        )
        metrics["replayed"] += replayed
        if _in_sync(services, model, state):
            break
        metrics["reloads"] += 1
        log.warning(
            "after catching up to window %s the model differs from the validator's; reloading",
            state.last_window,
        )
    else:
        log.error(
            "could not match the validator's model after %d reloads; training on regardless "
            "(this peer's sync score will be low)",
            cfg.catch_up_retries,
        )
    metrics["catch_up_s"] = time.perf_counter() - t0
    return metrics


def _reset_outer(outer: OuterStep) -> None:
    """A loaded checkpoint makes the outer step's own buffers meaningless: clear them."""
    state = outer.state_dict()
    if "errors" in state:
        outer.load_state_dict({**state, "errors": {}})


def _fetch_checkpoint(services: Services | None, work_dir: Path) -> tuple[int, int, str] | None:
    assert services is not None
    info = services.exchange.fetch_checkpoint(str(work_dir / "checkpoint"))
    if info is None:
        return None
    return info.window, info.outer_step, info.path


def _replay(
    services: Services | None,
    model: ModelRuntime,
    outer: OuterStep,
    state: PeerState,
    target: int,
    inner_steps: int,
    record_wait_s: float,
    sleep: Any,
    cap: int,
) -> float:
    """Apply the aggregate records of windows ``last + 1 .. target - 1`` in order."""
    if state.last_window is None:
        return 0.0
    done = 0
    for window in range(state.last_window + 1, target):
        record = agree(lambda w=window: _wait_for_record(services, w, record_wait_s, sleep))
        if record is None:
            raise CatchUpError(
                f"the aggregate record of window {window} did not appear within "
                f"{record_wait_s:.0f} s; cannot replay past it"
            )
        outer_step, listed = record
        ctx = WindowContext(window, outer_step, -1, inner_steps)
        applied = False
        if listed:
            uploads = agree(lambda w=window, r=listed: _fetch_listed(services, w, r, cap))
            if uploads is None:
                raise CatchUpError(f"window {window}: a listed upload is missing or altered")
            out = outer.apply(ctx, model, uploads if model.parallel.is_main else [])
            applied = bool(out.get("applied", 0.0))
            if not applied:
                raise CatchUpError(f"window {window}: replaying the aggregate failed")
        state.finish(window, outer_step, applied)
        done += 1
        log.info("replayed window %d (%d uploads)", window, len(listed))
    return float(done)


def _wait_for_record(
    services: Services | None, window: int, wait_s: float, sleep: Any
) -> tuple[int, list[tuple[int, str]]] | None:
    assert services is not None
    waited = 0.0
    while True:
        record: AggregateRecord | None = services.exchange.aggregate_record(window)
        if record is not None:
            return record.outer_step, list(record.uploads)
        if waited >= wait_s:
            return None
        sleep(RECORD_POLL_S)
        waited += RECORD_POLL_S


def _payload_cap(outer: OuterStep, model: ModelRuntime) -> int:
    """The largest valid payload for this model (collective: every rank's tensors count)."""
    import torch.distributed as dist

    mine = [(s.name, tuple(s.global_shape)) for s in model.layout()]
    parts = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, mine)
    shapes = dict(x for part in parts for x in part)
    if outer.codec is None:
        return 1 << 40
    return int(outer.codec.max_payload_bytes(shapes))


def _fetch_listed(
    services: Services | None,
    window: int,
    listed: list[tuple[int, str]],
    cap: int,
) -> list[Upload] | None:
    assert services is not None
    uploads: list[Upload] = []
    for uid, sha in listed:
        got = services.exchange.fetch_gradient_by_hash(window, uid, sha, max_bytes=cap)
        if isinstance(got, UploadRejection):
            log.warning("window %d: listed upload of uid %d unusable: %s", window, uid, got.detail)
            return None
        uploads.append(got)
    return uploads


def _in_sync(services: Services | None, model: ModelRuntime, state: PeerState) -> bool:
    """Whether this peer's sample equals the lead validator's for ``state.last_window``."""
    mine = sync_values(model)
    verdict = agree(lambda: _compare(services, state.last_window, mine))
    return bool(verdict)


def _compare(
    services: Services | None, window: int | None, mine: Mapping[str, tuple[float, float]]
) -> bool:
    assert services is not None
    if window is None:
        return True
    lead = services.lead()
    if lead is None:
        return True
    sample = services.exchange.fetch_sync_sample(window, lead.uid)
    if isinstance(sample, UploadRejection):
        return True  # nothing to compare with yet: the live sync score will tell
    diffs: list[float] = []
    for name, (a0, a1) in mine.items():
        theirs = sample.values.get(name)
        if theirs is not None:
            diffs += [abs(a0 - theirs[0]), abs(a1 - theirs[1])]
    if not diffs:
        return True
    worst = max(diffs)
    if worst > SYNC_TOLERANCE:
        log.warning("window %d: largest difference to the validator's sample %.3g", window, worst)
        return False
    return True


SYNC_TOLERANCE = 1e-6


__all__ = ["CatchUpError", "catch_up", "sync_values"]
