"""The local swarm end to end, as separate OS processes: the facts ``make run`` promises,
asserted from the run directory (metrics, records, events), never from log text.

A shortened ``swarm-cpu``: three miners (miner 3 a copier of miner 2), miner 1 killed in run
window 2 and started again in window 4 (it resumes and catches up), miner 4 joining in window 4
(checkpoint + replay), one validator, 20-second windows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("swarm")
    sets = [
        f'run.root="{root}"',
        "swarm.miners=3",
        "swarm.tp2_miners=[]",
        "swarm.windows=9",
        'swarm.churn=["kill miner 1 at window 2", "start miner 1 at window 4", '
        '"start miner 4 at window 4"]',
        "chain.blocks_per_window=20",
        "gauntlet.start_delay_windows=4",
        "gauntlet.checkpoint_interval=3",
        "train.inner_steps=6",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(root)}
    env.pop("COVENANT_PLUGINS", None)
    res = subprocess.run(
        [sys.executable, "-m", "covenant.engine.cli.main", "swarm", "--config", "swarm-cpu"]
        + [x for s in sets for x in ("--set", s)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return root / "swarm"


def _meta(run: Path) -> dict[str, Any]:
    return json.loads((run / "swarm.json").read_text())


def _uid(run: Path, name: str) -> int:
    return next(p["uid"] for p in _meta(run)["peers"] if p["name"] == name)


def test_the_global_model_learns(run: Path) -> None:
    lines = [x for x in _jsonl(run / "validator/swarm/metrics.jsonl") if x["kind"] == "validator"]
    assert len(lines) >= 9
    losses = [x["val_loss"] for x in lines]
    assert losses[-1] < losses[0] - 0.5, losses
    assert sum(x["applied"] for x in lines) >= 4  # outer steps were applied


def test_honest_miners_hold_the_weight_and_the_copier_is_penalised(run: Path) -> None:
    records = run / "validator/swarm/records"
    windows = sorted(int(p.name) for p in records.iterdir() if p.is_dir())
    weights: dict[str, float] = {}
    slashes: list[dict[str, Any]] = []
    for w in windows:
        summary = json.loads((records / str(w) / "window.json").read_text())
        slashes += summary["slashes"]
        if summary.get("weights"):
            weights = summary["weights"]
    burn = str(_meta(run)["burn_uid"])
    copier = _uid(run, "miner-3")
    non_burn = {u: w for u, w in weights.items() if u != burn}
    assert sum(non_burn.values()) > 0, weights
    assert non_burn.get(str(copier), 0.0) / sum(non_burn.values()) < 0.05
    assert any(s["uid"] == copier and s["rule"].startswith("copy") for s in slashes), slashes
    victim = _uid(run, "miner-2")  # uploads before the copier: only the later one is flagged
    assert not any(s["uid"] == victim and s["rule"].startswith("copy") for s in slashes), slashes


def _windows(run: Path, peer: str) -> list[dict[str, Any]]:
    return [x for x in _jsonl(run / peer / "swarm" / "metrics.jsonl") if x["kind"] == "window"]


def _validator_losses(run: Path) -> dict[int, float]:
    lines = _jsonl(run / "validator/swarm/metrics.jsonl")
    return {int(x["window"]): x["val_loss"] for x in lines if x["kind"] == "validator"}


def test_a_restarted_and_a_late_miner_catch_up(run: Path) -> None:
    events = _jsonl(run / "events.jsonl")
    assert any(e["event"] == "kill" and e["peer"] == "miner-1" for e in events)
    assert any(e["event"] == "restart" and e["peer"] == "miner-1" for e in events)
    assert any(e["event"] == "join" and e["peer"] == "miner-4" for e in events)
    validator = _validator_losses(run)
    for name in ("miner-1", "miner-4"):
        lines = _windows(run, name)
        caught = [x for x in lines if "catch_up_s" in x]
        assert caught, f"{name} never caught up"
        first = caught[-1]
        assert first["applied"] == 1.0
        # after catching up it holds the global model: the same held-out loss as the validator
        same = [x for x in lines if x["window"] > first["window"] and int(x["window"]) in validator]
        assert same, f"{name}: no window after catching up"
        for x in same:
            assert x["val_loss"] == pytest.approx(validator[int(x["window"])], abs=1e-4)
    joiner = next(x for x in _windows(run, "miner-4") if "catch_up_s" in x)
    assert joiner["checkpoint"] >= 0  # it started from a published checkpoint


def test_the_report_is_written(run: Path) -> None:
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
