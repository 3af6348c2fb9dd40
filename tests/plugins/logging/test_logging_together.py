"""All three consumers in one session: a failing one never stops the others or training."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from _log_helpers import Run

from covenant.plugins.logging import console as console_plugin
from covenant.plugins.logging import jsonl as jsonl_plugin
from covenant.plugins.logging.jsonl import read_metrics


def test_a_failing_consumer_does_not_stop_the_others(
    make_run: Callable[..., Run],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # pluggy calls the last registered first: console runs before jsonl on every hook
    run = make_run("jsonl", "wandb", "console", overrides=["wandb.mode=disabled"])
    run.start()
    view = console_plugin._view
    assert view is not None

    def broken(*_args: object, **_kwargs: object) -> None:
        raise ValueError("cannot render")

    view.console.print = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            run.log("train", step, loss=1.0)  # must not raise
        run.log("eval", 2, val_loss=0.9)
        run.hook.covenant_evaluate_end(step=2, metrics={"val_loss": 0.9})
        run.shutdown()
    assert view.disabled
    assert caplog.text.count("metrics consumer 'console' failed") == 1
    records = read_metrics(run.dir / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 0),
        ("train", 1),
        ("train", 2),
        ("eval", 2),
    ]


def test_sections_are_owned_by_each_plugin(make_run: Callable[..., Run]) -> None:
    config = make_run("jsonl", "console", "wandb").session.config
    assert config.section("jsonl").file == "metrics.jsonl"
    assert config.section("console").show_eval_table is True
    assert config.section("wandb").mode == "offline"
    # a consumer that is not loaded leaves no section behind
    assert not make_run("jsonl").session.config.has("console")


def test_no_consumer_loaded_is_fine(make_run: Callable[..., Run]) -> None:
    run = make_run()
    run.start()
    run.log("train", 0, loss=1.0)
    run.shutdown()
    assert jsonl_plugin._writer is None and not (run.dir / "metrics.jsonl").exists()


def test_plugins_import_without_heavy_libraries() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import covenant.plugins.logging.console, covenant.plugins.logging.jsonl, "
        "covenant.plugins.logging.wandb_plugin; "
        "print(sorted(m for m in ('wandb', 'torch', 'rich.progress') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
