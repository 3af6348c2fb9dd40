"""``prepare``: text sources -> tokenizer + pre-tokenized shards + manifest, cached and atomic.

Steps: resolve the sources (errors before anything is written), train the byte-level BPE on the
training documents (or reuse a given tokenizer), encode every document with an EOD token after
it, stream the tokens into ``train-*.bin`` / ``val-*.bin`` under temporary names, and only then
move them into place and write ``manifest.json`` last. A failure removes the temporaries and
leaves what was on disk as it was.

Held-out split: document ``i`` (0-based, in source order, empty documents skipped) is held out
iff ``floor((i+1)*f) > floor(i*f)`` for ``f = val_fraction``: every ``1/f``-th document, spread
over the whole corpus, whole documents only.

Caching: if ``manifest.json`` exists, its recorded request equals this one (parameters and the
sources' content hashes) and every file verifies, ``prepare`` returns it without writing. A
file lock serializes concurrent ``prepare`` calls on one directory (e.g. several ranks).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from covenant.engine.data.config import DataConfig
from covenant.engine.data.errors import DataError, ManifestError, TokenizerMismatchError
from covenant.engine.data.shards import (
    FORMAT_VERSION,
    Manifest,
    ShardWriter,
    SplitInfo,
    StagedShard,
    TokenizerInfo,
    commit_files,
    load_manifest,
    verify_data_dir,
)
from covenant.engine.data.sources import TextSource, resolve_source
from covenant.engine.data.tokenizer import (
    EOD_TOKEN,
    PIECE_CHARS,
    TOKENIZER_FILE,
    canonical_tokenizer_bytes,
    encode_documents,
    eod_id,
    load_tokenizer,
    train_tokenizer,
)
from covenant.engine.data.tokenizer import tokenizer_hash as compute_tokenizer_hash
from covenant.engine.fs import create_temp

__all__ = [
    "DATA_DIR_ENV",
    "PrepareProgress",
    "default_data_dir",
    "is_val_document",
    "prepare",
    "prepare_from_config",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "COVENANT_DATA_DIR"
SPLIT_RULE = "document i (0-based, source order) is held out iff floor((i+1)*f) > floor(i*f)"
#: Documents are encoded in batches of about this many characters (bounds memory, keeps
#: ``encode_batch`` busy on all cores).
ENCODE_BATCH_CHARS = 1 << 21
_LOCK_FILE = ".prepare.lock"
_DEFAULTS = DataConfig()


@dataclass(frozen=True)
class PrepareProgress:
    """Reported to ``on_progress`` as ``prepare`` advances."""

    stage: Literal["cached", "tokenizer", "encode", "commit", "done"]
    documents: int = 0
    tokens: int = 0


ProgressFn = Callable[[PrepareProgress], None]


def default_data_dir() -> Path:
    """``$COVENANT_DATA_DIR`` if set, else ``<git repo root or cwd>/.cache/data`` (never ``$HOME``)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / ".git").exists():
            return folder / ".cache" / "data"
    return cwd / ".cache" / "data"


