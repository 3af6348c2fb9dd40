"""Shared helpers for the SparseLoCo tests: payload surgery that keeps the framing valid."""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

PREFIX = struct.Struct("<4sHHI")


def reseal(body_without_crc: bytes) -> bytes:
    """Append a fresh CRC-32 trailer (so a test reaches the checks behind the checksum)."""
    return body_without_crc + struct.pack("<I", zlib.crc32(body_without_crc))


def mutate(payload: bytes, offset: int, value: int) -> bytes:
    """Set one byte and re-seal."""
    body = bytearray(payload[:-4])
    body[offset] = value
    return reseal(bytes(body))


def split(payload: bytes) -> tuple[tuple[Any, ...], dict[str, Any], bytes]:
    """(prefix fields, header dict, sections) of a well-formed payload."""
    fields = PREFIX.unpack_from(payload, 0)
    hlen = fields[3]
    header = json.loads(payload[PREFIX.size : PREFIX.size + hlen])
    return fields, header, payload[PREFIX.size + hlen : -4]


def rebuild(fields: tuple[Any, ...], header: dict[str, Any] | bytes, sections: bytes) -> bytes:
    """Re-frame a (possibly edited) header and sections, with a valid CRC."""
    raw = (
        header
        if isinstance(header, bytes)
        else json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    )
    magic, version, flags, _ = fields
    return reseal(PREFIX.pack(magic, version, flags, len(raw)) + raw + sections)


def section_offsets(payload: bytes) -> dict[str, tuple[int, int]]:
    """name -> (value section offset, index section offset) in the payload."""
    fields, header, _ = split(payload)
    off = PREFIX.size + fields[3]
    out = {}
    for e in header["tensors"]:
        rows_cols = e["shape"]
        numel = 1
        for s in rows_cols:
            numel *= s
        tiles = numel // (e["tile"][0] * e["tile"][1])
        out[e["name"]] = (off, off + e["value_bytes"])
        off += e["value_bytes"] + tiles * e["index_bytes_per_tile"]
    return out
