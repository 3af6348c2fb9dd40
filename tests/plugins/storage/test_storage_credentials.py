"""The on-chain read-credential commitment: both layouts, strict parsing, read transports."""

from __future__ import annotations

import pytest
from _storage_helpers import CREDS, s3_transport
from bittensor.sp_core import Keypair
from hypothesis import given, settings
from hypothesis import strategies as st

from covenant.plugins.storage.config import StorageConfig
from covenant.plugins.storage.credentials import (
    COMMITMENT_MAX_BYTES,
    ReadCredentials,
    format_commitment,
    parse_commitment,
    r2_credentials,
    read_transport_for,
)
from covenant.plugins.storage.errors import CommitmentError
from covenant.plugins.storage.exchange import ExpectedUpload, fetch_verified, upload_signed
from covenant.plugins.storage.keys import RunKeys
from covenant.plugins.storage.transport import S3Transport

ACCOUNT = "0123456789abcdef0123456789abcdef"
KEY_ID = "fedcba9876543210fedcba9876543210"
SECRET = "a" * 32 + "b" * 32


def test_legacy_r2_layout() -> None:
    creds = parse_commitment(ACCOUNT + KEY_ID + SECRET)
    assert creds.url == f"s3://{ACCOUNT}"
    assert creds.endpoint_url == f"https://{ACCOUNT}.r2.cloudflarestorage.com"
    assert (creds.key_id, creds.secret, creds.region, creds.r2) == (KEY_ID, SECRET, "auto", True)
    assert format_commitment(creds) == ACCOUNT + KEY_ID + SECRET
    assert SECRET not in repr(creds)


def test_v1_layout_round_trips() -> None:
    text = "v1|https://s3.eu-west-1.amazonaws.com|my-bucket/run-1|AKIAIOSFODNN7EXAMPLE|wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert len(text) <= COMMITMENT_MAX_BYTES
    creds = parse_commitment(text)
    assert creds.url == "s3://my-bucket/run-1" and creds.region == "eu-west-1" and not creds.r2
    assert format_commitment(creds) == text
    r2 = ReadCredentials(
        url="s3://bucket",
        endpoint_url=f"https://{ACCOUNT}.r2.cloudflarestorage.com",
        key_id="k",
        secret="s",
    )
    assert format_commitment(r2).startswith("v1|")  # bucket is not the account id: v1 form
    assert parse_commitment(format_commitment(r2)).r2


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x" * 127,
        "x" * 129,
        ACCOUNT + KEY_ID + SECRET[:-1] + "!",
        "v1|",
        "v1|https://h|b|k",
        "v1|ftp://host|bucket|k|s",
        "v1|http://example.com|bucket|k|s",  # plain http to a remote host
        "v1|https://[|bucket|k|s",
        "v1|https://[::1|bucket|k|s",
        "v1|https://[1.2.3.4]|bucket|k|s",
        "v1|https://[not-v6]|bucket|k|s",
        "v1|https://host:0|bucket|k|s",
        "v1|file://[",  # an unclosed bracket escaped as ValueError from urlsplit
        "v1|https://user:pw@host|bucket|k|s",
        "v1|https://host/path|bucket|k|s",
        "v1|https://host:99999|bucket|k|s",
        "v1|https://host|BAD_BUCKET|k|s",
        "v1|https://host|bucket/../x|k|s",
        "v1|https://host|bucket|k y|s",
        "v1|https://host|bucket|k|s\x00",
        "v1|https://h\u00e9|bucket|k|s",
        "v1|file:///tmp/x",  # local stores only when allowed
        "v1|https://host|bucket|k|" + "s" * 120,
    ],
)
def test_garbage_is_a_typed_error(bad: str) -> None:
    with pytest.raises(CommitmentError):
        parse_commitment(bad)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=140), st.binary(max_size=20), st.integers(), st.none()))
def test_parser_never_crashes(value: object) -> None:
    try:
        parse_commitment(value)
        parse_commitment(value, allow_local=True)
    except CommitmentError:
        pass


def test_local_stores_when_allowed(tmp_path: object) -> None:
    creds = parse_commitment("v1|memory://peer-3/store", allow_local=True)
    assert creds.url == "memory://peer-3/store"
    assert parse_commitment("v1|file:///srv/peer", allow_local=True).url == "file:///srv/peer"
    for bad in ("v1|file://relative/x", "v1|file:///a/../b", "v1|memory://"):
        with pytest.raises(CommitmentError):
            parse_commitment(bad, allow_local=True)


