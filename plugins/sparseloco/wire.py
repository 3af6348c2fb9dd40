"""The SparseLoCo payload wire format, version 1 (byte layout in docs/sparseloco.md).

One payload carries one peer's encoded tensors::

    prefix   12 bytes  magic b"CVSL" | version u16 LE | flags u16 LE (0) | header_len u32 LE
    header   header_len bytes of canonical JSON (sorted keys, no spaces, ASCII):
             {"format": "covenant-sparseloco", "quantizer": "reference",
              "tensors": [{"name", "shape", "tile", "k", "value_bytes", "index_bytes_per_tile"}]}
             tensors sorted by name, names unique
    sections one per tensor, in header order:
             values   table (5 x f32 LE: shift, lut0..lut3) + 2-bit codes, four per byte, first
                      code in the lowest bits, tile-major, zero padding
                      (quantizer "none": k x f32 LE per tile instead, no table)
             indices  per tile a fixed-size Elias-Fano record (absent when k == tile length)
    trailer  4 bytes  CRC-32 (zlib) of everything before it, u32 LE

Every size follows from the model's shapes and the config, so the decoder checks the declared
sizes against the byte length and the cap before it allocates anything, and
:func:`expected_payload_size` is exact. Nothing in a payload is ever executed (no pickle, no
``torch.load``).

Elias-Fano per tile (universe L, k sorted unique indices): ``l = floor(log2(L / k))`` low bits
per index; the upper bitmap has ``k + ((L - 1) >> l) + 1`` bits with bit ``(x_i >> l) + i`` set
for the i-th index; then the k low parts, ``l`` bits each, LSB first. Bits are numbered LSB-first
within bytes; the record is padded with zero bits to whole bytes. At k = 64 of 4096 that is
exactly 64 bytes = 8 bits per index; the representation of a set is unique, so the bytes are
canonical.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from covenant.plugins.sparseloco.codec import TensorPiece, decode_levels
from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.errors import (
    EncodeError,
    PayloadChecksumError,
    PayloadFormatError,
    PayloadIndexError,
    PayloadShapeError,
    PayloadSizeError,
    PayloadTableError,
    PayloadVersionError,
)
from covenant.plugins.sparseloco.tiling import (
    TileBlock,
    TileGeometry,
    flat_positions,
    kept_per_tile,
    tile_geometry,
)

logger = logging.getLogger(__name__)

MAGIC = b"CVSL"
VERSION = 1
FORMAT_NAME = "covenant-sparseloco"
_PREFIX = struct.Struct("<4sHHI")
_TRAILER = struct.Struct("<I")
_TABLE_BYTES = 5 * 4
_ENTRY_KEYS = {"name", "shape", "tile", "k", "value_bytes", "index_bytes_per_tile"}
_HEADER_KEYS = {"format", "quantizer", "tensors"}
_DEFAULT = SparseLoCoConfig()


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def ef_params(tile_len: int, k: int) -> tuple[int, int, int]:
    """Elias-Fano ``(low_bits, upper_bits, record_bytes)`` for k of ``tile_len``; 0 bytes if k == L."""
    if k >= tile_len:
        return 0, 0, 0
    low = (tile_len // k).bit_length() - 1
    upper = k + ((tile_len - 1) >> low) + 1
    return low, upper, (upper + k * low + 7) // 8


def value_section_bytes(num_tiles: int, k: int, quantizer: str) -> int:
    """Bytes of a tensor's value section (table + packed codes, or raw fp32 values)."""
    if quantizer == "none":
        return num_tiles * k * 4
    return _TABLE_BYTES + (num_tiles * k + 3) // 4


def _entry(name: str, geom: TileGeometry, k: int, quantizer: str) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(geom.shape),
        "tile": [geom.tile_rows, geom.tile_cols],
        "k": k,
        "value_bytes": value_section_bytes(geom.num_tiles, k, quantizer),
        "index_bytes_per_tile": ef_params(geom.tile_len, k)[2],
    }


