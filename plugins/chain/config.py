"""``[chain]``: which chain a process talks to, and the local chain's clock and limits.

Two implementations share one section: ``name = "local"`` (the embedded SQLite chain in the run
directory, for the CPU swarm and tests) and ``name = "bittensor"`` (the SDK v11 client). Values
that differ between the two by nature (window length, block time) default per chain: production
Bittensor numbers from SPEC section 1 (115 blocks of 12 s) for ``bittensor``, short ones for the
local swarm (10 blocks of 0.5 s) so a CPU run sees many windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Per-chain defaults, applied only when the key is absent (an explicit value always wins).
PER_CHAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {"blocks_per_window": 10, "block_time_s": 0.5},
    "bittensor": {"blocks_per_window": 115, "block_time_s": 12.0},
}


class ChainConfig(BaseModel):
    """``[chain]`` section (see docs/chain.md)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["local", "bittensor"] = Field("local", description="which chain implementation")
    blocks_per_window: int = Field(
        10,
        gt=0,
        description="window = block // blocks_per_window (bittensor default 115, local 10)",
    )
    block_time_s: float = Field(
        0.5,
        gt=0,
        description="seconds per block: the local clock's rate; for bittensor only the fallback "
        "used to predict future block times when the chain does not report it (default 12.0)",
    )
    hotkey: str | None = Field(
        None,
        description="hotkey spec for covenant.engine.keys.load_hotkey (//Alice, wallet:..., a key file)",
    )
    commitment_max_bytes: int = Field(
        128,
        gt=0,
        le=4096,
        description="largest commitment (UTF-8 bytes); production used 128 characters",
    )
    retries: int = Field(3, ge=1, le=20, description="tries per chain request before giving up")
    retry_backoff_s: float = Field(
        1.0, ge=0, description="base of the exponential backoff between tries"
    )
    retry_backoff_max_s: float = Field(30.0, ge=0, description="cap on one backoff sleep")
    # -- local chain ----------------------------------------------------------------------------
    clock: Literal["wall", "manual"] = Field(
        "wall", description="local: blocks advance with wall time, or only by hand (tests)"
    )
    db: Path | None = Field(None, description="local: SQLite file (default <run dir>/chain.sqlite)")
    max_uids: int = Field(
        256, ge=1, le=65535, description="local: uids before registration replaces one"
    )
    weights_rate_limit_blocks: int = Field(
        1,
        ge=0,
        description="local: blocks a hotkey must wait between weight sets (bittensor: set by the subnet)",
    )
    extrinsic_mortality_blocks: int = Field(
        64,
        ge=1,
        description="local: a signed write older than this many blocks is refused (replay guard)",
    )
    busy_timeout_s: float = Field(
        30.0, gt=0, description="local: how long a writer waits for the database lock"
    )
    poll_interval_s: float = Field(
        0.05, gt=0, description="local manual clock: wait_for_block poll period"
    )
    # -- bittensor ------------------------------------------------------------------------------
    network: str = Field(
        "finney", description="bittensor: finney, test, local, or a ws(s):// endpoint"
    )
    netuid: int = Field(3, ge=0, le=65535, description="bittensor: subnet id")
    token_symbols_cache: Path | None = Field(
        None,
        description="bittensor: SDK token-symbol cache file (default <run dir>/bittensor_token_symbols.json, "
        "so the SDK does not write under ~/.bittensor)",
    )

    @model_validator(mode="before")
    @classmethod
    def _per_chain_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("name", "local")
        defaults = PER_CHAIN_DEFAULTS.get(name) if isinstance(name, str) else None
        if defaults:
            data = {**defaults, **data}
        return data

    def db_path(self, run_dir: Path) -> Path:
        return self.db if self.db is not None else run_dir / "chain.sqlite"

    def token_symbols_path(self, run_dir: Path) -> Path:
        if self.token_symbols_cache is not None:
            return self.token_symbols_cache
        return run_dir / "bittensor_token_symbols.json"
