"""``[adversaries]``: which misbehaviour a miner runs, against whom, and from which window on.

The default (``behaviour = "none"``) is an honest miner: every hook of the plugin answers
``None``, so having the plugin installed changes nothing until a config enables a behaviour.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BEHAVIOURS", "AdversariesConfig", "Behaviour"]

Behaviour = Literal[
    "none",
    "copier",
    "partial_copier",
    "wrong_data",
    "noise",
    "stale",
    "late",
    "invalid",
    "forged",
    "replayed",
]
BEHAVIOURS: tuple[str, ...] = get_args(Behaviour)


class AdversariesConfig(BaseModel):
    """``[adversaries]`` section (see docs/adversaries.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    behaviour: Behaviour = Field(
        "none", description="the misbehaviour of this miner; 'none' = honest (plugin inert)"
    )
    victim: int | None = Field(
        None,
        ge=0,
        description="uid to copy (copier, partial_copier) or whose pool to train on (wrong_data); "
        "unset: the lowest other uid of the peer list (wrong_data: the lowest other uid)",
    )
    fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="partial_copier: share of the payload copied, counted as copy detection "
        "weighs it (tiles x k per tensor), whole tensors at a time",
    )
    start_window: int = Field(0, ge=0, description="misbehave from this window on (honest before)")
    invalid: Literal["payload", "receipt"] = Field(
        "payload",
        description="invalid: corrupt the payload bytes (the codec's checksum fails) or upload a "
        "data receipt that names no pool",
    )
    copy_delay_s: float = Field(
        2.0,
        ge=0.0,
        description="copiers: seconds between fetching the victim's upload and re-uploading it "
        "(a real copier needs time to download a large payload; under 1 s its timestamp can "
        "equal the victim's, and then the Gauntlet flags both)",
    )
    late_by_s: float = Field(
        1.0,
        ge=1.0,
        description="late: upload this many seconds (chain time) after the interval closes "
        "(at least 1: storage timestamps are compared in whole seconds)",
    )
    noise_scale: float = Field(
        0.01, gt=0.0, description="noise: standard deviation of the random tensors encoded"
    )
    replay_lookback: int = Field(
        16, ge=1, description="replayed: windows searched back for an earlier own upload"
    )
