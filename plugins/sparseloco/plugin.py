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
    import inspect

    from covenant.engine.errors import ConfigError
    from covenant.plugins.sparseloco.bench import PRESETS, run_codec_benchmark

    # `covenant bench codec --opt k=v` passes user text as keywords: an unknown one is a user
    # error (one line, exit 2), not a TypeError traceback
    accepted = inspect.signature(run_codec_benchmark).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"bench codec: unknown --opt {', '.join(map(repr, unknown))} "
            f"(accepted: {', '.join(accepted)})"
        )
    for key, value in options.items():
        default = accepted[key].default
        want = str if default is None else type(default)  # device: str or None
        if type(value) is not want:  # exact: True is not an int here
            raise ConfigError(f"bench codec: --opt {key}={value!r} must be of type {want.__name__}")
        if key in ("preset", "scale_to") and value not in PRESETS:
            raise ConfigError(f"bench codec: --opt {key}={value!r}: known {', '.join(PRESETS)}")
        if key in ("peers", "distinct_peers", "repeats") and not 1 <= int(value) <= 10_000:
            raise ConfigError(f"bench codec: --opt {key}={value} must be in 1..10000")
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