def is_val_document(index: int, val_fraction: float) -> bool:
    """True iff document ``index`` belongs to the held-out split (see the module docstring)."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def _documents(sources: Sequence[TextSource], max_documents: int | None) -> Iterator[str]:
    n = 0
    for source in sources:
        for doc in source.iter_documents():
            if max_documents is not None and n >= max_documents:
                return
            if not doc.strip():
                continue
            yield doc
            n += 1


@contextmanager
def _dir_lock(out_dir: Path) -> Iterator[None]:
    with (out_dir / _LOCK_FILE).open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cached(out_dir: Path, params: dict[str, Any], verify_hash: bool) -> Manifest | None:
    try:
        manifest = load_manifest(out_dir)
    except ManifestError:
        return None
    if manifest.params != params:
        logger.info("%s holds data prepared with other parameters; preparing again", out_dir)
        return None
    try:
        verify_data_dir(out_dir, verify_hash=verify_hash)
    except DataError as e:
        logger.warning("cached data in %s does not verify (%s); preparing again", out_dir, e)
        return None
    return manifest


def _get_tokenizer(
    out_dir: Path,
    train_docs: Callable[[], Iterator[str]],
    vocab_size: int,
    tokenizer_path: Path | None,
    tokenizer_hash: str | None,
    piece_chars: int,
) -> Tokenizer:
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path, expected_hash=tokenizer_hash)
        if tok.get_vocab_size() != vocab_size:
            raise TokenizerMismatchError(
                f"tokenizer file {tokenizer_path} has vocab {tok.get_vocab_size()}, "
                f"but vocab_size {vocab_size} was requested"
            )
        return tok
    existing = out_dir / TOKENIZER_FILE
    if tokenizer_hash is not None and existing.is_file():
        try:
            return load_tokenizer(existing, expected_hash=tokenizer_hash)
        except TokenizerMismatchError:
            pass  # not the pinned one: train and compare below
    tok = train_tokenizer(train_docs(), vocab_size, piece_chars=piece_chars)
    if tokenizer_hash is not None and compute_tokenizer_hash(tok) != tokenizer_hash.lower():
        raise TokenizerMismatchError(
            f"the tokenizer trained for {out_dir} has hash {compute_tokenizer_hash(tok)}, "
            f"but {tokenizer_hash} was required (pass the tokenizer file that has that hash)"
        )
    return tok


def prepare(
    out_dir: Path,
    sources: Sequence[str | TextSource] | None = None,
    vocab_size: int | None = None,
    seq_len: int = _DEFAULTS.seq_len,
    val_fraction: float = _DEFAULTS.val_fraction,
    *,
    shard_tokens: int = _DEFAULTS.shard_tokens,
    doc_max_chars: int = _DEFAULTS.doc_max_chars,
    max_documents: int | None = _DEFAULTS.max_documents,
    tokenizer_path: Path | None = None,
    tokenizer_hash: str | None = None,
    piece_chars: int = PIECE_CHARS,
    force: bool = False,
    verify_hash: bool = True,
    on_progress: ProgressFn | None = None,
) -> Manifest:
    """Prepare (or reuse) pre-tokenized shards in ``out_dir``; return the manifest.

    ``sources`` are spec strings (see :mod:`covenant.engine.data.sources`) or source objects;
    default ``["bigtxt"]``. ``vocab_size`` None means the given tokenizer's size, else the
    config default. ``tokenizer_path`` reuses a tokenizer.json instead of training;
    ``tokenizer_hash`` pins the tokenizer (reused from ``out_dir`` if it is there).
    ``verify_hash`` False makes the cache check compare sizes and token ranges but not sha256
    (for corpora too large to hash at every start).
    """
    report: ProgressFn = on_progress or (lambda _p: None)
    out_dir = Path(out_dir)
    if vocab_size is None:
        vocab_size = (
            load_tokenizer(tokenizer_path, tokenizer_hash).get_vocab_size()
            if tokenizer_path is not None
            else _DEFAULTS.vocab_size
        )
    specs = list(sources) if sources is not None else list(_DEFAULTS.sources)
    # Validate every number through the config model: one set of bounds, one error style.
    DataConfig(
        sources=[s if isinstance(s, str) else s.name for s in specs],
        vocab_size=vocab_size,
        seq_len=seq_len,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        doc_max_chars=doc_max_chars,
        max_documents=max_documents,
        tokenizer_hash=tokenizer_hash,
    )
    resolved = [resolve_source(s, doc_max_chars) if isinstance(s, str) else s for s in specs]
    if tokenizer_path is not None and tokenizer_hash is None:
        tokenizer_hash = compute_tokenizer_hash(load_tokenizer(tokenizer_path))
    params: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "sources": [s.describe() for s in resolved],
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "doc_max_chars": doc_max_chars,
        "max_documents": max_documents,
        "piece_chars": piece_chars,
        "tokenizer_hash": tokenizer_hash,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with _dir_lock(out_dir):
        if not force and (cached := _cached(out_dir, params, verify_hash)) is not None:
            logger.info("using cached data in %s", out_dir)
            report(PrepareProgress("cached", cached.split.num_documents, cached.train_tokens))
            return cached
        report(PrepareProgress("tokenizer"))

        def train_docs() -> Iterator[str]:
            for i, doc in enumerate(_documents(resolved, max_documents)):
                if not is_val_document(i, val_fraction):
                    yield doc

        tok = _get_tokenizer(
            out_dir, train_docs, vocab_size, tokenizer_path, tokenizer_hash, piece_chars
        )
        return _encode_and_commit(
            out_dir,
            resolved,
            tok,
            params,
            seq_len,
            val_fraction,
            shard_tokens,
            max_documents,
            piece_chars,
            report,
        )


def _encode_and_commit(
    out_dir: Path,
    sources: Sequence[TextSource],
    tok: Tokenizer,
    params: dict[str, Any],
    seq_len: int,
    val_fraction: float,
    shard_tokens: int,
    max_documents: int | None,
    piece_chars: int,
    report: ProgressFn,
) -> Manifest:
    eod = eod_id(tok)
    vocab = tok.get_vocab_size()
    writers = {
        "train": ShardWriter(out_dir, "train", shard_tokens, seq_len),
        "val": ShardWriter(out_dir, "val", shard_tokens, seq_len),
    }
    tok_tmp: Path | None = None
    num_docs = num_val = 0
    try:
        batch: list[tuple[bool, str]] = []
        chars = 0

        def flush() -> None:
            arrays = encode_documents(tok, [d for _, d in batch], eod, piece_chars=piece_chars)
            for split, want in (("train", False), ("val", True)):
                parts = [a for (v, _), a in zip(batch, arrays, strict=True) if v == want]
                if parts:
                    writers[split].write(np.concatenate(parts))
            batch.clear()
            report(PrepareProgress("encode", num_docs, writers["train"].num_tokens))

        for i, doc in enumerate(_documents(sources, max_documents)):
            held_out = is_val_document(i, val_fraction)
            batch.append((held_out, doc))
            num_docs += 1
            num_val += held_out
            chars += len(doc)
            if chars >= ENCODE_BATCH_CHARS:
                flush()
                chars = 0
        if batch:
            flush()

        staged: dict[str, list[StagedShard]] = {k: w.finish() for k, w in writers.items()}
        train_samples = sum(s.info.num_samples for s in staged["train"])
        val_samples = sum(s.info.num_samples for s in staged["val"])
        if train_samples == 0:
            raise DataError(
                f"preparing {out_dir}: {num_docs - num_val} training documents give "
                f"{writers['train'].num_tokens} tokens, less than one sample of seq_len {seq_len}"
            )
        if val_fraction > 0 and val_samples == 0:
            raise DataError(
                f"preparing {out_dir}: the held-out split is empty ({num_val} of {num_docs} "
                f"documents, {writers['val'].num_tokens} tokens, seq_len {seq_len}); raise "
                "val_fraction or add data"
            )
        tok_tmp, f = create_temp(out_dir, TOKENIZER_FILE)
        with f:
            f.write(canonical_tokenizer_bytes(tok.to_str()))
            f.flush()
            os.fsync(f.fileno())
        manifest = Manifest(
            seq_len=seq_len,
            tokenizer=TokenizerInfo(
                file=TOKENIZER_FILE,
                sha256=compute_tokenizer_hash(tok),
                vocab_size=vocab,
                eod_token=EOD_TOKEN,
                eod_id=eod,
            ),
            train=[s.info for s in staged["train"]],
            val=[s.info for s in staged["val"]],
            split=SplitInfo(
                rule=SPLIT_RULE,
                val_fraction=val_fraction,
                num_documents=num_docs,
                num_val_documents=num_val,
            ),
            sources=params["sources"],
            params=params,
        )
        report(PrepareProgress("commit", num_docs, manifest.train_tokens))
        files = {s.info.file: s.tmp_path for split in staged.values() for s in split}
        files[TOKENIZER_FILE] = tok_tmp
        commit_files(out_dir, files, manifest)
    except BaseException:
        for w in writers.values():
            w.abort()
        if tok_tmp is not None:
            tok_tmp.unlink(missing_ok=True)
        raise
    logger.info(
        "prepared %s: %d train tokens (%d samples) in %d shard(s), %d val tokens, tokenizer %s",
        out_dir,
        manifest.train_tokens,
        manifest.train_samples,
        len(manifest.train),
        manifest.val_tokens,
        manifest.tokenizer.sha256[:12],
    )
    report(PrepareProgress("done", num_docs, manifest.train_tokens))
    return manifest


def prepare_from_config(
    cfg: DataConfig, *, force: bool = False, on_progress: ProgressFn | None = None
) -> Manifest:
    """:func:`prepare` with every setting from a :class:`DataConfig` (``dir`` None: default)."""
    return prepare(
        cfg.dir if cfg.dir is not None else default_data_dir(),
        cfg.sources,
        cfg.vocab_size,
        cfg.seq_len,
        cfg.val_fraction,
        shard_tokens=cfg.shard_tokens,
        doc_max_chars=cfg.doc_max_chars,
        max_documents=cfg.max_documents,
        tokenizer_hash=cfg.tokenizer_hash,
        force=force,
        verify_hash=cfg.verify_hash,
        on_progress=on_progress,
    )
