"""The read-credential commitment a peer publishes on chain (SPEC section 6).

Each peer writes only to its own bucket (or prefix) and publishes, as its chain commitment, the
read-only credentials others use to fetch its uploads. Two forms are accepted:

* **legacy R2** (production's layout), exactly 128 characters, no separator::

      account_id (32) | read key id (32) | read secret (64)

  The account id doubles as the bucket name; the endpoint is
  ``https://{account_id}.r2.cloudflarestorage.com``.

* **v1**, for any S3-compatible endpoint (``|``-separated, ASCII)::

      v1|https://host[:port]|bucket[/prefix]|key_id|secret

  For the embedded single-machine mode, ``v1|file:///abs/path`` and ``v1|memory://name`` name a
  local store; the parser accepts them only when asked to (``allow_local=True``), because a chain
  commitment must not make a validator read its own disk in production.

**Endpoint policy.** A commitment is written by anyone and every miner and validator connects to
its endpoint, so a hostile one could point them all at a cloud metadata service or a host on
their internal network (server-side request forgery). Unless the local mode is enabled
(``allow_local=True``: the local swarm, tests against a local S3 server), an endpoint must be
``https://`` to a host that is public *by its literal form*: an IP literal must be a global
unicast address (in any encoding a resolver would accept: ``2130706433``, ``0x7f.1``,
``0177.0.0.1`` and ``[::ffff:127.0.0.1]`` are refused as the loopback address they are) and a
name must be a dotted DNS name outside the special-use suffixes (``localhost``, ``local``,
``internal``, ...). Names are not resolved here (a public name may still resolve to a private
address; see docs/SECURITY.md). In the local mode any host is allowed and ``http://`` too, but
only to a local host.

Limit: a commitment is at most :data:`COMMITMENT_MAX_BYTES` = 128 bytes, the largest ``Raw``
field of the chain's commitments pallet (``Raw0`` ... ``Raw128``), so it always fits one field.
An AWS example fits: ``v1|https://s3.eu-west-1.amazonaws.com|bucket/run|<20>|<40>`` is ~110.

:func:`parse_commitment` is the one place commitment strings are parsed; it is strict and raises
:class:`~covenant.plugins.storage.errors.CommitmentError` (never anything else) on garbage.
"""

from __future__ import annotations

import ipaddress
import re
import socket
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
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_AWS_REGION = re.compile(r"^s3[.-]([a-z0-9-]+)\.amazonaws\.com$")
# special-use and private-network suffixes (RFC 6761, 6762, 8375; ICANN's ".internal"): they name
# this machine or a host of its own network, never a peer's public bucket
_LOCAL_SUFFIXES = ("localhost", "local", "internal", "home.arpa", "localdomain", "lan", "invalid")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


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


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` denotes if it is an IP literal in *any* form a resolver accepts.

    ``ipaddress`` only reads canonical dotted quads, but ``getaddrinfo`` (and so botocore) also
    reads ``inet_aton``'s forms: ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        return None  # an IPv6 literal that ipaddress refused: not an address, not a name
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def _address_problem(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``addr`` is not a public unicast address, or ``None`` if it is."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return "has a zone id"
        inner = _embedded_v4(addr)
        if inner is not None:
            problem = _address_problem(inner)
            return f"embeds {inner}, which {problem}" if problem else None
    for flag, what in (
        ("is_unspecified", "is unspecified"),
        ("is_loopback", "is loopback"),
        ("is_link_local", "is link-local"),
        ("is_multicast", "is multicast"),
        ("is_private", "is private"),
        ("is_reserved", "is reserved"),
    ):
        if getattr(addr, flag):
            return what
    if not addr.is_global:  # e.g. shared address space 100.64.0.0/10
        return "is not a global address"
    return None


def _is_local_name(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in _LOCAL_SUFFIXES)


def _host_problem(host: str) -> str | None:
    """Why ``host`` (lower case, no brackets) is not a public host by its literal form."""
    addr = _ip_literal(host)
    if addr is not None:
        problem = _address_problem(addr)
        if problem:
            return f"address {addr} {problem}"
        if str(addr) != host:
            return f"an IP address must be written canonically ({addr})"
        return None
    name = host.removesuffix(".")
    labels = name.split(".")
    if len(labels) < 2:  # a bare name resolves through the search domains: an internal host
        return "is a single-label name"
    if not all(_LABEL.match(label) for label in labels):
        return "is not a valid DNS name"
    if labels[-1].isdigit():  # a numeric last label is read as an address, never a TLD
        return "ends in a numeric label"
    if _is_local_name(name):
        return "is a local or special-use name"
    return None


def _is_local_host(host: str) -> bool:
    """Whether ``host`` is this machine or its network (where the local mode may use http)."""
    addr = _ip_literal(host)
    if addr is not None:
        return _address_problem(addr) is not None
    name = host.removesuffix(".")
    return "." not in name or _is_local_name(name)


def _check_endpoint(endpoint: str, allow_local: bool) -> tuple[str, str]:
    """``(endpoint, host)`` of a bare ``https://host[:port]`` URL, else CommitmentError."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
        host = (parts.hostname or "").lower()
    except ValueError as exc:
        raise CommitmentError(f"commitment endpoint {endpoint!r} is not a URL: {exc}") from None
    v6 = parts.netloc.rpartition("@")[2].startswith("[")
    if (
        parts.scheme not in ("https", "http")
        or not (_HOST.match(host) or (v6 and ":" in host))
        or port == 0
    ):
        raise CommitmentError(f"commitment endpoint {endpoint!r} must be https://host[:port]")
    if (
        parts.username
        or parts.password
        or parts.query
        or parts.fragment
        or parts.path not in ("", "/")
    ):
        raise CommitmentError(f"commitment endpoint {endpoint!r} must have no path or user part")
    if v6 and not isinstance(_ip_literal(host), ipaddress.IPv6Address):
        raise CommitmentError(f"commitment endpoint {endpoint!r}: not an IPv6 address")
    if allow_local:
        if parts.scheme == "http" and not _is_local_host(host):
            raise CommitmentError(
                f"commitment endpoint {endpoint!r}: plain http only for a local host"
            )
    else:
        problem = _host_problem(host)
        if problem:
            raise CommitmentError(
                f"commitment endpoint {endpoint!r}: host {problem}; remote endpoints must be "
                "public hosts (private and local addresses only in the local mode)"
            )
        if parts.scheme != "https":
            raise CommitmentError(f"commitment endpoint {endpoint!r}: remote endpoints need https")
    shown = f"[{host}]" if v6 else host
    netloc = f"{shown}:{port}" if port is not None else shown
    return f"{parts.scheme}://{netloc}", host


def _region_for(host: str, r2: bool) -> str | None:
    if r2:
        return "auto"
    match = _AWS_REGION.match(host)
    return match.group(1) if match else None


def parse_commitment(text: object, *, allow_local: bool = False) -> ReadCredentials:
    """Parse a commitment string (legacy R2 or ``v1|...``); strict, typed errors only.

    ``allow_local`` enables the local mode: ``file://``/``memory://`` stores, and endpoints on
    loopback or private hosts (over ``http://`` too). Off, the endpoint must be a public host
    (see the module docstring).
    """
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
    endpoint, host = _check_endpoint(endpoint, allow_local)
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
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. 'file://[' (an unclosed IPv6 bracket)
        raise CommitmentError(f"commitment local store {url!r} is not a URL: {exc}") from None
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
