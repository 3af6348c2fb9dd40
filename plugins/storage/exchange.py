"""Signed uploads and verified downloads of untrusted objects (SPEC sections 1, 5, 6).

:func:`upload_signed` is how a peer publishes bytes: it builds the manifest (content hash and
size of the exact bytes), signs it with the peer's hotkey and writes manifest + payload as one
atomic object.

:func:`fetch_verified` is the single entry point for reading another peer's upload. It never
raises for anything the peer or its storage can cause; it returns a :class:`VerifiedObject` or a
:class:`Rejection` whose ``reason`` (a :class:`RejectReason`) the validator records. The order
of checks is fixed and cheap-first, and nothing is decoded before the signature and the content
hash have been checked:

1. the key is well formed (``bad_key``);
2. HEAD: the object exists (``missing``), is not over the cap (``too_large``, nothing downloaded),
   and its storage timestamp, in whole seconds, lies in the upload interval (``early``/``late``);
3. GET (bounded by the HEAD's size, pinned to its ETag);
4. the header parses as a signed manifest within its size cap (``bad_manifest``);
5. the manifest's hotkey is the one the chain lists for the uid (``hotkey_mismatch``) and the
   signature verifies against it (``bad_signature``);
6. run, version, key, window and uid are the ones expected (``replayed``);
7. size and SHA-256 of the payload match the manifest (``hash_mismatch``).

Transport failures become ``transport_error``; running out of time becomes ``deadline``.

:func:`iter_fetch` / :func:`fetch_many` fetch many peers at once on a thread pool, with the bytes
held by downloads in flight bounded by a :class:`ByteBudget`.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from covenant.engine.protocols import ObjectInfo, Transport
from covenant.plugins.storage.errors import (
    ManifestError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageDeadlineError,
    StorageError,
    StorageKeyError,
)
from covenant.plugins.storage.keys import validate_key
from covenant.plugins.storage.manifest import (
    Manifest,
    SignedManifest,
    content_hash,
    pack_object,
    sign_manifest,
    unpack_object,
)
from covenant.plugins.storage.retry import Deadline

log = logging.getLogger(__name__)

DEFAULT_HEADER_MAX_BYTES = 64 * 1024  # SPEC section 6: at most 64 KiB of header and manifest
_COMPUTED = ("key", "hotkey", "sha256", "size")


class RejectReason(StrEnum):
    """Why an upload was not accepted; the value is what the validator records."""

    MISSING = "missing"
    TOO_LARGE = "too_large"
    LATE = "late"
    EARLY = "early"
    BAD_MANIFEST = "bad_manifest"
    BAD_SIGNATURE = "bad_signature"
    HOTKEY_MISMATCH = "hotkey_mismatch"
    REPLAYED = "replayed"
    HASH_MISMATCH = "hash_mismatch"
    BAD_KEY = "bad_key"
    TRANSPORT_ERROR = "transport_error"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class Rejection:
    """A refused upload: ``reason`` to record, ``detail`` to explain it."""

    key: str
    reason: RejectReason
    detail: str
    ok: bool = field(default=False, init=False)


@dataclass(frozen=True)
class VerifiedObject:
    """An upload whose signature, identity, timing and content hash all checked out."""

    key: str
    manifest: Manifest
    info: ObjectInfo
    body: bytes = field(repr=False)
    payload_offset: int
    ok: bool = field(default=True, init=False)

    @property
    def payload(self) -> memoryview:
        """The payload bytes (a zero-copy view into ``body``)."""
        return memoryview(self.body)[self.payload_offset :]

    @property
    def content_hash(self) -> str:
        return self.manifest.sha256


FetchResult = VerifiedObject | Rejection


@dataclass(frozen=True)
class ExpectedUpload:
    """What the reader knows independently of the object (from the chain and the model).

    ``interval`` is the upload interval ``(lo, hi)`` in whole seconds, both inclusive, or
    ``None`` for objects without one (checkpoints, peer lists). ``max_bytes`` caps the whole
    object (payload plus header).
    """

    run: str
    version: int
    window: int
    uid: int
    hotkey: str
    max_bytes: int
    interval: tuple[int, int] | None = None
    codec: str | None = None
    header_max_bytes: int = DEFAULT_HEADER_MAX_BYTES


@dataclass(frozen=True)
class FetchJob:
    """One object to fetch in :func:`iter_fetch`: where, and what it must be."""

    transport: Transport
    key: str
    expected: ExpectedUpload


def upload_interval(t_next_window_start: float, upload_grace_s: int) -> tuple[int, int]:
    """``[floor(t(start of w+1)), floor(t(start of w+1)) + upload_grace_s]`` (SPEC section 1)."""
    lo = math.floor(t_next_window_start)
    return lo, lo + upload_grace_s


def build_signed_object(
    key: str, data: bytes | memoryview, manifest_fields: Mapping[str, Any], keypair: Any
) -> tuple[SignedManifest, bytes]:
    """The signed manifest for ``data`` and the object bytes to store under ``key``."""
    validate_key(key)
    clash = sorted(set(manifest_fields) & set(_COMPUTED))
    if clash:
        raise ManifestError(f"manifest fields {clash} are computed, not given")
    try:
        manifest = Manifest(
            **manifest_fields,
            key=key,
            hotkey=keypair.ss58_address,
            sha256=content_hash(data),
            size=len(data),
        )
    except ValidationError as exc:
        raise ManifestError(f"cannot build the manifest for {key}: {exc}") from None
    prefix = f"{manifest.run}/v{manifest.version}/"
    if not key.startswith(prefix):
        raise StorageKeyError(f"key {key!r} is outside the run's prefix {prefix!r}")
    signed = sign_manifest(manifest, keypair)
    return signed, pack_object(signed, data)


def upload_signed(
    transport: Transport,
    key: str,
    data: bytes | memoryview,
    manifest_fields: Mapping[str, Any],
    keypair: Any,
    *,
    deadline: Deadline | None = None,
) -> ObjectInfo:
    """Sign and store ``data`` under ``key`` in one atomic PUT; returns the stored object's HEAD.

    ``manifest_fields`` gives ``run``, ``version``, ``window``, ``uid``, ``codec`` (and optional
    ``sizes``); key, hotkey, hash and size are computed. A failed PUT raises, never passes.
    """
    _, blob = build_signed_object(key, data, manifest_fields, keypair)
    kwargs = {"deadline": deadline} if deadline is not None else {}
    info = transport.put(key, blob, **kwargs)
    log.debug("uploaded %s (%d bytes, stamped %.0f)", key, len(blob), info.modified)
    return info


class ByteBudget:
    """Bytes that downloads in flight may hold; :meth:`acquire` waits for room."""

    def __init__(self, total: int) -> None:
        if total <= 0:
            raise ValueError(f"byte budget must be positive, got {total}")
        self.total = total
        self._used = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    def acquire(self, n: int, deadline: Deadline) -> int:
        """Reserve ``n`` bytes (at most the whole budget); returns what was reserved."""
        n = min(max(n, 0), self.total)
        with self._cond:
            while self._used + n > self.total:
                if self._closed:
                    raise StorageDeadlineError("the fetch was abandoned by its consumer")
                left = deadline.remaining()
                if left <= 0:
                    raise StorageDeadlineError(f"waited for {n} bytes of download budget")
                self._cond.wait(timeout=left)
            self._used += n
        return n

    def release(self, n: int) -> None:
        if n <= 0:
            return
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter and refuse further reservations (the consumer went away)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def fetch_verified(
    transport: Transport,
    key: str,
    expected: ExpectedUpload,
    *,
    deadline: Deadline | None = None,
) -> FetchResult:
    """Download and verify one upload; never raises for bad input (see the module docstring)."""
    result, _ = _fetch(transport, key, expected, deadline or Deadline(None), None)
    return result


def _fetch(
    transport: Transport,
    key: str,
    expected: ExpectedUpload,
    dl: Deadline,
    budget: ByteBudget | None,
) -> tuple[FetchResult, int]:
    """:func:`fetch_verified`, holding ``budget`` bytes for a successful result (returned)."""
    held = 0
    try:
        result = _fetch_checked(transport, key, expected, dl, budget)
        if isinstance(result, tuple):
            result, held = result
        return result, held
    except StorageKeyError as exc:
        return Rejection(key, RejectReason.BAD_KEY, str(exc)), 0
    except ObjectNotFoundError as exc:
        return Rejection(key, RejectReason.MISSING, str(exc)), 0
    except ObjectTooLargeError as exc:
        return Rejection(key, RejectReason.TOO_LARGE, str(exc)), 0
    except StorageDeadlineError as exc:
        return Rejection(key, RejectReason.DEADLINE, str(exc)), 0
    except StorageError as exc:
        return Rejection(key, RejectReason.TRANSPORT_ERROR, str(exc)), 0
    except Exception as exc:  # a transport bug must not take the validator down
        log.warning("fetching %s failed unexpectedly", key, exc_info=True)
        return Rejection(key, RejectReason.TRANSPORT_ERROR, f"{type(exc).__name__}: {exc}"), 0


def _ours(transport: Transport) -> bool:
    # covenant's transports take a deadline and the caller's HEAD; third-party ones may not
    from covenant.plugins.storage.transport import FsspecTransport

    return isinstance(transport, FsspecTransport)


def _fetch_checked(
    transport: Transport,
    key: str,
    exp: ExpectedUpload,
    dl: Deadline,
    budget: ByteBudget | None,
) -> FetchResult | tuple[FetchResult, int]:
    validate_key(key)
    dl.check(f"fetch {key}")
    ours = _ours(transport)
    info = transport.head(key, deadline=dl) if ours else transport.head(key)  # type: ignore[call-arg]
    if info is None:
        return Rejection(key, RejectReason.MISSING, f"{key}: no such object")
    if info.size > exp.max_bytes:
        return Rejection(
            key, RejectReason.TOO_LARGE, f"{key}: {info.size} bytes, cap {exp.max_bytes}"
        )
    if exp.interval is not None:
        ts = math.floor(info.modified)
        lo, hi = exp.interval
        if ts < lo:
            return Rejection(key, RejectReason.EARLY, f"{key}: stamped {ts}, interval opens {lo}")
        if ts > hi:
            return Rejection(key, RejectReason.LATE, f"{key}: stamped {ts}, interval closed {hi}")
    held = budget.acquire(info.size, dl) if budget is not None else 0
    try:
        if ours:
            body = transport.get(key, exp.max_bytes, deadline=dl, info=info)  # type: ignore[call-arg]
        else:
            body = transport.get(key, exp.max_bytes)
        verdict = verify_object(key, body, exp, info)
    except BaseException:
        if budget is not None:
            budget.release(held)
        raise
    if not verdict.ok and budget is not None:
        budget.release(held)
        held = 0
    return verdict, held


def verify_object(key: str, body: bytes, exp: ExpectedUpload, info: ObjectInfo) -> FetchResult:
    """Checks 4-7 of the module docstring on downloaded bytes."""
    if len(body) > exp.max_bytes:
        return Rejection(
            key, RejectReason.TOO_LARGE, f"{key}: {len(body)} bytes, cap {exp.max_bytes}"
        )
    try:
        signed, payload = unpack_object(body, exp.header_max_bytes)
    except ManifestError as exc:
        return Rejection(key, RejectReason.BAD_MANIFEST, f"{key}: {exc}")
    m = signed.manifest
    if m.hotkey != exp.hotkey:
        return Rejection(
            key,
            RejectReason.HOTKEY_MISMATCH,
            f"{key}: manifest hotkey {m.hotkey} is not uid {exp.uid}'s hotkey {exp.hotkey}",
        )
    if not signed.verify(exp.hotkey):
        return Rejection(key, RejectReason.BAD_SIGNATURE, f"{key}: signature does not verify")
    claimed = (m.run, m.version, m.key, m.window, m.uid)
    wanted = (exp.run, exp.version, key, exp.window, exp.uid)
    if claimed != wanted:
        names = ("run", "version", "key", "window", "uid")
        diff = [
            f"{n} {c!r} != {w!r}" for n, c, w in zip(names, claimed, wanted, strict=True) if c != w
        ]
        return Rejection(key, RejectReason.REPLAYED, f"{key}: manifest is for {', '.join(diff)}")
    if exp.codec is not None and m.codec != exp.codec:
        return Rejection(
            key, RejectReason.BAD_MANIFEST, f"{key}: codec {m.codec!r}, expected {exp.codec!r}"
        )
    if len(payload) != m.size or content_hash(payload) != m.sha256:
        return Rejection(
            key, RejectReason.HASH_MISMATCH, f"{key}: payload does not match the manifest's hash"
        )
    return VerifiedObject(
        key=key, manifest=m, info=info, body=body, payload_offset=len(body) - len(payload)
    )


def iter_fetch(
    jobs: Iterable[FetchJob],
    *,
    max_concurrent: int,
    max_inflight_bytes: int,
    deadline: Deadline,
) -> Iterator[tuple[int, FetchResult]]:
    """Fetch many uploads concurrently; yield ``(uid, result)`` as each finishes.

    At most ``max_concurrent`` fetches run at once, and downloads hold at most
    ``max_inflight_bytes`` between them (one larger object gets the whole budget alone). The
    bytes of a yielded result stay reserved until the consumer asks for the next one, so a
    consumer that drops each payload after use keeps memory bounded. Every uid gets exactly
    one result; those still running at the deadline get ``Rejection(deadline)``.
    """
    job_list = list(jobs)
    uids = [j.expected.uid for j in job_list]
    if len(set(uids)) != len(uids):
        raise ValueError("iter_fetch: each uid may appear in only one job")
    budget = ByteBudget(max_inflight_bytes)
    abandoned = threading.Event()
    done: queue.Queue[tuple[int, FetchResult, int]] = queue.Queue()

    def work(job: FetchJob) -> None:
        if abandoned.is_set():
            return
        try:
            result, held = _fetch(job.transport, job.key, job.expected, deadline, budget)
        except BaseException as exc:  # _fetch already catches everything; belt and braces
            result, held = Rejection(job.key, RejectReason.TRANSPORT_ERROR, repr(exc)), 0
        done.put((job.expected.uid, result, held))

    pending = {j.expected.uid: j.key for j in job_list}
    pool = ThreadPoolExecutor(
        max_workers=max(1, max_concurrent), thread_name_prefix="covenant-fetch"
    )
    try:
        for job in job_list:
            pool.submit(work, job)
        while pending:
            try:
                uid, result, held = done.get(timeout=deadline.remaining() + 0.05)
            except queue.Empty:
                break
            pending.pop(uid, None)
            try:
                yield uid, result
            except GeneratorExit:
                abandoned.set()
                budget.close()  # before the release below, so no waiter starts a download
                raise
            finally:
                budget.release(held)
        for uid, key in sorted(pending.items()):
            yield uid, Rejection(key, RejectReason.DEADLINE, f"{key}: not fetched by the deadline")
    finally:
        # a consumer that stops early (or the deadline) must not leave workers downloading
        abandoned.set()
        budget.close()
        pool.shutdown(wait=False, cancel_futures=True)


def fetch_many(
    jobs: Iterable[FetchJob],
    *,
    max_concurrent: int,
    max_inflight_bytes: int,
    deadline: Deadline,
) -> dict[int, FetchResult]:
    """:func:`iter_fetch` collected into ``{uid: result}`` (ascending uid).

    Holds every accepted payload at once; use :func:`iter_fetch` to process them one by one.
    """
    results = dict(
        iter_fetch(
            jobs,
            max_concurrent=max_concurrent,
            max_inflight_bytes=max_inflight_bytes,
            deadline=deadline,
        )
    )
    return dict(sorted(results.items()))
