"""The console consumer: plain lines without a terminal, a live bar with one, the eval table."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable

import pytest
from _log_helpers import Run
from rich.console import Console

from covenant.plugins.logging import console as console_plugin
from covenant.plugins.logging.console import ConsoleConfig, ConsoleView, format_eta, format_rate


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def text_console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=140, color_system=None)


def output(c: Console) -> str:
    assert isinstance(c.file, io.StringIO)
    return c.file.getvalue()


def test_hooks_render_plain_lines_without_a_terminal(
    make_run: Callable[..., Run], capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run("console", overrides=["train.steps=4", "console.plain_interval_s=0"])
    run.start()
    for step in range(4):
        run.log("train", step, loss=4.0 - step, lr=1.17e-4, tokens_per_s=12345.0)
    run.log("eval", 3, val_loss=2.5)
    run.hook.covenant_evaluate_end(step=3, metrics={"val_loss": 2.5})  # same evaluation again
    run.log("window", 0, contributors=3.0)  # other kinds are not the console's business
    run.shutdown()
    captured = capsys.readouterr()
    assert captured.out == ""  # stderr only
    err = captured.err
    assert "train: starting at step 0/4" in err
    assert "step 1/4  loss 4.0000  lr 1.17e-04  12.3k tok/s" in err
    assert "step 4/4  loss 1.0000" in err and "eta 0:00:00" in err
    assert err.count("evaluation") == 1  # one table per evaluation, not per hook
    assert "best so far" in err and "12.18" in err  # ppl = exp(2.5)
    assert "train completed at step 4, best val loss 2.5000" in err
    assert "\x1b[" not in err  # no escape codes in a log file


def test_plain_lines_are_rate_limited() -> None:
    clock = Clock()
    c = text_console(terminal=False)
    view = ConsoleView(ConsoleConfig(plain_interval_s=10), total_steps=100, console=c, clock=clock)
    view.start(0)
    for step in range(100):
        clock.now = step + 1.0  # one second per step
        view.train(step, {"loss": 1.0})
    lines = [ln for ln in output(c).splitlines() if ln.startswith("step ")]
    # the first step, then every 10 s, and always the last step
    assert lines[0].startswith("step 1/100") and lines[-1].startswith("step 100/100")
    assert len(lines) == 11


def test_eta_uses_the_pace_since_start_after_a_resume() -> None:
    clock = Clock()
    view = ConsoleView(ConsoleConfig(), total_steps=200, console=text_console(False), clock=clock)
    clock.now = 50.0
    view.start(100)
    assert view.eta() is None
    for step in range(100, 110):
        clock.now += 2.0
        view.train(step, {})
    assert view.eta() == pytest.approx(90 * 2.0)


def test_unknown_total_still_renders() -> None:
    c = text_console(terminal=False)
    view = ConsoleView(ConsoleConfig(plain_interval_s=0), total_steps=None, console=c)
    view.train(0, {"loss": math.nan})
    assert "step 1/?  loss nan" in output(c) and "eta -:--:--" in output(c)
    assert view.eta() is None


def test_live_bar_on_a_terminal() -> None:
    c = text_console(terminal=True)
    view = ConsoleView(ConsoleConfig(refresh_per_second=50), total_steps=10, console=c)
    assert view.live
    view.start(0)
    for step in range(3):
        view.train(step, {"loss": 2.0, "lr": 1e-3, "tokens_per_s": 2.5e6})
    view.evaluation(2, {"val_loss": 1.9, "val_ppl": 6.69})
    view.close("completed", None)
    out = output(c)
    assert "3/10" in out and "loss 2.0000" in out and "2.5M tok/s" in out
    assert "val loss" in out and "1.9000" in out
    assert "train completed at step 3" in out
    assert not view.disabled


def test_live_bar_through_the_hooks(
    make_run: Callable[..., Run], capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run("console", overrides=["train.steps=3", "console.force_terminal=true"])
    run.start()
    for step in range(3):
        run.log("train", step, loss=1.5)
    run.shutdown("error", RuntimeError("boom"))
    err = capsys.readouterr().err
    assert "3/3" in err and "train error" in err and "RuntimeError: boom" in err


def test_eval_table_tracks_the_best_and_keeps_recent_rows() -> None:
    c = text_console(terminal=False)
    view = ConsoleView(ConsoleConfig(table_rows=2), total_steps=10, console=c)
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.7)]:
        view.evaluation(step, {"val_loss": loss})
    assert view.best == 2.5
    assert [r.step for r in view.evals] == [2, 3]
    assert [r.best for r in view.evals] == [2.5, 2.5]
    assert view.evals[-1].ppl == pytest.approx(math.exp(2.7))


def test_disabled_console_prints_nothing(
    make_run: Callable[..., Run], capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run("console", overrides=["console.enabled=false"])
    run.start()
    run.log("train", 0, loss=1.0)
    run.log("eval", 0, val_loss=1.0)
    run.shutdown()
    assert capsys.readouterr().err == ""
    assert console_plugin._view is None


def test_console_failure_is_contained(
    make_run: Callable[..., Run], caplog: pytest.LogCaptureFixture
) -> None:
    run = make_run("console", overrides=["console.plain_interval_s=0"])
    run.start()
    view = console_plugin._view
    assert view is not None

    def broken(*_args: object, **_kwargs: object) -> None:
        raise BrokenPipeError("stderr went away")

    view.console.print = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        run.log("train", 0, loss=1.0)
        run.log("train", 1, loss=1.0)
        run.log("eval", 1, val_loss=1.0)
        run.shutdown()
    assert view.disabled
    assert caplog.text.count("metrics consumer 'console' failed") == 1


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (12.0, "12"),
        (12345.6, "12.3k"),
        (2.5e6, "2.5M"),
        (3e9, "3.0G"),
        (None, "-"),
        (math.inf, "-"),
    ],
)
def test_format_rate(value: float | None, text: str) -> None:
    assert format_rate(value) == text


def test_format_eta() -> None:
    assert format_eta(3725) == "1:02:05"
    assert format_eta(None) == "-:--:--" and format_eta(math.nan) == "-:--:--"
