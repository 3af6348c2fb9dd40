"""Wire format: sizes, round trips, and every kind of bad input (SPEC 5)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from _sl_helpers import PREFIX, mutate, rebuild, reseal, section_offsets, split

import covenant.plugins.sparseloco as sl
from covenant.plugins.sparseloco.wire import ef_decode, ef_encode, ef_params

SHAPES = {"a.weight": (128, 192), "b.norm": (100,), "c.odd": (48, 40)}


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


@pytest.fixture(scope="module")
def payload(tensors: dict[str, torch.Tensor]) -> bytes:
    return sl.encode(tensors)


def test_size_is_exact_and_compact(payload: bytes) -> None:
    assert len(payload) == sl.expected_payload_size(SHAPES)
    # one 64x64 tile: 20-byte table amortised + 16 bytes codes + 64 bytes Elias-Fano
    shapes = {"w": (2048, 2048)}
    size = sl.expected_payload_size(shapes)
    tiles = 32 * 32
    _, header, _ = split(sl.encode({"w": torch.randn(2048, 2048)}))
    assert (
        size
        == PREFIX.size
        + len(json.dumps(header, sort_keys=True, separators=(",", ":")))
        + 20
        + tiles * 80
        + 4
    )
    assert (tiles * 80 * 8) / (2048 * 2048) == 0.15625
    assert size * 8 / (2048 * 2048) < 0.16


def test_round_trip_decode_matches_pieces(tensors: dict[str, torch.Tensor], payload: bytes) -> None:
    pieces = sl.encode_tensors(tensors)
    decoded = sl.decode(payload, SHAPES)
    assert set(decoded) == set(SHAPES)
    for n, p in pieces.items():
        assert torch.equal(decoded[n], p.to_dense())
        assert decoded[n].shape == torch.Size(SHAPES[n])
    idx = sl.tile_indices(payload, SHAPES)
    assert idx["a.weight"].shape == (6, 64) and torch.equal(
        idx["a.weight"], pieces["a.weight"].indices
    )
    assert torch.equal(idx["b.norm"], torch.arange(50).expand(2, 50))
    sl.validate_payload(payload, SHAPES)


@pytest.mark.parametrize(
    ("length", "k"), [(4096, 64), (1920, 64), (91, 64), (4096, 1), (2400, 7), (64, 63)]
)
def test_elias_fano_round_trip(length: int, k: int) -> None:
    g = torch.Generator().manual_seed(length + k)
    idx = torch.stack([torch.randperm(length, generator=g)[:k].sort().values for _ in range(9)])
    rec = ef_encode(idx, length)
    assert rec.shape == (9, ef_params(length, k)[2])
    assert torch.equal(ef_decode(rec, length, k, "t"), idx)


def test_elias_fano_is_eight_bits_per_index_at_k64() -> None:
    assert ef_params(4096, 64) == (6, 128, 64)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_truncated(payload: bytes) -> None:
    for cut in (0, 5, 11, 16, len(payload) // 2, len(payload) - 1):
        with pytest.raises(sl.PayloadError):
            sl.decode(payload[:cut], SHAPES)
    # truncated but re-sealed: caught by the size arithmetic, not only the CRC
    with pytest.raises(sl.PayloadSizeError):
        sl.decode(reseal(payload[:-40]), SHAPES)


def test_flipped_bits_anywhere_are_caught(payload: bytes) -> None:
    for pos in range(0, len(payload), max(1, len(payload) // 97)):
        for bit in (0, 7):
            bad = bytearray(payload)
            bad[pos] ^= 1 << bit
            with pytest.raises(sl.PayloadError):
                sl.decode(bytes(bad), SHAPES)


def test_cap_checked_before_anything(payload: bytes) -> None:
    cfg = sl.SparseLoCoConfig(max_payload_bytes=len(payload) - 1)
    with pytest.raises(sl.PayloadSizeError, match="over the cap"):
        sl.decode(payload, SHAPES, cfg)


def test_huge_header_length_and_claims(payload: bytes) -> None:
    fields, header, sections = split(payload)
    # header_len pointing past the end
    body = bytearray(payload[:-4])
    struct.pack_into("<I", body, 8, 2**32 - 1)
    with pytest.raises(sl.PayloadSizeError):
        sl.decode(reseal(bytes(body)), SHAPES)
    # a shape claiming 10^12 elements: rejected against the model's shape, nothing allocated
    header["tensors"][0]["shape"] = [10**6, 10**6]
    with pytest.raises(sl.PayloadShapeError, match="does not match") as info:
        sl.decode(rebuild(fields, header, sections), SHAPES)
    assert info.value.tensor == "a.weight"
    # ... and the model itself is that large: the declared sizes no longer fit the bytes
    big = dict(SHAPES, **{"a.weight": (10**6, 10**6)})
    with pytest.raises(sl.PayloadShapeError):
        sl.decode(rebuild(fields, header, sections), big)


def test_future_version_and_bad_magic(payload: bytes) -> None:
    body = bytearray(payload[:-4])
    struct.pack_into("<H", body, 4, 2)
    with pytest.raises(sl.PayloadVersionError, match="newer"):
        sl.decode(reseal(bytes(body)), SHAPES)
    with pytest.raises(sl.PayloadFormatError, match="magic"):
        sl.decode(mutate(payload, 0, ord("X")), SHAPES)
    with pytest.raises(sl.PayloadFormatError, match="flags"):
        sl.decode(mutate(payload, 6, 1), SHAPES)


def test_unknown_and_missing_tensor_names(payload: bytes, tensors: dict[str, torch.Tensor]) -> None:
    less = {n: s for n, s in SHAPES.items() if n != "b.norm"}
    with pytest.raises(sl.PayloadError) as info:
        sl.decode(payload, less)
    assert info.value.tensor == "b.norm" and isinstance(info.value, sl.PayloadShapeError)
    partial = sl.encode({n: t for n, t in tensors.items() if n != "c.odd"})
    with pytest.raises(sl.PayloadShapeError, match="lacks") as info:
        sl.decode(partial, SHAPES)
    assert info.value.tensor == "c.odd"
    lenient = sl.SparseLoCoConfig(require_all_tensors=False)
    assert set(sl.decode(partial, SHAPES, lenient)) == {"a.weight", "b.norm"}


def test_header_fields_are_checked(payload: bytes) -> None:
    fields, header, sections = split(payload)
    cases = [
        ("k", 65, sl.PayloadShapeError),
        ("k", True, sl.PayloadShapeError),
        ("tile", [32, 64], sl.PayloadShapeError),
        ("value_bytes", 1, sl.PayloadShapeError),
        ("index_bytes_per_tile", 60, sl.PayloadShapeError),
    ]
    for key, value, err in cases:
        h = json.loads(json.dumps(header))
        h["tensors"][0][key] = value
        with pytest.raises(err) as info:
            sl.decode(rebuild(fields, h, sections), SHAPES)
        assert info.value.tensor == "a.weight" and key in info.value.reason
    for mutation, err in [
        (lambda h: h.update(format="other"), sl.PayloadFormatError),
        (lambda h: h.update(quantizer="symmetric"), sl.PayloadFormatError),
        (lambda h: h.update(extra=1), sl.PayloadFormatError),
        (lambda h: h["tensors"].reverse(), sl.PayloadFormatError),
        (lambda h: h["tensors"].append(h["tensors"][0]), sl.PayloadFormatError),
        (lambda h: h["tensors"][0].pop("k"), sl.PayloadFormatError),
        (lambda h: h.update(tensors={}), sl.PayloadFormatError),
    ]:
        h = json.loads(json.dumps(header))
        mutation(h)
        with pytest.raises(err):
            sl.decode(rebuild(fields, h, sections), SHAPES)
    for raw in (b"\xff\xfe", b"[" * 100000, b"{}", b"not json", b"1" * 5000):
        with pytest.raises(sl.PayloadFormatError):
            sl.decode(rebuild(fields, raw, sections), SHAPES)


def test_nan_or_overflowing_table(payload: bytes) -> None:
    off, _ = section_offsets(payload)["c.odd"]
    for value in (float("nan"), float("inf"), 3e38):
        body = bytearray(payload[:-4])
        struct.pack_into("<f", body, off, value)  # shift
        struct.pack_into("<f", body, off + 16, 3e38)  # lut3: 3e38 + 3e38 overflows
        with pytest.raises(sl.PayloadTableError) as info:
            sl.decode(reseal(bytes(body)), SHAPES)
        assert info.value.tensor == "c.odd"


def _with_indices(payload: bytes, name: str, tile_idx: torch.Tensor) -> bytes:
    """Replace one tensor's first tile record with a hand-made Elias-Fano record."""
    _, idx_off = section_offsets(payload)[name]
    length = 48 * 40
    low, upper, nbytes = ef_params(length, 64)
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8)
    pos = (tile_idx >> low) + torch.arange(64)
    for p in pos.tolist():
        if p < upper:
            bits[p] = 1
    for i, v in enumerate(tile_idx.tolist()):
        for j in range(low):
            bits[upper + i * low + j] = (v >> j) & 1
    rec = bytes(int(sum(int(bits[b * 8 + j]) << j for j in range(8))) for b in range(nbytes))
    body = bytearray(payload[:-4])
    body[idx_off : idx_off + nbytes] = rec
    return reseal(bytes(body))


