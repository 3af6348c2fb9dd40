"""Signed uploads and verified downloads: every bad input is a typed rejection, never a crash."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import time
import uuid
from typing import Any

import pytest
from bittensor.sp_core import Keypair

from covenant.engine.protocols import ObjectInfo
from covenant.plugins.storage.errors import ManifestError, StorageKeyError
from covenant.plugins.storage.exchange import (
    ExpectedUpload,
    FetchJob,
    Rejection,
    RejectReason,
    VerifiedObject,
    fetch_many,
    fetch_verified,
    iter_fetch,
    upload_interval,
    upload_signed,
)
from covenant.plugins.storage.keys import RunKeys
from covenant.plugins.storage.manifest import (
    MAGIC,
    Manifest,
    SignedManifest,
    content_hash,
    pack_object,
)
from covenant.plugins.storage.retry import Deadline
from covenant.plugins.storage.transport import FsspecTransport, open_transport

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")
KEYS = RunKeys("run", 1)
PAYLOAD = b"compressed pseudo-gradient " * 40


def fields(window: int = 5, uid: int = 3) -> dict[str, Any]:
    return {"run": "run", "version": 1, "window": window, "uid": uid, "codec": "sparseloco/1"}


def expect(
    window: int = 5, uid: int = 3, hotkey: str = ALICE.ss58_address, **over: Any
) -> ExpectedUpload:
    base: dict[str, Any] = dict(
        run="run",
        version=1,
        window=window,
        uid=uid,
        hotkey=hotkey,
        max_bytes=64 * 1024 + len(PAYLOAD),
    )
    base.update(over)
    return ExpectedUpload(**base)


@pytest.fixture
def mem() -> FsspecTransport:
    return open_transport(f"memory://ex-{uuid.uuid4().hex[:10]}")


def reason(result: object) -> RejectReason:
    assert isinstance(result, Rejection), result
    return result.reason


def test_round_trip_on_every_backend(transport: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    info = upload_signed(transport, key, PAYLOAD, fields(), ALICE)
    lo, hi = upload_interval(info.modified - 1, 70)
    result = fetch_verified(transport, key, expect(interval=(lo, hi)))
    assert isinstance(result, VerifiedObject), result
    assert bytes(result.payload) == PAYLOAD
    assert result.content_hash == content_hash(PAYLOAD)
    assert result.manifest.hotkey == ALICE.ss58_address
    # replayed into another window's key: same bytes, valid signature, wrong place
    transport.put(KEYS.gradient(6, 3), transport.get(key, 10**6))
    assert reason(fetch_verified(transport, KEYS.gradient(6, 3), expect(window=6))) == "replayed"


def test_missing_and_too_large(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    assert reason(fetch_verified(mem, key, expect())) == RejectReason.MISSING
    upload_signed(mem, key, PAYLOAD, fields(), ALICE)
    assert reason(fetch_verified(mem, key, expect(max_bytes=len(PAYLOAD)))) == "too_large"


def test_interval_is_checked_in_whole_seconds(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    ts = math.floor(upload_signed(mem, key, PAYLOAD, fields(), ALICE).modified)
    assert fetch_verified(mem, key, expect(interval=(ts, ts))).ok
    assert reason(fetch_verified(mem, key, expect(interval=(ts + 1, ts + 71)))) == "early"
    assert reason(fetch_verified(mem, key, expect(interval=(ts - 71, ts - 1)))) == "late"
    assert upload_interval(1000.9, 70) == (1000, 1070)


def test_local_upload_outside_its_window_is_late(tmp_path: Any) -> None:
    t = open_transport((tmp_path / "s").as_uri())
    key = KEYS.gradient(5, 3)
    upload_signed(t, key, PAYLOAD, fields(), ALICE)
    t_next = 1_700_000_000.4
    os.utime(tmp_path / "s" / key, (t_next + 71, t_next + 71))  # storage stamp 71 s after
    assert reason(fetch_verified(t, key, expect(interval=upload_interval(t_next, 70)))) == "late"
    os.utime(tmp_path / "s" / key, (t_next + 70, t_next + 70))
    assert fetch_verified(t, key, expect(interval=upload_interval(t_next, 70))).ok


def test_hotkey_that_does_not_match_the_uid(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    upload_signed(mem, key, PAYLOAD, fields(), BOB)  # Bob uploads as uid 3, whose hotkey is Alice's
    assert reason(fetch_verified(mem, key, expect(hotkey=ALICE.ss58_address))) == "hotkey_mismatch"


def _forge(manifest: Manifest, signer: Keypair, payload: bytes) -> bytes:
    from covenant.plugins.storage.manifest import SIGNING_DOMAIN

    sig = "0x" + bytes(signer.sign(SIGNING_DOMAIN + manifest.canonical_bytes())).hex()
    return pack_object(SignedManifest(manifest=manifest, signature=sig), payload)


def test_bad_signature(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    claim = Manifest(
        run="run",
        version=1,
        key=key,
        window=5,
        uid=3,
        hotkey=ALICE.ss58_address,
        codec="sparseloco/1",
        sha256=content_hash(PAYLOAD),
        size=len(PAYLOAD),
    )
    mem.put(key, _forge(claim, BOB, PAYLOAD))  # claims Alice, signed by Bob
    assert reason(fetch_verified(mem, key, expect())) == "bad_signature"


def test_flipped_signature_byte(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    upload_signed(mem, key, PAYLOAD, fields(), ALICE)
    blob = bytearray(mem.get(key, 10**6))
    i = blob.index(b'"signature":"0x') + len(b'"signature":"0x') + 5
    blob[i] = ord("0") if blob[i] != ord("0") else ord("1")
    mem.put(key, bytes(blob))
    assert reason(fetch_verified(mem, key, expect())) == "bad_signature"


def test_replayed_across_uid_and_run(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    upload_signed(mem, key, PAYLOAD, fields(), ALICE)
    blob = mem.get(key, 10**6)
    mem.put(KEYS.gradient(5, 4), blob)
    assert reason(fetch_verified(mem, KEYS.gradient(5, 4), expect(uid=4))) == "replayed"
    other = RunKeys("run", 2).gradient(5, 3)
    mem.put(other, blob)
    assert reason(fetch_verified(mem, other, expect(version=2))) == "replayed"
    mem.put(KEYS.debug(5, 3), blob)  # same window and uid, another kind of object
    assert reason(fetch_verified(mem, KEYS.debug(5, 3), expect())) == "replayed"


def test_content_hash_mismatch(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    upload_signed(mem, key, PAYLOAD, fields(), ALICE)
    blob = bytearray(mem.get(key, 10**6))
    blob[-1] ^= 0xFF
    mem.put(key, bytes(blob))
    assert reason(fetch_verified(mem, key, expect())) == "hash_mismatch"
    mem.put(key, bytes(blob[:-1]))  # truncated payload
    assert reason(fetch_verified(mem, key, expect())) == "hash_mismatch"


def test_bad_manifests(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    header = b"not json"
    mem.put(key, struct.pack(">4sBI", MAGIC, 1, len(header)) + header + PAYLOAD)
    assert reason(fetch_verified(mem, key, expect())) == "bad_manifest"
    good = mem
    upload_signed(good, key, PAYLOAD, fields(), ALICE)
    body = mem.get(key, 10**6)
    n = struct.unpack(">I", body[5:9])[0]
    doc = json.loads(body[9 : 9 + n])
    del doc["manifest"]["uid"]
    header = json.dumps(doc).encode()
    mem.put(key, struct.pack(">4sBI", MAGIC, 1, len(header)) + header + PAYLOAD)
    assert reason(fetch_verified(mem, key, expect())) == "bad_manifest"
    mem.put(key, PAYLOAD)  # a bare payload with no header at all
    assert reason(fetch_verified(mem, key, expect())) == "bad_manifest"
    upload_signed(mem, key, PAYLOAD, fields(), ALICE)
    assert reason(fetch_verified(mem, key, expect(codec="other/2"))) == "bad_manifest"
    assert reason(fetch_verified(mem, key, expect(header_max_bytes=100))) == "bad_manifest"


@pytest.mark.parametrize("bad", ["run/v1/../../etc/passwd", "/abs/key", "run\\v1", ""])
def test_bad_keys(mem: FsspecTransport, bad: str) -> None:
    assert reason(fetch_verified(mem, bad, expect())) == "bad_key"
    with pytest.raises(StorageKeyError):
        upload_signed(mem, bad, PAYLOAD, fields(), ALICE)


def test_upload_refuses_keys_outside_the_run_and_computed_fields(mem: FsspecTransport) -> None:
    with pytest.raises(StorageKeyError, match="outside"):
        upload_signed(mem, "otherrun/v1/gradient/5/3", PAYLOAD, fields(), ALICE)
    with pytest.raises(ManifestError, match="computed"):
        upload_signed(mem, KEYS.gradient(5, 3), PAYLOAD, {**fields(), "sha256": "0" * 64}, ALICE)
    with pytest.raises(ManifestError):
        upload_signed(mem, KEYS.gradient(5, 3), PAYLOAD, {**fields(), "window": -1}, ALICE)
    assert mem.list("") == []


class Broken:
    """A third-party transport that fails in odd ways."""

    url = "broken://"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def put(self, key: str, data: bytes) -> ObjectInfo:
        raise self.exc

    def head(self, key: str) -> ObjectInfo | None:
        raise self.exc

    def get(self, key: str, max_bytes: int) -> bytes:
        raise self.exc

    def list(self, prefix: str) -> list[ObjectInfo]:
        return []

    def delete(self, key: str) -> None:
        pass


def test_transport_failures_are_rejections() -> None:
    for exc in (RuntimeError("boom"), OSError("disk"), ValueError("odd")):
        result = fetch_verified(Broken(exc), KEYS.gradient(5, 3), expect())  # type: ignore[arg-type]
        assert reason(result) == "transport_error"


def test_expired_deadline(mem: FsspecTransport) -> None:
    key = KEYS.gradient(5, 3)
    upload_signed(mem, key, PAYLOAD, fields(), ALICE)
    assert reason(fetch_verified(mem, key, expect(), deadline=Deadline(0))) == "deadline"


class Recording:
    """Wraps a transport (third-party style) and records the peak bytes of GETs in flight."""

    url = "recording://"

    def __init__(self, inner: FsspecTransport, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def put(self, key: str, data: bytes) -> ObjectInfo:
        return self.inner.put(key, data)

    def head(self, key: str) -> ObjectInfo | None:
        return self.inner.head(key)

    def get(self, key: str, max_bytes: int) -> bytes:
        info = self.inner.head(key)
        size = info.size if info else 0
        with self.lock:
            self.in_flight += size
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(self.delay_s)
            return self.inner.get(key, max_bytes)
        finally:
            with self.lock:
                self.in_flight -= size

    def list(self, prefix: str) -> list[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def test_fetch_many_one_result_per_uid_with_bounded_bytes(mem: FsspecTransport) -> None:
    rec = Recording(mem, delay_s=0.02)
    jobs = []
    for uid in range(20):
        key = KEYS.gradient(5, uid)
        signer = BOB if uid == 7 else ALICE
        upload_signed(mem, key, PAYLOAD, fields(uid=uid), signer)
        jobs.append(FetchJob(rec, key, expect(uid=uid)))  # type: ignore[arg-type]
    jobs.append(FetchJob(rec, KEYS.gradient(5, 99), expect(uid=99)))  # type: ignore[arg-type]
    size = len(mem.get(KEYS.gradient(5, 0), 10**6))
    results = fetch_many(jobs, max_concurrent=8, max_inflight_bytes=3 * size, deadline=Deadline(30))
    assert list(results) == [*range(20), 99]
    assert reason(results[7]) == "hotkey_mismatch"
    assert reason(results[99]) == "missing"
    assert all(results[u].ok for u in range(20) if u != 7)
    assert rec.peak <= 3 * size


def test_iter_fetch_holds_budget_until_consumed(mem: FsspecTransport) -> None:
    jobs = []
    for uid in range(4):
        upload_signed(mem, KEYS.gradient(5, uid), PAYLOAD, fields(uid=uid), ALICE)
        jobs.append(FetchJob(mem, KEYS.gradient(5, uid), expect(uid=uid)))
    size = mem.head(KEYS.gradient(5, 0)).size  # type: ignore[union-attr]
    seen = []
    for uid, result in iter_fetch(
        jobs, max_concurrent=4, max_inflight_bytes=size, deadline=Deadline(10)
    ):
        assert result.ok
        seen.append(uid)
    assert sorted(seen) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        list(
            iter_fetch(
                jobs + jobs[:1], max_concurrent=2, max_inflight_bytes=size, deadline=Deadline(1)
            )
        )


def test_fetch_many_meets_its_deadline(mem: FsspecTransport) -> None:
    rec = Recording(mem, delay_s=3.0)
    jobs = []
    for uid in range(3):
        upload_signed(mem, KEYS.gradient(5, uid), PAYLOAD, fields(uid=uid), ALICE)
        jobs.append(FetchJob(rec, KEYS.gradient(5, uid), expect(uid=uid)))  # type: ignore[arg-type]
    start = time.monotonic()
    results = fetch_many(jobs, max_concurrent=3, max_inflight_bytes=10**6, deadline=Deadline(0.5))
    assert time.monotonic() - start < 1.5
    assert {reason(r) for r in results.values()} == {RejectReason.DEADLINE}


def test_consumer_that_stops_early_releases_workers(mem: FsspecTransport) -> None:
    rec = Recording(mem, delay_s=0.05)
    jobs = []
    for uid in range(6):
        upload_signed(mem, KEYS.gradient(5, uid), PAYLOAD, fields(uid=uid), ALICE)
        jobs.append(FetchJob(rec, KEYS.gradient(5, uid), expect(uid=uid)))  # type: ignore[arg-type]
    size = mem.head(KEYS.gradient(5, 0)).size  # type: ignore[union-attr]
    gen = iter_fetch(jobs, max_concurrent=6, max_inflight_bytes=size, deadline=Deadline(30))
    uid, result = next(gen)
    assert result.ok
    gen.close()
    time.sleep(0.3)
    assert rec.in_flight == 0  # the others were refused their budget, not left waiting
    assert threading.active_count() < 20
