"""What the metrics consumers share: failure containment and the rank check.

A metrics consumer must never stop training (hookspec of ``covenant_log_metrics``). pluggy stops
a hook call at the first implementation that raises, so containment has to live *inside* each
implementation: :class:`Consumer` methods decorated with :func:`contained` turn the first
exception into one warning, switch the consumer off for the rest of the run and release what
it holds; later calls are no-ops. :func:`open_consumer` does the same for construction.

This is a helper module of the ``covenant.plugins.logging`` package, not a plugin.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Concatenate, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound="Consumer")


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank, without importing torch.

    ``torch.distributed`` is consulted only if something already imported it (a process group
    cannot exist otherwise), then the ``RANK`` variable torchrun sets, else 0.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
        except (AttributeError, RuntimeError):  # a half-imported or torn-down torch
            pass
    env = os.environ if environ is None else environ
    raw = env.get("RANK", "").strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable RANK={raw!r} is not an integer") from None


class Consumer:
    """Base of a metrics consumer that switches itself off at its first failure."""

    #: Name used in the warning (the plugin name).
    name = "consumer"

    def __init__(self) -> None:
        self.disabled = False

    def release(self) -> None:
        """Free what the consumer holds after it failed (best effort; may raise)."""

    def _fail(self, where: str, exc: BaseException) -> None:
        self.disabled = True
        log.warning(
            "metrics consumer '%s' failed in %s and is off for the rest of this run "
            "(training continues): %s: %s",
            self.name,
            where,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        try:
            self.release()
        except Exception as again:  # already reported the real failure; this is secondary
            log.debug(
                "metrics consumer '%s': release after failure also failed: %r", self.name, again
            )


def contained(method: Callable[Concatenate[C, P], R]) -> Callable[Concatenate[C, P], R | None]:
    """Run a :class:`Consumer` method so that an exception disables the consumer, never raises.

    Returns ``None`` (and does nothing) once the consumer is disabled. ``KeyboardInterrupt`` and
    ``SystemExit`` still propagate: they are the user's or the engine's, not the consumer's.
    """

    @functools.wraps(method)
    def wrapper(self: C, /, *args: P.args, **kwargs: P.kwargs) -> R | None:
        if self.disabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._fail(method.__name__, exc)
            return None

    return wrapper


def open_consumer(name: str, factory: Callable[[], R]) -> R | None:
    """Build a consumer; a failure logs one warning and returns ``None`` (consumer off)."""
    try:
        return factory()
    except Exception as exc:
        log.warning(
            "metrics consumer '%s' could not start and is off for this run (training continues): "
            "%s: %s",
            name,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        return None
