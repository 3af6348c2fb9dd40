"""Hook implementations of the ``sparseloco`` plugin.

Contributes the ``[sparseloco]`` config section and the ``codec`` benchmark
(``covenant bench codec --json``). The outer step itself (error feedback -> upload -> gather ->
aggregate -> apply) attaches through ``covenant_outer_step`` in the outer-step issue; the codec
it uses is public in :mod:`covenant.plugins.sparseloco`.

Heavy imports (torch) happen inside the hooks: the CLI imports this module at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from covenant.engine.hookspecs import hookimpl


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
