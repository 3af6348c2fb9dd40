"""The bounded reader (``covenant.engine.untrusted``): properties beyond the registry's fuzzing.

Valid JSON and TOML round-trip and agree with the standard library; each bound (size, depth,
number length, duplicate keys, NaN) is enforced exactly at its limit, before the work it bounds,
and never as a ``RecursionError``/``ValueError`` escaping untyped.
"""

from __future__ import annotations

import json
import math
import pickle
import time
import tomllib
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covenant.engine.errors import CovenantError
from covenant.engine.untrusted import (
    UntrustedInputError,
    canonical_json,
    loads_canonical_json,
    loads_json,
    loads_toml,
)

SETTINGS = settings(
    derandomize=True,
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@SETTINGS
@given(JSON)
def test_valid_json_round_trips_and_agrees_with_the_stdlib(value: Any) -> None:
    raw = canonical_json(value)
    assert loads_canonical_json(raw, what="t") == value
    pretty = json.dumps(value, indent=2, ensure_ascii=False)
    assert loads_json(pretty, what="t") == json.loads(pretty) == value
    if pretty.encode() != raw:
        with pytest.raises(UntrustedInputError, match="canonical"):
            loads_canonical_json(pretty.encode(), what="t")


@SETTINGS
@given(st.dictionaries(st.text("abc_", min_size=1, max_size=6), _scalars, max_size=6))
def test_valid_toml_agrees_with_tomllib(table: dict[str, Any]) -> None:
    lines = []
    for key, value in table.items():
        if value is None:
            continue
        literal = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        if isinstance(value, float):
            literal = repr(value) if math.isfinite(value) and "e" not in repr(value) else "1.5"
        lines.append(f"{key} = {literal}")
    text = "\n".join(lines)
    try:
        expected = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        with pytest.raises(UntrustedInputError):
            loads_toml(text, what="t")
        return
    if any(isinstance(v, int) and len(str(abs(v))) > 64 for v in expected.values()):
        return
    assert loads_toml(text, what="t") == expected


@pytest.mark.parametrize("depth", [1, 31, 32, 33, 500, 100_000])
def test_json_depth_is_bounded_exactly_and_never_recurses(depth: int) -> None:
    text = "[" * depth + "]" * depth
    if depth <= 32:
        assert loads_json(text, what="t") is not None
    else:
        with pytest.raises(UntrustedInputError, match="nested deeper than 32"):
            loads_json(text, what="t")
    # brackets inside strings are not nesting
    assert loads_json(json.dumps("[" * depth), what="t") == "[" * depth


@pytest.mark.parametrize("depth", [1, 32, 33, 5000])
def test_toml_depth_is_bounded_inline_and_through_dotted_keys(depth: int) -> None:
    inline = "a = " + "[" * depth + "1" + "]" * depth
    dotted = ".".join(["k"] * (depth + 1)) + " = 1"  # depth tables, then the value
    for text in (inline, dotted):
        if depth <= 32:
            loads_toml(text, what="t")
        else:
            with pytest.raises(UntrustedInputError, match="nested deeper"):
                loads_toml(text, what="t")
    assert loads_toml(f'a = "{"[" * depth}" # [[[[', what="t") == {"a": "[" * depth}


@pytest.mark.parametrize("digits", [64, 65, 4301, 100_000])
def test_number_length_is_bounded_before_conversion(digits: int) -> None:
    for text, loader in (
        ("1" * digits, loads_json),
        ("-" + "1" * digits, loads_json),
        ("0." + "1" * digits, loads_json),
        ("a = " + "1" * digits, loads_toml),
        ("a = 0x" + "f" * digits, loads_toml),
    ):
        start = time.process_time()
        if digits <= 64 and not text.startswith("0."):
            loader(text, what="t")
        elif digits > 64:
            with pytest.raises(UntrustedInputError, match="longer than 64 digits"):
                loader(text, what="t")
        assert time.process_time() - start < 1.0


@pytest.mark.parametrize(
    "text", ["NaN", "[Infinity]", '{"a": -Infinity}', "1e999", "[-1e400]", '"\\ud800"']
)
def test_non_finite_numbers_and_lone_surrogates_are_refused(text: str) -> None:
    with pytest.raises(UntrustedInputError):
        loads_json(text, what="t")


def test_duplicate_keys_are_refused_unless_allowed() -> None:
    with pytest.raises(UntrustedInputError, match="duplicate key 'a'"):
        loads_json('{"a": 1, "b": {"a": 2, "a": 3}}', what="t")
    assert loads_json('{"a": 1, "a": 2}', what="t", allow_duplicate_keys=True) == {"a": 2}


def test_size_and_encoding_are_checked_before_parsing() -> None:
    big = b"[" + b"0," * (1 << 20) + b"0]"
    start = time.process_time()
    with pytest.raises(UntrustedInputError, match="larger than"):
        loads_json(big, what="t")
    with pytest.raises(UntrustedInputError, match="larger than"):
        loads_toml("a = 1\n" * (1 << 18), what="t")
    assert time.process_time() - start < 0.5
    with pytest.raises(UntrustedInputError, match="UTF-8"):
        loads_json(b'"\xff"', what="t")
    with pytest.raises(UntrustedInputError, match="UTF-8"):
        loads_toml('a = "\udcff"', what="t")


def test_the_error_names_what_was_read_and_is_typed() -> None:
    with pytest.raises(UntrustedInputError) as info:
        loads_json("{", what="peer 7's manifest")
    err = info.value
    assert str(err).startswith("peer 7's manifest: malformed JSON")
    assert issubclass(type(err), CovenantError) and issubclass(type(err), ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.what, again.problem, again.bound) == (err.what, err.problem, err.bound)


def test_a_megabyte_of_input_stays_within_its_caps() -> None:
    """The worst cases for a 1 MiB input: many small containers, long strings, many numbers."""
    cases = [
        "[" + ",".join(["{}"] * 330_000) + "]",
        "[" + ",".join(['"' + "x" * 100 + '"'] * 9_000) + "]",
        "[" + ",".join(["123456789"] * 100_000) + "]",
        "[" * 32 + "]" * 32 + " " * 1_000_000,
    ]
    for text in cases:
        assert len(text) <= 1 << 20
        tracemalloc.start()
        start = time.process_time()
        loads_json(text, what="t")
        cpu = time.process_time() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * len(text) + (1 << 20), peak
        assert cpu < 5.0, cpu
