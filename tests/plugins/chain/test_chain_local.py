"""The local SQLite chain: signed writes, transactions, the clock, and its own bad inputs."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from _chain_helpers import dev_key, no_sleep

from covenant.engine.errors import ConfigError
from covenant.engine.protocols import ChainError, ChainUnavailableError, NotRegisteredError
from covenant.plugins.chain.local import InvalidExtrinsicError, LocalChain, signing_message


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_forged_signature_is_refused(local_chain: LocalChain) -> None:
    alice, bob = dev_key("Alice"), dev_key("Bob")
    local_chain.register(alice)
    ext = local_chain.sign(alice, "commit", {"data": "creds"})
    message = signing_message(
        local_chain.chain_id, ext.op, ext.hotkey, ext.nonce, ext.block, ext.payload
    )
    forged = dataclasses.replace(ext, signature=bob.sign(message))  # Bob signs as Alice
    with pytest.raises(InvalidExtrinsicError, match="bad signature"):
        local_chain.submit(forged)
    tampered = dataclasses.replace(ext, payload={"data": "evil"})  # Alice's signature, other data
    with pytest.raises(InvalidExtrinsicError, match="bad signature"):
        local_chain.submit(tampered)
    garbage = dataclasses.replace(ext, signature=b"\x00" * 3)
    with pytest.raises(InvalidExtrinsicError, match="bad signature"):
        local_chain.submit(garbage)
    assert local_chain.commitments() == {}
    local_chain.submit(ext)  # the genuine one still applies
    assert local_chain.commitments()[alice.ss58_address].data == "creds"


def test_replayed_and_stale_extrinsics_are_refused(local_chain: LocalChain) -> None:
    alice = dev_key("Alice")
    local_chain.register(alice)
    ext = local_chain.sign(alice, "commit", {"data": "one"})
    local_chain.submit(ext)
    with pytest.raises(InvalidExtrinsicError, match="nonce"):
        local_chain.submit(ext)  # replay
    old = local_chain.sign(alice, "commit", {"data": "two"})
    local_chain.advance(local_chain.extrinsic_mortality_blocks + 1)
    with pytest.raises(InvalidExtrinsicError, match="era"):
        local_chain.submit(old)


def test_signature_is_bound_to_this_chain(tmp_path: Path) -> None:
    alice = dev_key("Alice")
    one = LocalChain(tmp_path / "one.sqlite", clock="manual")
    two = LocalChain(tmp_path / "two.sqlite", clock="manual")
    one.register(alice)
    two.register(alice)
    ext = one.sign(alice, "commit", {"data": "creds"})
    with pytest.raises(InvalidExtrinsicError, match="bad signature"):
        two.submit(ext)  # same nonce and block, different genesis


def test_malformed_payloads_are_refused_by_the_node(local_chain: LocalChain) -> None:
    alice = dev_key("Alice")
    local_chain.register(alice)
    for op, payload in [
        ("commit", {"data": "x", "extra": 1}),
        ("commit", {"data": "x" * 500}),
        ("set_weights", {"weights": [[0, -1.0]]}),
        ("set_weights", {"weights": [[5, 1.0]]}),
        ("set_weights", {"weights": [[0, 1.0], [0, 2.0]]}),
        ("set_weights", {"weights": "all"}),
    ]:
        with pytest.raises(ChainError):
            local_chain.submit(local_chain.sign(alice, op, payload))
    with pytest.raises(InvalidExtrinsicError, match="unknown operation"):
        local_chain.submit(local_chain.sign(alice, "sudo", {}))
    assert local_chain.commitments() == {} and local_chain.weights_history() == []


def test_failure_mid_write_leaves_nothing_behind(tmp_path: Path) -> None:
    class Crashing(LocalChain):
        def _apply(self, conn: sqlite3.Connection, ext: Any) -> Any:
            super()._apply(conn, ext)  # the op, the nonce and the log row are written...
            raise RuntimeError("power cut")  # ...and then the process fails before COMMIT

    path = tmp_path / "chain.sqlite"
    alice = dev_key("Alice")
    LocalChain(path, clock="manual").register(alice)
    crashing = Crashing(path, clock="manual")
    with pytest.raises(RuntimeError):
        crashing.commit(alice, "half-written?")
    fresh = LocalChain(path, clock="manual")
    assert fresh.commitments() == {}
    assert _count(path, "extrinsics") == 1  # only the registration
    fresh.commit(alice, "whole")  # the nonce did not move: the next write applies
    assert fresh.commitments()[alice.ss58_address].data == "whole"


def test_locked_database_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    chain = LocalChain(path, clock="manual", busy_timeout_s=0.05, retries=2, sleep_fn=no_sleep)
    alice = dev_key("Alice")
    chain.register(alice)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(ChainUnavailableError, match="2 tries"):
            chain.commit(alice, "creds")
        result = chain.set_weights(alice, {0: 1.0})
        assert not result.ok and "tries" in result.reason
        assert chain.block() == 0  # WAL: reads go on while a writer holds the lock
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    chain.commit(alice, "creds")
    assert chain.commitments()[alice.ss58_address].data == "creds"


def test_clock_settings_must_match_the_database(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    LocalChain(path, block_time_s=0.5, blocks_per_window=10)
    with pytest.raises(ConfigError, match="block_time_s"):
        LocalChain(path, block_time_s=1.0, blocks_per_window=10)
    with pytest.raises(ConfigError, match="blocks_per_window"):
        LocalChain(path, block_time_s=0.5, blocks_per_window=20)
    with pytest.raises(ConfigError, match="clock"):
        LocalChain(path, block_time_s=0.5, blocks_per_window=10, clock="manual")


def test_wall_clock_follows_time_from_genesis(tmp_path: Path) -> None:
    now = [1_000_000.0]

    def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    chain = LocalChain(
        tmp_path / "c.sqlite", block_time_s=2.0, time_fn=lambda: now[0], sleep_fn=fake_sleep
    )
    assert chain.genesis_time == 1_000_000.0 and chain.block() == 0
    now[0] += 7.9
    assert chain.block() == 3
    assert chain.block_timestamp(3) == 1_000_006.0
    # A second process opening the same file agrees (genesis comes from the database).
    other = LocalChain(tmp_path / "c.sqlite", block_time_s=2.0, time_fn=lambda: now[0])
    assert other.block() == 3 and other.block_hash(2) == chain.block_hash(2)
    assert chain.wait_for_block(10) == 10
    assert now[0] == pytest.approx(1_000_020.0, abs=0.01)
    with pytest.raises(ChainError, match="manual"):
        chain.advance(1)


def test_block_hash_of_the_future_is_an_error(local_chain: LocalChain) -> None:
    with pytest.raises(ChainError, match="no hash yet"):
        local_chain.block_hash(local_chain.block() + 1)


def test_full_chain_replaces_the_weakest_not_a_validator(tmp_path: Path) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", clock="manual", max_uids=3)
    keys = [dev_key(n) for n in ("Alice", "Bob", "Charlie", "Dave", "Eve")]
    for k in keys[:3]:
        chain.register(k)
    chain.set_stake(keys[0].ss58_address, 0.0, validator_permit=True)  # permit protects uid 0
    chain.set_stake(keys[1].ss58_address, 5.0)
    assert chain.register(keys[3]) == 2  # Charlie (no permit, no stake) loses uid 2
    assert chain.uid_of(keys[2].ss58_address) is None
    assert chain.register(keys[4]) == 2  # now Dave is the weakest (no permit, no stake)
    assert [n.hotkey for n in chain.metagraph()] == [
        k.ss58_address for k in (keys[0], keys[1], keys[4])
    ]
    assert chain.register(keys[0]) == 0  # registering again is a no-op


def test_malformed_commitment_in_the_database_is_skipped(
    local_chain: LocalChain, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = dev_key("Alice"), dev_key("Bob")
    local_chain.register(alice)
    local_chain.register(bob)
    local_chain.commit(alice, "good")
    # Someone writes around the signed path (a damaged or hostile database row).
    with sqlite3.connect(local_chain.path) as conn:
        conn.execute("INSERT INTO commitments VALUES (?, ?, 0)", (bob.ss58_address, "x" * 10_000))
    with caplog.at_level(logging.WARNING):
        got = local_chain.commitments()
    assert set(got) == {alice.ss58_address}
    assert "skipping the commitment" in caplog.text


def test_admin_stake_needs_a_registered_hotkey(local_chain: LocalChain) -> None:
    with pytest.raises(NotRegisteredError):
        local_chain.set_stake(dev_key("Alice").ss58_address, 1.0)
    local_chain.register(dev_key("Alice"))
    with pytest.raises(ChainError, match="finite"):
        local_chain.set_stake(dev_key("Alice").ss58_address, float("nan"))


def test_weights_history_is_kept(local_chain: LocalChain) -> None:
    alice, bob = dev_key("Alice"), dev_key("Bob")
    local_chain.register(alice)
    local_chain.register(bob)
    assert local_chain.set_weights(alice, {0: 1.0, 1: 3.0}).ok
    local_chain.advance(10)
    assert local_chain.set_weights(alice, {1: 1.0}).ok
    history = local_chain.weights_history()
    assert [r.block for r in history] == [10, 0]
    assert history[1].weights == {0: 0.25, 1: 0.75}
    assert local_chain.last_weights_block() == {0: 10}
