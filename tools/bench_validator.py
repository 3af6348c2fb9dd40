"""Benchmark: the Gauntlet validator per window, OpenSkill ratings, and the production projection.

* ``window``: the real :func:`covenant.engine.validate.run_validator` for ``--windows`` windows
  against ``--peers`` honest miners (real SparseLoCo payloads with data receipts, a manual local
  chain, ``file://`` stores: the world of ``tests/plugins/gauntlet/_validator_world.py``), on
  the ``--preset`` model (default ``tiny``: 4 layers, hidden 256) with vocab 512 and 64-token
  sequences. Every stage of ``GauntletScorer.process_window`` is timed by wrapping the function
  that does it, in wall time and in this process's CPU time (the development machine is shared:
  CPU time is the fairer number there): stage 1 (the metagraph, the shard, fetching and
  verifying every upload, receipts, payload checks, tile indices: ``_miners``, ``_shard``,
  ``fetch_gradients``, ``_stage1``), sync (fetching ``debug/{S-1}`` + ``rules.sync_score``), copy
  detection (``rules.pairwise_overlaps``), the other stage-1 rules (inactivity, gather miss,
  selection), stage 2 (``_evaluate``: losses before/after for each drawn peer), match and
  weights (``Gauntlet.finish_window``: negative evaluations, the OpenSkill match, final scores,
  weights, peer list), records (signing and writing every score record, storing it, the weight
  submission) and the apply of the aggregate (``outer.apply``); "other" is the rest (aggregate
  record, model hash, eval seed, own sync sample). Medians over the windows after the first
  (the first has no step-size EMA and pays one-time costs). The miners' own training happens
  while the validator waits and is not counted.
* ``ratings``: one OpenSkill ``PlackettLuce(beta=7, tau=0.1)`` free-for-all match through
  :func:`covenant.plugins.gauntlet.rules.rate_match` for 256 and 1024 players (median of
  ``--repeats``).
* ``projection``: stage 2 of 20 peers for templar-1b and covenant-72b against one window of
  115 blocks x 12 s, from forward FLOPs per token and the H200 rate measured in
  docs/BENCHMARKS.md (assumptions are listed in the output).

Prints one JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_validator.py [--peers 20] [--windows 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# --- projection inputs (docs/BENCHMARKS.md, SPEC 1 and 7) ----------------------------------------
H200_TFLOPS_ACHIEVED = 277.0  # templar-1b bf16 training on one H200: 0.280 MFU of 989 TFLOP/s
H200_DECODE_PARAMS_PER_S = 20.1e9  # SparseLoCo decode, one templar-1b layer, H200
H200_HBM_BYTES_PER_S = 4.8e12
WINDOW_BLOCKS, BLOCK_S = 115, 12.0
OWN_SAMPLES, RANDOM_SAMPLES, PEERS = 8, 8, 20

STAGES = (
    "stage1_fetch_checks",
    "sync",
    "copy_detection",
    "stage1_rules_other",
    "stage2_evaluation",
    "match_weights",
    "records",
    "apply",
    "other",
)


class _Timer:
    """Accumulates the seconds spent in wrapped callables, per stage, for the current window:
    wall time (``acc``) and this process's CPU time (``cpu``: what a machine shared with other
    jobs still measures fairly; the run is single-threaded with ``OMP_NUM_THREADS=1``)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.acc[stage] = self.acc.get(stage, 0.0) + time.perf_counter() - t0
                self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - c0

        setattr(owner, name, timed)

    def wrap_iter(self, owner: Any, name: str, stage: str) -> None:
        """Like :meth:`wrap` for a generator function: each item's production is timed."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            items = original(*args, **kwargs)
            while True:
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self.acc[stage] = self.acc.get(stage, 0.0) + time.perf_counter() - t0
                    self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - c0
                yield item

        setattr(owner, name, timed)


def _split(acc: dict[str, float], total: float) -> dict[str, float]:
    """Per-stage seconds of one window from the wrapped callables' totals."""
    row = {
        "stage1_fetch_checks": acc.get("stage1", 0.0),
        "sync": acc.get("sync_fetch", 0.0) + acc.get("sync_rules", 0.0),
        "copy_detection": acc.get("copy_detection", 0.0),
        # begin_window holds copy detection and rules.sync_score besides its other rules
        "stage1_rules_other": max(
            0.0,
            acc.get("begin_window", 0.0)
            - acc.get("copy_detection", 0.0)
            - acc.get("sync_rules", 0.0),
        ),
        "stage2_evaluation": acc.get("stage2_evaluation", 0.0),
        "match_weights": acc.get("match_weights", 0.0),
        "records": acc.get("records", 0.0),
        "apply": acc.get("apply", 0.0),
        "total": total,
    }
    row["other"] = total - sum(row[s] for s in STAGES if s != "other")
    return row


