"""The ``dense/1`` codec: whole pseudo-gradients, fp32 or bf16, in a bounded self-describing format.

DiLoCo sends every coordinate, so the format is raw little-endian numbers behind a small header
that names the tensors, their shapes and the element type. It is never unpickled and never
``torch.load``-ed; :func:`parse_dense` checks everything before a tensor is built from it.

Layout (all integers little-endian)::

    0   4  magic b"CVDN"
    4   2  version (u16) = 1
    6   2  flags (u16) = 0
    8   4  header_len (u32)
    12  .. header: ASCII JSON, sorted keys, no spaces:
           {"dtype":"fp32"|"bf16","format":"covenant-dense","tensors":[{"name":..,"shape":[..]},..]}
           tensors sorted by name, names unique
    ..  .. zero bytes up to the next multiple of 8 (so the data is aligned)
    ..  .. each tensor's elements in header order, row-major, fp32 or bf16
    -4  4  CRC-32 (zlib) of all preceding bytes (u32)

Every size follows from the shapes and the element type, so :func:`payload_size` is exact and
an update has exactly one encoding. Checks, in order, before anything the payload claims is
allocated: length within the fp32 size of the expected shapes, magic, version, flags, header
length, CRC, JSON (bounded, exact keys, canonical form), tensor set and shapes equal to the
model's, zero padding, exact total length, and every value finite.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from covenant.engine.protocols import ParamShard, PayloadRejected, Shapes
from covenant.engine.untrusted import UntrustedInputError, loads_json
from covenant.plugins.diloco.config import DiLoCoConfig

MAGIC = b"CVDN"
VERSION = 1
FORMAT = "covenant-dense"
PREFIX = struct.Struct("<4sHHI")
TRAILER = 4
ALIGN = 8
MAX_DIMS = 8
#: element type -> (bytes per element, numpy dtype of the stored bits, exponent mask)
DTYPES: dict[str, tuple[int, str, int]] = {
    "fp32": (4, "<u4", 0x7F800000),
    "bf16": (2, "<u2", 0x7F80),
}


class DenseEncodeError(ValueError):
    """Our own input cannot be encoded (a non-finite value, a piece that does not fit)."""


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, extent) of a slice


def header_bytes(shapes: Shapes, dtype: str) -> bytes:
    """The canonical header of a payload carrying ``shapes`` in ``dtype``."""
    body = {
        "dtype": dtype,
        "format": FORMAT,
        "tensors": [{"name": n, "shape": list(shapes[n])} for n in sorted(shapes)],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


def _padding(header_len: int) -> int:
    return (-(PREFIX.size + header_len)) % ALIGN


def payload_size(shapes: Shapes, dtype: str = "fp32") -> int:
    """The exact length of a ``dense/1`` payload of ``shapes`` in ``dtype``."""
    header = len(header_bytes(shapes, dtype))
    data = sum(math.prod(s) for s in shapes.values()) * DTYPES[dtype][0]
    return PREFIX.size + header + _padding(header) + data + TRAILER


def _reject(reason: str, detail: str) -> PayloadRejected:
    return PayloadRejected(reason, detail)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class DenseWriter:
    """Builds one payload from pieces (slices of tensors) written in any order.

    A peer under TP hands its slices to the uploading rank, which writes each into place; the
    bytes equal those of a peer that owns every tensor whole. :meth:`finish` checks that every
    element was written exactly once (by count) and appends the CRC.
    """

    def __init__(self, shapes: Shapes, dtype: str) -> None:
        if dtype not in DTYPES:
            raise DenseEncodeError(f"unknown wire dtype {dtype!r} (fp32, bf16)")
        self.shapes = {n: tuple(shapes[n]) for n in sorted(shapes)}
        self.dtype = dtype
        header = header_bytes(self.shapes, dtype)
        start = PREFIX.size + len(header) + _padding(len(header))
        self.buf = bytearray(payload_size(self.shapes, dtype))
        PREFIX.pack_into(self.buf, 0, MAGIC, VERSION, 0, len(header))
        self.buf[PREFIX.size : PREFIX.size + len(header)] = header
        itemsize = DTYPES[dtype][0]
        self.offsets: dict[str, int] = {}
        for name, shape in self.shapes.items():
            self.offsets[name] = start
            start += math.prod(shape) * itemsize
        self.written = dict.fromkeys(self.shapes, 0)

    def _array(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        _size, bits, _mask = DTYPES[self.dtype]
        arr = np.frombuffer(self.buf, dtype=bits, count=math.prod(shape), offset=self.offsets[name])
        return arr.reshape(shape)

    def write(self, name: str, offsets: Sequence[int], piece: torch.Tensor) -> None:
        """Write ``piece`` (this rank's slice of ``name``, at ``offsets``) into the payload."""
        if name not in self.shapes:
            raise DenseEncodeError(f"tensor {name!r} is not part of this payload")
        shape = self.shapes[name]
        if len(offsets) != len(shape) or piece.dim() != len(shape):
            raise DenseEncodeError(f"tensor {name!r}: piece rank does not match {shape}")
        box = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape, strict=True))
        if any(o < 0 or o + n > s for o, n, s in zip(offsets, piece.shape, shape, strict=True)):
            raise DenseEncodeError(f"tensor {name!r}: piece at {tuple(offsets)} leaves {shape}")
        wire = piece.detach().to("cpu", torch.float32 if self.dtype == "fp32" else torch.bfloat16)
        if not bool(torch.isfinite(wire).all()):
            raise DenseEncodeError(f"tensor {name!r}: non-finite value (after {self.dtype})")
        if self.dtype == "fp32":
            raw = wire.contiguous().view(torch.int32).numpy().view(np.uint32)
        else:
            raw = wire.contiguous().view(torch.int16).numpy().view(np.uint16)
        self._array(name)[box] = raw  # the stored bits, little-endian on any host
        self.written[name] += piece.numel()

    def finish(self) -> bytes:
        for name, shape in self.shapes.items():
            if self.written[name] != math.prod(shape):
                raise DenseEncodeError(
                    f"tensor {name!r}: {self.written[name]} of {math.prod(shape)} elements written"
                )
        struct.pack_into("<I", self.buf, len(self.buf) - TRAILER, zlib.crc32(self.buf[:-TRAILER]))
        return bytes(self.buf)


