"""Transport parity: the same behaviour over memory://, file:// and s3:// (moto)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from covenant.engine.protocols import Transport
from covenant.plugins.storage.config import StorageConfig
from covenant.plugins.storage.errors import (
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageError,
    StorageKeyError,
)
from covenant.plugins.storage.transport import (
    FsspecTransport,
    LocalTransport,
    TransportOptions,
    default_url,
    open_transport,
)


def test_is_a_transport(transport: FsspecTransport) -> None:
    assert isinstance(transport, Transport)


def test_put_head_get_delete(transport: FsspecTransport) -> None:
    before = time.time()
    info = transport.put("a/b/c", b"hello")
    assert info.key == "a/b/c" and info.size == 5
    assert before - 2 <= info.modified <= time.time() + 2
    head = transport.head("a/b/c")
    assert head is not None and head.size == 5 and int(head.modified) == int(info.modified)
    assert transport.get("a/b/c", max_bytes=5) == b"hello"
    transport.put("a/b/c", b"replaced")  # overwrite is allowed (same key, new bytes)
    assert transport.get("a/b/c", max_bytes=100) == b"replaced"
    transport.delete("a/b/c")
    assert transport.head("a/b/c") is None
    transport.delete("a/b/c")  # missing is not an error


def test_missing_objects(transport: FsspecTransport) -> None:
    assert transport.head("nope/x") is None
    with pytest.raises(ObjectNotFoundError):
        transport.get("nope/x", max_bytes=10)
    assert transport.list("nope/") == []


def test_empty_object(transport: FsspecTransport) -> None:
    transport.put("empty", b"")
    assert transport.get("empty", max_bytes=0) == b""


def test_cap_is_checked_before_download(transport: FsspecTransport) -> None:
    transport.put("big", b"x" * 1000)
    with pytest.raises(ObjectTooLargeError) as err:
        transport.get("big", max_bytes=999)
    assert err.value.size == 1000 and err.value.max_bytes == 999


def test_list_is_recursive_sorted_and_scoped(transport: FsspecTransport) -> None:
    for key in ["r/v1/gradient/2/1", "r/v1/gradient/1/1", "r/v1/peers/1", "other/x"]:
        transport.put(key, key.encode())
    keys = [o.key for o in transport.list("r/v1/gradient/")]
    assert keys == ["r/v1/gradient/1/1", "r/v1/gradient/2/1"]
    assert [o.key for o in transport.list("r/v1/gradient")] == keys
    assert {o.key for o in transport.list("")} >= {"other/x", "r/v1/peers/1"}
    sizes = {o.key: o.size for o in transport.list("r/")}
    assert sizes["r/v1/peers/1"] == len(b"r/v1/peers/1")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\\b", "a//b", ".x"])
def test_bad_keys_never_touch_storage(transport: FsspecTransport, bad: str) -> None:
    with pytest.raises(StorageKeyError):
        transport.put(bad, b"x")
    with pytest.raises(StorageKeyError):
        transport.head(bad)
    with pytest.raises(StorageKeyError):
        transport.get(bad, 10)
    with pytest.raises(StorageKeyError):
        transport.delete(bad)
    with pytest.raises(StorageKeyError):
        transport.list(bad + "/")
    assert transport.list("") == []


def test_ranged_reads_reassemble_large_objects(backend: str, transport: FsspecTransport) -> None:
    transport.options = TransportOptions(
        single_get_max_bytes=1000, range_chunk_bytes=333, max_parallel_ranges=3, backoff_base_s=0.01
    )
    data = os.urandom(3000)
    transport.put("big", data)
    assert transport.get("big", max_bytes=len(data)) == data


def test_local_put_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    t = open_transport((tmp_path / "s").as_uri())
    assert isinstance(t, LocalTransport)
    t.put("r/v1/gradient/1/2", b"abc")
    files = sorted(
        p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*") if p.is_file()
    )
    assert files == ["r/v1/gradient/1/2"]


def test_local_root_is_not_left(tmp_path: Path) -> None:
    t = open_transport((tmp_path / "s").as_uri())
    (tmp_path / "secret").write_bytes(b"s")
    with pytest.raises(StorageKeyError):
        t.get("../secret", 10)
    assert (tmp_path / "secret").read_bytes() == b"s"


def test_memory_stores_with_one_url_share_objects() -> None:
    a = open_transport("memory://shared-test/x")
    b = open_transport("memory://shared-test/x")
    a.put("k", b"v")
    assert b.get("k", 1) == b"v"
    a.delete("k")


def test_urls(tmp_path: Path) -> None:
    assert default_url(tmp_path / "run") == (tmp_path / "run" / "storage").resolve().as_uri()
    t = open_transport("", StorageConfig(), run_dir=tmp_path / "run")
    assert t.url.startswith("file://") and (tmp_path / "run" / "storage").is_dir()
    with pytest.raises(StorageError, match="unsupported scheme"):
        open_transport("gopher://x")
    with pytest.raises(StorageError):
        open_transport("")
    with pytest.raises(StorageError):
        open_transport("s3://a")
    with pytest.raises(StorageError):
        open_transport("memory://")
