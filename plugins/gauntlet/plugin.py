"""The ``gauntlet`` plugin: the ``[gauntlet]`` section and the validator's scorer.

``covenant validate --config validator`` builds the model, then asks ``covenant_scorer`` for the
:class:`~covenant.plugins.gauntlet.validator.GauntletScorer`, which measures (fetches, checks,
losses) what the pure rules in :mod:`covenant.plugins.gauntlet.rules` consume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel

from covenant.engine.hookspecs import hookimpl

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
