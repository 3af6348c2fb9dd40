"""A small local network for exchange tests: a manual-clock chain and one file store per peer.

Every identity gets a real session (storage + chain plugins), so its ``services.exchange`` is
the production :class:`~covenant.plugins.storage.run_exchange.StorageExchange`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covenant.engine.keys import load_hotkey
from covenant.engine.session import Session, open_session
from covenant.plugins.chain.local import LocalChain

BPW = 10
BLOCK_TIME = 1.0


@dataclass
class Network:
    root: Path
    chain: LocalChain
    sessions: dict[str, Session] = field(default_factory=dict)
    uids: dict[str, int] = field(default_factory=dict)

    def join(self, name: str, uri: str, *, stake: float = 0.0, **sets: Any) -> Session:
        key = load_hotkey(uri)
        uid = self.chain.register(key)
        store = (self.root / name / "storage").resolve()
        store.mkdir(parents=True, exist_ok=True)
        self.chain.commit(key, f"v1|{store.as_uri()}")
        if stake:
            self.chain.set_stake(key.ss58_address, stake, validator_permit=True)
        overrides = [
            'run.id="net"',
            f'run.root="{self.root / name}"',
            f'chain.db="{self.chain.path}"',
            'chain.clock="manual"',
            f"chain.blocks_per_window={BPW}",
            f"chain.block_time_s={BLOCK_TIME}",
            f'chain.hotkey="{uri}"',
            f'storage.url="{store.as_uri()}"',
            "storage.local_peers=true",
            "storage.upload_grace_s=5",
            "storage.retries=1",
            "storage.backoff_base_s=0",
            *(f"{k}={v}" for k, v in sets.items()),
        ]
        session = open_session(None, overrides, environ={"COVENANT_PLUGINS": "storage,chain"})
        self.sessions[name] = session
        self.uids[name] = uid
        return session

    def exchange(self, name: str) -> Any:
        return self.sessions[name].services.exchange

    def to_window(self, window: int, offset_blocks: int = 0) -> None:
        """Move the manual clock to block ``window * BPW + offset_blocks``."""
        target = window * BPW + offset_blocks
        now = self.chain.block()
        if target > now:
            self.chain.advance(target - now)


def make_network(tmp_path: Path) -> Network:
    chain = LocalChain(
        tmp_path / "chain.sqlite", blocks_per_window=BPW, block_time_s=BLOCK_TIME, clock="manual"
    )
    return Network(tmp_path, chain)
