"""Hook implementations of the ``ddp`` plugin: the outer step ``ddp`` (a comparison baseline).

Miner-only (``COVENANT_ROLES``): ``covenant validate`` refuses a config that enables it. See
:mod:`covenant.plugins.ddp.outer` for what the baseline is and where it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from covenant.engine.hookspecs import hookimpl

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.services import Services
    from covenant.plugins.ddp.outer import DDPOuterStep

COVENANT_ROLES = ("miner",)


@hookimpl
def covenant_outer_step(config: Config, name: str, services: Services) -> DDPOuterStep | None:
    if name != "ddp":
        return None
    from covenant.plugins.ddp.outer import DDPOuterStep

    return DDPOuterStep()
