"""The checks both chain implementations share: commitments (written and read) and weights.

Commitments: the one place a commitment string is checked, on write and on read.

A commitment is what a peer publishes on chain for others to read: its bucket read credentials
(the layout belongs to the storage plugin: production's 128-character string, or a versioned
form). At the chain level it is an opaque, printable UTF-8 string no larger than the chain's
limit; this module enforces exactly that, for our own writes (a :class:`CommitmentError`) and for
what other peers wrote (skipped with a warning, never raised, by the callers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from covenant.engine.protocols import ChainError, CommitmentError


def validate_commitment(data: object, max_bytes: int) -> str:
    """Return ``data`` if it is a valid commitment, else raise :class:`CommitmentError`.

    Valid: a non-empty ``str`` of printable characters (no control characters, no newlines),
    at most ``max_bytes`` bytes in UTF-8.
    """
    if not isinstance(data, str):
        raise CommitmentError(f"commitment must be a string, got {type(data).__name__}")
    if not data:
        raise CommitmentError("commitment is empty")
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates
        raise CommitmentError("commitment is not valid UTF-8 text") from None
    if size > max_bytes:
        raise CommitmentError(f"commitment is {size} bytes, the limit is {max_bytes}")
    if not data.isprintable():
        raise CommitmentError("commitment contains control or non-printable characters")
    return data


def prepare_weights(
    weights: Mapping[int, float], known_uids: set[int]
) -> tuple[list[tuple[int, float]], list[str]]:
    """Validate and normalise weights for submission; shared by both chain implementations.

    Returns ``(pairs, notes)``: ``pairs`` ascending by uid, summing to 1, without unknown uids
    or zeros; ``notes`` says what was dropped. Non-finite or negative values are an error
    (:class:`ChainError`), since they mean the scorer is broken, not the chain.
    """
    notes: list[str] = []
    parsed: list[tuple[int, float]] = []
    for uid, value in weights.items():
        if isinstance(uid, bool) or not isinstance(uid, int):
            raise ChainError(f"weight uid must be an int, got {uid!r}")
        w = float(value)
        if not math.isfinite(w) or w < 0:
            raise ChainError(f"weight for uid {uid} must be finite and >= 0, got {value!r}")
        parsed.append((uid, w))
    unknown = sorted(u for u, _ in parsed if u not in known_uids)
    if unknown:
        notes.append(f"dropped unknown uids {unknown}")
    kept = sorted((u, w) for u, w in parsed if u in known_uids and w > 0)
    total = sum(w for _, w in kept)
    if total <= 0:
        return [], notes
    return [(u, w / total) for u, w in kept], notes