def _header_bytes(entries: list[dict[str, Any]], quantizer: str) -> bytes:
    header = {"format": FORMAT_NAME, "quantizer": quantizer, "tensors": entries}
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def _section_bytes(e: Mapping[str, Any], num_tiles: int) -> int:
    return int(e["value_bytes"]) + num_tiles * int(e["index_bytes_per_tile"])


def header_size(
    shapes: Mapping[str, Sequence[int] | torch.Size], config: SparseLoCoConfig | None = None
) -> int:
    """Bytes of the fixed prefix, JSON header and trailer of a payload for ``shapes``."""
    config = config or _DEFAULT
    entries = []
    for name in sorted(shapes):
        geom = tile_geometry(tuple(shapes[name]), config.tile_max)
        entries.append(_entry(name, geom, kept_per_tile(geom, config), config.quantizer))
    return _PREFIX.size + len(_header_bytes(entries, config.quantizer)) + _TRAILER.size


def expected_payload_size(
    shapes: Mapping[str, Sequence[int] | torch.Size], config: SparseLoCoConfig | None = None
) -> int:
    """Exact byte length of a payload carrying every tensor of ``shapes`` (the download cap's base)."""
    config = config or _DEFAULT
    entries, body = [], 0
    for name in sorted(shapes):
        geom = tile_geometry(tuple(shapes[name]), config.tile_max)
        e = _entry(name, geom, kept_per_tile(geom, config), config.quantizer)
        entries.append(e)
        body += _section_bytes(e, geom.num_tiles)
    return _PREFIX.size + len(_header_bytes(entries, config.quantizer)) + body + _TRAILER.size


