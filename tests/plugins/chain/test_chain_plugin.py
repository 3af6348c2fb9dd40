"""The plugin's wiring (config section, provider hook) and the ``covenant chain`` commands."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from covenant.engine.errors import ConfigError
from covenant.engine.plugins import discover
from covenant.engine.protocols import Chain
from covenant.engine.session import open_session
from covenant.plugins.chain import plugin
from covenant.plugins.chain.bittensor_chain import BittensorChain
from covenant.plugins.chain.cli import app
from covenant.plugins.chain.config import ChainConfig
from covenant.plugins.chain.local import LocalChain


def _session(tmp_path: Path, *sets: str) -> Any:
    return open_session(
        None,
        [f"run.root={tmp_path}", *sets],
        environ={"COVENANT_PLUGINS": ""},
        extra_plugins=[("chain", plugin)],
    )


def test_local_chain_from_the_hook(tmp_path: Path) -> None:
    session = _session(tmp_path, "chain.clock=manual")
    chain = session.hook.covenant_chain(config=session.config)
    assert isinstance(chain, LocalChain) and isinstance(chain, Chain)
    assert chain.path == tmp_path / "local" / "chain.sqlite"
    assert chain.blocks_per_window == 10 and chain.block_time_s == 0.5


def test_bittensor_chain_from_the_hook(tmp_path: Path) -> None:
    session = _session(tmp_path, "chain.name=bittensor", "chain.network=test", "chain.netuid=268")
    chain = session.hook.covenant_chain(config=session.config)
    assert isinstance(chain, BittensorChain) and isinstance(chain, Chain)
    assert (chain.network, chain.netuid, chain.blocks_per_window) == ("test", 268, 115)


def test_per_chain_defaults_never_beat_explicit_values() -> None:
    assert ChainConfig(name="bittensor").blocks_per_window == 115
    assert ChainConfig(name="bittensor").block_time_s == 12.0
    assert ChainConfig(name="bittensor", blocks_per_window=20).blocks_per_window == 20
    assert ChainConfig().blocks_per_window == 10


def test_bad_chain_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[chain\] name"):
        _session(tmp_path, "chain.name=ethereum")
    with pytest.raises(ConfigError, match="unknown key"):
        _session(tmp_path, "chain.blocks=3")


def _cli_env() -> dict[str, str]:
    # Only this plugin: by its entry point once installed, else the CLI registers it by hand.
    return {"COVENANT_PLUGINS": "chain" if "chain" in discover() else ""}


def _cli(tmp_path: Path, *args: str) -> Any:
    runner = CliRunner()
    sets = ["--set", f"run.root={tmp_path}", "--set", "chain.clock=manual"]
    return runner.invoke(app, [*args, *sets], env=_cli_env())


def test_cli_register_and_status(tmp_path: Path) -> None:
    first = _cli(
        tmp_path, "register", "--hotkey", "//Alice", "--stake", "100", "--validator", "--json"
    )
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["uid"] == 0
    second = _cli(tmp_path, "register", "--hotkey", "//Bob")
    assert second.exit_code == 0 and "uid 1" in second.output
    advanced = _cli(tmp_path, "advance", "12")
    assert advanced.exit_code == 0 and "block 12" in advanced.output
    status = _cli(tmp_path, "status", "--json")
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert (data["block"], data["window"], data["next_window_block"]) == (12, 1, 20)
    assert data["seconds_to_next_window"] == pytest.approx(8 * 0.5)
    assert [(n["uid"], n["stake"], n["validator_permit"]) for n in data["neurons"]] == [
        (0, 100.0, True),
        (1, 0.0, False),
    ]
    table = _cli(tmp_path, "status")
    assert table.exit_code == 0 and "metagraph (2 neurons)" in table.output


def test_cli_user_errors_exit_2(tmp_path: Path) -> None:
    bad_key = _cli(tmp_path, "register", "--hotkey", str(tmp_path / "missing.json"))
    assert bad_key.exit_code == 2 and "no such key file" in bad_key.output
    runner = CliRunner()
    on_bittensor = runner.invoke(
        app,
        [
            "register",
            "--hotkey",
            "//Alice",
            "--set",
            f"run.root={tmp_path}",
            "--set",
            "chain.name=bittensor",
        ],
        env=_cli_env(),
    )
    assert on_bittensor.exit_code == 2 and "btcli" in on_bittensor.output


def test_cli_keygen(tmp_path: Path) -> None:
    result = _cli(tmp_path, "keygen", "miner-0")
    assert result.exit_code == 0, result.output
    path = tmp_path / "local" / "keys" / "miner-0.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = _cli(tmp_path, "keygen", "miner-0")
    assert again.exit_code == 2 and "already exists" in again.output
