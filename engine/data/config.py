"""The ``[data]`` config section: where the prepared corpus lives and how it is built.

Tiny defaults so that ``make run`` and the tests work on a CPU; the lead registers
:class:`DataConfig` as the ``[data]`` section.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DataConfig"]


class DataConfig(BaseModel):
    """How the corpus is prepared and read.

    ``dir`` None means :func:`covenant.engine.data.prepare.default_data_dir`.
    """

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = Field(default=None, description="Prepared data directory (None: default).")
    sources: list[str] = Field(
        default_factory=lambda: ["bigtxt"],
        description="Text sources: registered names ('bigtxt', 'name:arg') or .txt/.jsonl/.parquet paths.",
    )
    vocab_size: int = Field(default=8192, ge=257, le=2**32 - 1, description="BPE vocabulary size.")
    seq_len: int = Field(default=128, ge=2, description="Tokens per sample (T).")
    val_fraction: float = Field(
        default=0.02, ge=0.0, lt=1.0, description="Share of documents held out for validation."
    )
    shard_tokens: int = Field(
        default=1 << 26, ge=1, description="Target tokens per shard file (rounded down to k*T)."
    )
    doc_max_chars: int = Field(
        default=8000,
        ge=64,
        description="Long texts are cut at blank lines into blocks of this size.",
    )
    max_documents: int | None = Field(
        default=None, ge=1, description="Stop after this many documents (None: all)."
    )
    windows_per_shard: int = Field(
        default=1000, ge=1, description="Outer steps spent on one train shard before the next."
    )
    tokenizer_hash: str | None = Field(
        default=None, description="If set, the prepared data must use exactly this tokenizer."
    )
    verify_hash: bool = Field(
        default=True, description="Check each shard's sha256 when it is opened (once per process)."
    )
