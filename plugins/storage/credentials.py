"""The read-credential commitment a peer publishes on chain (SPEC section 6).

Each peer writes only to its own bucket (or prefix) and publishes, as its chain commitment, the
read-only credentials others use to fetch its uploads. Two forms are accepted:

* **legacy R2** (production's layout), exactly 128 characters, no separator::

      account_id (32) | read key id (32) | read secret (64)

  The account id doubles as the bucket name; the endpoint is
  ``https://{account_id}.r2.cloudflarestorage.com``.

* **v1**, for any S3-compatible endpoint (``|``-separated, ASCII)::

      v1|https://host[:port]|bucket[/prefix]|key_id|secret

  ``http://`` is accepted only for loopback hosts (tests, local S3 servers). For the embedded
  single-machine mode, ``v1|file:///abs/path`` and ``v1|memory://name`` name a local store; the
  parser accepts them only when asked to (``allow_local=True``), because a chain commitment must
  not make a validator read its own disk in production.

Limit: a commitment is at most :data:`COMMITMENT_MAX_BYTES` = 128 bytes, the largest ``Raw``
field of the chain's commitments pallet (``Raw0`` ... ``Raw128``), so it always fits one field.
An AWS example fits: ``v1|https://s3.eu-west-1.amazonaws.com|bucket/run|<20>|<40>`` is ~110.

:func:`parse_commitment` is the one place commitment strings are parsed; it is strict and raises
:class:`~covenant.plugins.storage.errors.CommitmentError` (never anything else) on garbage.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from covenant.plugins.storage.config import Credentials, StorageConfig
from covenant.plugins.storage.errors import CommitmentError, StorageKeyError
from covenant.plugins.storage.keys import validate_key
from covenant.plugins.storage.transport import (
    FsspecTransport,
    S3Transport,
    TransportOptions,
    open_transport,
    s3_filesystem,
)

COMMITMENT_MAX_BYTES = 128  # bittensor commitments: a Raw field holds at most 128 bytes
LEGACY_LENGTH = 128
V1 = "v1"
R2_ENDPOINT = "https://{account_id}.r2.cloudflarestorage.com"

_ALNUM32 = re.compile(r"^[A-Za-z0-9]{32}$")
_ALNUM64 = re.compile(r"^[A-Za-z0-9]{64}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SECRET = re.compile(r"^[A-Za-z0-9+/=_-]{1,100}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}$")
_AWS_REGION = re.compile(r"^s3[.-]([a-z0-9-]+)\.amazonaws\.com$")
_LOOPBACK_NAMES = {"localhost"}


@dataclass(frozen=True)
class ReadCredentials:
    """Where a peer's objects are and how to read them (parsed from its commitment)."""

    url: str  # s3://bucket[/prefix], or file:// / memory:// in the embedded mode
    endpoint_url: str | None = None
    key_id: str | None = None
    secret: str | None = None
    region: str | None = None
    r2: bool = False

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return (
            f"ReadCredentials(url={self.url!r}, endpoint_url={self.endpoint_url!r}, "
            f"key_id={self.key_id!r}, secret='**********', r2={self.r2})"
        )


