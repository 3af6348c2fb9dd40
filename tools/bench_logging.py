"""Per-call cost of the metrics consumers on the hot path (one ``covenant_log_metrics`` per step).

Prints one JSON object: microseconds per train line for the jsonl writer (by ``flush_every``),
per fsynced line (window/eval), per console update (plain and live), and per wandb offline
``log`` call. Everything is written under a temporary folder (HOME included, for wandb).

    .venv/bin/python tools/bench_logging.py [--lines 5000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from covenant.plugins.logging.console import ConsoleView
from covenant.plugins.logging.jsonl import JsonlWriter

METRICS = {
    "loss": 3.21,
    "lr": 1.17e-4,
    "grad_norm": 0.87,
    "tokens": 786432,
    "tokens_per_s": 123456.0,
    "step_time_s": 6.37,
}


def per_call_us(fn: Callable[[int], None], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def train_line(writer: JsonlWriter) -> Callable[[int], None]:
    return lambda i: writer.write("train", i, METRICS)


def console_step(view: ConsoleView) -> Callable[[int], None]:
    return lambda i: view.train(i, METRICS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=5000)
    args = parser.parse_args()
    n = args.lines
    tmp = Path(tempfile.mkdtemp(prefix="bench-logging-"))
    os.environ["HOME"] = str(tmp / "home")

    from rich.console import Console

    from covenant.plugins.logging.console import ConsoleConfig
    from covenant.plugins.logging.wandb_plugin import WandbConfig, WandbRun

    out: dict[str, object] = {"lines": n}
    for every in (1, 10, 100):
        writer = JsonlWriter(tmp / f"m{every}.jsonl", flush_every=every)
        out[f"jsonl_train_us_flush_every_{every}"] = round(per_call_us(train_line(writer), n), 2)
        writer.close()
    writer = JsonlWriter(tmp / "sync.jsonl")
    out["jsonl_fsynced_line_us"] = round(
        per_call_us(lambda i: writer.write("window", i, METRICS), min(n, 500)), 2
    )
    writer.close()

    for terminal in (False, True):
        console = Console(file=io.StringIO(), force_terminal=terminal, width=120)
        view = ConsoleView(ConsoleConfig(plain_interval_s=30.0), total_steps=n, console=console)
        view.start(0)
        out[f"console_{'live' if terminal else 'plain'}_us"] = round(
            per_call_us(console_step(view), n), 2
        )
        view.close("completed", None)

    t0 = time.perf_counter()
    run = WandbRun(WandbConfig(), tmp / "wandb-run", run_config={"bench": True})
    out["wandb_offline_init_s"] = round(time.perf_counter() - t0, 3)
    out["wandb_offline_log_us"] = round(per_call_us(lambda i: run.log("train", i, METRICS), n), 2)
    t0 = time.perf_counter()
    run.finish("completed", None)
    out["wandb_offline_finish_s"] = round(time.perf_counter() - t0, 3)
    out["home_written"] = any((tmp / "home").rglob("*"))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
