"""The model plugin: config sections, the model provider and the CLI commands, through hooks.

Loaded through the ``covenant`` entry point ``model = "covenant.models.plugin"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from covenant.engine.hookspecs import Register, hookimpl
from covenant.models.config import ModelConfig, OptimConfig

if TYPE_CHECKING:
    from pydantic import BaseModel

    from covenant.engine.config import Config
    from covenant.engine.protocols import ModelRuntime


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("model", ModelConfig)
    register("optim", OptimConfig)


def _section(config: Any, name: str) -> Any:
    return config.section(name) if config.has(name) else None


@hookimpl
def covenant_build_model(config: Config) -> ModelRuntime | None:
    model_cfg = _section(config, "model")
    if not isinstance(model_cfg, ModelConfig):
        return None
    optim_cfg = _section(config, "optim")
    from covenant.models.runtime import build_runtime

    return build_runtime(model_cfg, optim_cfg if isinstance(optim_cfg, OptimConfig) else None)


@hookimpl
def covenant_register_commands(register: Register) -> None:
    from covenant.models.cli import export, model_info

    register("model-info", model_info)
    register("export", export)
