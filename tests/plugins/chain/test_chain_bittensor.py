"""The Bittensor implementation through the SDK's own code, with the substrate double.

What is checked here beyond the shared interface tests: which extrinsics the SDK actually built
and who signed them (commitments by the hotkey, plain vs commit-reveal weights), the u16
normalisation, retries and clear errors when the endpoint is down, what is skipped when reading
other peers' commitments, and that nothing lands under ``~/.bittensor``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from _chain_helpers import dev_key, no_sleep
from substrate_double import SubstrateDouble

from covenant.engine.protocols import ChainError, ChainUnavailableError
from covenant.plugins.chain.bittensor_chain import BittensorChain, commitment_info
from covenant.plugins.chain.config import ChainConfig


def _two_neurons(double: SubstrateDouble) -> tuple[Any, Any]:
    validator, miner = dev_key("Alice"), dev_key("Bob")
    double.add_neuron(validator.ss58_address, stake=1000.0, validator_permit=True)
    double.add_neuron(miner.ss58_address, stake=1.0)
    return validator, miner


def test_commitment_is_the_raw_call_signed_by_the_hotkey(
    bt_chain: BittensorChain, double: SubstrateDouble
) -> None:
    _, miner = _two_neurons(double)
    bt_chain.commit(miner, "x" * 128)
    assert double.submitted[-1] == ("Commitments", "set_commitment", miner.ss58_address)
    stored = double.commitment_of[miner.ss58_address]["info"]["fields"]
    assert stored == [{"Raw128": "0x" + ("x" * 128).encode().hex()}]


def test_commitment_info_layout() -> None:
    assert commitment_info("abc") == {"fields": [[{"Raw3": b"abc"}]]}
    long = commitment_info("a" * 128 + "b" * 10)
    assert long == {"fields": [[{"Raw128": b"a" * 128}, {"Raw10": b"b" * 10}]]}


def test_plain_weights_go_through_set_weights_with_u16_values(
    bt_chain: BittensorChain, double: SubstrateDouble
) -> None:
    validator, _ = _two_neurons(double)
    result = bt_chain.set_weights(validator, {0: 0.25, 1: 0.75})
    assert result.ok and result.block == double.block
    assert double.submitted[-1] == (
        "SubtensorModule",
        "set_mechanism_weights",
        validator.ss58_address,
    )
    assert double.weights[0] == [(0, 21845), (1, 65535)]  # max-upscaled to u16 by the SDK


def test_commit_reveal_weights_are_timelocked(
    bt_chain: BittensorChain, double: SubstrateDouble
) -> None:
    validator, _ = _two_neurons(double)
    double.commit_reveal = True
    result = bt_chain.set_weights(validator, {0: 1.0, 1: 2.0})
    assert result.ok, result.reason
    assert double.submitted[-1] == (
        "SubtensorModule",
        "commit_timelocked_mechanism_weights",
        validator.ss58_address,
    )
    commit = double.timelocked[-1]
    assert commit["uid"] == 0 and len(commit["commit"]) > 64 and commit["reveal_round"] > 0
    assert f"round {commit['reveal_round']}" in result.reason
    assert 0 not in double.weights  # hidden until the chain reveals them


def test_chain_side_refusal_is_a_skip(bt_chain: BittensorChain, double: SubstrateDouble) -> None:
    validator, _ = _two_neurons(double)
    double.min_allowed_weights = 5  # the SDK's conform step refuses before signing
    result = bt_chain.set_weights(validator, {0: 1.0, 1: 1.0})
    assert not result.ok and "at least 5" in result.reason
    assert double.submitted == []


def test_endpoint_down_is_a_clear_error_after_retries(double: SubstrateDouble) -> None:
    validator, _ = _two_neurons(double)
    double.connect_failures = 100
    sleeps: list[float] = []
    chain = BittensorChain(
        substrate=double,
        netuid=double.netuid,
        retries=3,
        retry_backoff_s=0.5,
        sleep_fn=sleeps.append,
    )
    try:
        with pytest.raises(ChainUnavailableError, match="failed after 3 tries"):
            chain.block()
        assert double.calls.count("connect") == 3
        assert len(sleeps) == 2 and 0.5 <= sleeps[0] < sleeps[1]  # exponential backoff
        result = chain.set_weights(validator, {0: 1.0})
        assert not result.ok and "tries" in result.reason
    finally:
        chain.close()


def test_transient_outage_recovers(bt_chain: BittensorChain, double: SubstrateDouble) -> None:
    double.read_failures = 2
    assert bt_chain.block() == double.block


@pytest.mark.timeout(60)
def test_unreachable_real_endpoint(tmp_path: Path) -> None:
    # The SDK's real websocket backend against a closed local port: no network leaves the host.
    chain = BittensorChain(network="ws://127.0.0.1:9", retries=1, sleep_fn=no_sleep)
    try:
        with pytest.raises(ChainUnavailableError, match=r"127\.0\.0\.1:9"):
            chain.block()
    finally:
        chain.close()


def test_unreadable_commitments_are_skipped(
    bt_chain: BittensorChain, double: SubstrateDouble, caplog: pytest.LogCaptureFixture
) -> None:
    validator, miner = _two_neurons(double)
    carol, dave, gone = dev_key("Carol"), dev_key("Dave"), dev_key("Gone")
    double.add_neuron(carol.ss58_address)
    double.add_neuron(dave.ss58_address)
    raw = "0x" + b"ok-creds".hex()
    double.commitment_of = {
        validator.ss58_address: {"block": 900, "deposit": 0, "info": {"fields": [{"Raw8": raw}]}},
        # oversized for our limit (three full Raw fields = 384 bytes)
        miner.ss58_address: {
            "block": 901,
            "deposit": 0,
            "info": {"fields": [{"Raw128": "0x" + b"a".hex() * 128}] * 3},
        },
        # a control character
        carol.ss58_address: {
            "block": 902,
            "deposit": 0,
            "info": {"fields": [{"Raw3": "0x" + b"a\nb".hex()}]},
        },
        # still sealed by a timelock
        dave.ss58_address: {
            "block": 903,
            "deposit": 0,
            "info": {
                "fields": [{"TimelockEncrypted": {"encrypted": "0x00", "reveal_round": 10**12}}]
            },
        },
        # a hotkey that is no longer registered
        gone.ss58_address: {"block": 904, "deposit": 0, "info": {"fields": [{"Raw8": raw}]}},
    }
    with caplog.at_level(logging.WARNING):
        got = bt_chain.commitments()
    assert set(got) == {validator.ss58_address}
    assert (
        got[validator.ss58_address].data == "ok-creds" and got[validator.ss58_address].block == 900
    )
    assert caplog.text.count("skipping the commitment") == 3


def test_unknown_subnet_is_a_chain_error(double: SubstrateDouble) -> None:
    chain = BittensorChain(substrate=double, netuid=double.netuid + 1, sleep_fn=no_sleep)
    try:
        with pytest.raises(ChainError, match="does not exist"):
            chain.metagraph()
    finally:
        chain.close()


def test_sdk_cache_goes_to_the_run_dir_not_home(
    tmp_path: Path, double: SubstrateDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BTCLI_TOKEN_SYMBOLS_CACHE", raising=False)
    home = Path(os.environ["HOME"])
    cfg = ChainConfig(name="bittensor")
    chain = BittensorChain.from_config(cfg, tmp_path / "run", substrate=double, sleep_fn=no_sleep)
    try:
        chain.block()
    finally:
        chain.close()
    assert (tmp_path / "run" / "bittensor_token_symbols.json").is_file()
    assert not (home / ".bittensor").exists()


def test_block_time_and_future_timestamps(
    bt_chain: BittensorChain, double: SubstrateDouble
) -> None:
    now = double.block
    assert bt_chain.block_time() == double.block_time_s
    assert bt_chain.block_timestamp(now) == double.timestamp_ms(now) / 1000
    assert bt_chain.block_timestamp(now + 115) == pytest.approx(
        double.timestamp_ms(now) / 1000 + 115 * 12.0
    )
    with pytest.raises(ChainError):
        bt_chain.block_hash(now + 10)
