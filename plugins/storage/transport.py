"""Transports: object storage rooted at one URL, over fsspec (SPEC section 6).

One class, :class:`FsspecTransport`, wraps any fsspec file system in a ``DirFileSystem`` rooted
at the URL's path, so keys are relative and :func:`~covenant.plugins.storage.keys.validate_key`
keeps them inside the root. Two subclasses change only what a backend needs:

* :class:`LocalTransport` (``file://``): atomic put as temp file + fsync + rename, so a reader
  never sees half an object and the storage timestamp is the rename's file's mtime;
* :class:`S3Transport` (``s3://``, AWS S3 and Cloudflare R2 through s3fs): raw
  ``head_object``/``get_object``/``put_object`` calls so that a ranged GET can be pinned to the
  ETag from the HEAD (``If-Match``) and every try is bounded by ``asyncio.wait_for``. s3fs's and
  botocore's own retries are switched off; :mod:`covenant.plugins.storage.retry` owns retries.

``memory://`` uses the base class unchanged (fsspec's memory store is process-global, which is
what tests want: two transports on one URL see the same objects).

Reads are bounded: :meth:`FsspecTransport.get` HEADs first, refuses an object over the caller's
cap before downloading a byte, reads objects up to ``single_get_max_bytes`` in one GET and larger
ones in parallel ranges, and resumes a truncated body from where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fsspec.implementations.dirfs import DirFileSystem

from covenant.engine.fs import atomic_write_bytes
from covenant.engine.protocols import ObjectInfo
from covenant.plugins.storage.config import Credentials, StorageConfig, resolve_credentials
from covenant.plugins.storage.errors import (
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageError,
    StorageTransportError,
)
from covenant.plugins.storage.keys import validate_key
from covenant.plugins.storage.retry import (
    Deadline,
    RetryPolicy,
    TruncatedReadError,
    call_with_retries,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_CHUNK = 4 << 20  # body read granularity: a truncated body resumes from a chunk boundary
SCHEMES = ("file", "memory", "s3")

# aliases: inside the classes ``list`` names the method, not the builtin
Chunks = list[bytes]
Infos = list[ObjectInfo]


@dataclass(frozen=True)
class TransportOptions:
    """The knobs of one transport (from ``[storage]``)."""

    retries: int = 3
    backoff_base_s: float = 1.0
    request_timeout_s: float = 60.0
    deadline_s: float = 90.0
    range_chunk_bytes: int = 64 << 20
    max_parallel_ranges: int = 8
    single_get_max_bytes: int = 1 << 30

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> TransportOptions:
        return cls(
            retries=cfg.retries,
            backoff_base_s=cfg.backoff_base_s,
            request_timeout_s=cfg.request_timeout_s,
            deadline_s=cfg.per_window_deadline_s,
            range_chunk_bytes=cfg.range_chunk_bytes,
            max_parallel_ranges=cfg.max_parallel_ranges,
            single_get_max_bytes=cfg.single_get_max_bytes,
        )

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(tries=self.retries, backoff_base_s=self.backoff_base_s)


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    raise StorageTransportError(f"storage returned no usable timestamp ({value!r})")


def _info_timestamp(info: dict[str, Any]) -> float | None:
    for field in ("LastModified", "mtime", "created"):
        if info.get(field) is not None:
            return _timestamp(info[field])
    return None


class FsspecTransport:
    """A :class:`~covenant.engine.protocols.Transport` over any fsspec file system.

    Every public method takes an optional ``deadline``; without one each call gets its own
    ``deadline_s`` budget. Failures raise typed :mod:`~covenant.plugins.storage.errors`.
    """

    def __init__(
        self, url: str, fs: Any, root: str, options: TransportOptions | None = None
    ) -> None:
        self.url = url
        self.root = root.rstrip("/") or "/"
        self.options = options or TransportOptions()
        self._fs = DirFileSystem(path=self.root, fs=fs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # ---------------------------------------------------------------------------------------
    # public API (the Transport protocol)
    # ---------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, deadline: Deadline | None = None) -> ObjectInfo:
        """Atomically store ``data`` under ``key``; returns the stored object's HEAD."""
        validate_key(key)
        dl = deadline or self._deadline()
        self._retry(f"PUT {key}", dl, lambda: self._put_once(key, data, self._timeout(dl)))
        info = self.head(key, deadline=dl)
        if info is None or info.size != len(data):
            raise StorageTransportError(f"PUT {key}: object not readable back after the upload")
        return info

    def head(self, key: str, *, deadline: Deadline | None = None) -> ObjectInfo | None:
        """Metadata of ``key`` (size, storage timestamp, ETag), or ``None`` if it is missing."""
        validate_key(key)
        dl = deadline or self._deadline()
        try:
            return self._retry(f"HEAD {key}", dl, lambda: self._head_once(key, self._timeout(dl)))
        except ObjectNotFoundError:
            return None

    def get(
        self,
        key: str,
        max_bytes: int,
        *,
        deadline: Deadline | None = None,
        info: ObjectInfo | None = None,
    ) -> bytes:
        """The body of ``key``, HEAD first (or ``info`` from the caller's own HEAD).

        Raises :class:`ObjectTooLargeError` before downloading when the object is over
        ``max_bytes``, :class:`ObjectNotFoundError` when it is missing. Never reads more than
        the HEAD's size, even if the object grows meanwhile; ranged reads are pinned to the
        HEAD's ETag where the backend has one.
        """
        validate_key(key)
        dl = deadline or self._deadline()
        if info is None:
            info = self.head(key, deadline=dl)
            if info is None:
                raise ObjectNotFoundError(f"GET {key}: not found")
        if info.size > max_bytes:
            raise ObjectTooLargeError(key, info.size, max_bytes)
        if info.size == 0:
            return b""
        opts = self.options
        if info.size <= opts.single_get_max_bytes:
            return self._read_range(key, 0, info.size, info.etag, dl)
        ranges = [
            (start, min(start + opts.range_chunk_bytes, info.size))
            for start in range(0, info.size, opts.range_chunk_bytes)
        ]
        with ThreadPoolExecutor(
            max_workers=min(opts.max_parallel_ranges, len(ranges)),
            thread_name_prefix="covenant-range",
        ) as pool:
            futures = [pool.submit(self._read_range, key, s, e, info.etag, dl) for s, e in ranges]
            try:
                parts = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return b"".join(parts)

    def list(self, prefix: str, *, deadline: Deadline | None = None) -> Infos:
        """Every object below the folder ``prefix`` (recursive), sorted by key."""
        validate_key(prefix, allow_prefix=True)
        dl = deadline or self._deadline()
        folder = prefix.rstrip("/")
        found = self._retry(
            f"LIST {prefix}", dl, lambda: self._list_once(folder, self._timeout(dl))
        )
        keep = [o for o in found if not any(p.startswith(".") for p in o.key.split("/"))]
        return sorted(keep, key=lambda o: o.key)

    def delete(self, key: str, *, deadline: Deadline | None = None) -> None:
        """Remove ``key``; a missing key is not an error."""
        validate_key(key)
        dl = deadline or self._deadline()
        try:
            self._retry(f"DELETE {key}", dl, lambda: self._delete_once(key, self._timeout(dl)))
        except ObjectNotFoundError:
            pass

    # ---------------------------------------------------------------------------------------
    # one try of each request; subclasses replace these
    # ---------------------------------------------------------------------------------------

    def _put_once(self, key: str, data: bytes, timeout: float) -> None:
        self._fs.pipe_file(key, data)

    def _head_once(self, key: str, timeout: float) -> ObjectInfo | None:
        info = self._fs.info(key)
        if info.get("type") != "file":
            raise FileNotFoundError(key)
        modified = _info_timestamp(info)
        if modified is None:
            modified = _timestamp(self._fs.modified(key))
        return ObjectInfo(key=key, size=int(info["size"]), modified=modified, etag=None)

    def _read_once(
        self, key: str, start: int, end: int, etag: str | None, sink: Chunks, timeout: float
    ) -> None:
        data = self._fs.cat_file(key, start=start, end=end)
        sink.append(bytes(data[: end - start]))

    def _list_once(self, folder: str, timeout: float) -> Infos:
        try:
            found = self._fs.find(folder, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for name, info in found.items():
            if info.get("type") != "file":
                continue
            key = name.lstrip("/")
            modified = _info_timestamp(info)
            if modified is None:
                modified = _timestamp(self._fs.modified(key))
            out.append(ObjectInfo(key=key, size=int(info["size"]), modified=modified))
        return out

    def _delete_once(self, key: str, timeout: float) -> None:
        self._fs.rm_file(key)

    # ---------------------------------------------------------------------------------------
    # shared machinery
    # ---------------------------------------------------------------------------------------

    def _deadline(self) -> Deadline:
        return Deadline(self.options.deadline_s)

    def _timeout(self, dl: Deadline) -> float:
        return dl.timeout(self.options.request_timeout_s)

    def _retry(self, what: str, dl: Deadline, fn: Callable[[], T]) -> T:
        return call_with_retries(fn, what=what, policy=self.options.policy, deadline=dl)

    def _read_range(self, key: str, start: int, end: int, etag: str | None, dl: Deadline) -> bytes:
        """Bytes ``[start, end)``; a try that stops early is resumed by the next one."""
        sink: Chunks = []

        def attempt() -> None:
            have = sum(len(c) for c in sink)
            self._read_once(key, start + have, end, etag, sink, self._timeout(dl))
            have = sum(len(c) for c in sink)
            if have < end - start:
                raise TruncatedReadError(f"body ended after {have} of {end - start} bytes")

        self._retry(f"GET {key} [{start}, {end})", dl, attempt)
        data = sink[0] if len(sink) == 1 else b"".join(sink)
        if len(data) != end - start:  # a backend that sent more than asked for
            raise StorageTransportError(f"GET {key}: got {len(data)} bytes, expected {end - start}")
        return data


class LocalTransport(FsspecTransport):
    """``file://``: atomic put (temp file in the same folder, fsync, ``os.replace``)."""

    def _put_once(self, key: str, data: bytes, timeout: float) -> None:
        final = Path(self._fs._join(key))
        final.parent.mkdir(parents=True, exist_ok=True)
        # the temporary name starts with '.', which no valid key part does, so listings skip it
        atomic_write_bytes(final, data)


async def _bounded(
    fn: Callable[..., Coroutine[Any, Any, T]], args: tuple[Any, ...], timeout: float
) -> T:
    return await asyncio.wait_for(fn(*args), timeout)


class S3Transport(FsspecTransport):
    """``s3://bucket/prefix`` over s3fs (AWS S3, Cloudflare R2, any S3-compatible endpoint)."""

    def __init__(
        self, url: str, fs: Any, root: str, options: TransportOptions | None = None
    ) -> None:
        super().__init__(url, fs, root, options)
        self._s3 = fs

    def _run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, timeout: float) -> T:
        from fsspec.asyn import sync

        return sync(self._s3.loop, _bounded, fn, args, timeout)  # type: ignore[no-any-return]

    def _split(self, key: str) -> tuple[str, str]:
        bucket, path, _ = self._s3.split_path(f"{self.root}/{key}")
        return bucket, path

    def _put_once(self, key: str, data: bytes, timeout: float) -> None:
        # s3fs: one PUT below 2 x its chunk size, else a multipart upload; both atomic on S3
        self._run(self._s3._pipe_file, f"{self.root}/{key}", data, timeout=timeout)

    def _head_once(self, key: str, timeout: float) -> ObjectInfo | None:
        bucket, path = self._split(key)
        out = self._run(self._head_call, bucket, path, timeout=timeout)
        return ObjectInfo(
            key=key,
            size=int(out["ContentLength"]),
            modified=_timestamp(out["LastModified"]),
            etag=out.get("ETag"),
        )

    async def _head_call(self, bucket: str, path: str) -> dict[str, Any]:
        return await self._s3._call_s3("head_object", Bucket=bucket, Key=path)  # type: ignore[no-any-return]

    def _read_once(
        self, key: str, start: int, end: int, etag: str | None, sink: Chunks, timeout: float
    ) -> None:
        bucket, path = self._split(key)
        self._run(self._read_call, bucket, path, start, end, etag, sink, timeout=timeout)

    async def _read_call(
        self, bucket: str, path: str, start: int, end: int, etag: str | None, sink: Chunks
    ) -> None:
        kwargs: dict[str, Any] = {"Range": f"bytes={start}-{end - 1}"}
        if etag:
            kwargs["IfMatch"] = etag
        resp = await self._s3._call_s3("get_object", Bucket=bucket, Key=path, **kwargs)
        body = resp["Body"]
        try:
            length = int(resp.get("ContentLength", -1))
            if length > end - start:
                raise StorageTransportError(
                    f"GET {path}: server ignored the range ({length} bytes for {end - start})"
                )
            need = end - start
            while need > 0:
                chunk = await body.read(min(need, READ_CHUNK))
                if not chunk:
                    break
                sink.append(chunk)  # kept across tries: the next try resumes after it
                need -= len(chunk)
        finally:
            body.close()

    def _list_once(self, folder: str, timeout: float) -> Infos:
        full = f"{self.root}/{folder}" if folder else self.root
        found = self._run(self._find_call, full, timeout=timeout)
        out = []
        for name, info in found.items():
            if info.get("type") != "file" or not name.startswith(self.root + "/"):
                continue
            out.append(
                ObjectInfo(
                    key=name[len(self.root) + 1 :],
                    size=int(info["size"]),
                    modified=_timestamp(info["LastModified"]),
                    etag=info.get("ETag"),
                )
            )
        return out

    async def _find_call(self, full: str) -> dict[str, dict[str, Any]]:
        return await self._s3._find(full, detail=True)  # type: ignore[no-any-return]

    def _delete_once(self, key: str, timeout: float) -> None:
        bucket, path = self._split(key)
        self._run(self._delete_call, bucket, path, timeout=timeout)

    async def _delete_call(self, bucket: str, path: str) -> None:
        await self._s3._call_s3("delete_object", Bucket=bucket, Key=path)


