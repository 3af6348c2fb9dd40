"""SparseLoCo: error feedback, top-k tiles, 2-bit codes, wire format and aggregation.

Public API (names stable; ``config=None`` means the spec's defaults, see SPEC.md 4-5)::

    encode(tensors, config=None) -> bytes              # one peer's payload (error-fed tensors)
    decode(data, expected, config=None) -> dict        # dense decoded tensors
    aggregate(payloads, expected, config=None) -> dict # median-clipped contributor mean
    tile_indices(data, expected, config=None) -> dict  # per-tile index sets (copy detection)
    validate_payload(data, expected, config=None)      # every check, no dense allocation
    expected_payload_size(shapes, config=None) -> int  # exact wire size (download cap base)
    compress_step(error, delta, config) -> (piece, new_error)

Sharded ranks use :func:`encode_slices` (slice + offset + an all-reduce), :func:`merge` and
:func:`pack_payload`. This package registers no hooks itself; the plugin module wires it.

The names are loaded lazily from :mod:`covenant.plugins.sparseloco.api` (PEP 562), so that
importing the plugin module at CLI start-up does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from covenant.plugins.sparseloco.api import *

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        from covenant.plugins.sparseloco import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
