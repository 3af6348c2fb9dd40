"""The run's signed records: their formats, their one parser, and their writer (SPEC 1, 6, 7, 9).

Every record travels in the same signed object as a gradient (``manifest.py``: prefix, signed
manifest, body), with the record's JSON as the body and its format named in the manifest's
``codec`` field. The body is canonical JSON (``covenant.engine.untrusted.canonical_json``) and a
reader accepts only that exact form, so the signed bytes are the bytes acted on.

=================  ==============================  ===========================================
key                body ``format``                 what
=================  ==============================  ===========================================
start_window       ``covenant-start/1``            the run's first window (lead validator)
peers/{w}          ``covenant-peers/1``            peer list in force from window ``w``
aggregate/{w}      ``covenant-aggregate/1``        uploads applied in ``w``, ``outer_step(w)``
debug/{w}/{uid}    ``covenant-sync/1``             a peer's sync sample after applying ``w``
scores/{w}/{uid}   ``covenant-score/1``            a validator's score record of ``uid`` in ``w``
checkpoint/...     ``covenant-checkpoint/1``       a published checkpoint's manifest
=================  ==============================  ===========================================

The manifest's ``window`` is the record's window (``first_window`` for a peer list, 0 for
``start_window``) and its ``uid`` the writer's uid, so a record cannot be replayed under another
key, window or signer. :func:`parse_record` is the single entry point for record bodies: it
bounds the size, reads JSON with :mod:`covenant.engine.untrusted`, and validates the fields with
strict pydantic models, raising :class:`RecordError` (never anything else) for bad input.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from covenant.engine.protocols import AggregateRecord, PeerList, SyncSample
from covenant.engine.untrusted import UntrustedInputError, canonical_json, loads_canonical_json
from covenant.plugins.storage.errors import StorageError

MAX_RECORD_BYTES = 4 << 20  # a score record of a big model's sample ids stays far below this
MAX_PEERS = 1024  # uids in one peer list or aggregate record
MAX_TENSORS = 8192  # tensors in one sync sample (covenant-72b has ~730)
_UID = Annotated[int, Field(ge=0, lt=1 << 16)]
_WINDOW = Annotated[int, Field(ge=0, lt=1 << 48)]
_HEX64 = r"^[0-9a-f]{64}$"

START = "covenant-start/1"
PEERS = "covenant-peers/1"
AGGREGATE = "covenant-aggregate/1"
SYNC = "covenant-sync/1"
SCORE = "covenant-score/1"
CHECKPOINT = "covenant-checkpoint/1"
FORMATS = (START, PEERS, AGGREGATE, SYNC, SCORE, CHECKPOINT)


class RecordError(StorageError, ValueError):
    """A record body is malformed, over its bounds, or not in canonical form."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StartWindowBody(_Strict):
    format: Literal["covenant-start/1"]
    start_window: _WINDOW


class PeerListBody(_Strict):
    format: Literal["covenant-peers/1"]
    first_window: _WINDOW
    posted_window: _WINDOW
    gather: list[_UID] = Field(max_length=MAX_PEERS)
    reserve: list[_UID] = Field(max_length=MAX_PEERS)

    @field_validator("reserve")
    @classmethod
    def _disjoint(cls, reserve: list[int], info: Any) -> list[int]:
        gather = info.data.get("gather", [])
        both = list(gather) + list(reserve)
        if len(set(both)) != len(both):
            raise ValueError("a uid appears twice in the peer list")
        return reserve


class AggregateBody(_Strict):
    format: Literal["covenant-aggregate/1"]
    window: _WINDOW
    outer_step: _WINDOW
    uploads: list[tuple[_UID, Annotated[str, Field(pattern=_HEX64)]]] = Field(max_length=MAX_PEERS)

    @field_validator("uploads")
    @classmethod
    def _ascending(cls, uploads: list[tuple[int, str]]) -> list[tuple[int, str]]:
        uids = [u for u, _ in uploads]
        if any(b <= a for a, b in itertools.pairwise(uids)):
            raise ValueError("uploads must be in strictly ascending uid order")
        return uploads


class SyncBody(_Strict):
    format: Literal["covenant-sync/1"]
    window: _WINDOW
    uid: _UID
    values: dict[Annotated[str, Field(min_length=1, max_length=512)], tuple[float, float]] = Field(
        max_length=MAX_TENSORS
    )

    @field_validator("values")
    @classmethod
    def _finite(cls, values: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        if not all(math.isfinite(a) and math.isfinite(b) for a, b in values.values()):
            raise ValueError("sync sample values must be finite")
        return values


class CheckpointFile(_Strict):
    sha256: Annotated[str, Field(pattern=_HEX64)]
    size: Annotated[int, Field(ge=0, lt=1 << 50)]


class CheckpointBody(_Strict):
    format: Literal["covenant-checkpoint/1"]
    window: _WINDOW
    outer_step: _WINDOW
    model: dict[str, Any] = Field(max_length=64)  # the model shape (validated by the loader)
    files: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")], CheckpointFile
    ] = Field(min_length=1, max_length=4096)


