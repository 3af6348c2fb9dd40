"""Helpers shared by the data tests (a uniquely named module, so no clash with other conftests)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: The shared small corpus: a slice of big.txt, vocab 512, T = 64, several small train shards.
SMALL: dict[str, Any] = {
    "sources": ["bigtxt"],
    "vocab_size": 512,
    "seq_len": 64,
    "val_fraction": 0.05,
    "shard_tokens": 20_000,
    "doc_max_chars": 2000,
    "max_documents": 120,
}


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file in ``folder``: proof that nothing was modified."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
        if p.is_file()
    }
