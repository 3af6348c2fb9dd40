"""The ``reward`` plugin: the gauntlet's weights become chain weights.

Implements ``covenant_submit_weights``: through the :class:`~covenant.engine.protocols.Chain`
protocol (the local chain by default; Bittensor through the SDK, which converts to u16 and
uses commit-reveal where the subnet requires it), with a few tries inside the window when the
chain refuses for a transient reason (rate limit, unreachable). A refused or failed set is a
recorded skip (``WeightsResult(ok=False, reason=...)``), never an exception. A third party
replaces this reward scheme by implementing the same hook (and disabling this plugin).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from covenant.engine.hookspecs import hookimpl
from covenant.engine.protocols import WeightsResult

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.services import Services

log = logging.getLogger(__name__)
COVENANT_ROLES = ("validator",)
_TRANSIENT = ("rate limit", "unavailable", "unreachable", "timeout", "busy", "locked")


class RewardConfig(BaseModel):
    """``[reward]``: how weights are submitted."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="submit weights (false: compute and record only)")
    tries: int = Field(3, ge=1, le=20, description="tries when the chain refuses transiently")
    retry_wait_s: float = Field(
        2.0, ge=0, description="wait between tries (kept inside the window by the caller)"
    )
    min_weight: float = Field(
        0.0, ge=0, description="weights below this are dropped before submission"
    )


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("reward", RewardConfig)


def submit(
    chain: object,
    hotkey: object,
    weights: Mapping[int, float],
    cfg: RewardConfig,
    sleep: Callable[[float], None] = time.sleep,
) -> WeightsResult:
    """Set ``weights`` (normalised here) with retries on transient refusals; never raises."""
    clean = {int(u): float(w) for u, w in weights.items() if float(w) > cfg.min_weight}
    total = sum(clean.values())
    if total <= 0:
        return WeightsResult(ok=False, reason="no positive weight to set")
    clean = {u: w / total for u, w in clean.items()}
    result = WeightsResult(ok=False, reason="not tried")
    for attempt in range(cfg.tries):
        try:
            result = chain.set_weights(hotkey, clean)  # type: ignore[attr-defined]
        except Exception as exc:  # the protocol says it never raises; a plugin must not crash
            result = WeightsResult(ok=False, reason=f"{type(exc).__name__}: {exc}")
        if result.ok or not any(t in result.reason.lower() for t in _TRANSIENT):
            break
        if attempt + 1 < cfg.tries:
            log.info("weights refused (%s); retrying", result.reason)
            sleep(cfg.retry_wait_s)
    return result


@hookimpl
def covenant_submit_weights(
    window: int, weights: Mapping[int, float], services: Services, config: Config
) -> WeightsResult | None:
    cfg = (
        config.typed("reward", RewardConfig)
        if config.has("reward")
        else RewardConfig.model_validate({})
    )
    if not cfg.enabled:
        return WeightsResult(ok=False, reason="[reward] enabled = false")
    result = submit(services.chain, services.hotkey, weights, cfg)
    if result.ok:
        log.info("window %d: weights set for %d uids", window, len(weights))
    else:
        log.warning("window %d: weights not set: %s", window, result.reason)
    return result
