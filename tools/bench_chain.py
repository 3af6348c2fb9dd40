"""Benchmark the local chain: latency of signed writes and reads, and contention across processes.

Prints one JSON object. Usage::

    python tools/bench_chain.py [--peers 64] [--writes 200] [--procs 3]

* ``single``: one process, manual clock; median/p95 milliseconds of register, commit,
  set_weights (sign + verify + one transaction each) and of metagraph / commitments reads with
  ``--peers`` neurons registered.
* ``contended``: ``--procs`` processes commit ``--writes`` times each into one database at once
  (wall clock); total writes per second and the slowest single write.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covenant.engine.keys import load_hotkey
from covenant.plugins.chain.local import LocalChain


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1e3, 3),
        "n": len(ordered),
    }


def _timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def single(folder: Path, peers: int, writes: int) -> dict[str, Any]:
    chain = LocalChain(
        folder / "single.sqlite", clock="manual", weights_rate_limit_blocks=0, max_uids=peers + 1
    )
    keys = [load_hotkey(f"//Bench{i}") for i in range(peers)]
    register = []
    for key in keys:
        start = time.perf_counter()
        chain.register(key)
        register.append(time.perf_counter() - start)
    chain.set_stake(keys[0].ss58_address, 1000.0, True)
    commit = _timed(
        lambda: chain.commit(
            keys[1], "v1|https://s3.example.com|bucket/run|" + "k" * 20 + "|" + "s" * 40
        ),
        writes,
    )
    weights = {i: float(i + 1) for i in range(peers)}
    set_weights = _timed(lambda: chain.set_weights(keys[0], weights), writes)
    for key in keys:
        chain.commit(key, "creds-" + key.ss58_address[:8])
    return {
        "peers": peers,
        "register": _ms(register),
        "commit": _ms(commit),
        "set_weights": _ms(set_weights),
        "metagraph": _ms(_timed(chain.metagraph, writes)),
        "commitments": _ms(_timed(chain.commitments, writes)),
        "block_wall_clock": _ms(_timed(LocalChain(folder / "wall.sqlite").block, writes)),
    }


def _writer(path: str, index: int, writes: int, results: Any) -> None:
    chain = LocalChain(path, block_time_s=0.5, blocks_per_window=10)
    key = load_hotkey(f"//Writer{index}")
    chain.register(key)
    samples = _timed(lambda: chain.commit(key, f"creds-{index}"), writes)
    results.put(samples)


def contended(folder: Path, procs: int, writes: int) -> dict[str, Any]:
    path = str(folder / "contended.sqlite")
    LocalChain(path, block_time_s=0.5, blocks_per_window=10)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_writer, args=(path, i, writes, results)) for i in range(procs)]
    for w in workers:
        w.start()
    samples = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join()
    every = [s for batch in samples for s in batch]
    busy = max(sum(batch) for batch in samples)
    return {
        "procs": procs,
        "writes_per_proc": writes,
        "writes_per_s": round(len(every) / busy, 1),
        "commit": _ms(every),
        "slowest_ms": round(max(every) * 1e3, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=64)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--procs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result = {
            "single": single(folder, args.peers, args.writes),
            "contended": contended(folder, args.procs, args.writes),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
