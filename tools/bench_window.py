"""Benchmark: one window's outer-step cost against its inner loop, and what it implies at 72B.

One real miner (a :class:`~covenant.models.runtime.MegatronRuntime` of ``--preset``, the
``sparseloco`` or ``diloco`` outer step from ``covenant_outer_step``, its own
:class:`~covenant.engine.services.Services`) in a swarm of ``--peers`` on a local chain with
memory stores (the swarm of ``tools/study_outer.py``). The other peers' uploads are synthetic:
payloads of random pseudo-gradients encoded once, then uploaded, signed by each peer's own
hotkey, into its own store every window (not timed). Per window, the miner's phases are timed:

* ``inner``: ``--measure-steps`` inner steps (batch ``--batch``), scaled to H steps;
* ``snapshot``: ``begin`` (theta_start);
* ``encode``: pseudo-gradient, error feedback, top-k + 2-bit, residual, theta <- theta_start;
* ``pack``: the pieces to bytes; ``upload``: the signed PUT (sha256, sr25519, manifest);
* ``fetch_validate``: the peer list, fetching every listed upload through the Exchange
  (timing, signature, identity, hash), the codec's validation;
* ``aggregate_apply``: decode and aggregate every peer's payload, apply, reload;
* ``sync_sample``: the ``debug/{w}/{uid}`` upload after applying.

Medians over ``--windows`` windows, after ``--warmup`` untimed ones (the first window pays
one-time imports: signature verification, megatron paths). The projection multiplies the measured per-parameter (and
per-byte) rates by covenant-72b's size (exact payload size from the codec) and, separately,
uses the H200 codec rates of docs/BENCHMARKS.md, then compares with what Covenant-72B reports
(about 70 s of communication per round at 94.5 % compute utilisation).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_window.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Covenant-72B as reported (the round's communication and the compute utilisation)
REPORTED_COMM_S = 70.0
REPORTED_UTILISATION = 0.945
# H200 codec rates from docs/BENCHMARKS.md (SparseLoCo codec, one templar-1b layer, 2026-11-26)
H200_ENCODE_PARAMS_PER_S = 9.6e9
H200_DECODE_PARAMS_PER_S = 20.1e9
H200_AGGREGATE_PARAM_PEERS_PER_S = 67.1e6 * 20 / 0.156


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def synthetic_payload(outer: str, shapes: dict[str, tuple[int, ...]], seed: int) -> bytes:
    """A payload of random pseudo-gradients of ``shapes`` (roughly the scale of a real one)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()}
    if outer == "diloco":
        from covenant.plugins.diloco.codec import pack_dense

        return pack_dense(tensors, "fp32")
    import covenant.plugins.sparseloco as sl

    return sl.encode(tensors, sl.SparseLoCoConfig())


def sha256_bytes_per_s(size: int = 64 << 20) -> float:
    """This machine's sha256 rate: the per-byte part of verifying a download (content hash)."""
    import hashlib

    data = os.urandom(size)
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    return size / (time.perf_counter() - t0)


