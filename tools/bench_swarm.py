"""Swarm timing: where a window's wall time goes, how it scales with miners, catch-up speed.

Runs ``covenant swarm --config swarm-cpu`` (separate OS processes, this machine) with N honest
miners for a few windows each, then reads every peer's ``metrics.jsonl``:

* per miner and window: the inner loop (sum of ``step_time_s``), the outer step (encode,
  upload, gather, apply), waiting for the window's end (``wait_s``) and the inner steps done;
* per window: the validator's processing time (``total_s``, its ``stage1_s``/``eval_s``);
* catch-up: a miner that joins late loads the latest checkpoint and replays the later aggregate
  records; ``catch_up_s / replayed`` is the time per replayed window.

Prints JSON (``--out`` also writes it). Example::

    python tools/bench_swarm.py --miners 2 4 8 --windows 4 --out runs/bench_swarm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def run_swarm(root: Path, miners: int, windows: int, bpw: int, churn: list[str]) -> float:
    sets = [
        f'run.root="{root}"',
        f"swarm.miners={miners}",
        f"swarm.windows={windows}",
        "swarm.tp2_miners=[]",
        "swarm.adversaries={}",
        f"swarm.churn={json.dumps(churn)}",
        "swarm.max_processes_per_core=8",
        f"chain.blocks_per_window={bpw}",
        "gauntlet.checkpoint_interval=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("COVENANT_PLUGINS", None)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "covenant.engine.cli.main", "swarm", "--config", "swarm-cpu"]
        + [x for s in sets for x in ("--set", s)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=7200,
    )
    if res.returncode != 0:
        raise SystemExit(f"swarm failed ({res.returncode}): {res.stderr[-3000:]}")
    return time.perf_counter() - t0


def summarise(run: Path, window_s: float) -> dict[str, Any]:
    meta = json.loads((run / "swarm.json").read_text())
    start = meta["start_window"]
    per: dict[str, list[float]] = {"inner_s": [], "outer_s": [], "wait_s": [], "steps": []}
    catch: list[dict[str, float]] = []
    for peer in meta["peers"]:
        lines = _jsonl(run / peer["run_dir"] / "metrics.jsonl")
        if peer["role"] != "miner":
            continue
        train = [x for x in lines if x.get("kind") == "train"]
        windows = [x for x in lines if x.get("kind") == "window"]
        by_window: dict[int, float] = {}
        for w in windows:
            ws = int(w["window"])
            steps = int(w.get("inner_steps", 0))
            by_window[ws] = steps
        # inner-loop time per window: the step times of the window's steps, in order
        cursor = 0
        for w in windows:
            n = int(w.get("inner_steps", 0))
            inner = sum(float(x.get("step_time_s", 0.0)) for x in train[cursor : cursor + n])
            cursor += n
            if "catch_up_s" in w:
                catch.append(
                    {"catch_up_s": float(w["catch_up_s"]), "replayed": float(w["replayed"])}
                )
            if int(w["window"]) < start + 1:
                continue  # the first window is cut by start-up
            per["inner_s"].append(inner)
            per["outer_s"].append(
                sum(float(w.get(k, 0.0)) for k in ("encode_s", "upload_s", "gather_s", "apply_s"))
            )
            per["wait_s"].append(float(w.get("wait_s", 0.0)))
            per["steps"].append(float(n))
    vlines = [
        x
        for x in _jsonl(run / "validator" / meta["run_id"] / "metrics.jsonl")
        if x.get("kind") == "validator"
    ]
    validator = [float(x["total_s"]) for x in vlines if int(x["window"]) > start]
    stage2 = [float(x.get("eval_s", 0.0)) for x in vlines if int(x["window"]) > start]

    def mean(xs: list[float]) -> float | None:
        return round(statistics.fmean(xs), 3) if xs else None

    out: dict[str, Any] = {
        "window_s": window_s,
        "miner_windows": len(per["steps"]),
        "inner_loop_s": mean(per["inner_s"]),
        "outer_step_s": mean(per["outer_s"]),
        "waiting_s": mean(per["wait_s"]),
        "inner_steps": mean(per["steps"]),
        "validator_s": mean(validator),
        "validator_stage2_s": mean(stage2),
    }
    replays = [c["catch_up_s"] / c["replayed"] for c in catch if c["replayed"] > 0]
    if replays:
        out["catch_up_s_per_replayed_window"] = mean(replays)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--miners", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--blocks-per-window", type=int, default=30, help="seconds per window")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "command": " ".join(sys.argv),
        "runs": [],
    }
    for n in args.miners:
        with tempfile.TemporaryDirectory() as tmp:
            # the last miner joins in the middle: its catch-up is measured too
            churn = [f"start miner {n + 1} at window {max(2, args.windows // 2)}"]
            wall = run_swarm(Path(tmp), n, args.windows, args.blocks_per_window, churn)
            row = {"miners": n, "wall_s": round(wall, 1)}
            row.update(summarise(Path(tmp) / "swarm", float(args.blocks_per_window)))
            results["runs"].append(row)
            print(json.dumps(row), file=sys.stderr)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
