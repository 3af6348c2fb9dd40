"""The wandb consumer, with the real ``wandb`` package in offline mode (no network, no account)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from _log_helpers import Run

from covenant.plugins.logging import wandb_plugin
from covenant.plugins.logging.wandb_plugin import resolve_mode, wandb_environment

WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for name in (*WANDB_VARS, "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    return home


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_offline_run_lands_in_the_run_dir_and_nowhere_else(
    make_run: Callable[..., Run], fake_home: Path
) -> None:
    run = make_run("wandb", overrides=["wandb.tags=['smoke']"])
    run.start()
    assert os.environ["WANDB_CACHE_DIR"].startswith(str(run.dir))  # pointed inside while open
    for step in range(3):
        run.log("train", step, loss=3.0 - step, lr=float("nan"))
    run.log("window", 0, contributors=2.0)  # a smaller step than the train rows: still logged
    run.log("eval", 2, val_loss=2.5)
    run.shutdown()

    [folder] = offline_runs(run.dir)
    [log_file] = folder.glob("run-*.wandb")
    data = log_file.read_bytes()
    # the transaction log is protobuf; its strings are stored verbatim
    for key in (
        b"train/loss",
        b"window/contributors",
        b"window/step",
        b"eval/val_loss",
        b"versions",
    ):
        assert key in data, key
    assert list(fake_home.iterdir()) == []
    assert not any(name in os.environ for name in WANDB_VARS)  # restored after the run
    assert wandb_plugin._run is None


def test_disabled_mode_writes_nothing(make_run: Callable[..., Run], fake_home: Path) -> None:
    run = make_run("wandb", overrides=["wandb.mode=disabled"])
    run.start()
    run.log("train", 0, loss=1.0)
    run.shutdown()
    assert not (run.dir / "wandb").exists()


def test_wandb_mode_variable_applies_unless_the_config_says_otherwise(
    make_run: Callable[..., Run], fake_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = make_run("wandb")
    run.start()
    run.shutdown()
    assert not (run.dir / "wandb").exists()


def test_resolve_mode() -> None:
    assert resolve_mode("offline", False, {}) == "offline"
    assert resolve_mode("offline", False, {"WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("offline", False, {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode("online", True, {"WANDB_MODE": "disabled"}) == "online"
    assert resolve_mode("offline", False, {"WANDB_MODE": "bogus"}) == "offline"


def test_user_exported_directories_are_kept(tmp_path: Path) -> None:
    env = wandb_environment(tmp_path, {"WANDB_CACHE_DIR": "/big/cache"})
    assert "WANDB_CACHE_DIR" not in env
    assert env["WANDB_DATA_DIR"] == str(tmp_path / "wandb-data")
    assert env["WANDB_DIR"] == str(tmp_path) and env["WANDB_SILENT"] == "true"


def test_only_rank_zero_logs(
    make_run: Callable[..., Run], fake_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "2")
    run = make_run("wandb")
    run.start()
    run.shutdown()
    assert not (run.dir / "wandb").exists()


def test_init_failure_is_contained(
    make_run: Callable[..., Run],
    fake_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import wandb

    def refuse(**_kwargs: object) -> None:
        raise wandb.errors.CommError("no route to api.wandb.ai")

    monkeypatch.setattr(wandb, "init", refuse)
    run = make_run("wandb", overrides=["wandb.mode=online"])
    with caplog.at_level(logging.WARNING):
        run.start()
        run.log("train", 0, loss=1.0)
        run.shutdown()
    assert "metrics consumer 'wandb' could not start" in caplog.text
    assert not any(name in os.environ for name in WANDB_VARS)


def test_log_failure_is_contained(
    make_run: Callable[..., Run], fake_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = make_run("wandb")
    run.start()
    consumer = wandb_plugin._run
    assert consumer is not None
    real = consumer.run

    class Broken:
        def define_metric(self, *_a: object, **_k: object) -> None:
            raise RuntimeError("wandb-core died")

        def finish(self, exit_code: int = 0) -> None:
            real.finish(exit_code=exit_code)

    consumer.run = Broken()
    with caplog.at_level(logging.WARNING):
        run.log("train", 0, loss=1.0)
        run.log("train", 1, loss=1.0)
        run.shutdown()
    assert consumer.disabled
    assert caplog.text.count("metrics consumer 'wandb' failed in log") == 1
    assert not any(name in os.environ for name in WANDB_VARS)
