"""A small manual-clock network of real sessions for SparseLoCo outer-step tests.

Adapted from ``tests/plugins/storage/_network.py``: a local SQLite chain with a manual clock,
one ``file://`` store per participant, a real session (storage + chain plugins) per identity,
so every ``services.exchange`` is the production
:class:`~covenant.plugins.storage.run_exchange.StorageExchange` (signed uploads, verified
fetches with the timing checks). Storage timestamps are wall time and chain time is the manual
clock's, so an upload is stamped inside its window's upload interval with ``os.utime`` (as in
``test_storage_records.py``) before anyone fetches it.

Miners run the real :class:`~covenant.plugins.sparseloco.outer.SparseLoCoOuterStep` on a
:class:`ToyRuntime`: a few real tensors with the part of ``ModelRuntime`` an outer step uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from covenant.engine.keys import load_hotkey
from covenant.engine.protocols import ParallelInfo, ParamShard, PeerList, WindowContext
from covenant.engine.session import Session, open_session
from covenant.engine.window import OuterConfig
from covenant.plugins.chain.local import LocalChain
from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.outer import SparseLoCoOuterStep

BPW = 10
BLOCK_TIME = 1.0
GRACE = 5  # storage.upload_grace_s
RUN_ID = "net"
SHAPES: dict[str, tuple[int, ...]] = {
    "emb.weight": (64, 32),
    "mlp.weight": (32, 48),
    "norm.weight": (32,),
}
CONFIG = SparseLoCoConfig(k=8)


class ToyRuntime:
    """Named fp32 tensors standing in for a one-process peer's model (``ModelRuntime`` subset)."""

    seq_len = 8
    micro_batch = 1

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.parallel = ParallelInfo()
        self.params = {n: p.detach().clone().to(torch.float32) for n, p in params.items()}
        self.reloads = 0

    def layout(self) -> list[ParamShard]:
        return [
            ParamShard(n, tuple(p.shape), (0,) * p.dim(), tuple(p.shape))
            for n, p in self.params.items()
        ]

    def local_parameters(self) -> dict[str, torch.Tensor]:
        return self.params

    def reload_params(self) -> None:
        self.reloads += 1

    def group(self, kind: str) -> Any:
        return None

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def train(self, seed: int, scale: float = 0.01) -> None:
        """A stand-in for an inner loop: a deterministic change of every weight."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name in sorted(self.params):
                p = self.params[name]
                p.sub_(scale * torch.randn(p.shape, generator=g))


def initial_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


@dataclass
class Member:
    name: str
    uri: str
    session: Session
    uid: int
    store: Path
    outer: SparseLoCoOuterStep | None = None
    model: ToyRuntime | None = None

    @property
    def exchange(self) -> Any:
        return self.session.services.exchange

    @property
    def hotkey(self) -> Any:
        return self.session.services.hotkey


@dataclass
class OuterNet:
    """A lead validator, miners and anyone else, on one manual-clock chain."""

    root: Path
    chain: LocalChain
    members: dict[str, Member] = field(default_factory=dict)

    def join(
        self,
        name: str,
        uri: str,
        *,
        stake: float = 0.0,
        miner: bool = False,
        register: bool = True,
        run_id: str = RUN_ID,
        store_of: str | None = None,
    ) -> Member:
        """A participant with its own session; ``store_of`` shares another member's bucket
        (the same hotkey under another run id, say), ``register=False`` keeps it off-chain."""
        key = load_hotkey(uri)
        if store_of is not None:
            store = self.members[store_of].store
            uid = self.members[store_of].uid
        else:
            store = (self.root / name / "storage").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uid = -1
            if register:
                uid = self.chain.register(key)
                self.chain.commit(key, f"v1|{store.as_uri()}")
        if stake:
            self.chain.set_stake(key.ss58_address, stake, validator_permit=True)
        overrides = [
            f'run.id="{run_id}"',
            f'run.root="{self.root / name}"',
            f'chain.db="{self.chain.path}"',
            'chain.clock="manual"',
            f"chain.blocks_per_window={BPW}",
            f"chain.block_time_s={BLOCK_TIME}",
            f'chain.hotkey="{uri}"',
            f'storage.url="{store.as_uri()}"',
            "storage.local_peers=true",
            f"storage.upload_grace_s={GRACE}",
            "storage.retries=1",
            "storage.backoff_base_s=0",
            "storage.per_window_deadline_s=30",
        ]
        session = open_session(None, overrides, environ={"COVENANT_PLUGINS": "storage,chain"})
        member = Member(name, uri, session, uid, store)
        if miner:
            member.outer = SparseLoCoOuterStep(CONFIG, OuterConfig(), session.services)
            member.model = ToyRuntime(initial_params())
        self.members[name] = member
        return member

    def __getitem__(self, name: str) -> Member:
        return self.members[name]

    def miners(self) -> list[Member]:
        return [m for m in self.members.values() if m.outer is not None]

    # -- the clock -------------------------------------------------------------------------

    def to_block(self, block: int) -> None:
        now = self.chain.block()
        if block > now:
            self.chain.advance(block - now)

    def interval(self, window: int) -> tuple[int, int]:
        lead = next(iter(self.members.values()))
        return lead.exchange.upload_interval(window)  # type: ignore[no-any-return]

    # -- storage ---------------------------------------------------------------------------

    def gradient_path(self, member: Member, window: int, uid: int | None = None) -> Path:
        key = member.exchange.keys.gradient(window, member.uid if uid is None else uid)
        return member.store / key

    def stamp(self, path: Path, window: int) -> None:
        """Give a stored object a timestamp inside ``window``'s upload interval."""
        lo, _ = self.interval(window)
        os.utime(path, (lo + 1, lo + 1))

    # -- a window of the miners -------------------------------------------------------------

    def begin(self, window: int, outer_step: int = 0) -> dict[str, WindowContext]:
        ctxs = {}
        for m in self.miners():
            assert m.outer is not None and m.model is not None
            ctx = WindowContext(window, outer_step, m.uid, 1)
            m.outer.begin(ctx, m.model)
            m.model.train(seed=1000 * window + m.uid)
            ctxs[m.name] = ctx
        return ctxs

    def publish(self, ctxs: Mapping[str, WindowContext]) -> dict[str, dict[str, Any]]:
        """The window has ended: every miner uploads, inside the interval."""
        window = next(iter(ctxs.values())).window
        self.to_block((window + 1) * BPW + 1)
        out = {}
        for name, ctx in ctxs.items():
            m = self.members[name]
            assert m.outer is not None and m.model is not None
            out[name] = m.outer.publish(ctx, m.model)
            self.stamp(self.gradient_path(m, window), window)
        return out

    def close(self, window: int) -> None:
        """Move past ``window``'s upload interval (a missing upload is then final)."""
        self.to_block((window + 1) * BPW + GRACE + 3)

    def finish(
        self, ctxs: Mapping[str, WindowContext], names: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        out = {}
        for name in names if names is not None else list(ctxs):
            m = self.members[name]
            assert m.outer is not None and m.model is not None
            out[name] = m.outer.finish(ctxs[name], m.model)
        return out

    def post_peer_list(self, first_window: int, gather: Sequence[int]) -> None:
        lead = next(iter(self.members.values()))
        lead.exchange.put_peer_list(PeerList(first_window, first_window - 1, tuple(gather)))


def make_net(root: Path) -> OuterNet:
    chain = LocalChain(
        root / "chain.sqlite", blocks_per_window=BPW, block_time_s=BLOCK_TIME, clock="manual"
    )
    return OuterNet(root, chain)
