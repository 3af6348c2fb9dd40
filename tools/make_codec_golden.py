"""Write the SparseLoCo codec golden fixtures (tests/plugins/sparseloco/golden/codec_v1.npz).

Run once, commit the output, and re-run only on a deliberate numerics/format change:

    .venv/bin/python tools/make_codec_golden.py

The fixture pins, for a few seeded tensors (non-64 shapes, 1-D, ties, a density/symmetric
config), the selected indices, codes, tables, decoded tensors and payload bytes, plus a
three-peer aggregation. The inputs are stored in the file, so the fixture does not depend on any
random generator's stability.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import covenant.plugins.sparseloco as sl

OUT = Path(__file__).resolve().parents[1] / "tests/plugins/sparseloco/golden/codec_v1.npz"

# name -> (shape, seed)
CASES: dict[str, tuple[tuple[int, ...], int]] = {
    "w128x128": ((128, 128), 1),
    "w48x40": ((48, 40), 2),
    "w48x100": ((48, 100), 3),
    "w7x13": ((7, 13), 4),
    "v100": ((100,), 5),
    "v1024": ((1024,), 6),
    "ties64x128": ((64, 128), 7),
}
AGG_CASES = ("w48x40", "v100", "ties64x128")
CONFIGS: dict[str, dict[str, object]] = {
    "default": {},
    "density_symmetric": {"topk_rule": "density", "quantizer": "symmetric", "k": 32},
}
AGG_SEEDS = (11, 12, 13)


def make_input(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded float32 tensor (values exact in float16, so the fixture stores them as float16);
    the ties case has a zero block and repeated magnitudes."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 0.01).astype(np.float16).astype(np.float32)
    if name.startswith("ties"):
        x[:, :64] = 0.0
        x[:32, 64:] = np.sign(x[:32, 64:]) * np.float32(0.5)
    return x


def build() -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    shapes = {n: s for n, (s, _) in CASES.items()}
    inputs = {n: make_input(n, s, seed) for n, (s, seed) in CASES.items()}
    for n, x in inputs.items():
        arrays[f"input__{n}"] = x.astype(np.float16)
    for cname, opts in CONFIGS.items():
        cfg = sl.SparseLoCoConfig(**opts)  # type: ignore[arg-type]
        tensors = {n: torch.from_numpy(x.copy()) for n, x in inputs.items()}
        pieces = sl.encode_tensors(tensors, cfg)
        payload = sl.pack_payload(pieces, cfg)
        decoded = sl.decode(payload, shapes, cfg)
        for n, p in pieces.items():
            arrays[f"{cname}__indices__{n}"] = p.indices.numpy().astype(np.int64)
            assert p.codes is not None
            arrays[f"{cname}__codes__{n}"] = p.codes.numpy().astype(np.uint8)
            arrays[f"{cname}__table__{n}"] = np.asarray(p.table, dtype=np.float32)
            arrays[f"{cname}__decoded__{n}"] = decoded[n].numpy()
        arrays[f"{cname}__payload"] = np.frombuffer(payload, dtype=np.uint8).copy()
    # Three peers over the same tensor set, aggregated with the defaults.
    payloads = []
    agg_shapes = {n: shapes[n] for n in AGG_CASES}
    for i, seed in enumerate(AGG_SEEDS):
        peer = {
            n: torch.from_numpy(make_input(n, shapes[n], seed * 100 + j) * np.float32(2.0**i))
            for j, n in enumerate(AGG_CASES)
        }
        for n, t in peer.items():
            arrays[f"agg_input__{i}__{n}"] = t.numpy().astype(np.float16)
        payloads.append(sl.encode(peer))
    agg = sl.aggregate(payloads, agg_shapes)
    for n, t in agg.items():
        arrays[f"agg_result__{n}"] = t.numpy()
    arrays["meta"] = np.frombuffer(
        json.dumps(
            {
                "cases": {n: [list(s), seed] for n, (s, seed) in CASES.items()},
                "configs": CONFIGS,
                "agg_seeds": AGG_SEEDS,
                "agg_cases": AGG_CASES,
                "format_version": sl.VERSION,
            }
        ).encode(),
        dtype=np.uint8,
    ).copy()
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **build())  # type: ignore[arg-type]
    print(json.dumps({"written": str(args.out), "bytes": args.out.stat().st_size}))


if __name__ == "__main__":
    main()