def pack_dense(tensors: Mapping[str, torch.Tensor], dtype: str = "fp32") -> bytes:
    """The ``dense/1`` payload of whole tensors (a peer that owns everything)."""
    writer = DenseWriter({n: tuple(t.shape) for n, t in tensors.items()}, dtype)
    for name, t in tensors.items():
        writer.write(name, (0,) * t.dim(), t)
    return writer.finish()


# --------------------------------------------------------------------------------------------
# Reading (untrusted bytes)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DensePayload:
    """A payload whose structure has been checked against the expected shapes (values not yet)."""

    payload: bytes
    dtype: str
    shapes: dict[str, tuple[int, ...]]
    offsets: dict[str, int]

    def _bits(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        arr = np.frombuffer(
            self.payload,
            dtype=DTYPES[self.dtype][1],
            count=math.prod(shape),
            offset=self.offsets[name],
        )
        return arr.reshape(shape)

    def tensor(self, name: str, box: Box | None = None) -> torch.Tensor:
        """``name`` (or its slice ``box``) as a new float32 tensor; raises if non-finite."""
        bits = self._bits(name)
        if box is not None:
            bits = bits[tuple(slice(o, o + n) for o, n in zip(box[0], box[1], strict=True))]
        if self.dtype == "fp32":  # np.array: a native-order copy (0-d stays 0-d)
            out = torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32))
        else:
            raw = torch.from_numpy(np.array(bits, dtype=np.uint16).view(np.int16))
            out = raw.view(torch.bfloat16).to(torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise _reject("payload_nonfinite", f"tensor {name!r} holds NaN or infinity")
        return out

    def _chunks(self, name: str, chunk: int) -> Iterator[np.ndarray]:
        flat = self._bits(name).reshape(-1)
        for i in range(0, flat.size, chunk):
            yield flat[i : i + chunk]

    def check_finite(self, chunk: int, names: Collection[str] | None = None) -> None:
        """Every value of every tensor (of ``names``, if given) is finite (exponent bits not all
        ones), in bounded chunks."""
        mask = DTYPES[self.dtype][2]
        for name in self.shapes:
            if names is not None and name not in names:
                continue
            for part in self._chunks(name, chunk):
                if bool(np.any((part & mask) == mask)):
                    raise _reject("payload_nonfinite", f"tensor {name!r} holds NaN or infinity")

    def norm(self, name: str, chunk: int) -> float:
        """L2 norm of ``name``, summed in float64 chunk by chunk (same on every machine)."""
        total = 0.0
        for part in self._chunks(name, chunk):
            if self.dtype == "fp32":
                values = part.astype(np.uint32).view(np.float32).astype(np.float64)
            else:
                values = (part.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            total += float(np.dot(values, values))
        return math.sqrt(total)


def _check_header(obj: Any, max_name: int) -> tuple[str, dict[str, tuple[int, ...]]]:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "format", "tensors"}:
        raise _reject("payload_format", "header keys must be exactly dtype, format, tensors")
    if obj["format"] != FORMAT:
        raise _reject("payload_format", f"header format is not {FORMAT!r}")
    dtype = obj["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _reject("payload_format", f"unknown dtype (known: {', '.join(DTYPES)})")
    tensors = obj["tensors"]
    if not isinstance(tensors, list):
        raise _reject("payload_format", "header tensors must be a list")
    shapes: dict[str, tuple[int, ...]] = {}
    previous: str | None = None
    for entry in tensors:
        if not isinstance(entry, dict) or set(entry) != {"name", "shape"}:
            raise _reject("payload_format", "each tensor entry has exactly a name and a shape")
        name, shape = entry["name"], entry["shape"]
        if not isinstance(name, str) or not 0 < len(name) <= max_name:
            raise _reject("payload_format", f"tensor name must be a string of 1-{max_name} chars")
        if previous is not None and name <= previous:
            raise _reject("payload_format", "tensor names must be sorted and unique")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise _reject("payload_format", f"tensor {name!r}: shape must be <= {MAX_DIMS} ints")
        shapes[name] = tuple(shape)
        previous = name
    return dtype, shapes


def parse_dense(payload: bytes, shapes: Shapes, config: DiLoCoConfig) -> DensePayload:
    """Check a payload's structure against ``shapes``; raises :class:`PayloadRejected`."""
    n = len(payload)
    cap = payload_size(shapes, "fp32")
    if n > cap:
        raise _reject("payload_size", f"{n} bytes, over the {cap} bytes of an fp32 payload")
    if n < PREFIX.size + TRAILER:
        raise _reject("payload_size", f"{n} bytes: truncated")
    magic, version, flags, header_len = PREFIX.unpack_from(payload, 0)
    if magic != MAGIC:
        raise _reject("payload_format", "bad magic (not a dense/1 payload)")
    if version != VERSION:
        raise _reject("payload_version", f"version {version}, this decoder reads {VERSION}")
    if flags != 0:
        raise _reject("payload_format", f"flags {flags:#x} must be 0")
    if header_len > config.max_header_bytes or PREFIX.size + header_len + TRAILER > n:
        raise _reject("payload_size", f"header of {header_len} bytes does not fit")
    (stored,) = struct.unpack_from("<I", payload, n - TRAILER)
    if zlib.crc32(memoryview(payload)[: n - TRAILER]) != stored:
        raise _reject("payload_checksum", "CRC-32 mismatch")
    raw = payload[PREFIX.size : PREFIX.size + header_len]
    if not raw.isascii():
        raise _reject("payload_format", "header is not ASCII")
    text = raw.decode("ascii")
    try:  # the engine's bounded reader: depth, number length, duplicate keys, NaN
        obj = loads_json(raw, what="header", max_bytes=config.max_header_bytes, max_depth=4)
    except UntrustedInputError as exc:
        raise _reject("payload_format", f"header is not valid JSON: {exc.problem}") from None
    dtype, claimed = _check_header(obj, config.max_name_length)
    if json.dumps(obj, sort_keys=True, separators=(",", ":")) != text:
        raise _reject("payload_format", "header is not in canonical form")
    unknown = sorted(set(claimed) - set(shapes))
    missing = sorted(set(shapes) - set(claimed))
    if unknown:
        raise _reject("payload_shape", f"unknown tensor {unknown[0][:80]!r}")
    if missing:
        raise _reject("payload_shape", f"missing tensor {missing[0]!r} ({len(missing)} missing)")
    for name, shape in claimed.items():
        if shape != tuple(shapes[name]):
            raise _reject(
                "payload_shape", f"tensor {name!r}: shape {shape}, expected {shapes[name]}"
            )
    start = PREFIX.size + header_len
    pad = _padding(header_len)
    if any(payload[start : start + pad]):
        raise _reject("payload_format", "header padding is not zero")
    start += pad
    itemsize = DTYPES[dtype][0]
    offsets: dict[str, int] = {}
    for name, shape in claimed.items():
        offsets[name] = start
        start += math.prod(shape) * itemsize
    if start + TRAILER != n:
        raise _reject("payload_size", f"{n} bytes, the header describes {start + TRAILER}")
    return DensePayload(payload, dtype, claimed, offsets)


def boxes_of(owned: Sequence[ParamShard]) -> dict[str, Box]:
    return {s.name: (tuple(s.offsets), tuple(s.local_shape)) for s in owned}


# --------------------------------------------------------------------------------------------
# The Codec
# --------------------------------------------------------------------------------------------


class DenseCodec:
    """The :class:`covenant.engine.protocols.Codec` of ``dense/1`` payloads.

    ``aggregate`` is the plain mean over the peers (DiLoCo), added in list order in float32, so
    every machine gets the same bits for the same ordered list (pass ascending uids).
    """

    name = "dense/1"

    def __init__(self, config: DiLoCoConfig | None = None) -> None:
        self.config = config or DiLoCoConfig()

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> bytes:
        """Whole tensors -> payload in the configured wire dtype."""
        return pack_dense(tensors, self.config.wire_dtype)

    def max_payload_bytes(self, shapes: Shapes) -> int:
        return payload_size(shapes, "fp32")

    def validate(
        self, payload: bytes, shapes: Shapes, names: Collection[str] | None = None
    ) -> None:
        parse_dense(payload, shapes, self.config).check_finite(
            self.config.check_chunk_elements, names
        )

    def decode(
        self, payload: bytes, shapes: Shapes, owned: Sequence[ParamShard] | None = None
    ) -> dict[str, torch.Tensor]:
        parsed = parse_dense(payload, shapes, self.config)
        if owned is None:
            return {name: parsed.tensor(name) for name in parsed.shapes}
        return {n: parsed.tensor(n, box) for n, box in boxes_of(owned).items() if n in shapes}

    def norms(self, payload: bytes, shapes: Shapes) -> dict[str, float]:
        parsed = parse_dense(payload, shapes, self.config)
        parsed.check_finite(self.config.check_chunk_elements)
        return {n: parsed.norm(n, self.config.check_chunk_elements) for n in parsed.shapes}

    def aggregate(
        self,
        payloads: Sequence[bytes],
        shapes: Shapes,
        owned: Sequence[ParamShard] | None = None,
    ) -> dict[str, torch.Tensor]:
        if not payloads:
            return {}
        parsed = [parse_dense(p, shapes, self.config) for p in payloads]
        boxes: dict[str, Box | None] = (
            dict(boxes_of(owned)) if owned is not None else dict.fromkeys(sorted(shapes))
        )
        out: dict[str, torch.Tensor] = {}
        for name, box in boxes.items():
            if name not in shapes:
                continue
            total = parsed[0].tensor(name, box)
            for p in parsed[1:]:
                total += p.tensor(name, box)
            total /= float(len(parsed))
            if not bool(torch.isfinite(total).all()):
                raise _reject("nonfinite_aggregate", f"tensor {name!r}: the mean is not finite")
            out[name] = total
        return out

    def tile_indices(self, payload: bytes, shapes: Shapes) -> dict[str, Any]:
        """Dense payloads have no tiles: no copy detection by index sets."""
        parse_dense(payload, shapes, self.config)
        return {}


__all__ = [
    "DenseCodec",
    "DenseEncodeError",
    "DensePayload",
    "DenseWriter",
    "header_bytes",
    "pack_dense",
    "parse_dense",
    "payload_size",
]