def bench_window(peers: int, windows: int, preset: str, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests" / "plugins" / "gauntlet"))
    from _validator_world import World, prepare_data

    from covenant.plugins.gauntlet import rules

    data = prepare_data(work / "data")
    world = World(
        work / "run",
        data,
        miners=peers,
        model_preset=preset,
        gauntlet={"keep_window_checkpoints": 2},
    )
    timer = _Timer()
    per_window: list[dict[str, Any]] = []

    def instrument(scorer: Any) -> None:
        for module_fn, stage in (
            ("pairwise_overlaps", "copy_detection"),
            ("sync_score", "sync_rules"),
            ("rate_match", "rate_match"),
        ):
            timer.wrap(rules, module_fn, stage)
        timer.wrap(scorer, "_miners", "stage1")
        timer.wrap(scorer, "_shard", "stage1")
        timer.wrap_iter(scorer.services.exchange, "fetch_gradients", "stage1")
        timer.wrap(scorer, "_stage1", "stage1")
        timer.wrap(scorer, "_sync_samples", "sync_fetch")
        timer.wrap(scorer, "_evaluate", "stage2_evaluation")
        timer.wrap(scorer, "_publish", "records")
        timer.wrap(scorer.outer, "apply", "apply")
        timer.wrap(scorer.gauntlet, "begin_window", "begin_window")
        timer.wrap(scorer.gauntlet, "finish_window", "match_weights")
        original = scorer.process_window

        def process_window(window: int) -> dict[str, float]:
            timer.acc, timer.cpu = {}, {}
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = original(window)
            total, cpu_total = time.perf_counter() - t0, time.process_time() - c0
            wall, cpu = _split(timer.acc, total), _split(timer.cpu, cpu_total)
            per_window.append(
                {
                    "window": window,
                    "wall": wall,
                    "cpu": cpu,
                    "rate_match": timer.acc.get("rate_match", 0.0),
                    "evaluated": metrics["evaluated"],
                    "gathered": metrics["gathered"],
                }
            )
            return metrics

        scorer.process_window = process_window

    world.on_scorer = instrument
    t0 = time.perf_counter()
    world.run(windows)
    wall = time.perf_counter() - t0
    steady = per_window[1:] or per_window

    def median(kind: str) -> dict[str, float]:
        return {
            s: round(statistics.median(r[kind][s] for r in steady), 4) for s in (*STAGES, "total")
        }

    wall_median, cpu_median = median("wall"), median("cpu")
    shape = world.scorer._shapes if world.scorer is not None else {}
    params = sum(int(_prod(s)) for s in shape.values())
    return {
        "preset": preset,
        "params": params,
        "peers": peers,
        "windows": windows,
        "evaluated_per_window": [r["evaluated"] for r in per_window],
        "median_wall_s_per_window": wall_median,
        "median_cpu_s_per_window": cpu_median,
        "stage2_cpu_s_per_peer": round(cpu_median["stage2_evaluation"] / max(1, peers), 4),
        "rate_match_s": round(statistics.median(r["rate_match"] for r in steady), 4),
        "per_window": per_window,
        "wall_s_with_miners": round(wall, 1),
    }


def _prod(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def bench_ratings(players: list[int], repeats: int) -> dict[str, Any]:
    import numpy as np

    from covenant.plugins.gauntlet import rules

    out: dict[str, Any] = {}
    for n in players:
        rng = np.random.default_rng(n)
        scores = {u: float(s) for u, s in enumerate(rng.normal(0, 0.01, n))}
        ratings = {u: (25.0 + float(m), 8.0) for u, m in enumerate(rng.normal(0, 2, n))}
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            rules.rate_match(scores, ratings)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out[str(n)] = {
            "median_s": round(statistics.median(times), 4),
            "median_cpu_s": round(statistics.median(cpu), 4),
            "repeats": repeats,
        }
    return out


def _matmul_params(p: dict[str, int]) -> int:
    """Parameters touched by a matmul per token: every layer and the output layer (the input
    embedding is a lookup), as tools/bench_gpu.py counts them for MFU."""
    d, h, kv, ffn, layers, vocab = (
        p["hidden"],
        p["heads"],
        p["kv_heads"],
        p["ffn"],
        p["layers"],
        p["vocab"],
    )
    hd = d // h
    attn = d * (h * hd + 2 * kv * hd) + h * hd * d
    mlp = 3 * d * ffn
    return layers * (attn + mlp + 2 * d) + d + vocab * d


def projection() -> dict[str, Any]:
    presets = tomllib.loads((ROOT / "models" / "presets.toml").read_text())
    window_s = WINDOW_BLOCKS * BLOCK_S
    out: dict[str, Any] = {
        "assumptions": [
            f"window = {WINDOW_BLOCKS} blocks x {BLOCK_S:.0f} s = {window_s:.0f} s",
            f"stage 2 of {PEERS} peers: the {RANDOM_SAMPLES} random sequences once before, then "
            f"per peer {OWN_SAMPLES} own before, {OWN_SAMPLES} own after and {RANDOM_SAMPLES} "
            f"random after: {RANDOM_SAMPLES + PEERS * (2 * OWN_SAMPLES + RANDOM_SAMPLES)} "
            "sequences of seq_len tokens",
            "forward FLOPs per token = 2 N + 4 L d T (tools/bench_gpu.py's MFU count / 3; N "
            "without the input embedding, attention not discounted for causality)",
            f"forward runs at the achieved templar-1b training rate on an H200: "
            f"{H200_TFLOPS_ACHIEVED:.0f} TFLOP/s per GPU (0.280 MFU, docs/BENCHMARKS.md); the "
            "same per GPU on an 8-GPU node (TP=8 communication not charged)",
            f"per peer: decode at {H200_DECODE_PARAMS_PER_S / 1e9:.1f} G params/s per GPU "
            "(SparseLoCo decode, H200) plus norms, clip-and-apply and the bit-exact restore as "
            f"4 passes over the bf16 weights at {H200_HBM_BYTES_PER_S / 1e12:.1f} TB/s",
            "excluded: downloading the uploads (stage 1) and the other stages, which the tiny "
            "run shows are small next to stage 2",
        ]
    }
    for name, gpus in (("templar-1b", 1), ("covenant-72b", 8)):
        p = presets[name]
        n = _matmul_params(p)
        t = p["seq_len"]
        fwd = 2 * n + 4 * p["layers"] * p["hidden"] * t
        seqs = RANDOM_SAMPLES + PEERS * (2 * OWN_SAMPLES + RANDOM_SAMPLES)
        tokens = seqs * t
        rate = H200_TFLOPS_ACHIEVED * 1e12 * gpus
        forward_s = tokens * fwd / rate
        total_params = n + p["vocab"] * p["hidden"]
        decode_s = PEERS * total_params / (H200_DECODE_PARAMS_PER_S * gpus)
        memory_s = PEERS * 4 * 2 * total_params / (H200_HBM_BYTES_PER_S * gpus)
        stage2 = forward_s + decode_s + memory_s
        out[name] = {
            "gpus": f"{gpus} x H200",
            "params": total_params,
            "forward_gflop_per_token": round(fwd / 1e9, 2),
            "stage2_tokens": tokens,
            "forward_s": round(forward_s, 1),
            "decode_s": round(decode_s, 1),
            "apply_restore_s": round(memory_s, 2),
            "stage2_s": round(stage2, 1),
            "window_s": window_s,
            "fraction_of_window": round(stage2 / window_s, 3),
            "inside_one_window": stage2 < window_s,
            "one_gpu_equivalent_s": round(stage2 * gpus, 1),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=20)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--players", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-window", action="store_true", help="ratings and projection only")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if not args.skip_window:
        with tempfile.TemporaryDirectory(prefix="bench-validator-") as tmp:
            result["window"] = bench_window(args.peers, args.windows, args.preset, Path(tmp))
    result["ratings"] = bench_ratings(args.players, args.repeats)
    result["projection"] = projection()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