def test_indices_out_of_range_repeated_or_wrong_count(payload: bytes) -> None:
    base = torch.arange(0, 64 * 30, 30)
    assert sl.decode(_with_indices(payload, "c.odd", base), SHAPES)  # sanity: valid record
    rep = base.clone()
    rep[5] = rep[4]
    with pytest.raises(sl.PayloadIndexError, match="repeated") as info:
        sl.decode(_with_indices(payload, "c.odd", rep), SHAPES)
    assert info.value.tensor == "c.odd"
    oob = base.clone()
    oob[-1] = 1920 + 10  # high part still inside the bitmap, index past the tile
    with pytest.raises(sl.PayloadIndexError, match="range"):
        sl.decode(_with_indices(payload, "c.odd", oob), SHAPES)
    few = base.clone()
    few[-1] = 4000  # its bitmap position falls off the end: one index short
    with pytest.raises(sl.PayloadIndexError, match="declares 63"):
        sl.decode(_with_indices(payload, "c.odd", few), SHAPES)


def test_nonzero_padding_is_rejected(payload: bytes) -> None:
    # b.norm: 100 values (codes 25 bytes, no padding); c.odd: 64 codes -> 16 bytes, no padding.
    # A 3-code tensor has 2 padding bits in its last code byte.
    small = {"s": (3,)}
    p = sl.encode({"s": torch.tensor([1.0, -2.0, 3.0])})
    off, _ = section_offsets(p)["s"]
    bad = mutate(p, off + 20, p[off + 20] | 0xC0)
    with pytest.raises(sl.PayloadFormatError, match="padding"):
        sl.decode(bad, small)


def test_errors_are_value_errors_with_reason() -> None:
    err = sl.PayloadIndexError("bad", tensor="x")
    assert issubclass(sl.PayloadIndexError, ValueError)
    assert err.reason == "bad" and err.tensor == "x"
    assert "payload 3" in str(err.with_peer(3))
