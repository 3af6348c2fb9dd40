"""Operator config: TOML files loaded into typed, validated sections.

One section per component and per plugin. Sections are pydantic models that plugins contribute
through ``covenant_add_config_sections``; the engine's own sections (``[run]``, ``[plugins]``)
are contributed the same way by :mod:`covenant.engine.core`.

Precedence, highest first (documented in docs/config.md)::

    --set section.key=value   >   COVENANT__SECTION__KEY=value   >   the TOML file   >   defaults

Values given on the command line or in the environment are parsed as TOML values
(``3e-4``, ``true``, ``[1, 2]``, ``"text"``), falling back to a plain string.

Errors name the source (file, environment variable or ``--set``), the key path and what was
expected, e.g. ``configs/tiny.toml: [train] lr: Input should be a valid number (got 'fast')``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from covenant.engine.errors import ConfigError
from covenant.engine.fs import atomic_write_bytes
from covenant.engine.untrusted import UntrustedInputError, loads_toml

ENV_PREFIX = "COVENANT__"
BUILTIN_PACKAGE = "covenant.configs"
#: Largest config file read; real ones are a few KiB.
MAX_CONFIG_BYTES = 1 << 20
#: Largest single ``--set`` / environment value parsed as TOML.
MAX_VALUE_BYTES = 64 << 10

M = TypeVar("M", bound=BaseModel)


def resolve_config_path(name: str | os.PathLike[str]) -> Path:
    """Find a config file: a path as given, else a built-in config shipped in the package.

    ``tiny`` and ``tiny.toml`` both find the built-in ``covenant/configs/tiny.toml``, so
    ``covenant train --config tiny`` works from an installed wheel.
    """
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    if len(path.parts) <= 1 or (len(path.parts) == 2 and path.parts[0] == "configs"):
        builtin = resources.files(BUILTIN_PACKAGE).joinpath(stem)
        if builtin.is_file():
            return Path(str(builtin))
    raise ConfigError(f"config file not found: {name} (neither a file nor a built-in config)")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning every failure into one clear :class:`ConfigError`.

    Read with the bounded reader (:func:`covenant.engine.untrusted.loads_toml`): a config can
    come from anywhere (a shared run folder, a downloaded example), and pathological nesting or
    a 5,000-digit integer must be one error line, not a ``RecursionError`` or ``ValueError``.
    """
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: config file is {size} bytes, over {MAX_CONFIG_BYTES}")
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        return loads_toml(text, what=str(path), max_bytes=MAX_CONFIG_BYTES)
    except UntrustedInputError as exc:
        problem = exc.problem
        if not problem.startswith("malformed TOML"):
            problem = f"malformed TOML: {problem}"
        raise ConfigError(f"{path}: {problem}") from None


def parse_value(text: str, origin: str = "value") -> Any:
    """A command-line or environment value as TOML (``3e-4``, ``true``, ``[1,2]``), else a string.

    Malformed TOML falls back to the plain string; a value over the bounded reader's limits
    (nesting, number length, size) is a :class:`ConfigError` naming ``origin``.
    """
    try:
        return loads_toml(f"v = {text}", what=origin, max_bytes=MAX_VALUE_BYTES)["v"]
    except UntrustedInputError as exc:
        if exc.bound:
            raise ConfigError(f"{origin}: {exc.problem}") from None
        return text


def _set_path(tree: dict[str, Any], keys: list[str], value: Any, origin: str) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys)}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: Iterable[str]) -> list[tuple[list[str], Any, str]]:
    """``["train.lr=3e-4"]`` -> ``[(["train", "lr"], 0.0003, "--set train.lr")]``."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        keys = [k for k in key.strip().split(".") if k]
        if not sep or len(keys) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        origin = f"--set {key.strip()}"
        out.append((keys, parse_value(raw.strip(), origin), origin))
    return out


def env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    """``COVENANT__TRAIN__LR=3e-4`` -> ``[(["train", "lr"], 0.0003, "$COVENANT__TRAIN__LR")]``."""
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if len(keys) < 2:
            raise ConfigError(f"${name}: expected {ENV_PREFIX}SECTION__KEY=value")
        out.append((keys, parse_value(environ[name], f"${name}"), f"${name}"))
    return out


@dataclass
class Config:
    """The resolved config: one validated pydantic object per section.

    ``config.section("train")`` returns the section's model; ``config.train`` is a shortcut.
    ``origins`` maps ``section.key`` to where its value came from (file, env, --set).
    """

    sections: dict[str, BaseModel]
    source: str | None = None
    origins: dict[str, str] = field(default_factory=dict)

    def section(self, name: str) -> Any:
        try:
            return self.sections[name]
        except KeyError:
            raise ConfigError(
                f"config has no section [{name}] (is the plugin that owns it enabled?)"
            ) from None

    def typed(self, name: str, model: type[M]) -> M:
        """The section ``name`` checked to be an instance of ``model`` (for type checkers)."""
        value = self.section(name)
        if not isinstance(value, model):
            raise ConfigError(f"section [{name}] is {type(value).__name__}, not {model.__name__}")
        return value

    def has(self, name: str) -> bool:
        return name in self.sections

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view of every section (paths become strings)."""
        return {name: json.loads(model.model_dump_json()) for name, model in self.sections.items()}


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: an error line stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_validation(section: str, exc: ValidationError, origins: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = origins.get(f"{section}.{err['loc'][0]}" if err["loc"] else section, "defaults")
        got = (
            f" (got {_short(err['input'])})" if err["type"] != "missing" and "input" in err else ""
        )
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: [{section}] {loc}: unknown key")
        else:
            lines.append(f"{where}: [{section}] {loc}: {err['msg']}{got}")
    return "; ".join(lines)


def build_config(
    schema: Mapping[str, type[BaseModel]],
    file_data: Mapping[str, Any] | None = None,
    *,
    source: str | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge defaults < file < environment < ``--set`` and validate every section.

    ``schema`` maps section names to their models (from ``covenant_add_config_sections``).
    A section in the file that no enabled plugin owns is an error.
    """
    where = source or "config"
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, value in (file_data or {}).items():
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{name}' must be a [section], not a bare value")
        tree[name] = dict(value)
        for key in value:
            origins[f"{name}.{key}"] = where
    layered = env_overrides(os.environ if environ is None else environ)
    layered += parse_overrides(overrides)
    for keys, value, origin in layered:
        _set_path(tree, keys, value, origin)
        origins[".".join(keys[:2])] = origin
    unknown = sorted(set(tree) - set(schema))
    if unknown:
        first = unknown[0]
        culprit = next((o for k, o in origins.items() if k.split(".")[0] == first), where)
        raise ConfigError(
            f"{culprit}: unknown section [{first}] (known: {', '.join(sorted(schema))}; "
            "is the plugin that owns it enabled?)"
        )
    sections: dict[str, BaseModel] = {}
    for name, model in schema.items():
        try:
            sections[name] = model.model_validate(tree.get(name, {}))
        except ValidationError as exc:
            raise ConfigError(_format_validation(name, exc, origins)) from None
    return Config(sections=sections, source=source, origins=origins)


def write_resolved(config: Config, run_dir: Path, versions: Mapping[str, str]) -> Path:
    """Write ``resolved_config.json`` (every section + engine and plugin versions) atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "resolved_config.json"
    payload = {"source": config.source, "versions": dict(versions), "config": config.to_dict()}
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
    return path
