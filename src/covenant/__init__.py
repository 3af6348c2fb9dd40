"""covenant: an open engine for permissionless, globally distributed LLM pre-training.

The code lives in three floors (see docs/architecture.md):

* :mod:`covenant.engine`  -- the core: hook surface, plugin manager, config, loop, CLI;
* :mod:`covenant.models`  -- the megatron-core model and its parallel layout;
* :mod:`covenant.plugins` -- built-in plugins (sparseloco, storage, chain, logging, ...).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("covenant")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
