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
import sys
import warnings
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from covenant.engine.untrusted import UntrustedInputError, loads_json
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
    TileGeometry,
    global_positions,
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
_HEADER_DEPTH = 4  # {"tensors": [{"shape": [...]}]}
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


def _bit_table(device: torch.device) -> torch.Tensor:
    """(256, 8) uint8: the bits of every byte value, LSB first (unpacking is one gather)."""
    byte = torch.arange(256, device=device, dtype=torch.int32).unsqueeze(1)
    return ((byte >> torch.arange(8, device=device, dtype=torch.int32)) & 1).to(torch.uint8)


def _field_layout(first_bit: int, width: int, count: int) -> tuple[int, list[int], list[int]]:
    """Where ``count`` back-to-back ``width``-bit fields starting at bit ``first_bit`` lie.

    Returns ``(span, byte_of_field, shift_of_field)``: every field sits inside the ``span``
    bytes starting at ``byte_of_field[i]``, shifted left by ``shift_of_field[i]`` bits.
    """
    offsets = [first_bit + i * width for i in range(count)]
    span = (7 + width + 7) // 8
    return span, [o >> 3 for o in offsets], [o & 7 for o in offsets]


def ef_encode(indices: torch.Tensor, tile_len: int) -> torch.Tensor:
    """(T, k) sorted unique in-tile indices -> (T, record_bytes) uint8 Elias-Fano records.

    Every set bit belongs to exactly one field, so the record bytes are sums of per-field byte
    contributions: one ``scatter_add_`` of all of them (no carries, so the sums are ORs).
    """
    n_tiles, k = indices.shape
    low, upper, nbytes = ef_params(tile_len, k)
    dev = indices.device
    if nbytes == 0:
        return torch.empty((n_tiles, 0), dtype=torch.uint8, device=dev)
    lane = torch.arange(k, device=dev, dtype=torch.int64)
    pos = (indices >> low) + lane  # upper-bitmap bit of each index
    targets = [pos >> 3]
    contributions = [torch.ones_like(pos) << (pos & 7)]
    if low:
        span, byte_of, shift_of = _field_layout(upper, low, k)
        start = torch.tensor(byte_of, device=dev, dtype=torch.int64)
        field = (indices & ((1 << low) - 1)) << torch.tensor(
            shift_of, device=dev, dtype=torch.int64
        )
        for j in range(span):
            targets.append(start.expand(n_tiles, k) + j)
            contributions.append((field >> (8 * j)) & 0xFF)
    out = torch.zeros((n_tiles, nbytes + 3), dtype=torch.int64, device=dev)
    out.scatter_add_(1, torch.cat(targets, dim=1), torch.cat(contributions, dim=1))
    return out[:, :nbytes].to(torch.uint8)


def ef_decode(records: torch.Tensor, tile_len: int, k: int, name: str) -> torch.Tensor:
    """(T, record_bytes) uint8 -> (T, k) int64 in-tile indices, fully validated."""
    n_tiles, nbytes = records.shape
    low, upper, _ = ef_params(tile_len, k)
    dev = records.device
    upper_bytes = (upper + 7) // 8
    up = _bit_table(dev)[records[:, :upper_bytes].to(torch.int64)].reshape(n_tiles, -1)[:, :upper]
    counts = up.sum(dim=1, dtype=torch.int32)
    if bool((counts != k).any()):
        bad = int(torch.nonzero(counts != k)[0, 0])
        raise PayloadIndexError(
            f"tile {bad} declares {int(counts[bad])} indices, expected k={k}", tensor=name
        )
    used = upper + k * low
    # Only the last byte can hold padding (the record is the fewest whole bytes).
    if used < nbytes * 8 and (
        bool((records[:, used >> 3] >> (used & 7)).any())
        or bool(records[:, (used >> 3) + 1 :].any())
    ):
        raise PayloadIndexError("non-zero padding bits in an index record", tensor=name)
    pos = torch.nonzero(up)[:, 1].reshape(n_tiles, k)
    hi = pos - torch.arange(k, device=dev, dtype=torch.int64)
    idx = hi << low
    if low:
        span, byte_of, shift_of = _field_layout(upper, low, k)
        wide = torch.zeros((n_tiles, nbytes + span), dtype=torch.int64, device=dev)
        wide[:, :nbytes] = records
        start = torch.tensor(byte_of, device=dev, dtype=torch.int64)
        field = wide[:, start]
        for j in range(1, span):
            field |= wide[:, start + j] << (8 * j)
        idx |= (field >> torch.tensor(shift_of, device=dev, dtype=torch.int64)) & ((1 << low) - 1)
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
    # Four codes as one little-endian int32 b0 | b1 << 8 | b2 << 16 | b3 << 24 (each < 4):
    # folding the bytes down by 6, 12 and 18 bits lines the codes up at bits 0, 2, 4, 6.
    w = _le_int32(flat)
    return ((w | (w >> 6) | (w >> 12) | (w >> 18)) & 0xFF).to(torch.uint8)