class ScoreBody(_Strict):
    format: Literal["covenant-score/1"]
    window: _WINDOW
    uid: _UID
    record: dict[str, Any]


_MODELS: dict[str, type[_Strict]] = {
    START: StartWindowBody,
    PEERS: PeerListBody,
    AGGREGATE: AggregateBody,
    SYNC: SyncBody,
    SCORE: ScoreBody,
    CHECKPOINT: CheckpointBody,
}


def encode_record(body: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a record body (validated first: we never publish a bad one)."""
    parse_record(canonical_json(dict(body)), str(body.get("format")))
    return canonical_json(dict(body))


def parse_record(data: bytes | memoryview, fmt: str, *, max_bytes: int = MAX_RECORD_BYTES) -> Any:
    """Parse and validate a record body of format ``fmt``; raises :class:`RecordError`."""
    model = _MODELS.get(fmt)
    if model is None:
        raise RecordError(f"unknown record format {fmt!r}")
    raw = bytes(data)
    if len(raw) > max_bytes:
        raise RecordError(f"{fmt} record is {len(raw)} bytes, over the cap of {max_bytes}")
    try:
        value = loads_canonical_json(raw, what=f"{fmt} record", max_bytes=max_bytes, max_depth=16)
    except UntrustedInputError as exc:
        raise RecordError(str(exc)) from None
    if not isinstance(value, dict) or value.get("format") != fmt:
        raise RecordError(f"record is not a {fmt} record")
    try:
        return model.model_validate(_tuples(value))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise RecordError(f"{fmt} record is invalid: {where}: {first['msg']}") from None


def _tuples(value: Any) -> Any:
    """JSON arrays of the tuple-typed fields become tuples (strict mode wants the exact type)."""
    if isinstance(value, dict):
        out = {k: _tuples(v) for k, v in value.items()}
        if value.get("format") == AGGREGATE and isinstance(out.get("uploads"), list):
            out["uploads"] = [tuple(x) if isinstance(x, list) else x for x in out["uploads"]]
        if value.get("format") == SYNC and isinstance(out.get("values"), dict):
            out["values"] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in out["values"].items()
            }
        return out
    return value


# -- typed views ------------------------------------------------------------------------------


def start_window_body(window: int) -> dict[str, Any]:
    return {"format": START, "start_window": int(window)}


def peer_list_body(peers: PeerList) -> dict[str, Any]:
    return {
        "format": PEERS,
        "first_window": peers.first_window,
        "posted_window": peers.posted_window,
        "gather": list(peers.gather),
        "reserve": list(peers.reserve),
    }


def peer_list_of(body: PeerListBody, validator: str) -> PeerList:
    return PeerList(
        first_window=body.first_window,
        posted_window=body.posted_window,
        gather=tuple(body.gather),
        reserve=tuple(body.reserve),
        validator=validator,
    )


def aggregate_body(record: AggregateRecord) -> dict[str, Any]:
    return {
        "format": AGGREGATE,
        "window": record.window,
        "outer_step": record.outer_step,
        "uploads": [[uid, sha] for uid, sha in sorted(record.uploads)],
    }


def aggregate_of(body: AggregateBody, validator: str) -> AggregateRecord:
    return AggregateRecord(
        window=body.window,
        outer_step=body.outer_step,
        uploads=tuple((int(u), str(h)) for u, h in body.uploads),
        validator=validator,
    )


def sync_body(window: int, uid: int, values: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    return {
        "format": SYNC,
        "window": window,
        "uid": uid,
        "values": {name: [float(v[0]), float(v[1])] for name, v in sorted(values.items())},
    }


def sync_of(body: SyncBody) -> SyncSample:
    return SyncSample(uid=body.uid, window=body.window, values=dict(body.values))


__all__ = [
    "AGGREGATE",
    "CHECKPOINT",
    "FORMATS",
    "PEERS",
    "SCORE",
    "START",
    "SYNC",
    "AggregateBody",
    "CheckpointBody",
    "PeerListBody",
    "RecordError",
    "ScoreBody",
    "StartWindowBody",
    "SyncBody",
    "aggregate_body",
    "aggregate_of",
    "encode_record",
    "parse_record",
    "peer_list_body",
    "peer_list_of",
    "start_window_body",
    "sync_body",
    "sync_of",
]