def r2_credentials(account_id: str, key_id: str, secret: str) -> ReadCredentials:
    """Production's R2 layout: bucket = account id, endpoint from the account id."""
    if not (_ALNUM32.match(account_id) and _ALNUM32.match(key_id) and _ALNUM64.match(secret)):
        raise CommitmentError(
            "R2 credentials must be a 32-character account id, a 32-character key id and a "
            "64-character secret, all letters and digits"
        )
    return ReadCredentials(
        url=f"s3://{account_id.lower()}",
        endpoint_url=R2_ENDPOINT.format(account_id=account_id.lower()),
        key_id=key_id,
        secret=secret,
        region="auto",
        r2=True,
    )


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_endpoint(endpoint: str) -> tuple[str, str]:
    """``(endpoint, host)`` of a bare ``https://host[:port]`` URL, else CommitmentError."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError as exc:
        raise CommitmentError(f"commitment endpoint {endpoint!r} is not a URL: {exc}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not _HOST.match(host):
        raise CommitmentError(f"commitment endpoint {endpoint!r} must be https://host[:port]")
    if (
        parts.username
        or parts.password
        or parts.query
        or parts.fragment
        or parts.path not in ("", "/")
    ):
        raise CommitmentError(f"commitment endpoint {endpoint!r} must have no path or user part")
    if parts.scheme == "http" and not _is_loopback(host):
        raise CommitmentError(f"commitment endpoint {endpoint!r}: plain http only for loopback")
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}", host


def _region_for(host: str, r2: bool) -> str | None:
    if r2:
        return "auto"
    match = _AWS_REGION.match(host)
    return match.group(1) if match else None


def parse_commitment(text: object, *, allow_local: bool = False) -> ReadCredentials:
    """Parse a commitment string (legacy R2 or ``v1|...``); strict, typed errors only."""
    if not isinstance(text, str):
        raise CommitmentError(f"commitment must be a string, got {type(text).__name__}")
    if not text.isascii() or not text.isprintable():
        raise CommitmentError("commitment must be printable ASCII")
    if len(text) > COMMITMENT_MAX_BYTES:
        raise CommitmentError(
            f"commitment is {len(text)} bytes, over the limit of {COMMITMENT_MAX_BYTES}"
        )
    if not text.startswith(V1 + "|"):
        if len(text) != LEGACY_LENGTH:
            raise CommitmentError(
                f"commitment is neither v1|... nor the {LEGACY_LENGTH}-character R2 layout "
                f"({len(text)} characters)"
            )
        return r2_credentials(text[:32], text[32:64], text[64:])
    fields = text.split("|")
    if len(fields) == 2:
        return _parse_local(fields[1], allow_local)
    if len(fields) != 5:
        raise CommitmentError(
            f"v1 commitment needs 5 '|'-separated fields (v1|endpoint|bucket|key|secret), "
            f"got {len(fields)}"
        )
    _, endpoint, location, key_id, secret = fields
    endpoint, host = _check_endpoint(endpoint)
    bucket, _, prefix = location.partition("/")
    if not _BUCKET.match(bucket):
        raise CommitmentError(f"commitment bucket {bucket!r} is not a valid bucket name")
    if prefix:
        try:
            validate_key(prefix)
        except StorageKeyError as exc:
            raise CommitmentError(f"commitment prefix: {exc}") from None
    if not _KEY_ID.match(key_id):
        raise CommitmentError("commitment key id must be 1-64 letters, digits, '_' or '-'")
    if not _SECRET.match(secret):
        raise CommitmentError("commitment secret must be 1-100 characters of [A-Za-z0-9+/=_-]")
    r2 = host.endswith(".r2.cloudflarestorage.com")
    return ReadCredentials(
        url=f"s3://{location}",
        endpoint_url=endpoint,
        key_id=key_id,
        secret=secret,
        region=_region_for(host, r2),
        r2=r2,
    )


def _parse_local(url: str, allow_local: bool) -> ReadCredentials:
    if not allow_local:
        raise CommitmentError("commitment names a local store, which this reader does not allow")
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.path.startswith("/") and not parts.netloc:
        path = parts.path.rstrip("/")
        if path and ".." not in path.split("/") and "\\" not in path:
            return ReadCredentials(url=f"file://{path}")
    if parts.scheme == "memory" and parts.netloc:
        try:
            validate_key(parts.netloc + parts.path.rstrip("/"))
        except StorageKeyError as exc:
            raise CommitmentError(f"commitment store name: {exc}") from None
        return ReadCredentials(url=f"memory://{parts.netloc}{parts.path.rstrip('/')}")
    raise CommitmentError(
        f"commitment local store {url!r} must be file:///abs/path or memory://name"
    )


def format_commitment(creds: ReadCredentials) -> str:
    """The commitment string for ``creds``: the legacy layout where it fits, else ``v1``."""
    parts = urlsplit(creds.url)
    if parts.scheme in ("file", "memory"):
        text = f"{V1}|{creds.url}"
    else:
        if parts.scheme != "s3" or not creds.endpoint_url or not creds.key_id or not creds.secret:
            raise CommitmentError("an s3 commitment needs an s3:// url, an endpoint and a key pair")
        location = (parts.netloc + parts.path).rstrip("/")
        legacy_endpoint = R2_ENDPOINT.format(account_id=parts.netloc)
        if (
            creds.endpoint_url == legacy_endpoint
            and location == parts.netloc
            and _ALNUM32.match(parts.netloc)
            and _ALNUM32.match(creds.key_id)
            and _ALNUM64.match(creds.secret)
        ):
            text = f"{parts.netloc}{creds.key_id}{creds.secret}"
        else:
            text = f"{V1}|{creds.endpoint_url}|{location}|{creds.key_id}|{creds.secret}"
    parse_commitment(text, allow_local=True)  # what we publish must parse back
    return text


def read_transport_for(
    commitment: str, config: StorageConfig | None = None, *, allow_local: bool = False
) -> FsspecTransport:
    """A read transport for the peer that published ``commitment``.

    Uses ``config``'s timeouts, retries and caps but the commitment's endpoint and keys.
    A local store is opened read-only in spirit: its folder is not created.
    """
    creds = parse_commitment(commitment, allow_local=allow_local)
    cfg = config or StorageConfig()
    if not creds.url.startswith("s3://"):
        return open_transport(creds.url, cfg, create=False)
    if creds.key_id is None or creds.secret is None:  # parse_commitment guarantees both
        raise CommitmentError("an s3 commitment needs a key pair")
    fs = s3_filesystem(
        cfg,
        Credentials(key_id=creds.key_id, secret=creds.secret),
        endpoint_url=creds.endpoint_url,
        region=creds.region,
        r2=creds.r2,
    )
    return S3Transport(
        creds.url, fs, creds.url.removeprefix("s3://"), TransportOptions.from_config(cfg)
    )
