"""A small in-process swarm for outer-step tests: a local chain (manual clock), memory stores,
real :class:`~covenant.engine.services.Services` per participant, a lead validator's peer list,
and a toy model that implements the part of ``ModelRuntime`` an outer step uses."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from covenant.engine.config import build_config
from covenant.engine.plugins import PluginHost
from covenant.engine.protocols import ParallelInfo, ParamShard, PeerList
from covenant.engine.services import Services

BLOCKS_PER_WINDOW = 10


class ToyModel:
    """Named fp32 tensors standing in for a one-process peer's model."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.parallel = ParallelInfo()
        self.params = {n: p.clone() for n, p in params.items()}
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


@dataclass
class Member:
    config: Any
    services: Services
    uid: int = -1
    outer: Any = None
    model: Any = None  # a ToyModel once a test gives it one
    extra: dict[str, Any] = field(default_factory=dict)


class MiniSwarm:
    """A lead validator (//Alice) and ``peers`` miners (//Bob...) on a fresh chain."""

    URIS = ("//Bob", "//Charlie", "//Dave")

    def __init__(
        self,
        tmp: Path,
        outer: str,
        peers: int,
        section: dict[str, Any] | None = None,
        plugins: tuple[str, ...] = ("chain", "storage", "diloco"),
        peer_list: bool = True,
    ) -> None:
        self.host = PluginHost()
        self.host.load(list(plugins), environ={})
        self.host.check()
        tag = uuid.uuid4().hex[:8]
        base: dict[str, Any] = {
            "run": {"id": "t", "root": str(tmp)},
            "chain": {
                "clock": "manual",
                "db": str(tmp / "chain.sqlite"),
                "blocks_per_window": BLOCKS_PER_WINDOW,
                "block_time_s": 0.001,
            },
            "storage": {"local_peers": True, "upload_grace_s": 10**7, "retries": 1},
            "outer": {"name": outer},
        }
        if section is not None:
            base[outer] = section

        def member(uri: str, store: str) -> Member:
            tree = copy.deepcopy(base)
            tree["chain"]["hotkey"] = uri
            tree["storage"]["url"] = f"memory://{tag}-{store}"
            cfg = build_config(self.host.config_schema(), tree, environ={})
            return Member(cfg, Services(cfg, self.host.hook), extra={"url": tree["storage"]["url"]})

        self.lead = member("//Alice", "lead")
        self.peers = [member(self.URIS[i], f"p{i}") for i in range(peers)]
        self.chain = self.lead.services.chain
        for m in (self.lead, *self.peers):
            m.uid = self.chain.register(m.services.hotkey)
            self.chain.commit(m.services.hotkey, f"v1|{m.extra['url']}")
        self.chain.set_stake(self.lead.services.hotkey.ss58_address, 10.0, validator_permit=True)
        self.start = 1
        self.advance_to(self.start * BLOCKS_PER_WINDOW)
        if peer_list:
            self.lead.services.exchange.put_peer_list(
                PeerList(self.start, self.start - 1, tuple(m.uid for m in self.peers))
            )
        for m in self.peers:
            m.outer = self.host.hook.covenant_outer_step(
                config=m.config, name=outer, services=m.services
            )

    def advance_to(self, block: int) -> None:
        now = int(self.chain.block())
        if block > now:
            self.chain.advance(block - now)

    def close(self) -> None:
        for m in (self.lead, *self.peers):
            chain = m.services.__dict__.get("chain")
            if chain is not None:
                chain.close()
