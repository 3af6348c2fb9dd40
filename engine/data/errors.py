"""Typed errors of the data layer.

Every error is a :class:`~covenant.engine.errors.CovenantError` (the CLI prints it as one red
line and exits 2) and a ``ValueError`` (bad input, not a bug), and names the file or value that
was wrong and what differed.
"""

from __future__ import annotations

from covenant.engine.errors import CovenantError

__all__ = [
    "AssignmentError",
    "DataError",
    "ManifestError",
    "ShardDtypeError",
    "ShardHashError",
    "ShardMissingError",
    "ShardSizeError",
    "SourceError",
    "TokenRangeError",
    "TokenizerMismatchError",
]


class DataError(CovenantError, ValueError):
    """Base class: something about the corpus, the shards or the tokenizer is wrong."""


class SourceError(DataError):
    """A text source cannot be found or read (unknown name, missing file, bad record)."""


class ManifestError(DataError):
    """``manifest.json`` is missing, unreadable, too large, or not a valid manifest."""


class ShardMissingError(DataError):
    """A shard named by the manifest does not exist."""


class ShardSizeError(DataError):
    """A shard's size on disk is not ``num_tokens * 4`` bytes (truncated or padded)."""


class ShardDtypeError(DataError):
    """The manifest declares a shard dtype other than ``uint32``."""


class ShardHashError(DataError):
    """A shard's sha256 differs from the manifest (the bytes were changed)."""


class TokenRangeError(DataError):
    """A shard holds a token id ``>= vocab_size``."""


class TokenizerMismatchError(DataError):
    """A tokenizer's hash (or vocabulary) differs from what the manifest or caller expects."""


class AssignmentError(DataError):
    """Invalid inputs to the (uid, window) sample assignment (e.g. ``H*B > N``)."""
