"""The ``wandb`` metrics consumer: Weights & Biases, offline by default (no account needed).

At ``covenant_run_started`` (rank 0) it calls ``wandb.init`` with the resolved config plus the
engine and plugin versions; every ``covenant_log_metrics`` call becomes one ``run.log``; the run
is finished at shutdown. ``mode = "offline"`` writes ``wandb/offline-run-*/`` under ``dir`` (the
run directory by default) and touches no network; upload it later with ``wandb sync``.

Two wandb habits are tamed here (see docs/DEPENDENCIES.md):

* even offline, wandb writes under ``~/.cache``/``~/.config`` unless ``WANDB_CACHE_DIR``,
  ``WANDB_CONFIG_DIR``, ``WANDB_DATA_DIR`` (and ``WANDB_DIR``) point elsewhere; they are set to
  folders inside ``dir`` while the run is open (a value the user exported is kept) and
  restored afterwards, with ``WANDB_SILENT=true``;
* wandb drops a row whose ``step`` is below one already logged, and our kinds count in
  different units (``train``/``eval`` in inner steps, ``window`` in windows, ``score`` many
  rows per window). So keys are prefixed by kind (``train/loss``, ``window/...``), each kind's
  own counter is logged as ``<kind>/step`` and declared its x-axis with ``define_metric``, and
  ``run.log`` is called without ``step=``: nothing is ever dropped.

``wandb`` is imported inside the hooks only, so loading the plugin costs nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from covenant.engine.hookspecs import hookimpl
from covenant.plugins.logging.common import Consumer, contained, open_consumer, process_rank

log = logging.getLogger(__name__)

__all__ = ["WandbConfig", "WandbRun", "resolve_mode", "wandb_environment"]


class WandbConfig(BaseModel):
    """``[wandb]``: the Weights & Biases run of this process (rank 0)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="offline: local files only; online: upload (needs a login); disabled: off",
    )
    project: str = Field("covenant", min_length=1, description="wandb project")
    entity: str | None = Field(None, description="wandb team or user (None: the login's default)")
    name: str | None = Field(None, description="run display name (None: the [run] id)")
    group: str | None = Field(
        None, description="run group (None: the [run] id, so peers of one run group)"
    )
    tags: list[str] = Field(default_factory=list)
    dir: Path | None = Field(None, description="where wandb writes (None: the run directory)")
    capture_console: bool = Field(
        False, description="let wandb capture stdout/stderr (off: it would wrap the rich console)"
    )


#: wandb variables pointed inside ``dir`` (relative folder names) so nothing lands in $HOME.
_DIR_VARIABLES = {
    "WANDB_CACHE_DIR": "wandb-cache",
    "WANDB_CONFIG_DIR": "wandb-config",
    "WANDB_DATA_DIR": "wandb-data",
}


#: wandb's own spellings of ``WANDB_MODE`` mapped to ours.
_ENV_MODES = {
    "offline": "offline",
    "dryrun": "offline",
    "online": "online",
    "run": "online",
    "disabled": "disabled",
}


def resolve_mode(configured: str, explicit: bool, environ: Mapping[str, str]) -> str:
    """The mode to use: the config's if set explicitly, else ``$WANDB_MODE`` if set, else default.

    wandb users expect ``WANDB_MODE=disabled`` to work; a value in the config file, in
    ``COVENANT__WANDB__MODE`` or in ``--set wandb.mode`` is more specific and wins.
    """
    raw = environ.get("WANDB_MODE", "").strip().lower()
    if explicit or not raw:
        return configured
    if raw not in _ENV_MODES:
        log.warning(
            "wandb: ignoring WANDB_MODE=%r (expected one of %s)", raw, ", ".join(_ENV_MODES)
        )
        return configured
    return _ENV_MODES[raw]