# --------------------------------------------------------------------------------------------
# Bit packing (vectorised over tiles; loops only over bit positions)
# --------------------------------------------------------------------------------------------


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(T, 8*n) uint8 0/1 -> (T, n) uint8, LSB-first."""
    b = bits.view(bits.shape[0], -1, 8)
    out = b[..., 0].clone()
    for j in range(1, 8):
        out |= b[..., j] << j
    return out


def _unpack_bits(data: torch.Tensor) -> torch.Tensor:
    """(T, n) uint8 -> (T, 8*n) uint8 0/1, LSB-first."""
    return torch.stack([(data >> j) & 1 for j in range(8)], dim=-1).reshape(data.shape[0], -1)


def ef_encode(indices: torch.Tensor, tile_len: int) -> torch.Tensor:
    """(T, k) sorted unique in-tile indices -> (T, record_bytes) uint8 Elias-Fano records."""
    n_tiles, k = indices.shape
    low, upper, nbytes = ef_params(tile_len, k)
    if nbytes == 0:
        return torch.empty((n_tiles, 0), dtype=torch.uint8, device=indices.device)
    dev = indices.device
    bits = torch.zeros((n_tiles, nbytes * 8), dtype=torch.uint8, device=dev)
    pos = (indices >> low) + torch.arange(k, device=dev, dtype=torch.int64)
    bits.scatter_(1, pos, 1)
    if low:
        lo = indices & ((1 << low) - 1)
        lowbits = torch.stack([(lo >> j) & 1 for j in range(low)], dim=-1).reshape(n_tiles, k * low)
        bits[:, upper : upper + k * low] = lowbits.to(torch.uint8)
    return _pack_bits(bits)


def ef_decode(records: torch.Tensor, tile_len: int, k: int, name: str) -> torch.Tensor:
    """(T, record_bytes) uint8 -> (T, k) int64 in-tile indices, fully validated."""
    n_tiles = records.shape[0]
    low, upper, _ = ef_params(tile_len, k)
    bits = _unpack_bits(records)
    up = bits[:, :upper]
    counts = up.sum(dim=1, dtype=torch.int32)
    if bool((counts != k).any()):
        bad = int(torch.nonzero(counts != k)[0, 0])
        raise PayloadIndexError(
            f"tile {bad} declares {int(counts[bad])} indices, expected k={k}", tensor=name
        )
    if bool(bits[:, upper + k * low :].any()):
        raise PayloadIndexError("non-zero padding bits in an index record", tensor=name)
    pos = torch.nonzero(up)[:, 1].reshape(n_tiles, k)
    hi = pos - torch.arange(k, device=records.device, dtype=torch.int64)
    idx = hi << low
    if low:
        lb = bits[:, upper : upper + k * low].reshape(n_tiles, k, low).to(torch.int64)
        for j in range(low):
            idx |= lb[..., j] << j
    if bool((idx >= tile_len).any()):
        raise PayloadIndexError(f"index out of range for tiles of length {tile_len}", tensor=name)
    if k > 1 and bool((idx[:, 1:] <= idx[:, :-1]).any()):
        raise PayloadIndexError("indices repeated within a tile", tensor=name)
    return idx


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Flat 2-bit codes (values 0..3) -> uint8, four per byte, first code in the lowest bits."""
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    q = flat.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def unpack_codes(packed: torch.Tensor, count: int, name: str) -> torch.Tensor:
    """uint8 -> ``count`` codes (uint8 0..3); padding codes must be zero."""
    codes = torch.stack([(packed >> (2 * j)) & 3 for j in range(4)], dim=-1).reshape(-1)
    if bool(codes[count:].any()):
        raise PayloadFormatError("non-zero padding bits after the last code", tensor=name)
    return codes[:count]


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def pack_payload(
    pieces: Mapping[str, TensorPiece] | Iterable[TensorPiece],
    config: SparseLoCoConfig | None = None,
) -> bytes:
    """Serialise full (merged) tensor pieces into one payload."""
    config = config or _DEFAULT
    items = list(pieces.values()) if isinstance(pieces, Mapping) else list(pieces)
    items.sort(key=lambda p: p.name)
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    seen: set[str] = set()
    for p in items:
        if p.name in seen:
            raise EncodeError(f"tensor {p.name!r}: given twice")
        seen.add(p.name)
        if not p.is_full:
            raise EncodeError(
                f"tensor {p.name!r}: piece covers only {p.block}; merge the ranks' pieces first"
            )
        if p.quantizer != config.quantizer:
            raise EncodeError(
                f"tensor {p.name!r}: encoded with quantizer {p.quantizer!r}, config says {config.quantizer!r}"
            )
        g = p.geometry
        entries.append(_entry(p.name, g, p.k, config.quantizer))
        if p.values is not None:
            chunks.append(p.values.to(torch.float32).cpu().numpy().astype("<f4").tobytes())
        else:
            assert p.codes is not None
            chunks.append(np.asarray(p.table, dtype="<f4").tobytes())
            chunks.append(pack_codes(p.codes).cpu().numpy().tobytes())
        chunks.append(ef_encode(p.indices, g.tile_len).cpu().numpy().tobytes())
    header = _header_bytes(entries, config.quantizer)
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, 0, len(header)), header, *chunks])
    return body + _TRAILER.pack(zlib.crc32(body))


# --------------------------------------------------------------------------------------------
# Parsing (untrusted bytes)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedEntry:
    """A validated header entry with the offsets of its sections."""

    name: str
    geometry: TileGeometry
    k: int
    value_offset: int
    value_bytes: int
    index_offset: int
    index_bytes_per_tile: int
    table: tuple[float, ...]


def _is_int(x: Any) -> bool:
    return type(x) is int