def pack_codes_bytes(codes: torch.Tensor) -> bytes:
    """:func:`pack_codes` straight to bytes, on the host with numpy (the bytes go there anyway).

    Same fold as :func:`pack_codes`; numpy runs these few cheap passes without thread start-up
    costs, which dominate on a busy CPU.
    """
    flat = np.ascontiguousarray(codes.reshape(-1).to(torch.uint8).cpu().numpy())
    pad = (-flat.size) % 4
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    w = flat.view("<u4")
    return ((w | (w >> 6) | (w >> 12) | (w >> 18)) & 0xFF).astype(np.uint8).tobytes()


def _le_int32(flat: torch.Tensor) -> torch.Tensor:
    """Bytes (a multiple of 4) -> int32 words, little-endian whatever the host order."""
    if sys.byteorder == "little":
        if flat.storage_offset() % 4:  # a view into a bigger buffer: realign before reinterpreting
            flat = flat.clone()
        return flat.view(torch.int32)
    q = flat.view(-1, 4).to(torch.int32)
    return q[:, 0] | (q[:, 1] << 8) | (q[:, 2] << 16) | (q[:, 3] << 24)


def _code_table(device: torch.device | str) -> torch.Tensor:
    """(256, 4) uint8: the four 2-bit codes of every byte value, first code first."""
    byte = torch.arange(256, device=device, dtype=torch.int32).unsqueeze(1)
    return ((byte >> (2 * torch.arange(4, device=device, dtype=torch.int32))) & 3).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, count: int, name: str) -> torch.Tensor:
    """uint8 -> ``count`` codes (uint8 0..3); padding codes must be zero."""
    _check_code_padding(packed, count, name)
    return _code_table(packed.device)[packed.to(torch.int64)].reshape(-1)[:count]


def _check_code_padding(packed: torch.Tensor, count: int, name: str) -> None:
    """The bits after the ``count``-th code must be zero (canonical bytes)."""
    used = 2 * count
    if used < packed.numel() * 8:
        tail = packed[used >> 3 :].to(torch.int32)
        tail[0] >>= used & 7
        if bool(tail.any()):
            raise PayloadFormatError("non-zero padding bits after the last code", tensor=name)


def unpack_levels(
    packed: torch.Tensor, count: int, table: Sequence[float], name: str
) -> torch.Tensor:
    """uint8 codes -> ``count`` float32 decoded values ``lut[q] + shift`` (one gather per byte)."""
    _check_code_padding(packed, count, name)
    levels = decode_levels(table, packed.device)
    return levels[_code_table(packed.device).to(torch.int64)][packed.to(torch.int64)].reshape(-1)[
        :count
    ]


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
    records = _index_records(items)
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
            chunks.append(pack_codes_bytes(p.codes))
        chunks.append(records[p.name])
    header = _header_bytes(entries, config.quantizer)
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, 0, len(header)), header, *chunks])
    return body + _TRAILER.pack(zlib.crc32(body))


