"""The validator process (``covenant validate``): one window after another, on chain time.

    build the model (no inner loop) -> the scorer (``covenant_scorer``, the gauntlet by default)
    -> restore its state -> the scorer's first window (the lead validator publishes
    ``start_window`` and a peer list if there are none) -> for each window S:
        wait until S's upload interval has closed (chain time)
        -> scorer.process_window(S)  (checks, scores, ratings, weights, records, aggregate)
        -> save everything atomically (model, scorer state, last window)

A validator killed at any point restarts from its last saved window and never processes a
window twice. The scorer is told how far behind the chain it is and skips the slow stage (loss
evaluation) of a window whose successor has already ended, but never a window's aggregate
record: miners and joiners depend on one for every window.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covenant.engine.checkpoint import Checkpointer, CheckpointMeta, fingerprint
from covenant.engine.errors import ConfigError, CovenantError
from covenant.engine.protocols import ModelRuntime, Scorer
from covenant.engine.session import Session
from covenant.engine.window import OuterConfig

log = logging.getLogger(__name__)


@dataclass
class ValidatorResult:
    windows: list[int] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None


def run_validator(
    session: Session,
    *,
    windows: int | None = None,
    resume: bool = True,
    sleep: Any = time.sleep,
) -> ValidatorResult:
    """Run the validator until stopped (or for ``windows`` windows). Single process."""
    cfg, hook = session.config, session.hook
    outer_cfg: OuterConfig = cfg.section("outer")
    if outer_cfg.name == "none":
        raise ConfigError(
            "[outer] name = 'none': a validator needs the miners' outer step to read their "
            "payloads (set [outer] name, e.g. 'sparseloco', and enable that plugin)"
        )
    model: ModelRuntime | None = hook.covenant_build_model(config=cfg)
    if model is None:
        raise ConfigError("no model provider is enabled (enable the 'model' plugin)")
    if model.parallel.world_size != 1:
        model.close()
        raise ConfigError("covenant validate runs as one process (no torchrun layout yet)")
    run_dir = session.run_dir
    session.write_resolved()
    hook.covenant_run_started(config=cfg, run_dir=str(run_dir), versions=session.host.versions())
    result = ValidatorResult(run_dir=run_dir)
    reason: str = "completed"
    error_: BaseException | None = None
    try:
        scorer: Scorer | None = hook.covenant_scorer(
            config=cfg, services=session.services, model=model
        )
        if scorer is None:
            raise ConfigError("no scorer is enabled (enable the 'gauntlet' plugin)")
        # the scorer's local checkpoints: ``covenant replay`` needs the one before a record
        scoring = cfg.section("gauntlet") if cfg.has("gauntlet") else None
        keep = int(getattr(scoring, "keep_window_checkpoints", 2))
        ckpt = Checkpointer(run_dir / "checkpoints", rank=0, world_size=1, keep=keep)
        expect = CheckpointMeta(
            step=0,
            run_id=cfg.section("run").id,
            model_fingerprint=fingerprint(cfg.to_dict().get("model", {})),
            world_size=1,
        )
        last: int | None = None
        if resume and ckpt.latest() is not None:
            latest = ckpt.latest()
            assert latest is not None
            meta, state = ckpt.load(latest, expect)
            model.load_state_dict(state["model"])
            scorer.load_state_dict(state["scorer"])
            last = meta.window
            log.info("validator resumed from %s (last window %s)", latest, last)
        window = scorer.first_window(last)
        exchange = session.services.exchange
        chain = session.services.chain
        done = 0
        while windows is None or done < windows:
            _, hi = exchange.upload_interval(window)
            while chain.block_timestamp(int(chain.block())) <= hi:
                sleep(min(1.0, max(0.05, chain.block_timestamp(1) - chain.block_timestamp(0))))
            metrics = scorer.process_window(window)
            _save(ckpt, expect, window, model, scorer)
            hook.covenant_log_metrics(kind="validator", step=window, metrics=metrics)
            result.windows.append(window)
            result.metrics.append(dict(metrics))
            window += 1
            done += 1
    except KeyboardInterrupt as exc:
        reason, error_ = "interrupted", exc
        raise
    except BaseException as exc:
        reason, error_ = "error", exc
        raise
    finally:
        hook.covenant_shutdown(reason=reason, error=error_)
        model.close()
    return result


def check_validator_plugins(session: Session) -> None:
    """Refuse plugins that declare themselves miner-only (``COVENANT_ROLES`` without
    ``"validator"``): a validator must not run an adversary or a cross-peer DDP hook."""
    pm = session.host.pm
    for plugin in pm.get_plugins():
        roles = getattr(plugin, "COVENANT_ROLES", None)
        if roles is not None and "validator" not in roles:
            name = pm.get_name(plugin) or repr(plugin)
            raise ConfigError(
                f"plugin '{name}' is for {', '.join(roles)} only and must not be enabled in a "
                "validator's config ([plugins] enable)"
            )


def _save(
    ckpt: Checkpointer, expect: CheckpointMeta, window: int, model: ModelRuntime, scorer: Scorer
) -> None:
    meta = CheckpointMeta(
        step=0,
        run_id=expect.run_id,
        model_fingerprint=expect.model_fingerprint,
        world_size=1,
        window=window,
    )
    ckpt.save(meta, {"model": model.state_dict(), "scorer": scorer.state_dict()})


__all__ = ["CovenantError", "ValidatorResult", "check_validator_plugins", "run_validator"]
