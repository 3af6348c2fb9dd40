"""The storage plugin's hook implementations (entry point ``storage``).

Contributes the ``[storage]`` section, provides transports for ``file://``, ``memory://`` and
``s3://`` URLs (and the empty URL, meaning the run's embedded ``file://<run dir>/storage``), and
the run's :class:`~covenant.engine.protocols.Exchange` (signed uploads, sync samples, peer lists,
aggregate records, score records, checkpoints).
Heavy imports (fsspec, s3fs) happen inside the hooks so the CLI starts fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from covenant.engine.hookspecs import hookimpl
from covenant.plugins.storage.config import StorageConfig

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.services import Services
    from covenant.plugins.storage.run_exchange import StorageExchange
    from covenant.plugins.storage.transport import FsspecTransport

HANDLED_SCHEMES = ("file", "memory", "s3")


def storage_url(config: Config) -> str:
    """The configured ``[storage] url``, with the empty default resolved to the run dir."""
    from covenant.plugins.storage.transport import default_url

    url = config.typed("storage", StorageConfig).url
    return url or default_url(Path(config.section("run").dir))


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("storage", StorageConfig)


@hookimpl
def covenant_transport(url: str, config: Config) -> FsspecTransport | None:
    """Open ``url`` if its scheme is ours (``""`` = the run's default), else ``None``."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if url and scheme not in HANDLED_SCHEMES:
        return None
    from covenant.plugins.storage.transport import open_transport

    cfg = config.typed("storage", StorageConfig) if config.has("storage") else StorageConfig()
    run_dir: Any = Path(config.section("run").dir) if config.has("run") else None
    return open_transport(url, cfg, run_dir=run_dir)


@hookimpl
def covenant_exchange(config: Config, services: Services) -> StorageExchange | None:
    """The run's signed records in this process's bucket and the peers' (``Services.exchange``)."""
    if not config.has("storage"):
        return None
    from covenant.plugins.storage.run_exchange import StorageExchange

    return StorageExchange.from_config(config, services)


@hookimpl
def covenant_register_commands(register: Callable[[str, Any], None]) -> None:
    from covenant.plugins.storage.cli import app

    register("storage", app)
