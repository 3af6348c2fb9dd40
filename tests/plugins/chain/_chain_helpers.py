"""Shared helpers of the chain tests: dev keys and one harness per chain implementation.

A harness gives the tests the admin powers the Chain interface deliberately lacks (register
with stake, move the clock, fill the subnet so that a registration replaces a uid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from substrate_double import SubstrateDouble

from covenant.plugins.chain.bittensor_chain import BittensorChain
from covenant.plugins.chain.local import LocalChain

RATE_LIMIT = 5


def dev_key(name: str) -> Any:
    from bittensor.sp_core import Keypair

    return Keypair.create_from_uri(f"//{name}")


@dataclass
class LocalHarness:
    chain: LocalChain
    name: str = "local"

    def register(self, keypair: Any, stake: float = 0.0, validator: bool = False) -> int:
        uid = self.chain.register(keypair)
        self.chain.set_stake(keypair.ss58_address, stake, validator)
        return uid

    def advance(self, blocks: int) -> None:
        self.chain.advance(blocks)

    def register_replacing(self, keypair: Any) -> int:
        """Register into a full subnet: the weakest uid is handed to ``keypair``."""
        self.chain.max_uids = len(self.chain.metagraph())
        return self.chain.register(keypair)


@dataclass
class BittensorHarness:
    chain: BittensorChain
    double: SubstrateDouble
    name: str = "bittensor"

    def register(self, keypair: Any, stake: float = 0.0, validator: bool = False) -> int:
        return self.double.add_neuron(keypair.ss58_address, stake=stake, validator_permit=validator)

    def advance(self, blocks: int) -> None:
        self.double.block += blocks

    def register_replacing(self, keypair: Any) -> int:
        weakest = min(
            range(len(self.double.neurons)),
            key=lambda u: (
                self.double.neurons[u].validator_permit,
                self.double.neurons[u].stake_rao,
                u,
            ),
        )
        self.double.replace_neuron(weakest, keypair.ss58_address)
        return weakest


def no_sleep(_seconds: float) -> None:
    return None
