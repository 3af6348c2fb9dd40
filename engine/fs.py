"""Atomic file writes for every component (temp file in the same folder + ``os.replace``).

Temporary files are created with ``O_EXCL`` and mode ``0o666`` (minus the umask), so that the
renamed result has ordinary permissions (``tempfile.mkstemp`` would leave it ``0600``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write_bytes", "create_temp"]


def create_temp(folder: Path, name: str) -> tuple[Path, BinaryIO]:
    """Create and open ``folder/.{name}.{pid}.{random}.tmp`` for writing; never an existing file."""
    while True:
        path = Path(folder) / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return path, os.fdopen(fd, "wb")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old bytes or the new, never a part."""
    path = Path(path)
    tmp, f = create_temp(path.parent, path.name)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