def _index_records(items: Sequence[TensorPiece]) -> dict[str, bytes]:
    """Each tensor's Elias-Fano index section; tensors with the same tile length and k (most of
    a model) are encoded in one batch, which saves the fixed cost of each vectorised step."""
    groups: dict[tuple[int, int, torch.device], list[TensorPiece]] = {}
    for p in items:
        groups.setdefault((p.geometry.tile_len, p.k, p.indices.device), []).append(p)
    out: dict[str, bytes] = {}
    for (tile_len, _, _), group in groups.items():
        joined = torch.cat([p.indices for p in group]) if len(group) > 1 else group[0].indices
        data = ef_encode(joined, tile_len).cpu().numpy()
        row = 0
        for p in group:
            n = p.indices.shape[0]
            out[p.name] = data[row : row + n].tobytes()
            row += n
    return out


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
        vals = unpack_levels(raw[_TABLE_BYTES:].to(device), n, e.table, name)
        return vals.reshape(e.geometry.num_tiles, e.k)

    def sparse(
        self,
        name: str,
        device: torch.device | str = "cpu",
        indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions (int64, into the global row-major tensor) and float32 values.

        ``indices``: this tensor's already-read in-tile indices (from :meth:`all_indices`).
        """
        e = self.entries[name]
        idx = self.indices(name, device) if indices is None else indices
        vals = self.values(name, device)
        return global_positions(idx, e.geometry), vals.reshape(-1)

    def dense(
        self,
        name: str,
        device: torch.device | str = "cpu",
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoded dense float32 tensor ``name`` in its global shape."""
        g = self.entries[name].geometry
        pos, vals = self.sparse(name, device, indices)
        out = torch.zeros(g.numel, dtype=torch.float32, device=device)
        out[pos] = vals
        return out.reshape(g.shape)

    def all_indices(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """:meth:`indices` of every tensor, with the same checks and the same first error.

        Tensors with the same tile length, k and record size (most of a model) are decoded in
        one batch. If a batch fails any check, its tensors are re-read one by one in name order,
        so the error raised is exactly the one :meth:`indices` raises for the first bad tensor.
        """
        groups: dict[tuple[int, int, int], list[ParsedEntry]] = {}
        for e in self.entries.values():
            if e.index_bytes_per_tile:
                key = (e.geometry.tile_len, e.k, e.index_bytes_per_tile)
                groups.setdefault(key, []).append(e)
        out: dict[str, torch.Tensor] = {}
        for (tile_len, k, nbytes), group in groups.items():
            if len(group) == 1:
                continue
            raw = torch.cat(
                [
                    self._buf[e.index_offset : e.index_offset + e.geometry.num_tiles * nbytes]
                    for e in group
                ]
            ).to(device)
            try:
                idx = ef_decode(raw.view(-1, nbytes), tile_len, k, group[0].name)
            except PayloadIndexError:
                continue  # the per-tensor pass below raises the precise error
            row = 0
            for e in group:
                out[e.name] = idx[row : row + e.geometry.num_tiles]
                row += e.geometry.num_tiles
        return {
            name: out[name] if name in out else self.indices(name, device) for name in self.entries
        }

    def validate(
        self, names: Collection[str] | None = None, device: torch.device | str = "cpu"
    ) -> None:
        """Read and check every tensor's indices and values (no dense allocation); only those
        of ``names`` if given (a multi-rank peer splits the work by tensor), on ``device``."""
        for name in self.entries:
            if names is not None and name not in names:
                continue
            self.indices(name, device)
            self.values(name, device)


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
    # the bounded reader: no RecursionError from a nested header, no duplicate keys (two
    # decoders must not read one header two ways), no NaN, no 5,000-digit integers
    try:
        if not header_raw.isascii():
            raise UntrustedInputError("header", "not ASCII")
        header = loads_json(
            header_raw, what="header", max_bytes=config.max_header_bytes, max_depth=_HEADER_DEPTH
        )
    except UntrustedInputError as exc:
        raise PayloadFormatError(f"header is not valid ASCII JSON: {exc.problem}") from None
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
