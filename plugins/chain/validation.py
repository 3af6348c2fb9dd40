"""The checks both chain implementations share: commitments (written and read), weights, and
the values a chain answers with (neurons, blocks).

Commitments: the one place a commitment string is checked, on write and on read.

Answers: what the local chain's SQLite file holds (anyone who can write the shared folder can
write any row, of any SQLite type) and what a node returns to the SDK are untrusted too; every
value is checked for type and range by :func:`check_neuron`, :func:`check_block` and
:func:`parse_weight_pairs` before it becomes a :class:`~covenant.engine.protocols.Neuron` or a
number the engine computes with, and anything else is a
:class:`~covenant.engine.protocols.ChainError`.

A commitment is what a peer publishes on chain for others to read: its bucket read credentials
(the layout belongs to the storage plugin: production's 128-character string, or a versioned
form). At the chain level it is an opaque, printable UTF-8 string no larger than the chain's
limit; this module enforces exactly that, for our own writes (a :class:`CommitmentError`) and for
what other peers wrote (skipped with a warning, never raised, by the callers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from covenant.engine.protocols import ChainError, CommitmentError, Neuron
from covenant.engine.untrusted import UntrustedInputError, loads_json

#: uids are u16 on chain.
MAX_UID = 65535
#: Blocks fit a u64 on chain; far beyond any real chain's height.
MAX_BLOCK = (1 << 63) - 1
#: An ss58 address (or a test name): printable, short.
MAX_HOTKEY_CHARS = 64
#: Largest weight set read back (bytes of JSON): 65,536 pairs of ~24 bytes.
MAX_WEIGHTS_JSON_BYTES = 2 << 20


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ChainError(f"{what} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_block(value: Any, what: str = "block") -> int:
    """A block number from the chain: an int in ``[0, 2^63)``, else :class:`ChainError`."""
    return _int(value, what, 0, MAX_BLOCK)


def check_hotkey(value: Any, what: str = "hotkey") -> str:
    """A hotkey address from the chain: a non-empty printable ASCII string of at most 64."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_HOTKEY_CHARS
        or not value.isascii()
        or not value.isprintable()
    ):
        raise ChainError(f"{what} must be a printable address, got {_short(value)}")
    return value


def check_neuron(uid: Any, hotkey: Any, stake: Any, validator_permit: Any) -> Neuron:
    """A :class:`Neuron` from untrusted values, each checked for type and range."""
    uid = _int(uid, "neuron uid", 0, MAX_UID)
    hotkey = check_hotkey(hotkey, f"neuron {uid} hotkey")
    if isinstance(stake, bool) or not isinstance(stake, int | float):
        raise ChainError(f"neuron {uid} stake must be a number, got {_short(stake)}")
    if not math.isfinite(stake) or stake < 0:
        raise ChainError(f"neuron {uid} stake must be finite and >= 0, got {stake!r}")
    if validator_permit not in (0, 1) or isinstance(validator_permit, float):
        raise ChainError(
            f"neuron {uid} validator permit must be a boolean, got {_short(validator_permit)}"
        )
    return Neuron(
        uid=uid, hotkey=hotkey, stake=float(stake), validator_permit=bool(validator_permit)
    )


def parse_weight_pairs(text: Any, what: str = "weights") -> dict[int, float]:
    """A stored weight set (JSON ``[[uid, weight], ...]``) as ``uid -> weight``, checked."""
    if not isinstance(text, str | bytes):
        raise ChainError(f"{what} must be JSON text, got {type(text).__name__}")
    try:
        pairs = loads_json(text, what=what, max_bytes=MAX_WEIGHTS_JSON_BYTES, max_depth=2)
    except UntrustedInputError as exc:
        raise ChainError(str(exc)) from None
    if not isinstance(pairs, list):
        raise ChainError(f"{what} must be a list of [uid, weight] pairs")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ChainError(f"{what}: {_short(pair)} is not a [uid, weight] pair")
        uid = _int(pair[0], f"{what} uid", 0, MAX_UID)
        w = pair[1]
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 1:
            raise ChainError(f"{what}: weight of uid {uid} must be in [0, 1], got {_short(w)}")
        if uid in out:
            raise ChainError(f"{what}: uid {uid} appears twice")
        out[uid] = float(w)
    return out


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
