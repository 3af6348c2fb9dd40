"""Fixtures for the chain plugin tests.

``chain_harness`` is parametrised over the local SQLite chain (manual clock) and the Bittensor
implementation running the SDK's own code against :mod:`substrate_double`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _chain_helpers import RATE_LIMIT, BittensorHarness, LocalHarness, no_sleep
from substrate_double import SubstrateDouble

from covenant.plugins.chain.bittensor_chain import BittensorChain
from covenant.plugins.chain.local import LocalChain


@pytest.fixture
def local_chain(tmp_path: Path) -> Iterator[LocalChain]:
    chain = LocalChain(
        tmp_path / "chain.sqlite",
        clock="manual",
        weights_rate_limit_blocks=RATE_LIMIT,
        sleep_fn=no_sleep,
    )
    yield chain
    chain.close()


@pytest.fixture
def double() -> SubstrateDouble:
    return SubstrateDouble(weights_rate_limit=RATE_LIMIT)


@pytest.fixture
def bt_chain(double: SubstrateDouble) -> Iterator[BittensorChain]:
    chain = BittensorChain(
        substrate=double, netuid=double.netuid, blocks_per_window=10, sleep_fn=no_sleep
    )
    yield chain
    chain.close()


@pytest.fixture(params=["local", "bittensor"])
def chain_harness(request: pytest.FixtureRequest) -> Any:
    if request.param == "local":
        return LocalHarness(request.getfixturevalue("local_chain"))
    return BittensorHarness(request.getfixturevalue("bt_chain"), request.getfixturevalue("double"))