def test_r2_credentials_are_checked() -> None:
    with pytest.raises(CommitmentError):
        r2_credentials("short", KEY_ID, SECRET)


def test_read_transport_reads_a_peer_bucket(
    moto_url: str, bucket: str, fast_cfg: StorageConfig
) -> None:
    alice = Keypair.create_from_uri("//Alice")
    keys = RunKeys("run", 1)
    writer = s3_transport(moto_url, bucket, fast_cfg, prefix="peer")
    upload_signed(
        writer,
        keys.gradient(1, 2),
        b"bytes",
        {"run": "run", "version": 1, "window": 1, "uid": 2, "codec": "c/1"},
        alice,
    )
    text = format_commitment(
        ReadCredentials(
            url=f"s3://{bucket}/peer",
            endpoint_url=moto_url,
            key_id=CREDS.key_id,
            secret=CREDS.secret,
        )
    )
    with pytest.raises(CommitmentError, match="loopback"):  # moto is local: refused by default
        read_transport_for(text, fast_cfg)
    reader = read_transport_for(text, fast_cfg, allow_local=True)
    assert isinstance(reader, S3Transport)
    result = fetch_verified(
        reader,
        keys.gradient(1, 2),
        ExpectedUpload(
            run="run", version=1, window=1, uid=2, hotkey=alice.ss58_address, max_bytes=10_000
        ),
    )
    assert result.ok


def test_read_transport_for_local_store_creates_nothing(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path)) / "peer"
    t = read_transport_for(f"v1|file://{root}", allow_local=True)
    assert t.head("x") is None and not root.exists()


PRIVATE_HOSTS = [
    "127.0.0.1",
    "127.0.0.1:9000",
    "127.1",  # inet_aton's short form
    "2130706433",  # decimal integer host
    "0x7f000001",  # hex integer host
    "0x7f.0.0.1",
    "0177.0.0.1",  # octal
    "0.0.0.0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata service
    "100.64.0.1",  # shared address space
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "[::1]",
    "[::]",
    "[fe80::1]",
    "[fd00:ec2::254]",  # AWS metadata over IPv6
    "[ff02::1]",
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:a9fe:a9fe]",
    "[64:ff9b::a9fe:a9fe]",  # NAT64 of the metadata address
    "[2002:7f00:1::]",  # 6to4 of loopback
    "[fe80::1%25eth0]",  # zone id
    "localhost",
    "localhost.",
    "LOCALHOST",
    "foo.localhost",
    "metadata.google.internal",
    "printer.local",
    "router.home.arpa",
    "metadata",  # a single label resolves through the search domains
    "host.123",  # numeric last label: read as an address by resolvers
    "08.8.8.8",
]


@pytest.mark.parametrize("host", PRIVATE_HOSTS)
def test_remote_endpoints_must_be_public_hosts(host: str) -> None:
    for scheme in ("https", "http"):
        with pytest.raises(CommitmentError, match=r"public hosts|https"):
            parse_commitment(f"v1|{scheme}://{host}|bucket|k|s")


@pytest.mark.parametrize(
    "host", [h for h in PRIVATE_HOSTS if h not in ("[fe80::1%25eth0]", "host.123", "08.8.8.8")]
)
def test_local_mode_allows_local_hosts_over_http(host: str) -> None:
    creds = parse_commitment(f"v1|http://{host}|bucket|k|s", allow_local=True)
    assert creds.endpoint_url is not None and creds.endpoint_url.startswith("http://")


@pytest.mark.parametrize(
    "host", ["s3.eu-west-1.amazonaws.com", "8.8.8.8", "[2001:4860:4860::8888]", "Example.COM"]
)
def test_public_hosts_are_allowed_over_https_only(host: str) -> None:
    creds = parse_commitment(f"v1|https://{host}:443|bucket|k|s")
    assert creds.endpoint_url == f"https://{host.lower()}:443"
    for local in (False, True):
        with pytest.raises(CommitmentError, match="http"):
            parse_commitment(f"v1|http://{host}|bucket|k|s", allow_local=local)


def test_public_address_in_another_encoding_is_refused() -> None:
    with pytest.raises(CommitmentError, match="canonically"):
        parse_commitment("v1|https://134744072|bucket|k|s")  # 8.8.8.8 as one integer
