"""Hook implementations of the ``adversaries`` plugin (entry point ``adversaries``).

Contributes the ``[adversaries]`` section and implements the three hooks through which a miner
can be made to misbehave, each a thin call into :mod:`covenant.plugins.adversaries.behaviours`:
``covenant_sample_uid`` (wrong data), ``covenant_payload`` (copiers, noise, invalid, late,
forged, replayed uploads; global rank 0 only) and ``covenant_apply_aggregate`` (a stale peer).
With ``behaviour = "none"`` (the default) every hook answers ``None``: installed but inert.

The configured section and the model's shapes are kept from ``covenant_configure`` and
``covenant_model_built`` (the hooks that decide per window receive no config), so a process runs
one configured miner, as the engine does. Heavy imports (torch, the codec, storage) happen inside
the hooks.

**Miner-only** (``COVENANT_ROLES``): ``covenant validate`` refuses a config that enables it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

from covenant.engine.hookspecs import hookimpl
from covenant.plugins.adversaries.config import AdversariesConfig

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.protocols import ModelRuntime, ParamShard, WindowContext
    from covenant.engine.services import Services

COVENANT_ROLES = ("miner",)


@dataclass
class _Configured:
    """What the per-window hooks need and are not given: the section and the model's shapes."""

    config: AdversariesConfig = field(default_factory=AdversariesConfig)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


_STATE = _Configured()


def configured() -> AdversariesConfig:
    """The ``[adversaries]`` section this process was configured with (``none`` before)."""
    return _STATE.config


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("adversaries", AdversariesConfig)


@hookimpl
def covenant_configure(config: Config) -> None:
    if config.has("adversaries"):
        _STATE.config = config.typed("adversaries", AdversariesConfig)
        _STATE.shapes = {}


@hookimpl
def covenant_model_built(model: ModelRuntime, layout: Sequence[ParamShard]) -> None:
    # Every tensor's global shape (complete with tensor parallelism; with PP > 1 a rank sees only
    # its stage's tensors, so partial_copier and noise need PP = 1).
    _STATE.shapes = {s.name: tuple(int(d) for d in s.global_shape) for s in layout}


@hookimpl
def covenant_sample_uid(ctx: WindowContext) -> int | None:
    if _STATE.config.behaviour != "wrong_data":
        return None
    from covenant.plugins.adversaries.behaviours import sample_uid_for

    return sample_uid_for(_STATE.config, ctx)


@hookimpl
def covenant_payload(ctx: WindowContext, payload: bytes, services: Services) -> bytes | None:
    if _STATE.config.behaviour == "none":
        return None
    from covenant.plugins.adversaries.behaviours import payload_for

    return payload_for(_STATE.config, ctx, payload, services, shapes=_STATE.shapes)


@hookimpl
def covenant_apply_aggregate(ctx: WindowContext) -> bool | None:
    if _STATE.config.behaviour != "stale":
        return None
    from covenant.plugins.adversaries.behaviours import apply_aggregate_for

    return apply_aggregate_for(_STATE.config, ctx)
