"""The SparseLoCo public API (re-exported lazily by the package; see its docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from covenant.plugins.sparseloco.aggregation import aggregate_parsed, aggregate_payloads
from covenant.plugins.sparseloco.codec import (
    Reduce,
    TensorPiece,
    TensorSlice,
    compress_step,
    compress_steps,
    encode_slice,
    encode_slices,
    encode_slices_lockstep,
    encode_tensors,
    merge,
)
from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.errors import (
    AggregationError,
    EncodeError,
    PayloadChecksumError,
    PayloadError,
    PayloadFormatError,
    PayloadIndexError,
    PayloadShapeError,
    PayloadSizeError,
    PayloadTableError,
    PayloadVersionError,
)
from covenant.plugins.sparseloco.wire import (
    VERSION,
    ParsedPayload,
    expected_payload_size,
    pack_payload,
    parse_payload,
)

Shapes = Mapping[str, Sequence[int] | torch.Size]


def encode(tensors: Mapping[str, torch.Tensor], config: SparseLoCoConfig | None = None) -> bytes:
    """One peer's payload for already error-fed, whole tensors."""
    return pack_payload(encode_tensors(tensors, config), config)


def decode(
    data: bytes,
    expected: Shapes,
    config: SparseLoCoConfig | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Dense float32 decoded tensors of one payload; raises a :class:`PayloadError` if invalid."""
    parsed = parse_payload(data, expected, config)
    try:
        indices = parsed.all_indices(device)
    except PayloadError:
        # Re-read tensor by tensor (indices, then values) so the first error is the same one
        # the per-tensor order finds.
        return {name: parsed.dense(name, device) for name in parsed.entries}
    return {name: parsed.dense(name, device, indices[name]) for name in parsed.entries}


def aggregate(
    payloads: Sequence[bytes],
    expected: Shapes,
    config: SparseLoCoConfig | None = None,
    device: torch.device | str = "cpu",
    owned: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Aggregate peers' payloads (in list order) into one dense update per tensor.

    ``owned`` (name -> ``(offsets, local_shape)``) restricts the result to a rank's slices;
    each slice equals the same box of the full result bit for bit.
    """
    return aggregate_payloads(payloads, expected, config, device, owned)


def tile_indices(
    data: bytes, expected: Shapes, config: SparseLoCoConfig | None = None
) -> dict[str, torch.Tensor]:
    """Per tensor, the ``(num_tiles, k)`` int64 in-tile index sets (ascending), validated."""
    parsed = parse_payload(data, expected, config)
    return {name: parsed.indices(name) for name in parsed.entries}


def validate_payload(data: bytes, expected: Shapes, config: SparseLoCoConfig | None = None) -> None:
    """Run every decoder check (framing, sizes, header, tables, indices) without dense tensors."""
    parse_payload(data, expected, config).validate()


__all__ = [
    "VERSION",
    "AggregationError",
    "EncodeError",
    "ParsedPayload",
    "PayloadChecksumError",
    "PayloadError",
    "PayloadFormatError",
    "PayloadIndexError",
    "PayloadShapeError",
    "PayloadSizeError",
    "PayloadTableError",
    "PayloadVersionError",
    "Reduce",
    "SparseLoCoConfig",
    "TensorPiece",
    "TensorSlice",
    "aggregate",
    "aggregate_parsed",
    "compress_step",
    "compress_steps",
    "decode",
    "encode",
    "encode_slice",
    "encode_slices",
    "encode_slices_lockstep",
    "encode_tensors",
    "expected_payload_size",
    "merge",
    "pack_payload",
    "parse_payload",
    "tile_indices",
    "validate_payload",
]
