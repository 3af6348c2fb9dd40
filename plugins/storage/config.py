"""``[storage]``: where this peer's objects live and how untrusted objects are read.

Every number here is a SPEC section 6 default (or, where SPEC is silent, a documented choice).
Credentials are :class:`pydantic.SecretStr`, so the resolved-config dump shows ``**********``
instead of a key; they may also come from the environment (see :func:`resolve_credentials`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, SecretStr

MiB = 1 << 20
GiB = 1 << 30

#: Environment variables read for the write credentials, first match wins (after the config).
ENV_KEY_ID = ("COVENANT_S3_KEY", "AWS_ACCESS_KEY_ID")
ENV_SECRET = ("COVENANT_S3_SECRET", "AWS_SECRET_ACCESS_KEY")


class StorageConfig(BaseModel):
    """``[storage]`` section (SPEC section 6)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        "",
        description="where this peer writes: file:///path, memory://name, s3://bucket/prefix; "
        "empty = file://<run dir>/storage (the embedded default)",
    )
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (R2: https://<account>.r2.cloudflarestorage.com)"
    )
    region: str | None = Field(None, description="S3 region (R2: auto); unset = botocore default")
    access_key_id: SecretStr | None = Field(
        None, description="write key id; else $COVENANT_S3_KEY or $AWS_ACCESS_KEY_ID"
    )
    secret_access_key: SecretStr | None = Field(
        None, description="write secret; else $COVENANT_S3_SECRET or $AWS_SECRET_ACCESS_KEY"
    )
    r2: bool = Field(
        False, description="Cloudflare R2: send checksums only when required (R2 rejects CRC32)"
    )
    local_peers: bool = Field(
        False,
        description="accept peers' commitments naming a local store (file://, memory://) or a "
        "loopback endpoint: the single-machine swarm and tests; never on a real network",
    )
    max_object_bytes: int = Field(
        GiB, gt=0, description="cap for reads whose caller gives no exact cap (gradients do)"
    )
    manifest_max_bytes: int = Field(64 * 1024, gt=0, description="cap on an object's header")
    upload_grace_s: int = Field(
        70, ge=0, description="upload interval length after t(start of w+1)"
    )
    retention_windows: int = Field(100, ge=1, description="own uploads older than this are deleted")
    retention_protect_windows: int = Field(
        20,
        ge=0,
        description="never delete an own upload named in an aggregate record of the last N "
        "windows (twice the checkpoint interval: a late joiner replays from there)",
    )
    retries: int = Field(3, ge=1, description="tries per request (first try included)")
    backoff_base_s: float = Field(
        1.0, ge=0, description="scale of the backoff 2^a + U(0,1) seconds between tries"
    )
    per_window_deadline_s: float = Field(
        90.0, gt=0, description="everything one window reads must finish within this"
    )
    request_timeout_s: float = Field(60.0, gt=0, description="one request (one try) at most")
    connect_timeout_s: float = Field(10.0, gt=0, description="S3 connect timeout")
    read_timeout_s: float = Field(30.0, gt=0, description="S3 socket idle timeout")
    range_chunk_bytes: int = Field(64 * MiB, gt=0, description="size of one ranged GET")
    max_parallel_ranges: int = Field(8, ge=1, description="ranged GETs of one object at once")
    single_get_max_bytes: int = Field(GiB, gt=0, description="objects up to this in one GET")
    max_concurrent_peers: int = Field(16, ge=1, description="peers fetched at once")
    max_inflight_bytes: int = Field(
        2 * GiB, gt=0, description="payload bytes held by downloads in flight (bounded memory)"
    )


@dataclass(frozen=True)
class Credentials:
    """An S3 key pair, resolved from the config or the environment."""

    key_id: str
    secret: str

    def __repr__(self) -> str:  # never print a secret, even in a traceback
        return f"Credentials(key_id={self.key_id!r}, secret='**********')"


def resolve_credentials(
    cfg: StorageConfig, environ: Mapping[str, str] | None = None
) -> Credentials | None:
    """The write credentials: config first, then ``$COVENANT_S3_*``, then ``$AWS_*``.

    ``None`` means "let botocore find them" (instance profile, ``~/.aws``...).
    """
    env = os.environ if environ is None else environ
    key = cfg.access_key_id.get_secret_value() if cfg.access_key_id else None
    secret = cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None
    key = key or next((env[n] for n in ENV_KEY_ID if env.get(n)), None)
    secret = secret or next((env[n] for n in ENV_SECRET if env.get(n)), None)
    if key and secret:
        return Credentials(key_id=key, secret=secret)
    return None
