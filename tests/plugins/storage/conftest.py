"""Fixtures for the storage tests: a real S3 endpoint (moto's server mode on loopback, port 0),
a fault-injecting proxy in front of it, and one transport per backend for parity tests.

In-process ``moto.mock_aws`` does not patch aiobotocore, so s3fs needs this real HTTP server.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _storage_helpers import s3_transport
from faultproxy import FaultProxy

from covenant.plugins.storage.config import StorageConfig
from covenant.plugins.storage.transport import FsspecTransport, open_transport


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[tuple[str, int]]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield host, port
    server.stop()


@pytest.fixture(scope="session")
def moto_url(moto_endpoint: tuple[str, int]) -> str:
    host, port = moto_endpoint
    return f"http://{host}:{port}"


def make_bucket(endpoint_url: str) -> str:
    import boto3

    name = f"covenant-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(moto_url: str) -> str:
    return make_bucket(moto_url)


@pytest.fixture
def fast_cfg() -> StorageConfig:
    """Test timings: tiny backoff, short timeouts."""
    return StorageConfig(
        backoff_base_s=0.01,
        per_window_deadline_s=20.0,
        request_timeout_s=5.0,
        read_timeout_s=2.0,
        connect_timeout_s=2.0,
    )


@pytest.fixture
def fault_proxy(moto_endpoint: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(*moto_endpoint) as proxy:
        yield proxy


@pytest.fixture(params=["memory", "file", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def transport(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, fast_cfg: StorageConfig
) -> FsspecTransport:
    """The same suite runs over ``memory://``, ``file://`` and ``s3://`` (moto)."""
    if backend == "memory":
        return open_transport(f"memory://t-{uuid.uuid4().hex[:12]}/root", fast_cfg)
    if backend == "file":
        return open_transport((tmp_path / "store").as_uri(), fast_cfg)
    moto_url: Any = request.getfixturevalue("moto_url")
    return s3_transport(moto_url, make_bucket(moto_url), fast_cfg)
