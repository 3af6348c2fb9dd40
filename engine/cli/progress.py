"""The training progress display: a rich progress bar and a table at each evaluation.

On a terminal it shows one live line (step/total, loss, lr, tokens/s, elapsed, ETA) on stderr
and prints a short evaluation table (step, val loss, ppl, best so far) above it. Where stderr is
not a terminal (CI, a log file) a live bar would only produce noise, so it falls back to plain
lines every ``plain_interval_s`` seconds (and at the last step), with its own ETA.

This is console output, so it lives with the CLI; the ``console`` plugin
(:mod:`covenant.plugins.logging.console`) feeds it from the metrics hooks on rank 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["EvalRow", "ProgressSettings", "TrainProgress", "format_eta", "format_rate"]


class ProgressSettings(Protocol):
    """What the display needs from its config (the ``[console]`` section has these fields)."""

    refresh_per_second: float
    show_eval_table: bool
    table_rows: int
    plain_interval_s: float
    force_terminal: bool | None


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any, spec: str) -> str:
    number = _num(value)
    if number is None:
        return "-"
    if not math.isfinite(number):
        return str(number)
    return format(number, spec)


def format_rate(value: Any) -> str:
    """``12345.6`` -> ``"12.3k"``; missing -> ``"-"``."""
    number = _num(value)
    if number is None or not math.isfinite(number):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.1f}{unit}"
    return f"{number:.0f}"


def format_eta(seconds: float | None) -> str:
    """``3725`` -> ``"1:02:05"``; unknown -> ``"-:--:--"``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclass(frozen=True)
class EvalRow:
    step: int
    val_loss: float | None
    ppl: float | None
    best: float | None


# ---------------------------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------------------------


class TrainProgress:
    """Progress and evaluation output for one run; usable on its own with any rich Console."""

    def __init__(
        self,
        cfg: ProgressSettings,
        total_steps: int | None,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.console import Console

        self.cfg = cfg
        self.total = total_steps
        self.console = console or Console(stderr=True, force_terminal=cfg.force_terminal)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self._clock = clock
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._started = False
        self._t0 = 0.0
        self._start_step = 0
        self._last_plain = -math.inf
        self.step: int | None = None  # last finished inner step (0-based)
        self.last: dict[str, Any] = {}
        self.best: float | None = None
        self.evals: list[EvalRow] = []

    # -- train --------------------------------------------------------------------------------

    def start(self, start_step: int) -> None:
        """The inner loop starts at ``start_step`` (> 0 after a resume)."""
        if self._started:
            return
        self._started = True
        self._t0 = self._clock()
        self._start_step = start_step
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(bar_width=None),
                MofNCompleteColumn(),
                TextColumn("loss [cyan]{task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=self.cfg.refresh_per_second,
                transient=False,
            )
            self._task = self._progress.add_task(
                "train", total=self.total, completed=start_step, loss="-", lr="-", tps="-"
            )
            self._progress.start()
        else:
            total = "?" if self.total is None else str(self.total)
            self.console.print(f"train: starting at step {start_step}/{total}", highlight=False)

    def train(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One inner step ``step`` (0-based) finished with ``metrics``."""
        if not self._started:
            self.start(step)
        self.step = step
        self.last = dict(metrics)
        done = step + 1
        loss = _fmt(metrics.get("loss"), ".4f")
        lr = _fmt(metrics.get("lr"), ".2e")
        tps = format_rate(metrics.get("tokens_per_s"))
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, loss=loss, lr=lr, tps=tps)
            return
        now = self._clock()
        last_step = self.total is not None and done >= self.total
        if now - self._last_plain < self.cfg.plain_interval_s and not last_step:
            return
        self._last_plain = now
        total = "?" if self.total is None else str(self.total)
        self.console.print(
            f"step {done}/{total}  loss {loss}  lr {lr}  {tps} tok/s  "
            f"eta {format_eta(self.eta(now))}",
            highlight=False,
        )

    def eta(self, now: float | None = None) -> float | None:
        """Seconds to ``total`` at the mean pace since :meth:`start` (``None`` if unknown)."""
        if self.total is None or self.step is None:
            return None
        done = self.step + 1 - self._start_step
        if done <= 0:
            return None
        elapsed = (self._clock() if now is None else now) - self._t0
        return max(0.0, (self.total - self.step - 1) * elapsed / done)

    # -- eval ---------------------------------------------------------------------------------

    def evaluation(self, step: int, metrics: Mapping[str, Any]) -> None:
        """An evaluation at ``step``; both eval hooks may report it, the second is ignored."""
        if self.evals and self.evals[-1].step == step:
            return
        val_loss = _num(metrics.get("val_loss"))
        ppl = _num(metrics.get("val_ppl"))
        if ppl is None and val_loss is not None:
            ppl = math.exp(val_loss) if val_loss < 700 else math.inf
        if val_loss is not None and math.isfinite(val_loss):
            self.best = val_loss if self.best is None else min(self.best, val_loss)
        self.evals.append(EvalRow(step, val_loss, ppl, self.best))
        del self.evals[: -self.cfg.table_rows]
        if self.cfg.show_eval_table:
            self.console.print(self.table())

    def table(self) -> Any:
        """The evaluation table (the most recent ``table_rows`` evaluations)."""
        from rich.table import Table

        table = Table(title="evaluation", title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("step", justify="right")
        table.add_column("val loss", justify="right")
        table.add_column("ppl", justify="right")
        table.add_column("best so far", justify="right")
        for row in self.evals:
            mark = " *" if row.val_loss is not None and row.val_loss == row.best else ""
            table.add_row(
                str(row.step + 1),  # steps completed, as the progress bar counts
                _fmt(row.val_loss, ".4f") + mark,
                _fmt(row.ppl, ".2f"),
                _fmt(row.best, ".4f"),
            )
        return table

    # -- end ----------------------------------------------------------------------------------

    def close(self, reason: str, error: BaseException | None) -> None:
        """Stop the live bar and print one closing line (idempotent)."""
        self.release()
        if not self._started:
            return
        self._started = False
        step = "-" if self.step is None else str(self.step + 1)
        best = "" if self.best is None else f", best val loss {self.best:.4f}"
        why = "" if error is None else f": {type(error).__name__}: {error}"
        style = "green" if reason == "completed" else "red"
        self.console.print(f"[{style}]train {reason}[/] at step {step}{best}{why}", highlight=False)

    def release(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()
