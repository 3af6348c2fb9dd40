"""Retention: a peer deletes its own old uploads (SPEC section 6).

Own gradient uploads (by default; any windowed kind on request) whose window is more than
``retention_windows`` behind the current one are deleted, except keys the caller protects:
those named in an aggregate record younger than twice the checkpoint interval, which a late
joiner still has to re-download. Deciding which keys are protected belongs to the caller (it
reads the aggregate records); this module only lists and deletes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from covenant.engine.protocols import Transport
from covenant.plugins.storage.keys import RunKeys

log = logging.getLogger(__name__)


def expired_keys(
    transport: Transport,
    keys: RunKeys,
    *,
    uid: int,
    current_window: int,
    retention_windows: int,
    protected: Collection[str] = (),
    kinds: Iterable[str] = ("gradient",),
) -> list[str]:
    """Own keys of ``kinds`` with ``window < current_window - retention_windows``, unprotected."""
    if retention_windows < 1:
        raise ValueError(f"retention_windows must be >= 1, got {retention_windows}")
    cutoff = current_window - retention_windows
    out = []
    for kind in kinds:
        for info in transport.list(keys.kind_prefix(kind)):
            parsed = keys.parse_windowed(kind, info.key)
            if parsed is None:
                continue
            window, owner = parsed
            if owner == uid and window < cutoff and info.key not in protected:
                out.append(info.key)
    return sorted(out)


def delete_expired(
    transport: Transport,
    keys: RunKeys,
    *,
    uid: int,
    current_window: int,
    retention_windows: int,
    protected: Collection[str] = (),
    kinds: Iterable[str] = ("gradient",),
) -> list[str]:
    """Delete what :func:`expired_keys` lists; returns the deleted keys."""
    doomed = expired_keys(
        transport,
        keys,
        uid=uid,
        current_window=current_window,
        retention_windows=retention_windows,
        protected=protected,
        kinds=kinds,
    )
    for key in doomed:
        transport.delete(key)
    if doomed:
        log.info(
            "retention: deleted %d own uploads older than window %d",
            len(doomed),
            current_window - retention_windows,
        )
    return doomed
