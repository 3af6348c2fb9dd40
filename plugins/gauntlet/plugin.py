"""The ``gauntlet`` plugin: the ``[gauntlet]`` section and the validator's scorer.

``covenant validate --config validator`` builds the model, then asks ``covenant_scorer`` for the
:class:`~covenant.plugins.gauntlet.validator.GauntletScorer`, which measures (fetches, checks,
losses) what the pure rules in :mod:`covenant.plugins.gauntlet.rules` consume.

Commands: ``covenant replay RECORD`` recomputes a signed score record
(:mod:`~covenant.plugins.gauntlet.replay`) and ``covenant explain --uid N`` shows why a peer got
its score (:mod:`~covenant.plugins.gauntlet.explain`). Both modules import torch and the
validator only when a command runs: mounting them costs a few tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel

from covenant.engine.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.protocols import ModelRuntime
    from covenant.engine.services import Services
    from covenant.plugins.gauntlet.validator import GauntletScorer

COVENANT_ROLES = ("validator",)


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    from covenant.plugins.gauntlet.validator import GauntletSection

    register("gauntlet", GauntletSection)


@hookimpl
def covenant_scorer(config: Config, services: Services, model: ModelRuntime) -> GauntletScorer:
    from covenant.plugins.gauntlet.validator import GauntletScorer

    return GauntletScorer(config, services, model)


@hookimpl
def covenant_register_commands(register: Register) -> None:
    from covenant.plugins.gauntlet.explain import explain_command
    from covenant.plugins.gauntlet.replay import replay_command

    register("replay", replay_command)
    register("explain", explain_command)
