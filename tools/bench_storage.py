"""Benchmark the storage transport against moto's S3 server on loopback; prints JSON.

Measures, in one run against one moto server (started in a child process so its memory is not
counted as ours):

* upload and download throughput of a 64 MiB payload: covenant's ``S3Transport`` (put =
  one PUT + HEAD; get = HEAD + ranged GET pinned to the ETag) vs a plain single s3fs
  ``pipe_file``/``cat_file``; plus covenant's parallel ranged download (payload split in 4);
* time to fetch and verify 20 peers' signed payloads concurrently (``fetch_many``, every result
  held; ``iter_fetch``, each payload dropped after use) and the peak RSS growth while doing so.

Usage::

    .venv/bin/python tools/bench_storage.py [--mb 64] [--peers 20] [--peer-mb 16] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MiB = 1 << 20

_SERVER = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
s.stop()
"""


@contextmanager
def moto_process() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=30)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's RSS every 5 ms (``peak - start`` is the growth) and traces the
    Python heap's peak (``tracemalloc``: exact for the payload buffers, which are Python bytes;
    RSS alone under-reports a second phase because the allocator keeps freed arenas)."""

    def __enter__(self) -> PeakRss:
        tracemalloc.start()
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.heap_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    @property
    def heap_peak_mib(self) -> float:
        return round(self.heap_peak / MiB, 1)

    @property
    def growth_mib(self) -> float:
        return round((self.peak - self.start) / MiB, 1)


def timed(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64, help="single-object payload, MiB")
    ap.add_argument("--peers", type=int, default=20)
    ap.add_argument("--peer-mb", type=int, default=16, help="payload per peer, MiB")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import boto3
    from bittensor.sp_core import Keypair

    from covenant.plugins.storage.config import Credentials, StorageConfig
    from covenant.plugins.storage.exchange import (
        ExpectedUpload,
        FetchJob,
        fetch_many,
        iter_fetch,
        upload_signed,
    )
    from covenant.plugins.storage.keys import RunKeys
    from covenant.plugins.storage.retry import Deadline
    from covenant.plugins.storage.transport import TransportOptions, open_transport, s3_filesystem

    out: dict[str, Any] = {
        "benchmark": "storage",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "payload_mib": args.mb,
        "reps": args.reps,
    }
    with moto_process() as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="t",
            aws_secret_access_key="t",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        cfg = StorageConfig(
            endpoint_url=endpoint,
            request_timeout_s=300,
            read_timeout_s=120,
            per_window_deadline_s=600,
        )
        creds = Credentials("t", "t")
        t = open_transport(f"s3://{bucket}/cov", cfg, credentials=creds)
        plain = s3_filesystem(cfg, creds)
        data: bytes = os.urandom(args.mb * MiB)
        mb = len(data) / 1e6

        put_cov = timed(lambda: t.put("obj", data), args.reps)
        put_plain = timed(lambda: plain.pipe_file(f"{bucket}/plain/obj", data), args.reps)
        assert t.get("obj", len(data)) == data
        get_cov = timed(lambda: t.get("obj", len(data)), args.reps)
        get_plain = timed(lambda: plain.cat_file(f"{bucket}/plain/obj"), args.reps)
        ranged = open_transport(f"s3://{bucket}/cov", cfg, credentials=creds)
        ranged.options = TransportOptions(
            single_get_max_bytes=len(data) // 4 - 1,
            range_chunk_bytes=len(data) // 4,
            max_parallel_ranges=4,
            request_timeout_s=300,
            deadline_s=600,
        )
        assert ranged.get("obj", len(data)) == data
        get_ranged = timed(lambda: ranged.get("obj", len(data)), args.reps)
        out["single_object"] = {
            "upload_MBps": {
                "covenant": round(mb / put_cov, 1),
                "s3fs_plain": round(mb / put_plain, 1),
            },
            "download_MBps": {
                "covenant": round(mb / get_cov, 1),
                "covenant_4_ranges": round(mb / get_ranged, 1),
                "s3fs_plain": round(mb / get_plain, 1),
            },
        }
        keys = RunKeys("bench", 1)
        alice = Keypair.create_from_uri("//Alice")
        size = args.peer_mb * MiB
        jobs = []
        for uid in range(args.peers):
            peer = open_transport(f"s3://{bucket}/peer{uid}", cfg, credentials=creds)
            payload = os.urandom(size)
            upload_signed(
                peer,
                keys.gradient(1, uid),
                payload,
                {"run": "bench", "version": 1, "window": 1, "uid": uid, "codec": "bench/1"},
                alice,
            )
            exp = ExpectedUpload(
                run="bench",
                version=1,
                window=1,
                uid=uid,
                hotkey=alice.ss58_address,
                max_bytes=size + 64 * 1024,
            )
            jobs.append(FetchJob(peer, keys.gradient(1, uid), exp))
        del payload

        with PeakRss() as mem_all:
            t0 = time.perf_counter()
            results = fetch_many(
                jobs,
                max_concurrent=cfg.max_concurrent_peers,
                max_inflight_bytes=cfg.max_inflight_bytes,
                deadline=Deadline(600),
            )
            held_s = time.perf_counter() - t0
            ok = sum(r.ok for r in results.values())
        del results
        budget = 4 * (size + 64 * 1024)
        with PeakRss() as mem_stream:
            t0 = time.perf_counter()
            streamed_ok = 0
            for _uid, result in iter_fetch(
                jobs,
                max_concurrent=cfg.max_concurrent_peers,
                max_inflight_bytes=budget,
                deadline=Deadline(600),
            ):
                streamed_ok += result.ok
                del result
            stream_s = time.perf_counter() - t0
        out["peers"] = {
            "peers": args.peers,
            "payload_mib_each": args.peer_mb,
            "fetch_many": {
                "seconds": round(held_s, 2),
                "verified": ok,
                "peak_rss_growth_mib": mem_all.growth_mib,
                "peak_heap_mib": mem_all.heap_peak_mib,
                "max_concurrent": cfg.max_concurrent_peers,
            },
            "iter_fetch_streaming": {
                "seconds": round(stream_s, 2),
                "verified": streamed_ok,
                "peak_rss_growth_mib": mem_stream.growth_mib,
                "peak_heap_mib": mem_stream.heap_peak_mib,
                "inflight_budget_mib": round(budget / MiB, 1),
            },
            "total_mib": args.peers * args.peer_mb,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
