"""Benchmark: the local spec's fast path (SDPA attention, the SwiGLU fusion) on this machine.

Builds covenant's :class:`~covenant.models.runtime.MegatronRuntime` once per variant from the
same seed, then times one inner step (forward + backward + AdamW with clipping) of each variant
in alternating rounds, so machine noise hits all alike. Reports per variant the median step
time, tokens/s, the speed-up over ``plain`` (megatron's unfused attention, no fusion) and the
first step's loss (equal to float rounding). Prints JSON (``--out`` also writes it).

    OMP_NUM_THREADS=2 python tools/bench_fast_path.py --preset tiny-2l --micro-batch 4 --seq 128

On a GPU the same variants run with ``tools/bench_gpu.py --attention ... --fusions ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"attention": "unfused", "fusions": []},
    "sdpa": {"attention": "sdpa", "fusions": []},
    "swiglu": {"attention": "unfused", "fusions": ["swiglu"]},
    "sdpa+swiglu": {"attention": "sdpa", "fusions": ["swiglu"]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-2l")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (0 = micro-batch)")
    ap.add_argument("--seq", type=int, default=0, help="sequence length (0 = the preset's)")
    ap.add_argument("--steps", type=int, default=15, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    from covenant.models import parallel
    from covenant.models.config import ModelConfig, OptimConfig
    from covenant.models.runtime import MegatronRuntime

    base: dict[str, Any] = {"preset": args.preset, "micro_batch": args.micro_batch, "seed": 0}
    if args.seq:
        base["seq_len"] = args.seq
    runtimes = {}
    for name in args.variants:
        rt = MegatronRuntime(ModelConfig(**base, **VARIANTS[name]), OptimConfig())
        runtimes[name] = rt
    shape = next(iter(runtimes.values())).shape
    batch = args.batch or args.micro_batch
    tokens = torch.randint(
        0, shape.vocab, (batch, shape.seq_len), generator=torch.Generator().manual_seed(1)
    )
    first_loss = {}
    times: dict[str, list[float]] = {n: [] for n in runtimes}
    for i in range(args.warmup + args.steps):
        for name, rt in runtimes.items():
            t0 = time.perf_counter()
            result = rt.train_step(tokens, 1e-4)
            dt = time.perf_counter() - t0
            if i == 0:
                first_loss[name] = result.loss
            if i >= args.warmup:
                times[name].append(dt)
    parallel.teardown()
    plain = statistics.median(times["plain"]) if "plain" in times else None
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "variant": name,
                **VARIANTS[name],
                "step_s_median": round(med, 4),
                "tokens_per_s": round(batch * (shape.seq_len - 1) / med, 1),
                "speedup_vs_plain": round(plain / med, 3) if plain else None,
                "first_loss": first_loss[name],
            }
        )
    out = {
        "bench": "fast_path_cpu",
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "preset": args.preset,
        "micro_batch": args.micro_batch,
        "batch": batch,
        "seq": shape.seq_len,
        "steps": args.steps,
        "results": rows,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
