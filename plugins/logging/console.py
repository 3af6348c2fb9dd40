"""The ``console`` metrics consumer: a rich progress bar and a table at each evaluation.

On a terminal it shows one live line (step/total, loss, lr, tokens/s, elapsed, ETA) on
stderr and prints a short evaluation table (step, val loss, ppl, best so far) above it. Where
stderr is not a terminal (CI, a log file) a live bar would only produce noise, so it falls back
to plain lines every ``plain_interval_s`` seconds (and at the last step), with its own ETA.

The display itself is the CLI's (:mod:`covenant.engine.cli.progress`); this plugin owns the
``[console]`` section, feeds the display from the metrics hooks on rank 0, and contains its
failures so that they never reach training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from covenant.engine.cli.progress import TrainProgress, format_eta, format_rate
from covenant.engine.hookspecs import hookimpl
from covenant.plugins.logging.common import Consumer, contained, open_consumer, process_rank

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

__all__ = ["ConsoleConfig", "ConsoleView", "format_eta", "format_rate"]


class ConsoleConfig(BaseModel):
    """``[console]``: the progress bar and evaluation table on stderr (rank 0)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="show progress and evaluation output at all")
    refresh_per_second: float = Field(4.0, gt=0, le=60, description="live bar redraws per second")
    show_eval_table: bool = Field(True, description="print a table at each evaluation")
    table_rows: int = Field(5, ge=1, le=100, description="most recent evaluations in the table")
    plain_interval_s: float = Field(
        30.0,
        ge=0,
        description="without a terminal: seconds between plain progress lines (0: every step)",
    )
    force_terminal: bool | None = Field(
        None, description="true/false overrides the terminal detection (None: detect)"
    )


# ---------------------------------------------------------------------------------------------
# The view: the CLI's progress display, made failure-proof for use inside training
# ---------------------------------------------------------------------------------------------


class ConsoleView(Consumer, TrainProgress):
    """:class:`~covenant.engine.cli.progress.TrainProgress` that disables itself on failure."""

    name = "console"

    def __init__(
        self,
        cfg: ConsoleConfig,
        total_steps: int | None,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        Consumer.__init__(self)
        TrainProgress.__init__(self, cfg, total_steps, console, clock)

    start = contained(TrainProgress.start)
    train = contained(TrainProgress.train)
    evaluation = contained(TrainProgress.evaluation)
    close = contained(TrainProgress.close)

    def release(self) -> None:
        TrainProgress.release(self)


# ---------------------------------------------------------------------------------------------
# Hook implementations (rank 0 only: run_started opens the view there and nowhere else)
# ---------------------------------------------------------------------------------------------

_view: ConsoleView | None = None


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("console", ConsoleConfig)


@hookimpl
def covenant_run_started(config: Any, run_dir: str, versions: Mapping[str, str]) -> None:
    global _view
    _close("replaced", None)

    def build() -> ConsoleView | None:
        cfg: ConsoleConfig = config.typed("console", ConsoleConfig)
        if not cfg.enabled or process_rank() != 0:
            return None
        total = config.section("train").steps if config.has("train") else None
        return ConsoleView(cfg, total)

    _view = open_consumer("console", build)


@hookimpl
def covenant_train_start(config: Any, model: Any, start_step: int) -> None:
    if _view is not None:
        _view.start(start_step)


@hookimpl
def covenant_log_metrics(metrics: Mapping[str, Any], step: int, kind: str) -> None:
    if _view is None:
        return
    if kind == "train":
        _view.train(step, metrics)
    elif kind == "eval":
        _view.evaluation(step, metrics)


@hookimpl
def covenant_evaluate_end(step: int, metrics: Mapping[str, float]) -> None:
    if _view is not None:
        _view.evaluation(step, metrics)


@hookimpl
def covenant_shutdown(reason: str, error: BaseException | None) -> None:
    _close(reason, error)


def _close(reason: str, error: BaseException | None) -> None:
    global _view
    if _view is not None:
        _view.close(reason, error)
        _view = None
