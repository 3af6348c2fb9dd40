"""Hook implementations of the ``diloco`` plugin.

Contributes the ``[diloco]`` config section and the outer step ``diloco``
(:class:`~covenant.plugins.diloco.outer.DiLoCoOuterStep` with the ``dense/1`` codec) through
``covenant_outer_step``. Miners and validators may both enable it (the validator uses the codec
and ``apply``). Heavy imports (torch) happen inside the hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel

from covenant.engine.hookspecs import hookimpl

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.services import Services
    from covenant.plugins.diloco.outer import DiLoCoOuterStep


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    from covenant.plugins.diloco.config import DiLoCoConfig

    register("diloco", DiLoCoConfig)


@hookimpl
def covenant_outer_step(config: Config, name: str, services: Services) -> DiLoCoOuterStep | None:
    if name != "diloco":
        return None
    from covenant.plugins.diloco.config import DiLoCoConfig
    from covenant.plugins.diloco.outer import DiLoCoOuterStep

    return DiLoCoOuterStep(config.typed("diloco", DiLoCoConfig), config.section("outer"), services)
