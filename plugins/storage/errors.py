"""Typed errors of the storage plugin.

Every error derives from :class:`StorageError` (a :class:`CovenantError`, so the CLI prints one
line and exits 2). Callers that read untrusted objects do not see most of these: the exchange
layer (:mod:`covenant.plugins.storage.exchange`) turns them into a recorded
:class:`~covenant.plugins.storage.exchange.Rejection` instead.
"""

from __future__ import annotations

from covenant.engine import protocols
from covenant.engine.errors import CovenantError


class StorageError(CovenantError):
    """Base of every storage failure."""


class StorageKeyError(StorageError, ValueError):
    """A key is malformed or would leave the transport's root (``..``, absolute, ``\\``)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object does not exist (or vanished between HEAD and GET)."""


class ObjectTooLargeError(StorageError):
    """The object is larger than the caller's cap; nothing was downloaded."""

    def __init__(self, key: str, size: int, max_bytes: int) -> None:
        super().__init__(f"{key}: object is {size} bytes, over the cap of {max_bytes} bytes")
        self.key = key
        self.size = size
        self.max_bytes = max_bytes


class StorageTransportError(StorageError):
    """A request failed for good (not retryable, or still failing after every try)."""


class ObjectChangedError(StorageTransportError):
    """The object was replaced while it was being downloaded (its ETag changed)."""


class StorageDeadlineError(StorageError, TimeoutError):
    """The operation's deadline passed before it could finish."""


class ManifestError(StorageError):
    """A manifest or object header is malformed (not JSON, missing fields, over its size cap)."""


class CommitmentError(StorageError, protocols.CommitmentError):
    """A read-credential commitment string is malformed or too long.

    Also a :class:`covenant.engine.protocols.CommitmentError`, so a caller that reads
    commitments through the chain interface catches both the chain's and the parser's errors
    with one ``except``.
    """
