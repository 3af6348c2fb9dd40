"""Typed errors of the engine.

Every error a user can cause (a bad config, an unknown plugin, a damaged shard) derives from
:class:`CovenantError`. The CLI turns one into a single red line naming the culprit and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CovenantError(Exception):
    """Base of all user-facing errors. ``str(err)`` is the one line the CLI prints."""

    exit_code = 2


class ConfigError(CovenantError, ValueError):
    """A config file, environment variable or ``--set`` value is wrong."""


class PluginError(CovenantError):
    """A plugin could not be found, imported or registered."""
