"""covenant.engine: the core. It names no plugin; plugins attach through hooks.

``hookimpl`` is the marker plugin authors decorate their hook implementations with::

    from covenant.engine import hookimpl
"""

from covenant.engine.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
