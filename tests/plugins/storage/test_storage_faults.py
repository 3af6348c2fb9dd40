"""Fault injection: throttling, resets, truncated and slow bodies between s3fs and moto."""

from __future__ import annotations

import os
import time

import pytest
from _storage_helpers import s3_transport
from faultproxy import FaultProxy, Rule

from covenant.plugins.storage.config import StorageConfig
from covenant.plugins.storage.errors import (
    ObjectChangedError,
    StorageDeadlineError,
    StorageTransportError,
)
from covenant.plugins.storage.retry import Deadline
from covenant.plugins.storage.transport import FsspecTransport

KEY_PATH = r"/root/obj"


@pytest.fixture
def proxied(fault_proxy: FaultProxy, bucket: str, fast_cfg: StorageConfig) -> FsspecTransport:
    return s3_transport(fault_proxy.url, bucket, fast_cfg)


def _methods(proxy: FaultProxy) -> list[str]:
    return [s.method for s in proxy.seen if "/root/obj" in s.path]


def test_throttled_put_is_retried(proxied: FsspecTransport, fault_proxy: FaultProxy) -> None:
    fault_proxy.add(Rule("503", method="PUT", path=KEY_PATH, times=2))
    proxied.put("obj", b"data")
    assert _methods(fault_proxy).count("PUT") == 3
    fault_proxy.add(Rule("429", method="HEAD", path=KEY_PATH, times=1))
    assert proxied.head("obj") is not None


def test_persistent_throttling_fails_clearly(
    proxied: FsspecTransport, fault_proxy: FaultProxy
) -> None:
    fault_proxy.add(Rule("503", method="PUT", path=KEY_PATH, times=-1))
    with pytest.raises(StorageTransportError, match="failed after 3 tries"):
        proxied.put("obj", b"data")
    assert _methods(fault_proxy).count("PUT") == 3


def test_connection_reset_is_retried(proxied: FsspecTransport, fault_proxy: FaultProxy) -> None:
    proxied.put("obj", b"payload" * 100)
    fault_proxy.clear()
    fault_proxy.add(Rule("reset", method="GET", path=KEY_PATH, times=1))
    assert proxied.get("obj", 10_000) == b"payload" * 100
    assert _methods(fault_proxy) == ["HEAD", "GET", "GET"]


def test_truncated_body_is_resumed(proxied: FsspecTransport, fault_proxy: FaultProxy) -> None:
    data = os.urandom(3 << 20)
    proxied.put("obj", data)
    fault_proxy.clear()
    fault_proxy.add(Rule("truncate", method="GET", path=KEY_PATH, times=1, fraction=0.5))
    assert proxied.get("obj", len(data)) == data
    gets = [s for s in fault_proxy.seen if s.method == "GET"]
    assert len(gets) == 2
    assert gets[0].headers["Range"] == f"bytes=0-{len(data) - 1}"
    resumed_from, resumed_to = gets[1].headers["Range"].removeprefix("bytes=").split("-")
    assert 0 < int(resumed_from) <= len(data) // 2  # resumed, not restarted
    assert int(resumed_to) == len(data) - 1


def test_head_comes_first_and_ranges_are_pinned(
    proxied: FsspecTransport, fault_proxy: FaultProxy
) -> None:
    from covenant.plugins.storage.transport import TransportOptions

    proxied.options = TransportOptions(
        single_get_max_bytes=1000, range_chunk_bytes=400, max_parallel_ranges=2, backoff_base_s=0.01
    )
    data = os.urandom(1500)
    info = proxied.put("obj", data)
    fault_proxy.clear()
    assert proxied.get("obj", 2000) == data
    seen = [s for s in fault_proxy.seen if "/root/obj" in s.path]
    assert seen[0].method == "HEAD"
    gets = [s for s in seen if s.method == "GET"]
    assert sorted(g.headers["Range"] for g in gets) == [
        "bytes=0-399",
        "bytes=1200-1499",
        "bytes=400-799",
        "bytes=800-1199",
    ]
    assert {g.headers.get("If-Match") for g in gets} == {info.etag}


def test_replaced_object_is_detected(proxied: FsspecTransport) -> None:
    old = proxied.put("obj", b"first version")
    proxied.put("obj", b"second version!")
    with pytest.raises(ObjectChangedError):
        proxied.get("obj", 100, info=old)


def test_slow_body_is_cut_by_the_request_timeout_and_retried(
    fault_proxy: FaultProxy, bucket: str, fast_cfg: StorageConfig
) -> None:
    t = s3_transport(
        fault_proxy.url, bucket, fast_cfg.model_copy(update={"request_timeout_s": 0.5})
    )
    t.put("obj", b"z" * 5000)
    fault_proxy.add(Rule("slow", method="GET", path=KEY_PATH, times=1, pieces=10, delay_s=0.3))
    assert t.get("obj", 10_000) == b"z" * 5000
    assert _methods(fault_proxy).count("GET") >= 2


def test_deadline_bounds_a_stalled_download(
    fault_proxy: FaultProxy, bucket: str, fast_cfg: StorageConfig
) -> None:
    t = s3_transport(fault_proxy.url, bucket, fast_cfg)
    t.put("obj", b"z" * 5000)
    fault_proxy.add(Rule("slow", method="GET", path=KEY_PATH, times=-1, pieces=50, delay_s=0.2))
    start = time.monotonic()
    with pytest.raises(StorageDeadlineError):
        t.get("obj", 10_000, deadline=Deadline(1.0))
    assert time.monotonic() - start < 2.0


def test_no_retry_on_missing_objects(proxied: FsspecTransport, fault_proxy: FaultProxy) -> None:
    assert proxied.head("obj") is None
    assert _methods(fault_proxy) == ["HEAD"]
