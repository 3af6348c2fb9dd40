"""covenant.engine.data: the offline corpus, tokenizer, pre-tokenized shards and sample assignment.

- :mod:`.sources`: text sources (``bigtxt``, .txt/.jsonl/.parquet files) and their registry;
- :mod:`.tokenizer`: byte-level BPE trained locally, identified by the sha256 of its JSON;
- :mod:`.shards`: the uint32 shard format, the manifest, the checked read-only reader;
- :mod:`.prepare`: sources -> tokenizer + shards + manifest, cached and atomic;
- :mod:`.assignment`: (uid, window) -> sample ids and receipts, shared by miners and validators;
- :mod:`.config`: the ``[data]`` config section.

Engine floor: nothing here imports ``covenant.models`` or ``covenant.plugins``.
"""

from __future__ import annotations

from covenant.engine.data.assignment import (
    Receipt,
    active_shard,
    check_batch_layout,
    rank_share,
    receipt,
    sample_pool,
    step_ids,
    verify_receipt,
    window_seed,
)
from covenant.engine.data.config import DataConfig
from covenant.engine.data.errors import (
    AssignmentError,
    DataError,
    ManifestError,
    ShardDtypeError,
    ShardHashError,
    ShardMissingError,
    ShardSizeError,
    SourceError,
    TokenizerMismatchError,
    TokenRangeError,
)
from covenant.engine.data.prepare import default_data_dir, prepare, prepare_from_config
from covenant.engine.data.shards import (
    Manifest,
    ShardDataset,
    load_manifest,
    open_active_shard,
    verify_data_dir,
)
from covenant.engine.data.sources import SOURCES, TextSource, register_source, resolve_source
from covenant.engine.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

__all__ = [
    "SOURCES",
    "AssignmentError",
    "DataConfig",
    "DataError",
    "Manifest",
    "ManifestError",
    "Receipt",
    "ShardDataset",
    "ShardDtypeError",
    "ShardHashError",
    "ShardMissingError",
    "ShardSizeError",
    "SourceError",
    "TextSource",
    "TokenRangeError",
    "TokenizerMismatchError",
    "active_shard",
    "check_batch_layout",
    "default_data_dir",
    "load_manifest",
    "load_tokenizer",
    "open_active_shard",
    "prepare",
    "prepare_from_config",
    "rank_share",
    "receipt",
    "register_source",
    "resolve_source",
    "sample_pool",
    "step_ids",
    "tokenizer_hash",
    "train_tokenizer",
    "verify_data_dir",
    "verify_receipt",
    "window_seed",
]
