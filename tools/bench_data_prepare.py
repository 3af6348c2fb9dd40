"""Benchmark ``covenant data prepare`` and batch reading; prints one JSON object.

    python tools/bench_data_prepare.py [--vocab 8192] [--seq-len 128] [--batch 64] [--batches 500]

Prepares the whole of big.txt in a temporary folder (tokenizer training + encoding + writing),
times a cached second call, then reads random batches through ``ShardDataset.batch``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from covenant.engine.data import shards
from covenant.engine.data.prepare import prepare
from covenant.engine.data.shards import ShardDataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--source", action="append", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        m = prepare(out, args.source or ["bigtxt"], args.vocab, args.seq_len, 0.02)
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare(out, args.source or ["bigtxt"], args.vocab, args.seq_len, 0.02)
        cached_s = time.perf_counter() - t0

        shards._scan_cache.clear()  # measure a cold open: sha256 + max of the shard
        t0 = time.perf_counter()
        ds = ShardDataset(out, verify_hash=True)
        open_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        ids = [rng.choice(ds.num_samples, args.batch, replace=False) for _ in range(args.batches)]
        ds.batch(ids[0])  # warm-up: the first call imports torch
        t0 = time.perf_counter()
        for batch_ids in ids:
            ds.batch(batch_ids)
        read_s = time.perf_counter() - t0

    tokens = m.train_tokens + m.val_tokens
    print(
        json.dumps(
            {
                "bench": "data_prepare",
                "source": [s.get("name") for s in m.sources],
                "vocab": m.tokenizer.vocab_size,
                "seq_len": m.seq_len,
                "tokens": tokens,
                "documents": m.split.num_documents,
                "prepare_s": round(prepare_s, 3),
                "prepare_s_per_million_tokens": round(prepare_s / tokens * 1e6, 3),
                "cached_prepare_s": round(cached_s, 3),
                "open_verify_s": round(open_s, 4),
                "batch": args.batch,
                "batches": args.batches,
                "read_tokens_per_s": round(args.batches * args.batch * m.seq_len / read_s),
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
