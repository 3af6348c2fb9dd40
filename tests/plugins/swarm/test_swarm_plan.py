"""``covenant swarm``: the plan is checked before anything starts (bad input: exit 2, nothing
started, nothing deleted), churn scripts parse, peer configs are complete and minimal."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from covenant.engine.session import open_session
from covenant.plugins.swarm.supervisor import Swarm, SwarmError, parse_churn, to_toml


def _cli(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "covenant.engine.cli.main",
            "swarm",
            "--config",
            "swarm-cpu",
            "--set",
            f'run.root="{tmp_path}"',
            *[x for s in sets for x in ("--set", s)],
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


def test_churn_script_parses_and_names_known_peers() -> None:
    events = parse_churn(
        ["start miner 5 at window 6", "kill miner 2 at window 4", "restart validator at window 8"],
        miners=4,
    )
    assert [(e.action, e.peer, e.window) for e in events] == [
        ("kill", "miner-2", 4),
        ("start", "miner-5", 6),
        ("restart", "validator", 8),
    ]
    with pytest.raises(SwarmError, match="miner 9"):
        parse_churn(["kill miner 9 at window 3"], miners=4)
    with pytest.raises(SwarmError, match="cannot read"):
        parse_churn(["explode miner 1 at window 3"], miners=4)
    with pytest.raises(SwarmError, match="numbered from 1"):
        parse_churn(["kill miner 0 at window 3"], miners=4)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['swarm.churn=["kill miner 7 at window 2"]'], "names miner 7"),
        (["swarm.miners=64"], "processes"),
        (['swarm.churn=["dance at window 2"]'], "cannot read"),
    ],
)
def test_a_bad_plan_exits_2_before_starting_anything(
    tmp_path: Path, sets: list[str], message: str
) -> None:
    res = _cli(tmp_path, *sets)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "swarm").exists()  # nothing was created, nothing started


def test_a_run_directory_of_another_run_is_refused_and_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "swarm"
    run_dir.mkdir()
    (run_dir / "swarm.json").write_text(json.dumps({"format": "covenant-swarm/1", "run_id": "x"}))
    (run_dir / "precious.txt").write_text("keep me")
    res = _cli(tmp_path)
    assert res.returncode == 2 and "holds run 'x'" in res.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["precious.txt", "swarm.json"]


def test_peer_configs_hold_their_role_and_load(tmp_path: Path) -> None:
    session = open_session("swarm-cpu", [f'run.root="{tmp_path}"'])
    swarm = Swarm.plan(session, [f'run.root="{tmp_path}"'])
    assert swarm.peers["miner-2"].tp == 2 and swarm.peers["miner-3"].adversary == "copier"
    assert "miner-5" in swarm.peers  # started by the churn script
    swarm.prepare_dir(resume=False)
    for name in ("validator", "miner-1", "miner-3"):
        path = swarm.peer_config(swarm.peers[name], tmp_path / "data")
        tree = tomllib.loads(path.read_text())
        enabled = tree["plugins"]["enable"]
        assert ("gauntlet" in enabled) == (name == "validator")
        assert ("adversaries" in enabled) == (name == "miner-3")
        assert "swarm" not in tree and tree["run"]["id"] == "swarm"
        assert tree["chain"]["hotkey"].endswith(f"keys/{name}.json")
        peer = open_session(path, [])  # the generated file is a valid config of its own
        assert peer.config.section("run").root == tmp_path / "swarm" / name


def test_toml_writer_round_trips() -> None:
    tree = {"a": {"x": 1, "y": 1e-5, "z": 'q"uote', "l": [1, 2.5, "s"], "b": True, "t": {"k": 2}}}
    assert tomllib.loads(to_toml(tree)) == tree


def test_swarm_json_keeps_the_start_time_across_rewrites_and_resume(tmp_path: Path) -> None:
    """A late join rewrites swarm.json; ``created`` (the report's time origin) stays the start."""

    class Chain:
        blocks_per_window = 30
        block_time_s = 1.0

    session = open_session("swarm-cpu", [f'run.root="{tmp_path}"'])
    swarm = Swarm.plan(session, [f'run.root="{tmp_path}"'])
    swarm.prepare_dir(resume=False)
    swarm.created = 1000.0
    swarm.write_meta(Chain())
    swarm.write_meta(Chain())  # later: a peer joined
    meta = json.loads((swarm.dir / "swarm.json").read_text())
    assert meta["created"] == 1000.0
    again = Swarm.plan(session, [f'run.root="{tmp_path}"'])
    assert again.created != 1000.0
    again.prepare_dir(resume=True)
    assert again.created == 1000.0


def test_stop_all_signals_every_peer_at_once_and_kills_the_stubborn(tmp_path: Path) -> None:
    import subprocess as sp

    from covenant.plugins.swarm.supervisor import Peer

    session = open_session("swarm-cpu", [f'run.root="{tmp_path}"'])
    swarm = Swarm.plan(session, [f'run.root="{tmp_path}"'])
    swarm.peers = {}
    for i, cmd in enumerate(
        [
            ["sleep", "60"],
            ["sleep", "60"],
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, "
                "signal.SIG_IGN); print('up', flush=True); time.sleep(60)",
            ],
        ]
    ):
        proc = sp.Popen(cmd, start_new_session=True, stdout=sp.PIPE)
        swarm.peers[f"p{i}"] = Peer(name=f"p{i}", role="miner", index=i, proc=proc)
    stubborn = swarm.peers["p2"].proc
    assert stubborn is not None and stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"up\n"  # its SIGTERM handler is in place
    codes = swarm.stop_all(3.0)
    assert codes == {"p0": -15, "p1": -15, "p2": -9}  # SIGTERM; the stubborn one killed
    assert not list(swarm.running())
