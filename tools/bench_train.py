"""Benchmark: ``covenant train``'s real loop vs a plain megatron-core loop, same model and process.

Three ways to take the same inner steps of a preset (default ``tiny``, ``configs/tiny.toml``'s
batch 16 x 128 tokens, micro-batch 4) on this CPU, in alternating rounds so machine noise hits
all alike:

* ``covenant``: :func:`covenant.engine.session.open_session` + :func:`covenant.engine.loop.run_training`
  (the ``model``, ``jsonl`` and ``wandb`` plugins loaded, wandb disabled, no console plugin), fed
  by the real data feed from prepared big.txt shards, evaluation off. Its per-step wall time is
  the interval between consecutive ``covenant_inner_step_end`` hook calls (recorded by a small
  plugin registered next to the others), so it holds everything the loop does per step: data,
  schedule, hooks, the jsonl line. The final checkpoint is after the last step and not timed.
  The time inside ``DataFeed.batch`` is measured separately through a timing subclass.
* ``runtime``: :func:`covenant.models.runtime.build_runtime` and ``train_step`` on pre-made
  batches of the same shape (no loop, no data, no hooks).
* ``plain``: the hand-written megatron-core loop of ``tools/bench_model.py`` (GPTModel + DDP +
  megatron optimizer + ``get_forward_backward_func``) on a pre-made batch.

Also times ``covenant data prepare`` (tokenizer + encoding + shards, cold) for the loop's data.
The ``plain`` loop also runs interleaved with the ``covenant`` loop, one step after each
loop step (``interleaved_*`` keys, the fairest comparison on a shared machine; the
``covenant`` step time excludes it). Prints one JSON object: tokens/s (from each variant's
mean step time over the timed steps, then the median over rounds), ``overhead_ratio`` = interleaved plain tokens/s / covenant tokens/s
(goal <= 1.05).

    OMP_NUM_THREADS=1 python tools/bench_train.py --steps 10 --warmup 2 --rounds 3
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
from pathlib import Path
from typing import Any

from covenant.engine.hookspecs import hookimpl


class StepClock:
    """A plugin recording when each inner step ended, and running one interleaved plain step.

    After every loop step it takes one step of the plain megatron loop (a separate copy of the
    model, on a fixed batch) and times it; the loop's own step time is the interval between
    hook calls minus that plain step, so both see the same machine load step by step.
    """

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.ends: list[float] = []
        self.plain_s: list[float] = []
        self._plain: Any = None

    @hookimpl
    def covenant_model_built(self, model: Any, layout: Any) -> None:
        import bench_model  # tools/bench_model.py (this folder is on sys.path)

        self._plain = bench_model._plain_loop(model, self.batch)

    @hookimpl
    def covenant_inner_step_end(self, step: int, result: Any, lr: float) -> None:
        t = time.perf_counter()
        self._plain()
        end = time.perf_counter()
        self.plain_s.append(end - t)
        self.ends.append(end)


def _overrides(data: Path, root: Path, run_id: str, steps: int, extra: list[str]) -> list[str]:
    return [
        'plugins.enable=["model", "jsonl", "wandb"]',
        'wandb.mode="disabled"',  # configs/tiny.toml configures wandb: loaded, but off
        f"run.root={json.dumps(str(root))}",
        f"run.id={json.dumps(run_id)}",
        f"data.dir={json.dumps(str(data))}",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        *extra,
    ]


def _covenant_round(
    args: argparse.Namespace, data: Path, root: Path, run_id: str
) -> dict[str, float]:
    import torch

    from covenant.engine import loop
    from covenant.engine.session import open_session

    clock = StepClock(None)
    data_times: list[float] = []

    class TimedFeed(loop.DataFeed):
        def batch(self, step: int) -> Any:
            t = time.perf_counter()
            out = super().batch(step)
            data_times.append(time.perf_counter() - t)
            return out

    total = args.warmup + args.steps
    session = open_session(
        args.config,
        _overrides(data, root, run_id, total, args.set),
        extra_plugins=[("bench_clock", clock)],
    )
    shape = session.config.section("model").resolve()
    batch = session.config.section("train").batch_size
    gen = torch.Generator().manual_seed(0)
    clock.batch = torch.randint(0, shape.vocab, (batch, shape.seq_len), generator=gen)
    original = loop.DataFeed
    loop.DataFeed = TimedFeed  # type: ignore[misc]
    try:
        result = loop.run_training(session)
    finally:
        loop.DataFeed = original  # type: ignore[misc]
    ends = clock.ends
    first = max(args.warmup, 1)
    timed = ends[-1] - ends[first - 1] - sum(clock.plain_s[first:])
    n = len(ends) - first
    tokens_per_step = result.tokens / len(result.losses)
    return {
        "step_s": timed / n,
        "tokens_per_step": tokens_per_step,
        "data_s": statistics.median(data_times[args.warmup :]),
        "interleaved_plain_step_s": sum(clock.plain_s[first:]) / n,
    }


def _baseline_round(
    args: argparse.Namespace, model_cfg: Any, optim_cfg: Any, train_cfg: Any
) -> dict[str, float]:
    import bench_model  # tools/bench_model.py (this folder is on sys.path)
    import torch

    from covenant.engine.schedule import learning_rate
    from covenant.models.runtime import build_runtime

    rt = build_runtime(model_cfg, optim_cfg)
    try:
        gen = torch.Generator().manual_seed(0)
        shape = (train_cfg.batch_size, rt.shape.seq_len)
        batches = [
            torch.randint(0, rt.shape.vocab, shape, generator=gen) for _ in range(args.steps)
        ]
        total = args.warmup + args.steps
        t0 = 0.0
        for step in range(total):
            if step == args.warmup:
                t0 = time.perf_counter()
            rt.train_step(batches[step % len(batches)], learning_rate(step, train_cfg))
        runtime_s = (time.perf_counter() - t0) / args.steps

        plain = bench_model._plain_loop(rt, batches[0])
        for step in range(total):
            if step == args.warmup:
                t0 = time.perf_counter()
            plain()
        plain_s = (time.perf_counter() - t0) / args.steps
    finally:
        rt.close()
    return {"runtime_step_s": runtime_s, "plain_step_s": plain_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides (KEY=VALUE)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="prepared data to reuse (default: prepare into a temporary folder and time it)",
    )
    args = ap.parse_args()

    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    torch.set_num_threads(args.threads)
    from covenant.engine.data.prepare import prepare_from_config
    from covenant.engine.session import open_session

    with tempfile.TemporaryDirectory(prefix="covenant-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        data = args.data_dir or tmp / "data"
        probe = open_session(args.config, _overrides(data, tmp / "runs", "probe", 1, args.set))
        cfg = probe.config
        t0 = time.perf_counter()
        manifest = prepare_from_config(cfg.section("data"))
        prepare_s = time.perf_counter() - t0
        data_tokens = manifest.train_tokens + manifest.val_tokens

        rounds: list[dict[str, float]] = []
        for r in range(args.rounds):
            row = _covenant_round(args, data, tmp / "runs", f"bench-{r}")
            row |= _baseline_round(
                args, cfg.section("model"), cfg.section("optim"), cfg.section("train")
            )
            rounds.append(row)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in rounds)

    tokens = rounds[0]["tokens_per_step"]
    cov_tps = statistics.median(tokens / row["step_s"] for row in rounds)
    rt_tps = statistics.median(tokens / row["runtime_step_s"] for row in rounds)
    plain_tps = statistics.median(tokens / row["plain_step_s"] for row in rounds)
    inter_tps = statistics.median(tokens / row["interleaved_plain_step_s"] for row in rounds)
    model = cfg.section("model")
    train = cfg.section("train")
    import megatron.core

    print(
        json.dumps(
            {
                "bench": "train_loop_cpu",
                "config": args.config,
                "overrides": args.set,
                "preset": model.preset,
                "batch": train.batch_size,
                "micro_batch": model.micro_batch,
                "seq": manifest.seq_len,
                "threads": args.threads,
                "steps": args.steps,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "tokens_per_step": tokens,
                "covenant_tokens_per_s": round(cov_tps, 1),
                "runtime_tokens_per_s": round(rt_tps, 1),
                "plain_megatron_tokens_per_s": round(plain_tps, 1),
                "interleaved_plain_tokens_per_s": round(inter_tps, 1),
                "overhead_ratio": round(inter_tps / cov_tps, 4),
                "overhead_ratio_per_round": [
                    round(row["step_s"] / row["interleaved_plain_step_s"], 4) for row in rounds
                ],
                "overhead_ratio_vs_separate_plain": round(plain_tps / cov_tps, 4),
                "overhead_ratio_vs_runtime": round(rt_tps / cov_tps, 4),
                "covenant_step_s": round(med("step_s"), 4),
                "plain_step_s": round(med("plain_step_s"), 4),
                "data_batch_s": round(med("data_s"), 6),
                "data_share_of_step": round(med("data_s") / med("step_s"), 5),
                "prepare_s": round(prepare_s, 2),
                "prepare_tokens": data_tokens,
                "prepare_s_per_million_tokens": round(prepare_s / data_tokens * 1e6, 2),
                "prepare_cached": args.data_dir is not None,
                "torch": torch.__version__,
                "megatron_core": megatron.core.__version__,
                "cpus": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
