"""Every untrusted parser in the registry (``targets.py``), fuzzed briefly in the default run.

Per target: its seeds are accepted and pass its round-trip check; mutated seeds (flips,
truncations, insertions, duplications, splices) and structure-aware inputs end in the parser's
own typed error or an accepted result that passes the check, within the target's memory and CPU
caps; and the checked-in corpus (``corpus/<target>/``: what ``tools/fuzz.py`` found) replays
clean. Seeded (``derandomize=True``) so a run is reproducible; ``COVENANT_FUZZ_EXAMPLES`` raises
the example count for a longer local run.
"""

from __future__ import annotations

import functools
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from targets import TARGETS, Target, corpus_files, mutate, run_one, warm

EXAMPLES = int(os.environ.get("COVENANT_FUZZ_EXAMPLES", "40"))
NAMES = sorted(TARGETS)
SETTINGS = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@functools.cache
def _seeds(name: str) -> list[bytes]:
    return warm(TARGETS[name])


def _assert_typed(target: Target, data: bytes) -> None:
    outcome = run_one(target, data)
    assert outcome.kind != "failure", f"{target.name}: {outcome.detail}; input {data[:300]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_seeds_are_accepted_and_round_trip(name: str) -> None:
    target = TARGETS[name]
    for seed in _seeds(name):
        outcome = run_one(target, seed)
        assert outcome.kind == "accepted", f"{name}: seed refused: {outcome.detail}"


@pytest.mark.parametrize("name", NAMES)
def test_mutations_end_in_typed_errors(name: str) -> None:
    target = TARGETS[name]
    seeds = _seeds(name)

    @SETTINGS
    @given(st.integers(0, 2**32 - 1), st.booleans())
    def prop(seed: int, fix: bool) -> None:
        rng = random.Random(seed)
        data = mutate(rng.choice(seeds), rng, seeds, target.tokens, target.max_input)
        if fix and target.fixup is not None:
            data = target.fixup(data)
        _assert_typed(target, data)

    prop()


@pytest.mark.parametrize("name", [n for n in NAMES if TARGETS[n].generate is not None])
def test_structured_inputs_end_in_typed_errors(name: str) -> None:
    target = TARGETS[name]
    _seeds(name)
    generate = target.generate
    assert generate is not None

    @SETTINGS
    @given(st.integers(0, 2**32 - 1))
    def prop(seed: int) -> None:
        _assert_typed(target, generate(random.Random(seed)))

    prop()


@pytest.mark.parametrize("name", NAMES)
def test_the_corpus_replays(name: str) -> None:
    target = TARGETS[name]
    _seeds(name)
    for path in corpus_files(name):
        outcome = run_one(target, path.read_bytes())
        assert outcome.kind != "failure", f"{path.name}: {outcome.detail}"


def test_a_failure_is_reported_not_raised() -> None:
    """The harness itself: an untyped exception or a blown cap is a failure, never a crash."""

    def boom(data: bytes) -> None:
        raise KeyError(data)

    bad = Target("t", "d", lambda: [b""], boom, (ValueError,))
    assert run_one(bad, b"x").kind == "failure"
    typed = Target("t", "d", lambda: [b""], lambda d: int(d), (ValueError,))
    assert run_one(typed, b"x").kind == "rejected" and run_one(typed, b"7").kind == "accepted"
    greedy = Target("t", "d", lambda: [b""], lambda d: bytearray(1 << 22), (), mem_cap=lambda n: 1)
    assert "allocated" in run_one(greedy, b"").detail