def projection(
    rates: dict[str, float], payload_72b: int, params_72b: int, peers: int, ranks: int
) -> dict[str, Any]:
    """Seconds per window of each phase for a covenant-72b peer, at this machine's measured
    rates (one CPU thread; then shared by ``ranks`` model-parallel ranks, each owning 1/ranks of
    the parameters) and at the H200 codec rates of docs/BENCHMARKS.md."""
    n, down = float(params_72b), float(payload_72b) * peers
    cpu = {  # work every rank does on the slices it owns
        "snapshot_s": n / rates["snapshot_params_per_s"],
        "encode_s": n / rates["encode_params_per_s"],
        "aggregate_apply_s": n * peers / rates["aggregate_apply_param_peers_per_s"],
    }
    round_s = REPORTED_COMM_S / (1.0 - REPORTED_UTILISATION)
    return {
        "params": params_72b,
        "peers": peers,
        "payload_bytes": payload_72b,
        "download_bytes_per_window": down,
        "reported": {
            "communication_s": REPORTED_COMM_S,
            "utilisation": REPORTED_UTILISATION,
            "implied_round_s": round_s,
            "implied_compute_s": round_s - REPORTED_COMM_S,
            "download_bandwidth_to_fit_bytes_per_s": down / REPORTED_COMM_S,
        },
        "cpu_one_thread_s": cpu,
        "cpu_one_thread_s_per_rank": {k: v / ranks for k, v in cpu.items()},
        "ranks": ranks,
        "rank0_sha256_of_downloads_s": down / rates["sha256_bytes_per_s"],
        "rank0_fetch_validate_s": n * peers / rates["fetch_validate_param_peers_per_s"],
        "h200_s_per_rank": {
            "encode_s": n / ranks / H200_ENCODE_PARAMS_PER_S,
            "decode_one_peer_s": n / ranks / H200_DECODE_PARAMS_PER_S,
            "aggregate_s": n / ranks * peers / H200_AGGREGATE_PARAM_PEERS_PER_S,
            "rank0_decode_every_upload_s": n * peers / H200_DECODE_PARAMS_PER_S,
            "source": "docs/BENCHMARKS.md: SparseLoCo codec on one H200, templar-1b layer",
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--outer", choices=("sparseloco", "diloco"), default="sparseloco")
    ap.add_argument("--peers", type=int, default=20, help="uploads fetched and aggregated")
    ap.add_argument("--inner-steps", type=int, default=30, help="H")
    ap.add_argument("--measure-steps", type=int, default=5, help="inner steps timed per window")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--windows", type=int, default=3, help="timed windows (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed windows first (imports)")
    ap.add_argument("--ranks", type=int, default=8, help="model-parallel ranks of a 72B peer")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--data-dir", default=None, help="prepared data (default: .cache/data)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-documents", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--json", action="store_true", help="print JSON only (the default output)")
    args = ap.parse_args(argv)

    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import study_outer as so
    import torch

    from covenant.engine.data.config import DataConfig
    from covenant.engine.data.prepare import default_data_dir, prepare_from_config
    from covenant.engine.loop import DataFeed
    from covenant.engine.plugins import PluginHost
    from covenant.engine.protocols import WindowContext
    from covenant.engine.schedule import TrainConfig, learning_rate
    from covenant.models.config import ModelConfig, OptimConfig
    from covenant.models.layout import global_params
    from covenant.models.runtime import build_runtime

    torch.set_num_threads(args.threads)
    data_cfg = DataConfig(
        dir=Path(args.data_dir) if args.data_dir else None,
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        max_documents=args.max_documents,
        val_fraction=args.val_fraction,
        verify_hash=False,
    )
    manifest = prepare_from_config(data_cfg)
    data_dir = data_cfg.dir or default_data_dir()
    host = PluginHost()
    host.load(so.PLUGINS, environ={})
    host.check()
    model = build_runtime(
        ModelConfig(
            preset=args.preset,
            vocab=args.vocab,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            seed=1234,
        ),
        OptimConfig(),
    )
    train = TrainConfig(inner_steps=args.inner_steps, batch_size=args.batch, lr=3e-3)
    feed = DataFeed(data_dir, manifest, data_cfg, train, model)
    numel = sum(p.numel() for p in model.local_parameters().values())
    method = so.Method(args.outer, args.outer)
    phases: dict[str, list[float]] = {}
    step_s: list[float] = []
    payload_bytes = 0.0
    down_bytes = 0.0
    peers_used = 0.0

    timed = False

    def record(name: str, seconds: float) -> None:
        if timed:
            phases.setdefault(name, []).append(seconds)

    with tempfile.TemporaryDirectory(prefix="covenant-bench-window-") as tmp:
        swarm = so.Swarm(host, Path(tmp), method, args.peers)
        try:
            miner = swarm.peers[0]
            shapes = miner.outer.shapes(model)
            distinct = [synthetic_payload(args.outer, shapes, s) for s in range(min(4, args.peers))]
            codec_name = miner.outer.codec.name
            for j in range(args.warmup + args.windows):
                timed = j >= args.warmup
                w = swarm.start + j
                ctx = WindowContext(w, j, miner.uid, args.inner_steps)
                ctx.extras["receipt"] = feed.receipt(ctx)
                t0 = time.perf_counter()
                miner.outer.begin(ctx, model)
                record("snapshot", time.perf_counter() - t0)
                for i in range(args.measure_steps):
                    batch = feed.batch(ctx, i)
                    t0 = time.perf_counter()
                    model.train_step(batch, learning_rate(j * args.inner_steps + i, train))
                    if timed:
                        step_s.append(time.perf_counter() - t0)
                swarm.advance_to((w + 1) * so.BLOCKS_PER_WINDOW)
                for k, p in enumerate(swarm.peers[1:]):  # the synthetic peers (not timed)
                    p.services.exchange.put_gradient(
                        w, distinct[k % len(distinct)], codec=codec_name
                    )
                t0 = time.perf_counter()
                pub = miner.outer.publish(ctx, model)
                publish_s = time.perf_counter() - t0
                record("encode", pub["encode_s"])
                record("upload", pub["upload_s"])
                record("pack", publish_s - pub["encode_s"] - pub["upload_s"] - pub["wait_s"])
                t0 = time.perf_counter()
                fin = miner.outer.finish(ctx, model)
                finish_s = time.perf_counter() - t0
                if not fin.get("applied"):
                    raise SystemExit(f"window {w}: nothing applied ({fin.get('skip_reason')})")
                record("fetch_validate", fin["gather_s"])
                record("aggregate_apply", fin["apply_s"])
                record("sync_sample", finish_s - fin["gather_s"] - fin["apply_s"])
                payload_bytes = pub["bytes_up"]
                down_bytes = fin["bytes_down"]
                peers_used = fin["peers"]
                swarm.retain(w)
        finally:
            swarm.close()
            model.close()

    outer = {k: _median(v) for k, v in phases.items()}
    outer_total = sum(outer.values())
    step = _median(step_s)
    inner = step * args.inner_steps
    rates = {
        "snapshot_params_per_s": numel / outer["snapshot"],
        "encode_params_per_s": numel / outer["encode"],
        "upload_bytes_per_s": payload_bytes / outer["upload"],
        "fetch_validate_bytes_per_s": down_bytes / outer["fetch_validate"],
        "fetch_validate_param_peers_per_s": numel * peers_used / outer["fetch_validate"],
        "aggregate_apply_param_peers_per_s": numel * peers_used / outer["aggregate_apply"],
        "sha256_bytes_per_s": sha256_bytes_per_s(),
    }
    shape72 = ModelConfig(preset="covenant-72b").resolve()
    shapes72 = {p.name: p.shape for p in global_params(shape72)}
    params72 = sum(math.prod(s) for s in shapes72.values())
    if args.outer == "diloco":
        from covenant.plugins.diloco.codec import payload_size

        payload72 = payload_size(shapes72, "fp32")
    else:
        import covenant.plugins.sparseloco as sl

        payload72 = sl.expected_payload_size(shapes72)
    result = {
        "benchmark": "window",
        "preset": args.preset,
        "outer": args.outer,
        "params": numel,
        "peers": args.peers,
        "peers_aggregated": peers_used,
        "inner_steps": args.inner_steps,
        "batch": args.batch,
        "windows": args.windows,
        "inner": {
            "step_s": step,
            "measured_steps": len(step_s),
            "window_s": inner,
            "tokens_per_s": args.batch * (model.seq_len - 1) / step,
        },
        "outer_s": outer,
        "outer_total_s": outer_total,
        "outer_fraction_of_window": outer_total / (inner + outer_total),
        "bytes": {"payload": payload_bytes, "download": down_bytes, "dense_fp32": 4 * numel},
        "rates": rates,
        "projection_covenant_72b": projection(rates, payload72, params72, args.peers, args.ranks),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "load_average": os.getloadavg(),
        },
    }
    if args.outer != "sparseloco":  # the H200 rates are the SparseLoCo codec's
        result["projection_covenant_72b"].pop("h200_s_per_rank")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
