"""Helpers for the metrics-consumer tests: a hook driver over an engine session."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from covenant.engine.session import Session
from covenant.plugins.logging import console, jsonl, wandb_plugin

CONSUMERS: dict[str, ModuleType] = {"console": console, "jsonl": jsonl, "wandb": wandb_plugin}


class Run:
    """A session plus shortcuts that fire the hooks the way the engine does on rank 0."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.hook = session.hook
        self.dir = session.run_dir

    def start(self, start_step: int = 0) -> None:
        self.session.write_resolved()
        self.hook.covenant_run_started(
            config=self.session.config, run_dir=str(self.dir), versions=self.session.host.versions()
        )
        self.hook.covenant_train_start(
            config=self.session.config, model=None, start_step=start_step
        )

    def log(self, kind: str, step: int, **metrics: Any) -> None:
        self.hook.covenant_log_metrics(metrics=metrics, step=step, kind=kind)

    def shutdown(self, reason: str = "completed", error: BaseException | None = None) -> None:
        self.hook.covenant_shutdown(reason=reason, error=error)
