"""The engine's own plugin: the core config sections, registered like any other plugin.

It is always loaded (it is not subject to the allow-list) and contributes only what every
process needs whatever its role: ``[run]`` (identity and run directory) and ``[plugins]``
(the allow-list itself, read before any plugin loads), ``[train]``, ``[outer]``
(which outer step a miner runs) and ``[data]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from covenant.engine.hookspecs import hookimpl


class RunConfig(BaseModel):
    """``[run]``: who this run is and where it writes."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        "local",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="run id; namespaces storage keys",
    )
    root: Path = Field(Path("runs"), description="folder holding one sub-folder per run id")
    protocol_version: int = Field(1, ge=1, description="storage/wire protocol version in every key")
    seed: int = Field(1234, ge=0, description="seed of everything that is seeded locally")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @property
    def dir(self) -> Path:
        return self.root / self.id


class PluginsConfig(BaseModel):
    """``[plugins]``: which entry-point plugins load (``COVENANT_PLUGINS`` overrides)."""

    model_config = ConfigDict(extra="forbid")

    enable: list[str] | None = Field(None, description="allow-list; unset = every installed plugin")


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    from covenant.engine.data.config import DataConfig
    from covenant.engine.schedule import TrainConfig
    from covenant.engine.window import OuterConfig

    register("run", RunConfig)
    register("plugins", PluginsConfig)
    register("train", TrainConfig)
    register("outer", OuterConfig)
    register("data", DataConfig)
