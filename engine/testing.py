"""Test helpers for plugin authors: run the engine with your plugin and see which hooks fired.

Installed covenant registers a pytest plugin (``covenant.testing``) that provides the
``covenant_engine`` fixture::

    def test_my_plugin_sees_metrics(covenant_engine):
        import my_plugin

        run = covenant_engine(my_plugin, overrides=["train.steps=3"])
        run.train()                      # the real inner loop, tiny model, real text
        assert run.called("covenant_log_metrics")

The harness is hermetic: only the core and the plugins you pass are loaded
(``COVENANT_PLUGINS`` is set to the given allow-list), the run directory is a temporary folder,
and hooks are recorded through pluggy's call monitoring.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covenant.engine.plugins import PluginHost
from covenant.engine.session import Session, open_session


@dataclass
class HookCall:
    """One recorded hook call: its name and the keyword arguments it was called with."""

    name: str
    kwargs: dict[str, Any]


@dataclass
class HookRecorder:
    """Records every hook call of a session (installed with ``add_hookcall_monitoring``)."""

    calls: list[HookCall] = field(default_factory=list)

    def before(self, hook_name: str, hook_impls: Any, kwargs: Mapping[str, Any]) -> None:
        self.calls.append(HookCall(hook_name, dict(kwargs)))

    def after(
        self, outcome: Any, hook_name: str, hook_impls: Any, kwargs: Mapping[str, Any]
    ) -> None:
        return None

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def of(self, name: str) -> list[HookCall]:
        return [c for c in self.calls if c.name == name]


@dataclass
class EngineRun:
    """A session with a recorder attached, plus shortcuts to run engine jobs under it."""

    session: Session
    recorder: HookRecorder
    run_dir: Path

    @property
    def config(self) -> Any:
        return self.session.config

    @property
    def hook(self) -> Any:
        return self.session.hook

    def called(self, name: str) -> bool:
        return bool(self.recorder.of(name))

    def train(self) -> Any:
        """Run ``covenant train`` in-process with this session (single process, CPU)."""
        from covenant.engine.loop import run_training

        return run_training(self.session)


def start_engine(
    *plugins: object,
    config: str | None = None,
    overrides: Iterable[str] = (),
    enable: Iterable[str] = (),
    run_root: Path,
    environ: Mapping[str, str] | None = None,
) -> EngineRun:
    """Open a session with ``plugins`` registered (each under its module/class name).

    ``enable`` names entry-point plugins to load as well (default: none, hermetic).
    """
    env = dict(environ or {})
    env["COVENANT_PLUGINS"] = ",".join(enable)
    extra = [(getattr(p, "__name__", type(p).__name__), p) for p in plugins]
    recorder = HookRecorder()
    host = PluginHost()
    host.pm.add_hookcall_monitoring(recorder.before, recorder.after)
    all_overrides = [f"run.root={json.dumps(str(run_root))}", *overrides]
    session = open_session(config, all_overrides, environ=env, extra_plugins=extra, host=host)
    return EngineRun(session=session, recorder=recorder, run_dir=session.run_dir)
