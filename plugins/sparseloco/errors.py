"""Typed errors of the SparseLoCo codec.

Every problem found in a peer's payload raises a :class:`PayloadError` (a ``ValueError``) that
names the tensor (``.tensor``, ``None`` for payload-level problems) and what was wrong
(``.reason``), so the validator can slash the upload and log why, and the miner can never crash
on a bad download. Problems with *our own* inputs (non-finite error buffer, a slice that does
not line up with the tile grid) raise :class:`EncodeError`; a non-finite aggregate raises
:class:`AggregationError`.
"""

from __future__ import annotations


class PayloadError(ValueError):
    """A payload (untrusted bytes) failed validation.

    Attributes:
        tensor: the tensor the problem was found in, or ``None`` for the payload as a whole.
        reason: a short human-readable description of what was wrong.
        peer: index of the payload in an :func:`aggregate` call, when known.
    """

    def __init__(self, reason: str, tensor: str | None = None, peer: int | None = None) -> None:
        self.reason = reason
        self.tensor = tensor
        self.peer = peer
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.peer is not None:
            where.append(f"payload {self.peer}")
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.reason}" if prefix else self.reason

    def with_peer(self, peer: int) -> PayloadError:
        """Return the same error annotated with the payload's position in a peer list."""
        self.peer = peer
        self.args = (self._render(),)
        return self


class PayloadSizeError(PayloadError):
    """The byte length is over the cap, truncated, or disagrees with the header's sizes."""


class PayloadFormatError(PayloadError):
    """Bad magic, malformed or non-canonical header, wrong field types or values."""


class PayloadVersionError(PayloadError):
    """The payload's format version is not one this decoder supports."""


class PayloadChecksumError(PayloadError):
    """The CRC-32 trailer does not match the bytes (corruption in transit or storage)."""


class PayloadShapeError(PayloadError):
    """A tensor the model lacks, a tensor missing, or a shape/tile/k that disagrees."""


class PayloadIndexError(PayloadError):
    """Per-tile indices out of range, repeated, unsorted, or the wrong count."""


class PayloadTableError(PayloadError):
    """A quantiser table (shift or decode level) that is not finite."""


class EncodeError(ValueError):
    """Our own input cannot be encoded (non-finite values, empty tensor, bad slice)."""


class AggregationError(ValueError):
    """The aggregate of a tensor is not finite (and ``on_nonfinite`` is ``"error"``).

    Attributes:
        tensor: name of the offending tensor.
    """

    def __init__(self, reason: str, tensor: str) -> None:
        self.tensor = tensor
        self.reason = reason
        super().__init__(f"tensor {tensor!r}: {reason}")
