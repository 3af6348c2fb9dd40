"""Start-up: read the config file, load the allowed plugins, validate every section.

This is the one place that turns ``--config FILE --set ...`` into a ready :class:`Session`
(a plugin host plus a resolved config). The CLI and :mod:`covenant.engine.testing` both use it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covenant.engine.config import (
    Config,
    build_config,
    parse_value,
    read_toml,
    resolve_config_path,
    write_resolved,
)
from covenant.engine.errors import ConfigError
from covenant.engine.plugins import PluginHost

if TYPE_CHECKING:
    from covenant.engine.services import Services

log = logging.getLogger(__name__)


@dataclass
class Session:
    """A plugin host and the config resolved through it."""

    host: PluginHost
    config: Config

    @property
    def hook(self) -> Any:
        return self.host.hook

    @property
    def run_dir(self) -> Path:
        return Path(self.config.section("run").dir)

    @functools.cached_property
    def services(self) -> Services:
        """Chain, hotkey, storage and records of this process, built once on first use."""
        from covenant.engine.services import Services

        return Services(self.config, self.hook)

    def register_text_sources(self) -> None:
        """Let plugins add text sources (``covenant_register_text_sources``) to the registry."""
        from covenant.engine.data.sources import SOURCES

        def register(name: str, factory: Any) -> None:
            SOURCES.register(name, factory, replace=True)

        self.hook.covenant_register_text_sources(register=register)

    def write_resolved(self) -> Path:
        """Write ``resolved_config.json`` into the run directory (with every plugin's version)."""
        return write_resolved(self.config, self.run_dir, self.host.versions())


def open_session(
    config: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
    extra_plugins: Iterable[tuple[str, object]] = (),
    host: PluginHost | None = None,
) -> Session:
    """Load the config file (if any), the allowed plugins and the validated config.

    ``extra_plugins`` are ``(name, plugin)`` pairs registered after the entry-point plugins
    (tests and embedding programs use it). ``host`` lets a caller prepare the plugin host
    (e.g. attach hook-call monitoring) before anything is loaded.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = None
    if config is not None:
        path = resolve_config_path(config)
        data = read_toml(path)
        source = str(path)
    enable = _early_allow_list(data, overrides, source)
    host = host or PluginHost()
    host.load(enable, environ=env)
    for name, plugin in extra_plugins:
        host.register(plugin, name=name)
    host.check()
    cfg = build_config(host.config_schema(), data, source=source, overrides=overrides, environ=env)
    host.hook.covenant_configure.call_historic(kwargs={"config": cfg})
    return Session(host=host, config=cfg)


def _early_allow_list(
    data: Mapping[str, Any], overrides: Iterable[str], source: str | None
) -> list[str] | None:
    """``[plugins] enable`` must be known before plugins load (and before their sections exist)."""
    enable = (
        data.get("plugins", {}).get("enable") if isinstance(data.get("plugins"), dict) else None
    )
    for item in overrides:
        key, _, raw = item.partition("=")
        if key.strip() == "plugins.enable":
            enable = parse_value(raw.strip(), "--set plugins.enable")
    if enable is not None and not (
        isinstance(enable, list) and all(isinstance(n, str) for n in enable)
    ):
        raise ConfigError(f"{source or '--set'}: [plugins] enable: expected a list of plugin names")
    return enable
