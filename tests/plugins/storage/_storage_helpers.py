"""Plain helpers shared by the storage tests (imported by name; conftest holds only fixtures)."""

from __future__ import annotations

from covenant.plugins.storage.config import Credentials, StorageConfig
from covenant.plugins.storage.transport import FsspecTransport, open_transport

CREDS = Credentials(key_id="testing", secret="testing")


def s3_transport(
    endpoint_url: str, bucket: str, cfg: StorageConfig, prefix: str = "root"
) -> FsspecTransport:
    cfg = cfg.model_copy(update={"endpoint_url": endpoint_url})
    return open_transport(f"s3://{bucket}/{prefix}", cfg, credentials=CREDS)
