"""Print the SparseLoCo codec benchmark as JSON (see covenant.plugins.sparseloco.bench).

OMP_NUM_THREADS=2 .venv/bin/python tools/bench_codec.py --preset templar-1b --peers 20
"""

from __future__ import annotations

import argparse
import json

from covenant.plugins.sparseloco.bench import PRESETS, run_codec_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description="SparseLoCo codec benchmark (JSON on stdout)")
    parser.add_argument("--preset", default="templar-1b", choices=sorted(PRESETS))
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--distinct-peers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-symmetric", action="store_true")
    args = parser.parse_args()
    result = run_codec_benchmark(
        preset=args.preset,
        peers=args.peers,
        distinct_peers=args.distinct_peers,
        repeats=args.repeats,
        device=args.device,
        seed=args.seed,
        include_reference=not args.no_reference,
        include_symmetric=not args.no_symmetric,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
