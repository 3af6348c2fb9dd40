"""Manifests: canonical bytes, sr25519 signatures, the bounded object layout."""

from __future__ import annotations

import json
import struct

import pytest
from bittensor.sp_core import Keypair
from hypothesis import given, settings
from hypothesis import strategies as st

from covenant.plugins.storage.errors import ManifestError
from covenant.plugins.storage.manifest import (
    MAGIC,
    Manifest,
    SignedManifest,
    content_hash,
    pack_object,
    sign_manifest,
    unpack_object,
)

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")


def manifest(**over: object) -> Manifest:
    fields: dict[str, object] = dict(
        run="r",
        version=1,
        key="r/v1/gradient/5/3",
        window=5,
        uid=3,
        hotkey=ALICE.ss58_address,
        codec="sparseloco/1",
        sha256=content_hash(b"payload"),
        size=7,
    )
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_sign_and_verify() -> None:
    signed = sign_manifest(manifest(), ALICE)
    assert signed.verify(ALICE.ss58_address)
    assert not signed.verify(BOB.ss58_address)
    assert not signed.verify("not an address")


def test_signature_binds_every_field() -> None:
    signed = sign_manifest(manifest(), ALICE)
    for change in (
        {"window": 6},
        {"uid": 4},
        {"run": "s"},
        {"version": 2},
        {"size": 8},
        {"key": "r/v1/gradient/6/3"},
        {"sha256": "0" * 64},
    ):
        moved = SignedManifest(manifest=manifest(**change), signature=signed.signature)
        assert not moved.verify(ALICE.ss58_address), change


def test_cannot_sign_for_another_hotkey() -> None:
    with pytest.raises(ManifestError):
        sign_manifest(manifest(), BOB)


def test_canonical_bytes_are_sorted_and_compact() -> None:
    raw = manifest(sizes={"b": 1, "a": 2}).canonical_bytes()
    assert b" " not in raw
    assert list(json.loads(raw)) == sorted(json.loads(raw))


def test_pack_unpack_round_trip() -> None:
    signed = sign_manifest(manifest(), ALICE)
    blob = pack_object(signed, b"payload")
    got, payload = unpack_object(blob, 64 * 1024)
    assert got == signed and bytes(payload) == b"payload"


def _raw(header: bytes, payload: bytes = b"", *, length: int | None = None) -> bytes:
    n = len(header) if length is None else length
    return struct.pack(">4sBI", MAGIC, 1, n) + header + payload


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "shorter"),
        (b"NOPE" + bytes(20), "does not start"),
        (struct.pack(">4sBI", MAGIC, 9, 2) + b"{}", "layout version"),
        (_raw(b"x" * 10, length=70_000), "over the cap"),
        (_raw(b"{}", length=500), "fewer"),
        (_raw(b"not json at all"), "invalid"),
        (_raw(b'{"manifest": {}, "signature": "0x00"}'), "invalid"),
        (_raw(b"[1, 2, 3]"), "invalid"),
        (_raw(b'{"manifest": null}'), "invalid"),
    ],
)
def test_malformed_objects_are_typed_errors(blob: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        unpack_object(blob, 64 * 1024)


def test_missing_and_extra_fields_are_refused() -> None:
    good = json.loads(sign_manifest(manifest(), ALICE).model_dump_json())
    missing = json.loads(json.dumps(good))
    del missing["manifest"]["sha256"]
    extra = json.loads(json.dumps(good))
    extra["manifest"]["evil"] = 1
    wrong_type = json.loads(json.dumps(good))
    wrong_type["manifest"]["window"] = "5"
    for doc in (missing, extra, wrong_type):
        with pytest.raises(ManifestError):
            unpack_object(_raw(json.dumps(doc).encode()), 64 * 1024)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_crashes(blob: bytes) -> None:
    try:
        unpack_object(blob, 64 * 1024)
    except ManifestError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_headers_never_crash(header: bytes) -> None:
    try:
        unpack_object(_raw(header), 64 * 1024)
    except ManifestError:
        pass


def _canonical_header() -> bytes:
    blob = pack_object(sign_manifest(manifest(), ALICE), b"")
    return blob[9:]


def test_header_is_canonical_json() -> None:
    header = _canonical_header()
    doc = json.loads(header)
    assert header == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda h: h.replace(b'"format":1', b'"format":true'), id="format-true"),
        pytest.param(lambda h: h.replace(b'"format":1', b'"format":1.0'), id="format-float"),
        pytest.param(lambda h: h.replace(b'"window":5', b'"window":5,"window":5'), id="dup-key"),
        pytest.param(lambda h: h.replace(b'"window":5', b'"window":6,"window":5'), id="dup-kv"),
        pytest.param(lambda h: h.replace(b":", b": ", 1), id="space"),
        pytest.param(lambda h: h + b"\n", id="newline"),
        pytest.param(lambda h: h.replace(b',"receipt":null', b""), id="omitted-default"),
        pytest.param(
            lambda h: b'{"signature":"0x' + b"0" * 128 + b'",' + h[1:], id="dup-signature"
        ),
        pytest.param(
            lambda h: (
                json.dumps(json.loads(h), separators=(",", ":"), sort_keys=False)
                .encode()
                .replace(b'"codec":"sparseloco/1",', b"")
                .replace(b'"uid":3', b'"uid":3,"codec":"sparseloco/1"')
            ),
            id="reordered",
        ),
        pytest.param(lambda h: h.replace(b"sparseloco", b"sparselo\\u0063o"), id="escaped"),
    ],
)
def test_only_the_canonical_header_is_accepted(mutate: object) -> None:
    header = _canonical_header()
    changed = mutate(header)  # type: ignore[operator]
    assert changed != header
    with pytest.raises(ManifestError, match="invalid"):
        unpack_object(_raw(changed), 64 * 1024)


def test_canonical_header_with_receipt_round_trips() -> None:
    from covenant.plugins.storage.manifest import ManifestReceipt

    signed = sign_manifest(manifest(receipt=ManifestReceipt(hash="ab" * 16, count=3)), ALICE)
    got, _ = unpack_object(pack_object(signed, b"x"), 64 * 1024)
    assert got == signed and got.verify(ALICE.ss58_address)