# --------------------------------------------------------------------------------------------
# opening a transport from a URL
# --------------------------------------------------------------------------------------------


def s3_filesystem(
    cfg: StorageConfig,
    credentials: Credentials | None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    r2: bool | None = None,
) -> Any:
    """An ``s3fs.S3FileSystem`` with covenant's timeouts and no retries of its own."""
    import s3fs

    r2 = cfg.r2 if r2 is None else r2
    config_kwargs: dict[str, Any] = {
        "connect_timeout": cfg.connect_timeout_s,
        "read_timeout": cfg.read_timeout_s,
        "retries": {"total_max_attempts": 1, "mode": "standard"},
    }
    if r2:  # R2 rejects botocore's default CRC32 request checksums
        config_kwargs["request_checksum_calculation"] = "when_required"
        config_kwargs["response_checksum_validation"] = "when_required"
    region = region or cfg.region or ("auto" if r2 else None)
    client_kwargs: dict[str, Any] = {"region_name": region} if region else {}
    fs = s3fs.S3FileSystem(
        key=credentials.key_id if credentials else None,
        secret=credentials.secret if credentials else None,
        endpoint_url=endpoint_url or cfg.endpoint_url,
        client_kwargs=client_kwargs,
        config_kwargs=config_kwargs,
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    fs.retries = 1  # covenant's retry loop is the only one (deadlines stay meaningful)
    return fs


def default_url(run_dir: Path) -> str:
    """The embedded default: ``file://<run dir>/storage``."""
    return (Path(run_dir) / "storage").resolve().as_uri()


def open_transport(
    url: str,
    cfg: StorageConfig | None = None,
    *,
    run_dir: Path | None = None,
    credentials: Credentials | None = None,
    environ: dict[str, str] | None = None,
    create: bool = True,
) -> FsspecTransport:
    """Open ``url`` (``file://``, ``memory://``, ``s3://``; ``""`` = the run's default).

    For ``s3://`` the credentials are ``credentials`` if given, else the config's or the
    environment's (:func:`~covenant.plugins.storage.config.resolve_credentials`). With
    ``create`` a ``file://`` root folder is created if missing (a writer's transport).
    """
    cfg = cfg or StorageConfig()
    options = TransportOptions.from_config(cfg)
    if url == "":
        if run_dir is None:
            raise StorageError("[storage] url is empty and no run directory is known")
        url = default_url(run_dir)
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "file":
        from fsspec.implementations.local import LocalFileSystem

        root = os.path.abspath(parts.netloc + parts.path) if parts.netloc else parts.path
        if not root or root == "/":
            raise StorageError(f"storage url {url!r}: refusing to use the file system root")
        if create:
            Path(root).mkdir(parents=True, exist_ok=True)
        return LocalTransport(url, LocalFileSystem(auto_mkdir=True), root, options)
    if scheme == "memory":
        from fsspec.implementations.memory import MemoryFileSystem

        root = "/" + (parts.netloc + parts.path).strip("/")
        if root == "/":
            raise StorageError(f"storage url {url!r}: name a store, e.g. memory://test")
        return FsspecTransport(url, MemoryFileSystem(), root, options)
    if scheme == "s3":
        bucket = parts.netloc
        if len(bucket) < 3:
            raise StorageError(f"storage url {url!r}: expected s3://bucket[/prefix]")
        prefix = parts.path.strip("/")
        if prefix:
            validate_key(prefix)
        creds = credentials or resolve_credentials(cfg, environ)
        fs = s3_filesystem(cfg, creds)
        return S3Transport(url, fs, f"{bucket}/{prefix}" if prefix else bucket, options)
    raise StorageError(f"storage url {url!r}: unsupported scheme (known: {', '.join(SCHEMES)})")