class ParsedPayload:
    """A payload whose header, sizes, checksum and tables have been checked.

    Index records are validated when a tensor's indices are read (:meth:`indices`,
    :meth:`sparse`); :meth:`validate` reads them all.
    """

    def __init__(self, buf: torch.Tensor, entries: list[ParsedEntry], quantizer: str) -> None:
        self._buf = buf
        self.entries = {e.name: e for e in entries}
        self.quantizer = quantizer

    def indices(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """(T, k) int64 in-tile indices of tensor ``name``, ascending per tile."""
        e = self.entries[name]
        g = e.geometry
        if e.index_bytes_per_tile == 0:
            return (
                torch.arange(g.tile_len, device=device).expand(g.num_tiles, g.tile_len).contiguous()
            )
        raw = self._buf[e.index_offset : e.index_offset + g.num_tiles * e.index_bytes_per_tile]
        return ef_decode(
            raw.to(device).view(g.num_tiles, e.index_bytes_per_tile), g.tile_len, e.k, name
        )

    def values(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """(T, k) float32 decoded kept values of tensor ``name`` (order matches :meth:`indices`)."""
        e = self.entries[name]
        n = e.geometry.num_tiles * e.k
        raw = self._buf[e.value_offset : e.value_offset + e.value_bytes]
        if self.quantizer == "none":
            host = raw.cpu().numpy()
            vals = torch.from_numpy(
                np.frombuffer(host.tobytes(), dtype="<f4").astype(np.float32)
            ).to(device)
            if not bool(torch.isfinite(vals).all()):
                raise PayloadTableError("non-finite value", tensor=name)
            return vals.reshape(e.geometry.num_tiles, e.k)
        codes = unpack_codes(raw[_TABLE_BYTES:].to(device), n, name).to(torch.int64)
        return decode_levels(e.table, device)[codes].reshape(e.geometry.num_tiles, e.k)

    def sparse(
        self, name: str, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions (int64, into the global row-major tensor) and float32 values."""
        e = self.entries[name]
        idx = self.indices(name, device)
        vals = self.values(name, device)
        g = e.geometry
        pos = flat_positions(idx, g, TileBlock(0, g.grid_rows, 0, g.grid_cols), rel=False)
        return pos, vals.reshape(-1)

    def dense(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The decoded dense float32 tensor ``name`` in its global shape."""
        g = self.entries[name].geometry
        pos, vals = self.sparse(name, device)
        out = torch.zeros(g.numel, dtype=torch.float32, device=device)
        out[pos] = vals
        return out.reshape(g.shape)

    def validate(self) -> None:
        """Read and check every tensor's indices and values (no dense allocation)."""
        for name in self.entries:
            self.indices(name)
            self.values(name)


def parse_payload(
    data: bytes | bytearray | memoryview,
    expected: Mapping[str, Sequence[int] | torch.Size],
    config: SparseLoCoConfig | None = None,
) -> ParsedPayload:
    """Check a payload's framing, checksum, header and tables against the model's shapes.

    Everything is checked before anything proportional to the payload's claims is allocated:
    the length against ``max_payload_bytes``, the header length against ``max_header_bytes``,
    every shape against ``expected``, every declared size against the derived size, and the sum
    of the sizes against the byte length.
    """
    config = config or _DEFAULT
    size = len(data)
    if size > config.max_payload_bytes:
        raise PayloadSizeError(
            f"payload is {size} bytes, over the cap of {config.max_payload_bytes}"
        )
    if size < _PREFIX.size + _TRAILER.size:
        raise PayloadSizeError(
            f"payload is {size} bytes, shorter than the fixed prefix and trailer"
        )
    mv = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    magic, version, flags, header_len = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise PayloadFormatError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        newer = "newer than this decoder" if version > VERSION else "unknown"
        raise PayloadVersionError(f"format version {version} is {newer} (supported: {VERSION})")
    (crc,) = _TRAILER.unpack_from(mv, size - _TRAILER.size)
    if zlib.crc32(mv[: size - _TRAILER.size]) != crc:
        raise PayloadChecksumError("CRC-32 mismatch: the payload was corrupted")
    if flags != 0:
        raise PayloadFormatError(f"unknown flags {flags:#06x}")
    if header_len > config.max_header_bytes:
        raise PayloadSizeError(
            f"header of {header_len} bytes is over the cap of {config.max_header_bytes}"
        )
    if _PREFIX.size + header_len > size - _TRAILER.size:
        raise PayloadSizeError(f"header of {header_len} bytes runs past the end of the payload")
    header_raw = bytes(mv[_PREFIX.size : _PREFIX.size + header_len])
    try:
        header = json.loads(header_raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadFormatError(f"header is not valid ASCII JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise PayloadFormatError(f"header must be an object with keys {sorted(_HEADER_KEYS)}")
    if header["format"] != FORMAT_NAME:
        raise PayloadFormatError(f"format {header['format']!r} is not {FORMAT_NAME!r}")
    if header["quantizer"] != config.quantizer:
        raise PayloadFormatError(
            f"quantizer {header['quantizer']!r}, this run uses {config.quantizer!r}"
        )
    tensors = header["tensors"]
    if not isinstance(tensors, list):
        raise PayloadFormatError("'tensors' must be a list")
    # No count check needed: names must be unique, sorted and known, so at most len(expected).

    offset = _PREFIX.size + header_len
    body_end = size - _TRAILER.size
    entries: list[ParsedEntry] = []
    prev: str | None = None
    for i, e in enumerate(tensors):
        if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
            raise PayloadFormatError(
                f"tensor entry {i} must be an object with keys {sorted(_ENTRY_KEYS)}"
            )
        name = e["name"]
        if not isinstance(name, str) or not name or len(name) > config.max_name_length:
            raise PayloadFormatError(f"tensor entry {i} has an invalid name")
        if prev is not None and name <= prev:
            raise PayloadFormatError("tensor names are not sorted and unique", tensor=name)
        prev = name
        if name not in expected:
            raise PayloadShapeError("the model has no tensor of this name", tensor=name)
        want_shape = [int(s) for s in expected[name]]
        shape = e["shape"]
        if not isinstance(shape, list) or not all(_is_int(s) for s in shape) or shape != want_shape:
            raise PayloadShapeError(
                f"shape {shape!r} does not match the model's {want_shape}", tensor=name
            )
        geom = tile_geometry(tuple(want_shape), config.tile_max)
        k = kept_per_tile(geom, config)
        derived = _entry(name, geom, k, config.quantizer)
        for key in ("tile", "k", "value_bytes", "index_bytes_per_tile"):
            got = e[key]
            ok = (
                isinstance(got, list) and all(_is_int(x) for x in got)
                if key == "tile"
                else _is_int(got)
            )
            if not ok or got != derived[key]:
                raise PayloadShapeError(f"{key} is {got!r}, expected {derived[key]!r}", tensor=name)
        section = _section_bytes(derived, geom.num_tiles)
        if offset + section > body_end:
            raise PayloadSizeError(
                f"sections need {offset + section - _PREFIX.size - header_len} bytes, payload body has "
                f"{body_end - _PREFIX.size - header_len}",
                tensor=name,
            )
        table: tuple[float, ...] = ()
        if config.quantizer != "none":
            t = np.frombuffer(mv, dtype="<f4", count=5, offset=offset).astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                levels = t[1:] + t[0]
            if not (np.isfinite(t).all() and np.isfinite(levels).all()):
                raise PayloadTableError(f"non-finite quantiser table {t.tolist()}", tensor=name)
            table = tuple(float(x) for x in t)
        entries.append(
            ParsedEntry(
                name=name,
                geometry=geom,
                k=k,
                value_offset=offset,
                value_bytes=derived["value_bytes"],
                index_offset=offset + derived["value_bytes"],
                index_bytes_per_tile=derived["index_bytes_per_tile"],
                table=table,
            )
        )
        offset += section
    if offset != body_end:
        raise PayloadSizeError(
            f"{body_end - offset} unexpected bytes after the last tensor section"
        )
    if config.require_all_tensors:
        missing = sorted(set(expected) - {e.name for e in entries})
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise PayloadShapeError(f"payload lacks this tensor{more}", tensor=missing[0])
    # Share the caller's bytes (no copy: payloads can be GBs); the tensor is only ever read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer" for bytes input
        buf = torch.frombuffer(mv, dtype=torch.uint8)
    return ParsedPayload(buf, entries, config.quantizer)


def payload_numel(shapes: Mapping[str, Sequence[int]]) -> int:
    """Total parameter count of a shape map (for bits-per-parameter figures)."""
    return sum(math.prod(int(s) for s in shape) for shape in shapes.values())
