"""Pytest plugin for covenant plugin authors (registered through the ``pytest11`` entry point).

Provides the ``covenant_engine`` fixture: ``covenant_engine(plugin, overrides=[...])`` opens an
engine session in a temporary run directory with only the core and ``plugin`` loaded, records
every hook call, and can run the real training loop (``.train()``). See
:mod:`covenant.engine.testing` for the harness and docs/plugins.md for a worked example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from covenant.engine.testing import EngineRun, HookRecorder, start_engine

__all__ = ["EngineRun", "HookRecorder", "covenant_engine", "start_engine"]


@pytest.fixture
def covenant_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., EngineRun]:
    """Factory: ``covenant_engine(*plugins, config=None, overrides=(), enable=())``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def factory(
        *plugins: Any,
        config: str | None = None,
        overrides: Iterable[str] = (),
        enable: Iterable[str] = (),
    ) -> EngineRun:
        return start_engine(
            *plugins, config=config, overrides=overrides, enable=enable, run_root=tmp_path / "runs"
        )

    return factory
