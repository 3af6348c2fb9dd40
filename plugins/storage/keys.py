"""The run's key layout (SPEC section 6) and the rules every key must follow.

All keys live under ``{run}/v{version}/`` so incompatible runs never read each other's objects::

    {run}/v{version}/start_window
    {run}/v{version}/gradient/{window}/{uid}     payload + signed manifest (one object)
    {run}/v{version}/debug/{window}/{uid}        sync sample
    {run}/v{version}/peers/{first_window}        the validator's peer list
    {run}/v{version}/aggregate/{window}          the lead validator's aggregate record
    {run}/v{version}/checkpoint/{window}/{name}  checkpoint files
    {run}/v{version}/checkpoint/latest
    {run}/v{version}/scores/{window}/{uid}       a validator's signed score record

:func:`validate_key` is the one gate every transport passes keys through: a key that could
leave the transport's root (``..``, absolute, backslashes, empty parts) or hide among its
temporary files (a part starting with ``.``) is a :class:`StorageKeyError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from covenant.plugins.storage.errors import StorageKeyError

MAX_KEY_LENGTH = 1024  # S3's own limit on key length
_PART = re.compile(r"^[A-Za-z0-9_=+-][A-Za-z0-9._=+-]*$")
_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as [run] id in the engine config

KINDS = ("gradient", "debug", "peers", "aggregate", "checkpoint", "scores")


def validate_key(key: object, *, allow_prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`StorageKeyError`.

    With ``allow_prefix`` the empty string (the root) and one trailing ``/`` are accepted, for
    listing.
    """
    if not isinstance(key, str):
        raise StorageKeyError(f"storage key must be a string, got {type(key).__name__}")
    if allow_prefix:
        if key == "":
            return key
        body = key[:-1] if key.endswith("/") else key
    else:
        body = key
    if not body:
        raise StorageKeyError("storage key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise StorageKeyError(f"storage key is {len(key)} characters, over {MAX_KEY_LENGTH}")
    if body.startswith("/"):
        raise StorageKeyError(f"storage key {key!r} is absolute")
    if "\\" in body:
        raise StorageKeyError(f"storage key {key!r} contains a backslash")
    for part in body.split("/"):
        if part == "":
            raise StorageKeyError(f"storage key {key!r} has an empty part")
        if part in (".", ".."):
            raise StorageKeyError(f"storage key {key!r} contains {part!r}")
        if not _PART.match(part):
            raise StorageKeyError(
                f"storage key {key!r}: part {part!r} must be [A-Za-z0-9._=+-] "
                "and must not start with '.'"
            )
    return key


def _nonneg(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StorageKeyError(f"{name} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class RunKeys:
    """Key builders for one run id and protocol version."""

    run: str
    version: int

    def __post_init__(self) -> None:
        if not isinstance(self.run, str) or not _RUN.match(self.run):
            raise StorageKeyError(f"run id {self.run!r} must match {_RUN.pattern}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise StorageKeyError(f"protocol version must be an integer >= 1, got {self.version!r}")

    @property
    def prefix(self) -> str:
        """``{run}/v{version}/``: everything of this run lives under it."""
        return f"{self.run}/v{self.version}/"

    def owns(self, key: str) -> bool:
        """Whether ``key`` is a valid key under this run's prefix."""
        try:
            validate_key(key)
        except StorageKeyError:
            return False
        return key.startswith(self.prefix)

    def kind_prefix(self, kind: str) -> str:
        if kind not in KINDS:
            raise StorageKeyError(f"unknown key kind {kind!r} (known: {', '.join(KINDS)})")
        return f"{self.prefix}{kind}/"

    def start_window(self) -> str:
        return f"{self.prefix}start_window"

    def gradient(self, window: int, uid: int) -> str:
        return f"{self.prefix}gradient/{_nonneg('window', window)}/{_nonneg('uid', uid)}"

    def debug(self, window: int, uid: int) -> str:
        return f"{self.prefix}debug/{_nonneg('window', window)}/{_nonneg('uid', uid)}"

    def peers(self, first_window: int) -> str:
        return f"{self.prefix}peers/{_nonneg('window', first_window)}"

    def aggregate(self, window: int) -> str:
        return f"{self.prefix}aggregate/{_nonneg('window', window)}"

    def scores(self, window: int, uid: int) -> str:
        return f"{self.prefix}scores/{_nonneg('window', window)}/{_nonneg('uid', uid)}"

    def checkpoint(self, window: int, name: str) -> str:
        return validate_key(f"{self.prefix}checkpoint/{_nonneg('window', window)}/{name}")

    def checkpoint_latest(self) -> str:
        return f"{self.prefix}checkpoint/latest"

    def parse_windowed(self, kind: str, key: str) -> tuple[int, int | None] | None:
        """``(window, uid)`` of a ``gradient``/``debug`` key (``uid`` None for ``peers``,
        ``aggregate``), or ``None`` if ``key`` is not such a key of this run."""
        head = self.kind_prefix(kind)
        if not key.startswith(head):
            return None
        parts = key[len(head) :].split("/")
        if not all(p.isdigit() and p.isascii() for p in parts):
            return None
        if kind in ("gradient", "debug", "scores") and len(parts) == 2:
            return int(parts[0]), int(parts[1])
        if kind in ("peers", "aggregate") and len(parts) == 1:
            return int(parts[0]), None
        return None
