"""Benchmark: the full-weight format and the streaming HF export at a real preset's size.

Writes a full-weight directory for ``--preset`` as a TP x PP peer would (one safetensors file
per rank, random fp32 values, no megatron model needed), then in fresh subprocesses (so peak
memory is theirs alone):

* ``read``: opens it and reads every global tensor one at a time (``FullWeights.items``);
* ``export``: ``covenant.models.hf.export_hf`` with ``--max-shard-gb``;
* ``export_one_file``: the same with one output file for the whole model, what a
  gather-then-write export costs at least.

Reports seconds, throughput and peak resident memory (``VmHWM``) of each, and the model's
size, as JSON. The claim under test: streaming export needs about one output file plus one
tensor of memory, not the model.

    python tools/bench_weights.py --preset sparseloco-512m --tp 2 --pp 2 --max-shard-gb 0.5
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _write(root: Path, preset: str, tp: int, pp: int) -> dict[str, Any]:
    import torch

    from covenant.models.config import ModelConfig
    from covenant.models.layout import global_params, rank_layout
    from covenant.models.weights import build_index, write_index, write_pieces

    shape = ModelConfig(preset=preset).resolve()
    g = torch.Generator().manual_seed(0)
    sources = []
    t0 = time.perf_counter()
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            rank = pp_rank * tp + tp_rank
            mine = {}
            for s in rank_layout(shape, tp, tp_rank, pp, pp_rank):
                if s.replicated_over_tp and tp_rank:
                    continue
                sources.append((rank, s))
                mine[s.name] = torch.randn(s.local_shape, generator=g) * 0.02
            write_pieces(root, rank, mine)
            del mine
    write_index(root, build_index(shape, sources))
    numel = sum(torch.Size(p.shape).numel() for p in global_params(shape))
    largest = max(torch.Size(p.shape).numel() for p in global_params(shape))
    return {
        "params": numel,
        "fp32_bytes": numel * 4,
        "largest_tensor_bytes": largest * 4,
        "files": tp * pp,
        "write_s": round(time.perf_counter() - t0, 2),
    }


def _child(mode: str, src: str, out: str, max_shard_bytes: int) -> None:
    from covenant.models.hf import export_hf
    from covenant.models.weights import open_full_weights

    t0 = time.perf_counter()
    weights = open_full_weights(src)
    if mode == "read":
        n = sum(t.numel() for _, t in weights.items())
        assert n > 0
    else:
        export_hf(weights, weights.shape, out, max_shard_bytes=max_shard_bytes)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_bytes": _peak_rss()}))


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over
    ``execve`` from the parent, so a child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_child(mode: str, src: Path, out: Path, max_shard_bytes: int) -> dict[str, Any]:
    # The import baseline (torch, safetensors) is measured the same way, to subtract it.
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(out), str(max_shard_bytes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _baseline() -> int:
    cmd = [sys.executable, __file__, "--baseline"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def main() -> None:
    if sys.argv[1:2] == ["--baseline"]:
        import covenant.models.hf  # noqa: F401 - the imports every child pays

        print(_peak_rss())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="sparseloco-512m")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--max-shard-gb", type=float, default=0.5)
    args = ap.parse_args()
    max_bytes = int(args.max_shard_gb * 1e9)
    with tempfile.TemporaryDirectory(prefix="covenant-bench-weights-") as tmp:
        root = Path(tmp)
        model = _write(root / "weights", args.preset, args.tp, args.pp)
        base = _baseline()
        runs = {}
        for mode, shard in (
            ("read", max_bytes),
            ("export", max_bytes),
            ("export_one_file", 1 << 62),
        ):
            r = _run_child(mode, root / "weights", root / mode, shard)
            r["peak_rss_above_imports_bytes"] = r["peak_rss_bytes"] - base
            r["GB_per_s"] = round(model["fp32_bytes"] / r["seconds"] / 1e9, 3)
            if mode != "read":
                r["output_files"] = len(list((root / mode).glob("*.safetensors")))
            runs[mode] = r
    print(
        json.dumps(
            {
                "bench": "weights",
                "preset": args.preset,
                "writer_layout": {"tp": args.tp, "pp": args.pp},
                "max_shard_bytes": max_bytes,
                "model": model,
                "imports_rss_bytes": base,
                "runs": runs,
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
