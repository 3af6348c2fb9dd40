"""Benchmark: the Gauntlet's two costs that grow with the swarm (SPEC 7).

* ``rate``: one OpenSkill ``PlackettLuce(beta=7, tau=0.1).rate`` free-for-all match, as
  :func:`covenant.plugins.gauntlet.rules.rate_match` calls it, for 20 (the production match
  size), 256 and 1024 players; median of a few repeats. The cost is quadratic in players.
* ``overlap``: :func:`covenant.plugins.gauntlet.rules.pairwise_overlaps` (copy detection) for
  30 uploads, every pair, on a templar-1b-sized tensor set (tiles of 4096, k = 64). By default
  it runs one transformer layer's tensors (16 448 tiles) and extrapolates linearly in tiles to
  the whole model (295 200 tiles): the work is per tile and per pair, so it scales linearly;
  ``--layers`` runs more; ``--workers`` threads (numpy releases the GIL). Also one pair through
  :func:`index_overlap`.

Prints one JSON object.

    python tools/bench_gauntlet_ratings.py [--players 20 256 1024] [--uploads 30] [--layers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np

# templar-1b (SPEC 2): 16 layers, hidden 2048, 8 heads, 8 kv heads, ffn 8192, vocab 32000
HIDDEN, FFN, VOCAB, LAYERS = 2048, 8192, 32000, 16
TILE, K = 4096, 64


def _layer_tiles() -> dict[str, int]:
    """Tiles per tensor of one layer (64x64 tiles; 1-D norms in segments of 64)."""
    sq = HIDDEN * HIDDEN // TILE
    mlp = HIDDEN * FFN // TILE
    return {
        "q": sq, "k": sq, "v": sq, "o": sq,
        "gate": mlp, "up": mlp, "down": mlp,
        "norm1": HIDDEN // 64, "norm2": HIDDEN // 64,
    }  # fmt: skip


def _model_tiles() -> int:
    per_layer = sum(_layer_tiles().values())
    return LAYERS * per_layer + 2 * (VOCAB * HIDDEN // TILE) + HIDDEN // 64


def _uploads(n: int, layers: int, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """``n`` uploads with honest-looking overlap: each tile is the shared set with p = 0.3,
    else the shared set rotated by a random offset (unique indices, ~1.5 % chance overlap)."""
    rng = np.random.default_rng(seed)
    shapes = {f"l{i}.{name}": t for i in range(layers) for name, t in _layer_tiles().items()}
    base: dict[str, np.ndarray] = {}
    for name, tiles in shapes.items():
        length = 64 if "norm" in name else TILE
        k = min(K, length)
        rows = []
        for lo in range(0, tiles, 2048):
            r = rng.random((min(2048, tiles - lo), length), dtype=np.float32)
            rows.append(r.argpartition(k - 1, axis=1)[:, :k])
        base[name] = np.concatenate(rows).astype(np.int64)
    out: dict[int, dict[str, np.ndarray]] = {}
    for u in range(n):
        up = {}
        for name, idx in base.items():
            length = 64 if "norm" in name else TILE
            keep = rng.random(idx.shape[0]) < 0.3
            shift = np.where(keep, 0, rng.integers(1, length, idx.shape[0]))[:, None]
            up[name] = np.sort((idx + shift) % length, axis=1)
        out[u] = up
    return out


def _rate(players: int, repeats: int) -> dict[str, Any]:
    from covenant.plugins.gauntlet.rules import rate_match

    rng = np.random.default_rng(players)
    ratings: dict[int, tuple[float, float] | None] = {
        u: (float(rng.normal(25, 3)), float(rng.uniform(2, 25 / 3))) for u in range(players)
    }
    scores = {u: float(rng.normal(0.01, 0.01)) for u in range(players)}
    for u in range(0, players, 10):
        scores[u] = -99.0  # failures, as in a real match
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rate_match(scores, ratings)
        times.append(time.perf_counter() - t0)
    return {"players": players, "repeats": repeats, "median_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--players", type=int, nargs="+", default=[20, 256, 1024])
    ap.add_argument("--uploads", type=int, default=30)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    import openskill

    from covenant.plugins.gauntlet.rules import index_overlap, pairwise_overlaps

    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "openskill": getattr(openskill, "__version__", "?"),
        },
        "rate": [_rate(p, args.repeats if p > 256 else 5) for p in args.players],
    }

    t0 = time.perf_counter()
    ups = _uploads(args.uploads, args.layers)
    gen_s = time.perf_counter() - t0
    tiles = sum(v.shape[0] for v in ups[0].values())
    all_pairs_s: dict[int, float] = {}
    for workers in args.workers:
        t0 = time.perf_counter()
        pairs = pairwise_overlaps(ups, workers=workers)
        all_pairs_s[workers] = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = index_overlap(ups[0], ups[1])
    one_pair_s = time.perf_counter() - t0
    scale = _model_tiles() / tiles
    values = np.array(list(pairs.values()))
    result["overlap"] = {
        "uploads": args.uploads,
        "pairs": len(pairs),
        "layers_run": args.layers,
        "tiles_run": tiles,
        "k": K,
        "tile_length": TILE,
        "generate_s": gen_s,
        "all_pairs_s_by_workers": all_pairs_s,
        "one_pair_index_overlap_s": one_pair_s,
        "overlap_mean": float(values.mean()),
        "overlap_max": float(values.max()),
        "one_pair_value": one,
        "model_tiles": _model_tiles(),
        "extrapolated_to_templar_1b": {
            "note": f"linear in tiles: measured on {tiles} tiles x {scale:.2f}",
            "all_pairs_s_by_workers": {w: t * scale for w, t in all_pairs_s.items()},
            "one_pair_s": one_pair_s * scale,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
