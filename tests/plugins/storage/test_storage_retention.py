"""Retention deletes only own, old, unprotected uploads."""

from __future__ import annotations

import pytest

from covenant.plugins.storage.keys import RunKeys
from covenant.plugins.storage.retention import delete_expired, expired_keys
from covenant.plugins.storage.transport import FsspecTransport


def test_deletes_own_old_uploads_only(transport: FsspecTransport) -> None:
    keys = RunKeys("run", 1)
    for window in (1, 2, 3, 10):
        transport.put(keys.gradient(window, 5), b"mine")
        transport.put(keys.gradient(window, 6), b"not mine")
        transport.put(keys.debug(window, 5), b"debug")
    transport.put(keys.peers(1), b"peers")
    protected = {keys.gradient(2, 5)}
    assert expired_keys(
        transport, keys, uid=5, current_window=12, retention_windows=9, protected=protected
    ) == [keys.gradient(1, 5)]
    deleted = delete_expired(
        transport, keys, uid=5, current_window=13, retention_windows=9, protected=protected
    )
    assert deleted == [keys.gradient(1, 5), keys.gradient(3, 5)]
    left = {o.key for o in transport.list(keys.prefix)}
    assert keys.gradient(2, 5) in left and keys.gradient(10, 5) in left
    assert all(keys.gradient(w, 6) in left for w in (1, 2, 3, 10))
    assert keys.debug(1, 5) in left and keys.peers(1) in left
    assert delete_expired(
        transport, keys, uid=5, current_window=13, retention_windows=9, kinds=("debug",)
    ) == [keys.debug(1, 5), keys.debug(2, 5), keys.debug(3, 5)]


def test_retention_windows_must_be_positive(transport: FsspecTransport) -> None:
    with pytest.raises(ValueError):
        expired_keys(transport, RunKeys("r", 1), uid=0, current_window=5, retention_windows=0)
