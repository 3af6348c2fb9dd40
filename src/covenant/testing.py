"""Pytest plugin for covenant plugin authors (registered through the ``pytest11`` entry point).

The real fixtures live in :mod:`covenant.engine.testing`; this module only re-exports them so
that ``pytest`` picks them up automatically once covenant is installed.
"""

from __future__ import annotations
