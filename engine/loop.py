"""The training loop of one peer, short and top to bottom (in the manner of torchtitan's train()).

    prepare data -> build model -> resume -> for each inner step:
        window start? (hooks; the outer step attaches here) -> batch -> step -> log
        -> evaluate? -> checkpoint? -> window end? (hooks)
    -> final checkpoint -> shutdown

What a step trains on is a pure function of ``(uid, window, inner step)``
(:mod:`covenant.engine.data.assignment`), and the learning rate a pure function of the global
inner step (:mod:`covenant.engine.schedule`), so a resumed run replays exactly what the
uninterrupted one would have done. Everything optional (outer step, logging, scoring) hangs
off hooks, never off ``if`` branches here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from covenant.engine.checkpoint import (
    Checkpointer,
    CheckpointMeta,
    fingerprint,
    rng_state,
    set_rng_state,
)
from covenant.engine.data.assignment import check_batch_layout, rank_share, sample_pool, step_ids
from covenant.engine.data.config import DataConfig
from covenant.engine.data.prepare import default_data_dir, prepare_from_config
from covenant.engine.data.shards import Manifest, ShardDataset, open_active_shard
from covenant.engine.errors import ConfigError, CovenantError
from covenant.engine.protocols import ModelRuntime, StepResult, WindowContext
from covenant.engine.schedule import TrainConfig, learning_rate
from covenant.engine.session import Session

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


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class DataFeed:
    """This rank's token batches for any global inner step, plus validation batches."""

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
        self._pool: tuple[tuple[int, int], np.ndarray] | None = None
        self.val = ShardDataset(data_dir, "val", 0, verify_hash=False, manifest=manifest)
        check_batch_layout(train.batch_size, model.micro_batch, self.par.dp)

    def shard(self, window: int) -> ShardDataset:
        if self._shard is None or self._shard[0] != window // self.cfg.windows_per_shard:
            ds = open_active_shard(
                self.data_dir,
                window,
                self.cfg.windows_per_shard,
                verify_hash=False,
                manifest=self.manifest,
            )
            self._shard = (window // self.cfg.windows_per_shard, ds)
        return self._shard[1]

    def batch(self, step: int) -> torch.Tensor:
        """Tokens of global inner step ``step`` for this DP rank, shape (B / D, T)."""
        window, inner = divmod(step, self.train.inner_steps)
        shard = self.shard(window)
        key = (self.train.uid, window)
        if self._pool is None or self._pool[0] != key:
            pool = sample_pool(
                self.train.uid,
                window,
                shard.num_samples,
                self.train.inner_steps,
                self.train.batch_size,
            )
            self._pool = (key, pool)
        ids = step_ids(self._pool[1], inner, self.train.batch_size)
        return shard.batch(rank_share(ids, self.par.dp_rank, self.par.dp))

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


def run_training(
    session: Session, *, resume: bool = False, steps: int | None = None
) -> TrainResult:
    """Run the inner loop of one peer (``covenant train``). Collective over the peer's ranks."""
    cfg, hook = session.config, session.hook
    if steps is not None:  # the one place the loop's length is decided; consumers read train.steps
        cfg.sections["train"] = cfg.section("train").model_copy(update={"steps": steps})
    train: TrainConfig = cfg.section("train")
    total = train.steps
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
        start = 0
        if resume:
            latest = ckpt.latest()
            if latest is None:
                raise CovenantError(f"--resume: no checkpoint in {ckpt.root}")
            meta, state = ckpt.load(latest, expect)
            model.load_state_dict(state["model"])
            set_rng_state(state["rng"])
            start = meta.step
            log.info("resumed from %s at step %d", latest, start)
        result.steps = start
        hook.covenant_train_start(config=cfg, model=model, start_step=start)
        for step in range(start, total):
            window, inner = divmod(step, train.inner_steps)
            ctx = WindowContext(
                window=window, outer_step=window, uid=train.uid, inner_steps=train.inner_steps
            )
            if inner == 0 or step == start:
                hook.covenant_window_start(ctx=ctx)
            lr = learning_rate(step, train)
            t0 = time.perf_counter()
            out: StepResult = model.train_step(feed.batch(step), lr)
            dt = time.perf_counter() - t0
            result.losses.append(out.loss)
            result.tokens += out.tokens
            result.steps = step + 1
            hook.covenant_inner_step_end(step=step, result=out, lr=lr)
            if par.is_main and (step + 1) % train.log_every == 0:
                hook.covenant_log_metrics(
                    kind="train",
                    step=step,
                    metrics={
                        "loss": out.loss,
                        "lr": lr,
                        "grad_norm": out.grad_norm,
                        "tokens": out.tokens,
                        "tokens_per_s": out.tokens / dt if dt > 0 else 0.0,
                        "step_time_s": dt,
                    },
                )
            if train.eval_every and ((step + 1) % train.eval_every == 0 or step + 1 == total):
                metrics = evaluate(model, val_batches)
                result.val_losses[step + 1] = metrics["val_loss"]
                hook.covenant_evaluate_end(step=step, metrics=metrics)
                if par.is_main:
                    hook.covenant_log_metrics(kind="eval", step=step, metrics=metrics)
            if train.checkpoint_every and (step + 1) % train.checkpoint_every == 0:
                _save(ckpt, expect, step + 1, model)
            if inner == train.inner_steps - 1:
                window_metrics = {"window": float(window), "loss": out.loss}
                hook.covenant_window_end(ctx=ctx, metrics=window_metrics)
                if par.is_main:
                    hook.covenant_log_metrics(kind="window", step=window, metrics=window_metrics)
        if result.steps > start and (
            not train.checkpoint_every or result.steps % train.checkpoint_every
        ):
            _save(ckpt, expect, result.steps, model)
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


def _save(ckpt: Checkpointer, expect: CheckpointMeta, step: int, model: ModelRuntime) -> None:
    meta = CheckpointMeta(
        step=step,
        run_id=expect.run_id,
        model_fingerprint=expect.model_fingerprint,
        world_size=expect.world_size,
    )
    ckpt.save(
        meta,
        {"model": model.state_dict(), "rng": rng_state(), "step": step},
        write_extra=lambda folder: model.save_full_weights(str(folder / "weights")),
    )


__all__ = ["DataFeed", "TrainResult", "evaluate", "run_training"]
