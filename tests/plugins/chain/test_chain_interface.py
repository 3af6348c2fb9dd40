"""The Chain interface, run against both implementations (local SQLite, Bittensor SDK + double).

Every test here holds for any provider of :class:`covenant.engine.protocols.Chain`: the clock
and windows, the metagraph, commitments, weights, and the bad inputs of the issue (oversized or
malformed commitments, unregistered hotkeys, re-registered uids, unknown uids, rate limits).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from _chain_helpers import RATE_LIMIT, dev_key

from covenant.engine.protocols import (
    Chain,
    CommitmentError,
    NotRegisteredError,
    window_of,
    window_start_block,
)


def _setup(h: Any) -> tuple[Any, Any]:
    validator, miner = dev_key("Alice"), dev_key("Bob")
    assert h.register(validator, stake=1000.0, validator=True) == 0
    assert h.register(miner, stake=2.0) == 1
    return validator, miner


def test_is_a_chain(chain_harness: Any) -> None:
    assert isinstance(chain_harness.chain, Chain)


def test_clock_windows_and_hashes(chain_harness: Any) -> None:
    chain = chain_harness.chain
    start = chain.block()
    chain_harness.advance(3)
    now = chain.block()
    assert now == start + 3
    assert window_of(now, chain.blocks_per_window) == now // chain.blocks_per_window
    t0, t1 = chain.block_timestamp(now - 1), chain.block_timestamp(now)
    assert t1 > t0 > 1.6e9  # seconds since the epoch, increasing
    # Future blocks are predicted at the chain's block time.
    future = window_start_block(
        window_of(now, chain.blocks_per_window) + 1, chain.blocks_per_window
    )
    assert chain.block_timestamp(future) == pytest.approx(t1 + (future - now) * (t1 - t0), rel=1e-6)
    h = chain.block_hash(now - 2)
    assert h == chain.block_hash(now - 2)
    assert h != chain.block_hash(now - 1)
    assert h.startswith("0x") and len(h) == 66


def test_metagraph_lists_uids_stakes_and_permits(chain_harness: Any) -> None:
    validator, miner = _setup(chain_harness)
    graph = chain_harness.chain.metagraph()
    assert [n.uid for n in graph] == [0, 1]
    assert [n.hotkey for n in graph] == [validator.ss58_address, miner.ss58_address]
    assert graph[0].stake == pytest.approx(1000.0) and graph[0].validator_permit
    assert graph[1].stake == pytest.approx(2.0) and not graph[1].validator_permit


def test_commit_and_read_back(chain_harness: Any) -> None:
    chain = chain_harness.chain
    _, miner = _setup(chain_harness)
    assert chain.commitments() == {}
    creds = "a" * 32 + "b" * 32 + "c" * 64  # the production 128-character layout
    chain.commit(miner, creds)
    got = chain.commitments()
    assert set(got) == {miner.ss58_address}
    assert got[miner.ss58_address].data == creds
    first_block = got[miner.ss58_address].block
    chain_harness.advance(2)
    chain.commit(miner, "v2:short")
    latest = chain.commitments()[miner.ss58_address]
    assert latest.data == "v2:short" and latest.block > first_block


@pytest.mark.parametrize(
    "bad",
    ["x" * 129, "é" * 65, "line\nbreak", "tab\there", "", "nul\x00"],
    ids=["oversized", "oversized-utf8", "newline", "tab", "empty", "nul"],
)
def test_bad_commitment_is_refused_before_submission(chain_harness: Any, bad: str) -> None:
    _, miner = _setup(chain_harness)
    with pytest.raises(CommitmentError):
        chain_harness.chain.commit(miner, bad)
    assert chain_harness.chain.commitments() == {}


def test_unregistered_hotkey_cannot_commit_or_set_weights(chain_harness: Any) -> None:
    _setup(chain_harness)
    stranger = dev_key("Mallory")
    with pytest.raises(NotRegisteredError):
        chain_harness.chain.commit(stranger, "creds")
    result = chain_harness.chain.set_weights(stranger, {0: 1.0})
    assert not result.ok and "not registered" in result.reason.lower().replace("_", " ")


def test_set_weights_drops_unknown_uids(chain_harness: Any) -> None:
    validator, _ = _setup(chain_harness)
    result = chain_harness.chain.set_weights(validator, {0: 1.0, 1: 3.0, 42: 5.0})
    assert result.ok, result.reason
    assert "42" in result.reason
    assert result.block is not None


def test_set_weights_only_unknown_uids_is_a_skip(chain_harness: Any) -> None:
    validator, _ = _setup(chain_harness)
    result = chain_harness.chain.set_weights(validator, {7: 1.0, 8: 1.0})
    assert not result.ok and "no weights" in result.reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_set_weights_invalid_values_is_a_skip(chain_harness: Any, value: float) -> None:
    validator, _ = _setup(chain_harness)
    result = chain_harness.chain.set_weights(validator, {0: 1.0, 1: value})
    assert not result.ok and "uid 1" in result.reason


def test_set_weights_rate_limit_is_a_recorded_skip(chain_harness: Any) -> None:
    validator, _ = _setup(chain_harness)
    assert chain_harness.chain.set_weights(validator, {1: 1.0}).ok
    again = chain_harness.chain.set_weights(validator, {1: 1.0})
    assert not again.ok and "rate" in again.reason.lower()
    chain_harness.advance(RATE_LIMIT + 1)
    assert chain_harness.chain.set_weights(validator, {1: 1.0}).ok


def test_reregistered_uid_changes_hotkey(chain_harness: Any) -> None:
    chain = chain_harness.chain
    validator, miner = _setup(chain_harness)
    chain.commit(miner, "old-miner-creds")
    newcomer = dev_key("Charlie")
    uid = chain_harness.register_replacing(newcomer)
    assert uid == 1  # the weakest uid (no permit, least stake) is handed over
    graph = chain.metagraph()
    assert graph[1].hotkey == newcomer.ss58_address
    assert graph[0].hotkey == validator.ss58_address
    # The replaced hotkey's commitment is not a peer's any more; it cannot write either.
    assert miner.ss58_address not in chain.commitments()
    with pytest.raises(NotRegisteredError):
        chain.commit(miner, "still-here")
    assert not chain.set_weights(miner, {0: 1.0}).ok
    chain.commit(newcomer, "new-creds")
    assert chain.commitments()[newcomer.ss58_address].data == "new-creds"


def test_wait_for_block(chain_harness: Any) -> None:
    chain = chain_harness.chain
    now = chain.block()
    assert chain.wait_for_block(now) == now
    assert chain.wait_for_block(now - 1) == now
    # Nothing moves the chain here: the wait gives up at the timeout and says where it is.
    assert chain.wait_for_block(now + 5, timeout_s=0.05) == now
