"""What a chain answers is untrusted: rows someone wrote into the local SQLite file, and a node's
answers through the SDK. Malformed values are a typed ChainError (or a skipped commitment),
never a ValueError, TypeError or KeyError from deep inside a read."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import pytest
from _chain_helpers import dev_key, no_sleep
from substrate_double import SubstrateDouble

from covenant.engine.protocols import ChainError
from covenant.plugins.chain.bittensor_chain import BittensorChain
from covenant.plugins.chain.local import LocalChain
from covenant.plugins.chain.validation import check_neuron, parse_weight_pairs


def _write(chain: LocalChain, sql: str, *args: Any) -> None:
    with sqlite3.connect(chain.path) as conn:
        conn.execute(sql, args)


@pytest.mark.parametrize(
    "row",
    [
        (70000, "5Grw", 1.0, 0, 0),  # not a u16
        (1, b"\x00\xff", 1.0, 0, 0),  # a blob hotkey
        (2, "\x1b[31m", 1.0, 0, 0),  # an escape sequence
        (3, "5Grw", "lots", 0, 0),
        (4, "5Grw", -1.0, 0, 0),
        (5, "5Grw", 1.0, 7, 0),  # a permit that is not a boolean
    ],
)
def test_a_malformed_neuron_row_is_a_chain_error(local_chain: LocalChain, row: tuple) -> None:
    _write(local_chain, "INSERT INTO neurons VALUES (?, ?, ?, ?, ?)", *row)
    with pytest.raises(ChainError, match="malformed neurons row"):
        local_chain.metagraph()


@pytest.mark.parametrize("weights", ["[", "[[0, NaN]]", "[[0, 2.0]]", "[[0]]", "{}", "[" * 99])
def test_a_malformed_weights_row_is_a_chain_error(local_chain: LocalChain, weights: str) -> None:
    _write(
        local_chain,
        "INSERT INTO weights (block, uid, hotkey, weights) VALUES (1, 0, 'h', ?)",
        weights,
    )
    with pytest.raises(ChainError, match="malformed weights row"):
        local_chain.weights_history()


def test_malformed_commitment_rows_are_skipped(
    local_chain: LocalChain, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = dev_key("Alice"), dev_key("Bob")
    local_chain.register(alice)
    local_chain.register(bob)
    local_chain.commit(alice, "good")
    _write(local_chain, "INSERT INTO commitments VALUES (?, ?, ?)", bob.ss58_address, b"\xff", 1)
    with caplog.at_level(logging.WARNING):
        got = local_chain.commitments()
    assert set(got) == {alice.ss58_address} and "skipping the commitment" in caplog.text
    _write(
        local_chain, "UPDATE commitments SET block = 'soon' WHERE hotkey = ?", alice.ss58_address
    )
    assert local_chain.commitments() == {}


@pytest.mark.parametrize("value", ["x", "-1", "9" * 30, b"\x01", 1.5])
def test_a_malformed_manual_block_is_a_chain_error(local_chain: LocalChain, value: Any) -> None:
    _write(local_chain, "UPDATE meta SET value = ? WHERE key = 'manual_block'", value)
    with pytest.raises(ChainError, match="manual block"):
        local_chain.block()


@pytest.mark.parametrize(
    ("key", "value"), [("genesis_seed", "zz"), ("genesis_time", "soon"), ("block_time_s", "x")]
)
def test_a_malformed_meta_table_is_a_chain_error(
    local_chain: LocalChain, key: str, value: str
) -> None:
    _write(local_chain, "UPDATE meta SET value = ? WHERE key = ?", value, key)
    with pytest.raises(ChainError, match="malformed"):
        LocalChain(local_chain.path, clock="manual", sleep_fn=no_sleep)


def test_the_shared_checks() -> None:
    assert check_neuron(3, "5Grw", 2, True).stake == 2.0
    with pytest.raises(ChainError):
        check_neuron(True, "5Grw", 1.0, 0)  # a bool is not a uid
    assert parse_weight_pairs("[[1, 0.5], [2, 0.5]]") == {1: 0.5, 2: 0.5}
    with pytest.raises(ChainError, match="twice"):
        parse_weight_pairs("[[1, 0.5], [1, 0.5]]")


class _HostileNode(SubstrateDouble):
    override: dict[str, Any] | None = None

    async def runtime_call(
        self, api: str, method: str, params: list, block_hash: Any = None
    ) -> Any:
        value = await super().runtime_call(api, method, params, block_hash)
        return {**value, **(self.override or {})} if isinstance(value, dict) else value


@pytest.mark.parametrize(
    "override",
    [
        {"hotkeys": 5},  # the SDK's decoder raises TypeError
        {"last_update": ["x", "y"]},  # ValueError
        {"total_stake": [1.5, float("nan")]},
        {"hotkeys": ["\x1b[2J", "x"]},
    ],
)
def test_a_malformed_metagraph_answer_is_a_chain_error(override: dict[str, Any]) -> None:
    node = _HostileNode()
    node.add_neuron(dev_key("Alice").ss58_address, stake=1.0)
    node.add_neuron(dev_key("Bob").ss58_address, stake=2.0)
    chain = BittensorChain(substrate=node, netuid=node.netuid, retries=1, sleep_fn=no_sleep)
    assert len(chain.metagraph()) == 2
    node.override = override
    with pytest.raises(ChainError):
        chain.metagraph()
        chain.last_weights_block()
    chain.close()
