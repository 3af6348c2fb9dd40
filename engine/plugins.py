"""The plugin manager: one ``pluggy.PluginManager("covenant")`` per process.

Built-in plugins and third-party plugins load through exactly the same path: the entry-point
group ``covenant`` (covenant's own ``pyproject.toml`` declares the built-ins there). Which ones
load is decided by an allow-list:

* ``[plugins] enable = [...]`` in the config file, overridden by
* the environment variable ``COVENANT_PLUGINS`` (comma list; set but empty means *none beyond
  the core*).

Without either, every discovered plugin loads. The *core* (:mod:`covenant.engine.core`: the
engine's own config sections and defaults) is always registered. ``check_pending()`` runs after
loading, so a misspelled hook implementation is an error naming the plugin and the hook.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel

from covenant.engine import hookspecs
from covenant.engine.errors import PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "covenant"
ENV_ALLOW_LIST = "COVENANT_PLUGINS"
CORE_PLUGIN = "covenant.engine.core"


@dataclass(frozen=True)
class PluginInfo:
    """What ``covenant plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    module: str
    enabled: bool
    hooks: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "enabled": self.enabled,
            "hooks": list(self.hooks),
        }


def discover() -> dict[str, metadata.EntryPoint]:
    """Every plugin entry point of the ``covenant`` group, by name (sorted)."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"two plugins are called '{ep.name}': {found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    return dict(sorted(found.items()))


def allow_list(
    configured: Iterable[str] | None, environ: Mapping[str, str] | None = None
) -> list[str] | None:
    """The effective allow-list: ``COVENANT_PLUGINS`` wins over the config; ``None`` = all."""
    env = os.environ if environ is None else environ
    if ENV_ALLOW_LIST in env:
        return [n.strip() for n in env[ENV_ALLOW_LIST].split(",") if n.strip()]
    return None if configured is None else list(configured)


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version or "unknown"


class PluginHost:
    """Owns the pluggy manager and knows where each registered plugin came from."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.available: dict[str, metadata.EntryPoint] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    # -- loading ------------------------------------------------------------------------------

    def load(
        self, enable: Iterable[str] | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        """Register the core, then every allowed entry-point plugin; check hook names."""
        core = importlib.import_module(CORE_PLUGIN)
        self.register(core, name="core", distribution="covenant", version=_own_version())
        self.available = discover()
        wanted = allow_list(enable, environ)
        if wanted is not None:
            unknown = [n for n in wanted if n not in self.available]
            if unknown:
                known = ", ".join(self.available) or "none installed"
                raise PluginError(
                    f"unknown plugin '{unknown[0]}' in the allow-list (installed: {known})"
                )
        for name, ep in self.available.items():
            if wanted is not None and name not in wanted:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a third-party plugin may raise anything at import
                raise PluginError(
                    f"plugin '{name}' ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            dist, version = _dist_of(ep)
            self.register(plugin, name=name, distribution=dist, version=version)
        self.check()

    def register(
        self, plugin: object, *, name: str, distribution: str = "local", version: str = "0"
    ) -> None:
        """Register ``plugin`` (a module or object with ``@hookimpl`` functions) as ``name``."""
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin '{name}' cannot be registered: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin '{name}' is invalid: {exc}") from exc
        module = getattr(plugin, "__name__", type(plugin).__name__)
        self.infos[name] = PluginInfo(
            name, distribution, version, module, True, self._hooks_of(plugin)
        )

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.infos.pop(name, None)

    def check(self) -> None:
        """Fail on hook implementations whose hook does not exist (a typo in a plugin)."""
        for hook_name in self.pm.hook.__dict__:
            if hook_name.startswith("_"):
                continue
            caller = getattr(self.pm.hook, hook_name)
            if caller.spec is None and caller.get_hookimpls():
                owners = ", ".join(
                    self.pm.get_name(i.plugin) or "?" for i in caller.get_hookimpls()
                )
                raise PluginError(
                    f"plugin '{owners}' implements unknown hook '{hook_name}' "
                    "(see covenant.engine.hookspecs for the hook names)"
                )
        self.pm.check_pending()

    def _hooks_of(self, plugin: object) -> tuple[str, ...]:
        callers = self.pm.get_hookcallers(plugin) or []
        return tuple(sorted(c.name for c in callers))

    # -- services -----------------------------------------------------------------------------

    def config_schema(self) -> dict[str, type[BaseModel]]:
        """Collect every section model through ``covenant_add_config_sections``."""
        schema: dict[str, type[BaseModel]] = {}
        owner: dict[str, str] = {}
        for impl in self.pm.hook.covenant_add_config_sections.get_hookimpls():  # registration order
            plugin_name = self.pm.get_name(impl.plugin) or "?"

            def register(section: str, model: type[BaseModel], _p: str = plugin_name) -> None:
                if section in schema:
                    raise PluginError(
                        f"config section [{section}] registered twice: by '{owner[section]}' and '{_p}'"
                    )
                if not (isinstance(model, type) and issubclass(model, BaseModel)):
                    raise PluginError(f"plugin '{_p}': section [{section}] is not a pydantic model")
                schema[section] = model
                owner[section] = _p

            impl.function(register=register)
        return schema

    def registry(self, hook_name: str) -> dict[str, Any]:
        """Call a ``covenant_register_*`` hook and collect ``name -> thing``."""
        items: dict[str, Any] = {}

        def register(name: str, thing: Any) -> None:
            if name in items:
                raise PluginError(f"{hook_name}: '{name}' registered twice")
            items[name] = thing

        getattr(self.pm.hook, hook_name)(register=register)
        return items

    def plugin_infos(self, include_disabled: bool = False) -> list[PluginInfo]:
        infos = list(self.infos.values())
        if include_disabled:
            for name, ep in self.available.items():
                if name not in self.infos:
                    dist, version = _dist_of(ep)
                    infos.append(PluginInfo(name, dist, version, ep.value, False, ()))
        return sorted(infos, key=lambda i: (i.name != "core", i.name))

    def versions(self) -> dict[str, str]:
        return {i.name: f"{i.distribution} {i.version}" for i in self.infos.values()}


def _own_version() -> str:
    try:
        return metadata.version("covenant")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "0.0.0+unknown"
