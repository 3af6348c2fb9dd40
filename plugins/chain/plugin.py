"""The chain plugin: the ``[chain]`` section, the chain provider and the ``covenant chain`` CLI.

``covenant_chain(config)`` returns a :class:`~covenant.plugins.chain.local.LocalChain` or a
:class:`~covenant.plugins.chain.bittensor_chain.BittensorChain` according to ``[chain] name``;
everything else in covenant talks to it only through :class:`covenant.engine.protocols.Chain`.
Heavy imports (sqlite is cheap, the Bittensor SDK is not) happen inside the hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from covenant.engine.hookspecs import Register, hookimpl
from covenant.plugins.chain.config import ChainConfig

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.protocols import Chain


def open_chain(config: Config, **kwargs: Any) -> Chain:
    """The chain the config names (``kwargs`` go to the implementation, e.g. ``substrate=``)."""
    cfg = config.typed("chain", ChainConfig)
    run_dir = Path(config.section("run").dir)
    if cfg.name == "bittensor":
        from covenant.plugins.chain.bittensor_chain import BittensorChain

        return BittensorChain.from_config(cfg, run_dir, **kwargs)
    from covenant.plugins.chain.local import LocalChain

    return LocalChain.from_config(cfg, run_dir, **kwargs)


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("chain", ChainConfig)


@hookimpl
def covenant_chain(config: Config) -> Chain | None:
    if not config.has("chain"):
        return None
    cfg = config.section("chain")
    if not isinstance(cfg, ChainConfig) or cfg.name not in ("local", "bittensor"):
        return None
    return open_chain(config)


@hookimpl
def covenant_hotkey(config: Config) -> Any:
    """This process's signing key: ``[chain] hotkey`` (a dev URI, key file or wallet)."""
    if not config.has("chain"):
        return None
    cfg = config.section("chain")
    if not isinstance(cfg, ChainConfig) or cfg.hotkey is None:
        return None
    from covenant.engine.keys import load_hotkey

    return load_hotkey(cfg.hotkey)


@hookimpl
def covenant_register_commands(register: Register) -> None:
    from covenant.plugins.chain.cli import app

    register("chain", app)
