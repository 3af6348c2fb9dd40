"""The training loop of one peer, short and top to bottom (in the manner of torchtitan's train()).

    prepare data -> build model -> resume -> for each window (from the clock):
        outer step begin (snapshot) -> window start hooks
        -> inner steps until H or the window ends: batch -> step -> log -> evaluate?
        -> outer step end (upload, gather, apply; every rank or none) -> window end hooks
        -> checkpoint (a miner: every window, atomically)
    -> final checkpoint -> shutdown

A peer training alone (``[outer] name = "none"``) counts windows as ``step // H``; a miner
(an outer step enabled) takes its windows from the chain (:mod:`covenant.engine.window`).
What a step trains on is a pure function of ``(uid, window, outer step, inner step)``
(:mod:`covenant.engine.data.assignment`), and the learning rate a pure function of the global
inner step ``outer_step * H + i`` (:mod:`covenant.engine.schedule`), so a resumed or late peer
replays exactly what everyone else does. Everything optional (the outer step, logging, scoring)
hangs off hooks and the outer-step protocol, never off ``if`` branches here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covenant.engine.catchup import CatchUpError, catch_up
from covenant.engine.checkpoint import (
    Checkpointer,
    CheckpointMeta,
    fingerprint,
    rng_state,
    set_rng_state,
)
from covenant.engine.data.assignment import (
    check_batch_layout,
    rank_share,
    receipt,
    sample_pool,
    step_ids,
)
from covenant.engine.data.config import DataConfig
from covenant.engine.data.prepare import default_data_dir, prepare_from_config
from covenant.engine.data.shards import Manifest, ShardDataset, open_active_shard
from covenant.engine.errors import ConfigError, CovenantError
from covenant.engine.protocols import ModelRuntime, OuterStep, Receipt, StepResult, WindowContext
from covenant.engine.schedule import TrainConfig, learning_rate
from covenant.engine.session import Session
from covenant.engine.window import (
    ChainClock,
    OuterConfig,
    PeerState,
    StepClock,
    agree,
    check_outer_config,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished ``covenant train`` reports (rank 0's view; losses equal on all ranks)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    run_dir: Path | None = None
    windows: list[dict[str, float]] = field(default_factory=list)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class DataFeed:
    """This rank's token batches for any (window, outer step, inner step), plus validation."""

    def __init__(
        self,
        data_dir: Path,
        manifest: Manifest,
        cfg: DataConfig,
        train: TrainConfig,
        model: ModelRuntime,
    ) -> None:
        self.data_dir, self.manifest, self.cfg, self.train = data_dir, manifest, cfg, train
        self.par = model.parallel
        self._shard: tuple[int, ShardDataset] | None = None
        self._pool: tuple[tuple[int, int, int], np.ndarray] | None = None
        self.val = ShardDataset(data_dir, "val", 0, verify_hash=False, manifest=manifest)
        check_batch_layout(train.batch_size, model.micro_batch, self.par.dp)

    def shard(self, outer_step: int) -> ShardDataset:
        """The train shard active at ``outer_step`` (every peer agrees on the outer step)."""
        key = outer_step // self.cfg.windows_per_shard
        if self._shard is None or self._shard[0] != key:
            ds = open_active_shard(
                self.data_dir,
                outer_step,
                self.cfg.windows_per_shard,
                verify_hash=False,
                manifest=self.manifest,
            )
            self._shard = (key, ds)
        return self._shard[1]

    def pool(self, uid: int, window: int, outer_step: int) -> np.ndarray:
        """The ``H*B`` sample ids ``uid`` trains on in ``window`` (SPEC section 3)."""
        key = (uid, window, outer_step // self.cfg.windows_per_shard)
        if self._pool is None or self._pool[0] != key:
            n = self.shard(outer_step).num_samples
            pool = sample_pool(uid, window, n, self.train.inner_steps, self.train.batch_size)
            self._pool = (key, pool)
        return self._pool[1]

    def receipt(self, ctx: WindowContext) -> Receipt:
        r = receipt(self.pool(ctx.uid, ctx.window, ctx.outer_step))
        return Receipt(hash=r.hash, count=r.count)

    def batch(self, ctx: WindowContext, inner: int) -> torch.Tensor:
        """Tokens of inner step ``inner`` of ``ctx``'s window for this DP rank, shape (B/D, T).

        The pool is the peer's own (``ctx.uid``) unless a plugin chose another uid's samples
        (``ctx.extras["data_uid"]``, see ``covenant_sample_uid``).
        """
        pool = self.pool(ctx.extras.get("data_uid", ctx.uid), ctx.window, ctx.outer_step)
        ids = step_ids(pool, inner, self.train.batch_size)
        return self.shard(ctx.outer_step).batch(rank_share(ids, self.par.dp_rank, self.par.dp))

    def val_batches(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` validation batches (the same every evaluation), this DP rank's share."""
        b = self.train.batch_size
        n = min(count, self.val.num_samples // b)
        if n == 0:
            raise CovenantError(
                f"{self.val.path}: {self.val.num_samples} validation samples, fewer than one batch of {b}"
            )
        return [
            self.val.batch(rank_share(np.arange(i * b, (i + 1) * b), self.par.dp_rank, self.par.dp))
            for i in range(n)
        ]


def evaluate(model: ModelRuntime, batches: list[torch.Tensor]) -> dict[str, float]:
    loss = float(np.mean([model.eval_loss(b) for b in batches]))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def open_outer_step(session: Session) -> OuterStep | None:
    """The configured outer step (``[outer] name``), or ``None`` to train alone."""
    cfg: OuterConfig = session.config.section("outer")
    if cfg.name == "none":
        return None
    outer = session.hook.covenant_outer_step(
        config=session.config, name=cfg.name, services=session.services
    )
    check_outer_config(cfg, outer)
    return outer  # type: ignore[no-any-return]


def run_training(
    session: Session, *, resume: bool = False, steps: int | None = None
) -> TrainResult:
    """Run one peer (``covenant train``): alone, or as a miner when an outer step is enabled.

    Collective over the peer's ranks.
    """
    cfg, hook = session.config, session.hook
    if steps is not None:  # the one place the loop's length is decided; consumers read train.steps
        cfg.sections["train"] = cfg.section("train").model_copy(update={"steps": steps})
    train: TrainConfig = cfg.section("train")
    outer_cfg: OuterConfig = cfg.section("outer")
    data_cfg: DataConfig = cfg.section("data")

    session.register_text_sources()
    manifest = prepare_from_config(data_cfg)
    data_dir = Path(data_cfg.dir) if data_cfg.dir is not None else default_data_dir()
    model: ModelRuntime | None = hook.covenant_build_model(config=cfg)
    if model is None:
        raise ConfigError("no model provider is enabled (enable the 'model' plugin)")
    if model.seq_len != manifest.seq_len:
        raise ConfigError(
            f"model seq_len {model.seq_len} differs from the data's seq_len {manifest.seq_len} "
            f"({data_dir}); set [data] seq_len and [model] seq_len alike"
        )
    par = model.parallel
    run_dir = session.run_dir
    if par.is_main:
        session.write_resolved()
        hook.covenant_run_started(
            config=cfg, run_dir=str(run_dir), versions=session.host.versions()
        )
    result = TrainResult(steps=0, run_dir=run_dir)
    begun = time.perf_counter()
    reason = "completed"
    error_: BaseException | None = None
    try:
        outer = open_outer_step(session)
        hook.covenant_model_built(model=model, layout=list(model.layout()))
        feed = DataFeed(data_dir, manifest, data_cfg, train, model)
        val_batches = feed.val_batches(train.eval_batches) if train.eval_every else []
        ckpt = Checkpointer(
            run_dir / "checkpoints", rank=par.rank, world_size=par.world_size, barrier=_barrier
        )
        expect = CheckpointMeta(
            step=0,
            run_id=cfg.section("run").id,
            model_fingerprint=fingerprint(cfg.to_dict().get("model", {})),
            world_size=par.world_size,
        )
        state = PeerState()
        if resume:
            state = _resume(ckpt, expect, model, outer)
        uid = agree(lambda: session.services.uid) if outer is not None else train.uid
        clock: StepClock | ChainClock
        if outer is None:
            clock = StepClock(train.steps, train.inner_steps, state.steps)
        else:
            clock = _chain_clock(session, train, outer_cfg, par.is_main)
        result.steps = first_step = state.steps
        hook.covenant_train_start(config=cfg, model=model, start_step=state.steps)
        for plan in clock.windows(state):
            caught: dict[str, Any] = {}
            if outer is not None and outer_cfg.catch_up and _behind(state, plan.window):
                caught = _catch_up(session, model, outer, state, plan.window, outer_cfg, train)
                plan = clock.refresh(plan, state)
            ctx = WindowContext(plan.window, plan.outer_step, uid, train.inner_steps)
            data_uid = hook.covenant_sample_uid(ctx=ctx)
            ctx.extras["data_uid"] = uid if data_uid is None else int(data_uid)
            if outer is not None:
                ctx.extras["receipt"] = feed.receipt(ctx)
                ctx.extras["skipped"] = list(plan.skipped)
                outer.begin(ctx, model)
            hook.covenant_window_start(ctx=ctx)
            out: StepResult | None = None
            for inner in range(plan.first_inner, plan.inner_steps):
                if clock.window_over(plan, inner):
                    break
                step = ctx.outer_step * train.inner_steps + inner  # the global inner step
                lr = learning_rate(step, train)
                t0 = time.perf_counter()
                out = model.train_step(feed.batch(ctx, inner), lr)
                dt = time.perf_counter() - t0
                ctx.steps_done += 1
                state.steps += 1
                state.tokens += out.tokens
                result.losses.append(out.loss)
                result.tokens += out.tokens
                result.steps = state.steps
                hook.covenant_inner_step_end(step=step, result=out, lr=lr)
                if par.is_main and state.steps % train.log_every == 0:
                    hook.covenant_log_metrics(
                        kind="train", step=step, metrics=_train_metrics(out, lr, dt)
                    )
                if outer is None and _due(train.eval_every, state.steps, train.steps):
                    _evaluate(hook, model, val_batches, step, state.steps, result, par.is_main)
                if outer is None and _due(train.checkpoint_every, state.steps, None):
                    _save(ckpt, expect, state, model, outer)
            metrics = outer.end(ctx, model) if outer is not None else {}
            applied = bool(metrics.get("applied", 0.0))
            state.finish(ctx.window, ctx.outer_step, applied)
            window_metrics = {
                **caught,
                "window": float(ctx.window),
                "outer_step": float(ctx.outer_step),
                "inner_steps": float(ctx.steps_done),
                **({"loss": out.loss} if out is not None else {}),
                **metrics,
            }
            hook.covenant_window_end(ctx=ctx, metrics=window_metrics)
            if outer is not None and train.eval_every:
                at = ctx.outer_step * train.inner_steps + ctx.steps_done
                window_metrics.update(
                    _evaluate(hook, model, val_batches, at, ctx.window, result, par.is_main)
                )
            result.windows.append(window_metrics)
            if outer is not None:  # saved before the line is logged: a line means it is kept
                _save(ckpt, expect, state, model, outer)
                if par.is_main:
                    window_metrics["pruned"] = float(_prune(session, ctx.window))
            if par.is_main:
                hook.covenant_log_metrics(kind="window", step=ctx.window, metrics=window_metrics)
        if (
            outer is None
            and state.steps > first_step
            and not _due(train.checkpoint_every, state.steps, None)
        ):
            _save(ckpt, expect, state, model, outer)
    except KeyboardInterrupt as exc:
        reason, error_ = "interrupted", exc
        raise
    except BaseException as exc:
        reason, error_ = "error", exc
        raise
    finally:
        result.seconds = time.perf_counter() - begun
        hook.covenant_shutdown(reason=reason, error=error_)
        model.close()
    return result


def _chain_clock(
    session: Session, train: TrainConfig, outer_cfg: OuterConfig, is_main: bool
) -> ChainClock:
    """The miner's clock; only global rank 0 reads the chain (the others get its decisions)."""
    services = session.services if is_main else None

    def timing() -> tuple[int, float]:
        assert services is not None
        return int(services.chain.blocks_per_window), float(services.exchange.upload_grace_s)

    bpw, grace = agree(timing)
    return ChainClock(
        services,
        train.inner_steps,
        blocks_per_window=bpw,
        upload_grace_s=grace,
        max_windows=outer_cfg.max_windows,
        start_wait_s=outer_cfg.start_wait_s,
    )


def _catch_up(
    session: Session,
    model: ModelRuntime,
    outer: OuterStep,
    state: PeerState,
    window: int,
    cfg: OuterConfig,
    train: TrainConfig,
) -> dict[str, Any]:
    """Catch up before ``window``; a catch-up that cannot finish (a record never published,
    an upload gone) is logged and the miner trains on what it holds: its sync score will say
    so, and a later checkpoint brings it back. Never a crash."""
    try:
        return catch_up(
            session.services if model.parallel.is_main else None,
            model,
            outer,
            state,
            window,
            cfg,
            session.run_dir / "catchup",
            inner_steps=train.inner_steps,
            record_wait_s=cfg.record_wait_s,
        )
    except CatchUpError as exc:
        log.error("catch-up before window %d stopped: %s; training on regardless", window, exc)
        state.last_window = window - 1  # do not wait for the same record again next window
        return {"catch_up_failed": 1.0, "skip_reason": f"catch-up: {exc}"}


def _prune(session: Session, window: int) -> int:
    """Retention of this miner's own uploads (rank 0); a failure costs storage, not the run."""
    try:
        return int(session.services.exchange.prune(window))
    except Exception as exc:
        log.warning("retention after window %d failed: %s", window, exc)
        return 0


def _behind(state: PeerState, window: int) -> bool:
    """Whether this peer's weights are older than the end of ``window - 1``."""
    return state.last_window is None or state.last_window < window - 1


def _due(every: int, done: int, last: int | None) -> bool:
    return bool(every) and (done % every == 0 or (last is not None and done == last))


def _train_metrics(out: StepResult, lr: float, dt: float) -> dict[str, float]:
    return {
        "loss": out.loss,
        "lr": lr,
        "grad_norm": out.grad_norm,
        "tokens": out.tokens,
        "tokens_per_s": out.tokens / dt if dt > 0 else 0.0,
        "step_time_s": dt,
    }


def _evaluate(
    hook: Any,
    model: ModelRuntime,
    batches: list[torch.Tensor],
    step: int,
    key: int | None,
    result: TrainResult,
    is_main: bool,
) -> dict[str, float]:
    metrics = evaluate(model, batches)
    result.val_losses[key if key is not None else step] = metrics["val_loss"]
    hook.covenant_evaluate_end(step=step, metrics=metrics)
    if is_main:
        hook.covenant_log_metrics(kind="eval", step=step, metrics=metrics)
    return metrics


def _resume(
    ckpt: Checkpointer, expect: CheckpointMeta, model: ModelRuntime, outer: OuterStep | None
) -> PeerState:
    latest = ckpt.latest()
    if latest is None:
        raise CovenantError(f"--resume: no checkpoint in {ckpt.root}")
    meta, state = ckpt.load(latest, expect)
    model.load_state_dict(state["model"])
    set_rng_state(state["rng"])
    if outer is not None:
        if "outer" not in state:
            raise CovenantError(f"{latest}: holds no outer-step state (written by a solo run)")
        outer.load_state_dict(state["outer"])
    peer = PeerState.from_dict(state.get("peer", {"steps": meta.step}))
    log.info(
        "resumed from %s (step %d%s)",
        latest,
        peer.steps,
        f", last window {peer.last_window}" if peer.last_window is not None else "",
    )
    return peer


def _save(
    ckpt: Checkpointer,
    expect: CheckpointMeta,
    state: PeerState,
    model: ModelRuntime,
    outer: OuterStep | None,
) -> None:
    meta = CheckpointMeta(
        step=state.steps,
        run_id=expect.run_id,
        model_fingerprint=expect.model_fingerprint,
        world_size=expect.world_size,
        window=state.last_window if outer is not None else None,
    )
    payload: dict[str, Any] = {
        "model": model.state_dict(),
        "rng": rng_state(),
        "step": state.steps,
        "peer": state.to_dict(),
    }
    if outer is not None:
        payload["outer"] = outer.state_dict()
    ckpt.save(
        meta, payload, write_extra=lambda folder: model.save_full_weights(str(folder / "weights"))
    )


__all__ = ["DataFeed", "TrainResult", "evaluate", "open_outer_step", "run_training"]