def wandb_environment(root: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The wandb variables to set for a run writing under ``root`` (explicit user values win)."""
    wanted = {"WANDB_DIR": str(root), "WANDB_SILENT": "true"}
    for name, sub in _DIR_VARIABLES.items():
        if not environ.get(name):
            wanted[name] = str(root / sub)
    return wanted


class WandbRun(Consumer):
    """One wandb run: open, log by kind, finish. Usable on its own (outside the plugin)."""

    name = "wandb"

    def __init__(
        self,
        cfg: WandbConfig,
        root: Path,
        *,
        run_config: Mapping[str, Any],
        default_name: str | None = None,
    ) -> None:
        super().__init__()
        import wandb

        self.cfg = cfg
        self.root = root
        self._saved_env: dict[str, str | None] = {}
        root.mkdir(parents=True, exist_ok=True)
        for name, value in wandb_environment(root, os.environ).items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value
            if name != "WANDB_SILENT" and name != "WANDB_DIR":
                Path(value).mkdir(parents=True, exist_ok=True)
        self._kinds: set[str] = set()
        try:
            self.run: Any = wandb.init(
                mode=cfg.mode,
                dir=str(root),
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or default_name,
                group=cfg.group or default_name,
                tags=list(cfg.tags),
                config=dict(run_config),
                reinit="finish_previous",
                settings=wandb.Settings(
                    silent=True,
                    console="auto" if cfg.capture_console else "off",
                    disable_git=True,
                ),
            )
        except BaseException:
            self._restore_env()
            raise
        log.info("wandb: %s run %s in %s", cfg.mode, getattr(self.run, "id", "?"), root)

    @contained
    def log(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Log one row: ``<kind>/<key>`` for every metric plus ``<kind>/step``."""
        axis = f"{kind}/step"
        if kind not in self._kinds:
            # each kind plots against its own counter (see the module docstring)
            self.run.define_metric(axis)
            self.run.define_metric(f"{kind}/*", step_metric=axis)
            self._kinds.add(kind)
        row: dict[str, Any] = {f"{kind}/{key}": _plain(value) for key, value in metrics.items()}
        row[axis] = int(step)
        self.run.log(row)

    @contained
    def finish(self, reason: str, error: BaseException | None) -> None:
        """Finish the run (exit code 1 after an error) and restore the environment."""
        try:
            self.run.finish(exit_code=0 if error is None and reason != "error" else 1)
        finally:
            self._restore_env()

    def release(self) -> None:
        try:
            self.run.finish(exit_code=1)
        finally:
            self._restore_env()

    def _restore_env(self) -> None:
        saved, self._saved_env = self._saved_env, {}
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _plain(value: Any) -> Any:
    """Numpy/torch scalars as Python numbers (wandb would otherwise treat tensors as media)."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return value


# ---------------------------------------------------------------------------------------------
# Hook implementations (rank 0 only: run_started opens the run there and nowhere else)
# ---------------------------------------------------------------------------------------------

_run: WandbRun | None = None


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("wandb", WandbConfig)


@hookimpl
def covenant_run_started(config: Any, run_dir: str, versions: Mapping[str, str]) -> None:
    global _run
    _close("replaced", None)

    def build() -> WandbRun | None:
        cfg: WandbConfig = config.typed("wandb", WandbConfig)
        mode = resolve_mode(cfg.mode, "wandb.mode" in config.origins, os.environ)
        cfg = cfg.model_copy(update={"mode": mode})
        if cfg.mode == "disabled" or process_rank() != 0:
            return None  # "disabled" writes nothing: not even importing wandb is cheaper
        run_id = config.section("run").id if config.has("run") else None
        run_config = {**config.to_dict(), "versions": dict(versions)}
        root = cfg.dir if cfg.dir is not None else Path(run_dir)
        return WandbRun(cfg, root.resolve(), run_config=run_config, default_name=run_id)

    _run = open_consumer("wandb", build)


@hookimpl
def covenant_log_metrics(metrics: Mapping[str, Any], step: int, kind: str) -> None:
    if _run is not None:
        _run.log(kind, step, metrics)


@hookimpl
def covenant_shutdown(reason: str, error: BaseException | None) -> None:
    _close(reason, error)


def _close(reason: str, error: BaseException | None) -> None:
    global _run
    if _run is not None:
        _run.finish(reason, error)
        _run = None
