"""Property tests: random and mutated payloads never crash the decoder, only PayloadError."""

from __future__ import annotations

import torch
from _sl_helpers import reseal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import covenant.plugins.sparseloco as sl

SHAPES = {"a": (64, 128), "b": (100,), "c": (48, 40)}
_g = torch.Generator().manual_seed(0)
VALID = sl.encode({n: torch.randn(s, generator=_g) for n, s in SHAPES.items()})
SETTINGS = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _decode_or_payload_error(data: bytes) -> None:
    try:
        out = sl.decode(data, SHAPES)
    except sl.PayloadError:
        return
    # anything that decodes is well-formed: right names, shapes, finite values
    assert set(out) == set(SHAPES)
    for n, t in out.items():
        assert t.shape == torch.Size(SHAPES[n]) and bool(torch.isfinite(t).all())


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _decode_or_payload_error(data)


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_with_valid_prefix(tail: bytes) -> None:
    _decode_or_payload_error(reseal(VALID[:12] + tail))


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID) - 5), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.booleans(),
)
def test_mutated_payloads(edits: list[tuple[int, int]], sealed: bool) -> None:
    body = bytearray(VALID[:-4])
    for pos, val in edits:
        body[pos] = val
    data = reseal(bytes(body)) if sealed else bytes(body) + VALID[-4:]
    _decode_or_payload_error(data)


@SETTINGS
@given(st.integers(0, len(VALID)), st.binary(max_size=64))
def test_truncated_or_extended(cut: int, extra: bytes) -> None:
    _decode_or_payload_error(reseal(VALID[:cut] + extra))
