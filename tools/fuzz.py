"""Long fuzzing run over every untrusted parser: coverage-guided mutation within a time budget.

The targets, their seeds, mutations, structure-aware generators and caps are the registry in
``tests/fuzz/targets.py`` (the default test run fuzzes the same targets briefly). Here each
target gets an equal share of ``--minutes``. Every input is run twice: once under a line tracer
restricted to covenant's sources, ``json`` and ``tomllib`` (an input that reaches a new branch, as a new
(line, next line) arc, joins the queue that mutations draw from) and once measured, with
``tracemalloc`` and ``time.process_time``, against the target's memory and CPU caps (the
verdict). No new dependency: atheris needs a compiled extension, and hypothesis's generation is
not coverage-guided.

Inputs that fail (an untyped exception, an accepted input that breaks the target's check, a cap
exceeded) are saved to ``tests/fuzz/corpus/<target>/fail-<sha>.bin``; a few small inputs that
reached new code are saved as ``cov-<sha>.bin``. The default tests replay that folder.

    python tools/fuzz.py --minutes 10
    python tools/fuzz.py --minutes 1 --target commitment --json

Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))

import targets as T  # noqa: E402 - the registry lives with the tests

_TRACED = tuple(
    str(p)
    for p in (
        ROOT / "engine",
        ROOT / "plugins",
        ROOT / "models",
        Path(json.__file__).parent,
        Path(str(__import__("tomllib").__file__)).parent,
    )
)


@dataclass
class Report:
    """What one target's share of the run did."""

    target: str
    seconds: float = 0.0
    tried: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: int = 0
    new_coverage_inputs: int = 0
    arcs: int = 0
    queue: int = 0
    max_peak_bytes: int = 0
    max_cpu_s: float = 0.0
    saved: list[str] = field(default_factory=list)
    failure_details: list[str] = field(default_factory=list)


class ArcTracer:
    """Collects (file, line, next line) arcs of covenant's code while installed."""

    def __init__(self) -> None:
        self.arcs: set[tuple[str, int, int]] = set()
        self._last: dict[int, int] = {}

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            key = id(frame)
            self.arcs.add((frame.f_code.co_filename, self._last.get(key, 0), frame.f_lineno))
            self._last[key] = frame.f_lineno
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_filename.startswith(_TRACED):
            return self._local
        return None

    def run(self, target: T.Target, data: bytes) -> tuple[T.Outcome, set[tuple[str, int, int]]]:
        self.arcs = set()
        self._last = {}
        sys.settrace(self._global)
        threading.settrace(self._global)
        try:
            outcome = T.run_one(target, data, measure=False)
        finally:
            sys.settrace(None)
            threading.settrace(None)  # type: ignore[arg-type]
        return outcome, self.arcs


def _save(name: str, data: bytes, prefix: str) -> str:
    folder = T.CORPUS / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    if not path.exists():
        path.write_bytes(data)
    return str(path.relative_to(ROOT))


def fuzz_target(
    target: T.Target, seconds: float, rng: random.Random, *, save: bool, save_limit: int
) -> Report:
    report = Report(target.name)
    start = time.monotonic()
    queue = list(T.warm(target)) + [p.read_bytes() for p in T.corpus_files(target.name)]
    seen: set[tuple[str, int, int]] = set()
    tracer = ArcTracer()
    saved_cov = 0
    existing = len(T.corpus_files(target.name))
    initial = len(queue)
    i = 0
    while time.monotonic() - start < seconds:
        if i < initial:  # every seed and corpus entry once, first
            data = queue[i]
        elif target.generate is not None and rng.random() < 0.25:
            data = target.generate(rng)
        else:
            # favour recent finds: half the picks from the newest quarter of the queue
            pool = queue[-max(1, len(queue) // 4) :] if rng.random() < 0.5 else queue
            data = T.mutate(rng.choice(pool), rng, queue, target.tokens, target.max_input)
            if target.fixup is not None and rng.random() < 0.5:
                data = target.fixup(data)
        i += 1
        traced, arcs = tracer.run(target, data)
        outcome = T.run_one(target, data)
        if traced.kind == "failure" and outcome.kind != "failure":
            outcome = traced
        report.tried += 1
        report.max_peak_bytes = max(report.max_peak_bytes, outcome.peak_bytes)
        report.max_cpu_s = max(report.max_cpu_s, outcome.cpu_s)
        if outcome.kind == "accepted":
            report.accepted += 1
        elif outcome.kind == "rejected":
            report.rejected += 1
        else:
            report.failures += 1
            if len(report.failure_details) < 20:
                report.failure_details.append(f"{outcome.detail} | input {data[:120]!r}")
            if save:
                report.saved.append(_save(target.name, data, "fail"))
        new = arcs - seen
        if new:
            seen |= arcs
            if data not in queue:
                queue.append(data)
                report.new_coverage_inputs += 1
                small = len(data) <= 4096 and outcome.kind != "failure"
                if save and small and saved_cov < save_limit and existing + saved_cov < 24:
                    report.saved.append(_save(target.name, data, "cov"))
                    saved_cov += 1
    report.seconds = round(time.monotonic() - start, 1)
    report.arcs = len(seen)
    report.queue = len(queue)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="total time budget")
    parser.add_argument("--target", action="append", help="only these targets (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    parser.add_argument("--no-save", action="store_true", help="do not write the corpus")
    parser.add_argument("--save-limit", type=int, default=4, help="new-coverage inputs saved")
    args = parser.parse_args(argv)
    names = args.target or sorted(T.TARGETS)
    unknown = [n for n in names if n not in T.TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(sorted(T.TARGETS))}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    share = args.minutes * 60 / len(names)
    rng = random.Random(args.seed)
    reports = []
    for name in names:
        report = fuzz_target(
            T.TARGETS[name], share, rng, save=not args.no_save, save_limit=args.save_limit
        )
        reports.append(report)
        if not args.json:
            print(
                f"{name:22s} {report.tried:8d} inputs  accepted {report.accepted:7d}  "
                f"rejected {report.rejected:7d}  failures {report.failures:4d}  "
                f"arcs {report.arcs:5d}  peak {report.max_peak_bytes / 2**20:6.1f} MiB  "
                f"max cpu {report.max_cpu_s:5.2f} s",
                flush=True,
            )
            for detail in report.failure_details[:5]:
                print(f"    FAILURE {detail}")
    if args.json:
        total = {
            "minutes": args.minutes,
            "seed": args.seed,
            "command": "python tools/fuzz.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "targets": [asdict(r) for r in reports],
        }
        print(json.dumps(total, indent=2))
    return 1 if any(r.failures for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
