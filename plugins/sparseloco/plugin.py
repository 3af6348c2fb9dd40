"""Hook implementations of the ``sparseloco`` plugin.

Contributes the ``[sparseloco]`` config section, the outer step ``sparseloco``
(:class:`~covenant.plugins.sparseloco.outer.SparseLoCoOuterStep`: error feedback -> upload ->
gather -> aggregate -> apply, through ``covenant_outer_step``) with its codec, and the ``codec``
benchmark (``covenant bench codec --json``). The codec is public in
:mod:`covenant.plugins.sparseloco`.

Heavy imports (torch) happen inside the hooks: the CLI imports this module at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from covenant.engine.hookspecs import hookimpl

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.services import Services
    from covenant.plugins.sparseloco.outer import SparseLoCoOuterStep


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    from covenant.plugins.sparseloco.config import SparseLoCoConfig

    register("sparseloco", SparseLoCoConfig)


def _codec_benchmark(**options: Any) -> dict[str, Any]:
    from covenant.plugins.sparseloco.bench import run_codec_benchmark

    return run_codec_benchmark(**options)


@hookimpl
def covenant_register_benchmarks(register: Callable[[str, Any], None]) -> None:
    register("codec", _codec_benchmark)


@hookimpl
def covenant_outer_step(
    config: Config, name: str, services: Services
) -> SparseLoCoOuterStep | None:
    if name != "sparseloco":
        return None
    from covenant.plugins.sparseloco.config import SparseLoCoConfig
    from covenant.plugins.sparseloco.outer import SparseLoCoOuterStep

    return SparseLoCoOuterStep(
        config.typed("sparseloco", SparseLoCoConfig), config.section("outer"), services
    )
