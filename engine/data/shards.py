"""Pre-tokenized shards: the on-disk format, the manifest, the atomic writer and the reader.

Format (``format_version`` 1): each shard is a flat little-endian ``uint32`` array, one token per
element, documents separated by the EOD token. Sample ``i`` of a shard is tokens
``[i*T, (i+1)*T)``; a tail shorter than ``T`` is never read. A data directory holds::

    manifest.json      what is here (this module's :class:`Manifest`), written last
    tokenizer.json     canonical tokenizer JSON; its sha256 is in the manifest
    train-00000.bin    training shards
    val-00000.bin      the held-out split (whole documents, never seen in training)

Reading is read-only (``numpy.memmap`` mode ``"r"``) and checks every shard against the manifest
before the first sample is served: the file exists, its size is ``num_tokens * 4``, the dtype is
``uint32``, its sha256 matches (optional; once per process per (path, size, mtime)), and no
token id is ``>= vocab_size``. Each failure is a typed :class:`~covenant.engine.data.errors.DataError`
that names the file and what differs; nothing on disk is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from covenant.engine.data.assignment import active_shard
from covenant.engine.data.errors import (
    ManifestError,
    ShardDtypeError,
    ShardHashError,
    ShardMissingError,
    ShardSizeError,
    TokenizerMismatchError,
    TokenRangeError,
)
from covenant.engine.data.tokenizer import load_tokenizer
from covenant.engine.fs import atomic_write_bytes, create_temp

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "Manifest",
    "ShardDataset",
    "ShardInfo",
    "ShardWriter",
    "SplitInfo",
    "StagedShard",
    "TokenizerInfo",
    "commit_files",
    "load_manifest",
    "open_active_shard",
    "scan_shard",
    "shard_name",
    "verify_data_dir",
    "write_manifest",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DTYPE = "uint32"
#: On-disk element type: explicit little-endian so files are portable across hosts.
NP_DTYPE = np.dtype("<u4")
TOKEN_BYTES = NP_DTYPE.itemsize
#: A manifest larger than this is refused before it is read.
MAX_MANIFEST_BYTES = 16 << 20
#: Shard files are read in chunks of this many bytes for hashing.
SCAN_CHUNK_BYTES = 16 << 20

Split = Literal["train", "val"]
_SHARD_RE = re.compile(r"(train|val)-\d{5}\.bin")
_HEX64 = r"^[0-9a-f]{64}$"


def shard_name(split: Split, index: int) -> str:
    """``train-00000.bin`` style file name."""
    return f"{split}-{index:05d}.bin"


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


class ShardInfo(BaseModel):
    """One shard file as the manifest describes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    # A plain string, not a Literal: a wrong dtype must surface as ShardDtypeError naming the
    # file when the shard is opened, not as a generic manifest parse error.
    dtype: str = DTYPE
    num_tokens: int = Field(ge=0)
    num_samples: int = Field(ge=0)
    sha256: str = Field(pattern=_HEX64)
    max_token_id: int = Field(ge=-1, description="-1 for an empty shard")

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # The manifest may come from elsewhere: never let it point outside its directory.
        if not _SHARD_RE.fullmatch(v):
            raise ValueError(
                f"shard file name {v!r} is not of the form train-NNNNN.bin/val-NNNNN.bin"
            )
        return v


class TokenizerInfo(BaseModel):
    """The tokenizer the shards were written with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = "tokenizer.json"
    sha256: str = Field(pattern=_HEX64)
    kind: str = "byte-level-bpe"
    vocab_size: int = Field(ge=1)
    eod_token: str
    eod_id: int = Field(ge=0)

    @field_validator("file")
    @classmethod
    def _plain_file(cls, v: str) -> str:
        if "/" in v or "\\" in v or v in {"", ".", ".."}:
            raise ValueError(f"tokenizer file name {v!r} must be a plain file name")
        return v


class SplitInfo(BaseModel):
    """How documents were divided between train and val."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: str
    val_fraction: float
    num_documents: int
    num_val_documents: int


class Manifest(BaseModel):
    """``manifest.json``: everything needed to read and trust a data directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    seq_len: int = Field(ge=1)
    tokenizer: TokenizerInfo
    train: list[ShardInfo]
    val: list[ShardInfo]
    split: SplitInfo
    sources: list[dict[str, Any]]
    params: dict[str, Any] = Field(description="The prepare request; a cache hit needs equality.")

    def shards(self, split: Split) -> list[ShardInfo]:
        """The shards of one split, in order."""
        return list(self.train if split == "train" else self.val)

    @property
    def train_tokens(self) -> int:
        return sum(s.num_tokens for s in self.train)

    @property
    def train_samples(self) -> int:
        return sum(s.num_samples for s in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(s.num_tokens for s in self.val)

    @property
    def val_samples(self) -> int:
        return sum(s.num_samples for s in self.val)

    @property
    def min_train_shard_samples(self) -> int:
        """The smallest N over train shards: ``H*B`` must not exceed it (any shard may be active)."""
        return min((s.num_samples for s in self.train), default=0)

    def summary(self) -> dict[str, Any]:
        """A short JSON-able summary (for ``covenant data inspect`` and logs)."""
        return {
            "format_version": self.format_version,
            "seq_len": self.seq_len,
            "vocab_size": self.tokenizer.vocab_size,
            "tokenizer_sha256": self.tokenizer.sha256,
            "eod_id": self.tokenizer.eod_id,
            "train_shards": len(self.train),
            "train_tokens": self.train_tokens,
            "train_samples": self.train_samples,
            "val_shards": len(self.val),
            "val_tokens": self.val_tokens,
            "val_samples": self.val_samples,
            "documents": self.split.num_documents,
            "val_documents": self.split.num_val_documents,
            "sources": [s.get("name", "?") for s in self.sources],
        }


def load_manifest(data_dir: Path) -> Manifest:
    """Read and validate ``data_dir/manifest.json`` (size-bounded, pydantic-validated)."""
    path = Path(data_dir) / MANIFEST_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise ManifestError(
            f"{path} does not exist (run `covenant data prepare --out {data_dir}`)"
        ) from e
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is {size} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise ManifestError(
            f"{path} is not a valid manifest: {e.errors()[0]['msg']} "
            f"at {'.'.join(map(str, e.errors()[0]['loc']))}"
        ) from e
    if manifest.format_version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {manifest.format_version}; this engine reads {FORMAT_VERSION}"
        )
    return manifest


def write_manifest(data_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically; stable key order, so equal manifests are equal bytes."""
    path = Path(data_dir) / MANIFEST_FILE
    data = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, data.encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------
# Scanning (sha256 + max), cached per process
# --------------------------------------------------------------------------------------------

_scan_cache: dict[tuple[str, int, int], tuple[str, int]] = {}
_scan_lock = threading.Lock()


def scan_shard(path: Path) -> tuple[str, int]:
    """Return ``(sha256 hex, max token id or -1)`` of a shard file, reading it once.

    Cached per process by (resolved path, size, mtime_ns): a shard is hashed once even when it
    is opened by many readers.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _scan_lock:
        hit = _scan_cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    top = -1
    carry = b""
    with path.open("rb") as f:
        while block := f.read(SCAN_CHUNK_BYTES):
            h.update(block)
            block = carry + block
            usable = len(block) - len(block) % TOKEN_BYTES
            carry = block[usable:]
            if usable:
                top = max(top, int(np.frombuffer(block[:usable], dtype=NP_DTYPE).max()))
    result = (h.hexdigest(), top)
    with _scan_lock:
        _scan_cache[key] = result
    return result


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedShard:
    """A finished shard still under its temporary name, with what the manifest needs."""

    tmp_path: Path
    info: ShardInfo


class ShardWriter:
    """Append tokens to numbered shard files of one split, under temporary names.

    A shard is closed once it holds ``shard_tokens`` tokens (rounded down to a multiple of
    ``seq_len`` so that only the last shard can have a tail). A last shard smaller than half a
    shard is appended to the one before it, so no train shard is tiny (the assignment needs
    ``H*B <= N`` on every shard). Nothing gets its final name here: :func:`commit_files` does
    that after everything is written, and :meth:`abort` removes the temporaries.
    """

    def __init__(self, out_dir: Path, split: Split, shard_tokens: int, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.seq_len = seq_len
        self.shard_tokens = max(seq_len, shard_tokens - shard_tokens % seq_len)
        self._tmp: list[Path] = []
        self._counts: list[int] = []
        self._file: BinaryIO | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self._counts)

    def _open_next(self) -> None:
        self._close()
        tmp, self._file = create_temp(self.out_dir, shard_name(self.split, len(self._tmp)))
        self._tmp.append(tmp)
        self._counts.append(0)

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def write(self, tokens: NDArray[np.uint32]) -> None:
        """Append tokens (any length), opening new shards as they fill up."""
        arr = np.ascontiguousarray(tokens, dtype=NP_DTYPE)
        pos = 0
        while pos < arr.size:
            if self._file is None or self._counts[-1] >= self.shard_tokens:
                self._open_next()
            f = self._file
            assert f is not None  # _open_next always leaves a file open
            room = self.shard_tokens - self._counts[-1]
            take = min(room, arr.size - pos)
            f.write(arr[pos : pos + take].tobytes())
            self._counts[-1] += take
            pos += take

    def finish(self) -> list[StagedShard]:
        """Close, merge a small last shard into its predecessor, hash, and describe each shard."""
        self._close()
        if len(self._counts) >= 2 and self._counts[-1] < self.shard_tokens // 2:
            last, prev = self._tmp.pop(), self._tmp[-1]
            with prev.open("ab") as dst, last.open("rb") as src:
                while block := src.read(SCAN_CHUNK_BYTES):
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            last.unlink()
            tail = self._counts.pop()
            self._counts[-1] += tail
        staged = []
        for i, (tmp, count) in enumerate(zip(self._tmp, self._counts, strict=True)):
            sha, top = scan_shard(tmp)
            info = ShardInfo(
                file=shard_name(self.split, i),
                num_tokens=count,
                num_samples=count // self.seq_len,
                sha256=sha,
                max_token_id=top,
            )
            staged.append(StagedShard(tmp_path=tmp, info=info))
        return staged

    def abort(self) -> None:
        """Remove every temporary file this writer made."""
        with contextlib.suppress(Exception):
            self._close()
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)
        self._tmp.clear()
        self._counts.clear()


def commit_files(out_dir: Path, staged: dict[str, Path], manifest: Manifest) -> None:
    """Move staged files to their final names and write the manifest last.

    The old manifest is removed first, so a crash half-way leaves a directory without a manifest
    (re-prepared on the next run) rather than a manifest describing other bytes. Shard files of
    an earlier prepare that the new manifest does not name are removed.
    """
    out_dir = Path(out_dir)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for final, tmp in staged.items():
        os.replace(tmp, out_dir / final)
    keep = {s.file for s in manifest.train} | {s.file for s in manifest.val}
    for stale in out_dir.iterdir():
        if _SHARD_RE.fullmatch(stale.name) and stale.name not in keep:
            stale.unlink()
    write_manifest(out_dir, manifest)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class ShardDataset:
    """One shard of a prepared directory, memory-mapped read-only and checked against the manifest.

    ``sample(i)`` is tokens ``[i*T, (i+1)*T)``; ``batch(ids)`` stacks samples into a
    ``torch.LongTensor`` of shape ``(len(ids), T)``.
    """

    def __init__(
        self,
        data_dir: Path,
        split: Split = "train",
        index: int = 0,
        *,
        verify_hash: bool = True,
        expected_tokenizer_hash: str | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.data_dir)
        if expected_tokenizer_hash is not None and (
            expected_tokenizer_hash.lower() != self.manifest.tokenizer.sha256
        ):
            raise TokenizerMismatchError(
                f"{self.data_dir / MANIFEST_FILE} was written with tokenizer "
                f"{self.manifest.tokenizer.sha256}, but {expected_tokenizer_hash} is required"
            )
        shards = self.manifest.shards(split)
        if not 0 <= index < len(shards):
            raise ShardMissingError(
                f"{self.data_dir / MANIFEST_FILE} has {len(shards)} {split} shard(s); "
                f"index {index} does not exist"
            )
        self.split: Split = split
        self.index = index
        self.info = shards[index]
        self.path = self.data_dir / self.info.file
        self.seq_len = self.manifest.seq_len
        self.vocab_size = self.manifest.tokenizer.vocab_size
        self.eod_id = self.manifest.tokenizer.eod_id
        self._check(verify_hash)
        if self.info.num_tokens:
            # A plain ndarray view of the read-only map: slicing a np.memmap subclass costs
            # several microseconds per call in __array_finalize__.
            self.tokens: NDArray[np.uint32] = np.memmap(
                self.path, dtype=NP_DTYPE, mode="r", shape=(self.info.num_tokens,)
            ).view(np.ndarray)
        else:
            self.tokens = np.zeros(0, dtype=NP_DTYPE)

    def _check(self, verify_hash: bool) -> None:
        info, path = self.info, self.path
        if info.dtype != DTYPE:
            raise ShardDtypeError(f"{path}: manifest says dtype {info.dtype!r}, expected {DTYPE!r}")
        if info.num_samples != info.num_tokens // self.seq_len:
            raise ShardSizeError(
                f"{path}: manifest says {info.num_samples} samples, but {info.num_tokens} tokens "
                f"at seq_len {self.seq_len} make {info.num_tokens // self.seq_len}"
            )
        if info.max_token_id >= self.vocab_size:
            raise TokenRangeError(
                f"{path}: manifest records token id {info.max_token_id} >= vocab_size {self.vocab_size}"
            )
        try:
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise ShardMissingError(f"{path} is missing (named by {MANIFEST_FILE})") from e
        expected = info.num_tokens * TOKEN_BYTES
        if size != expected:
            what = "truncated" if size < expected else "too large"
            raise ShardSizeError(
                f"{path} is {what}: {size} bytes, manifest says {info.num_tokens} uint32 tokens "
                f"= {expected} bytes"
            )
        if verify_hash:
            sha, top = scan_shard(path)
            if sha != info.sha256:
                raise ShardHashError(
                    f"{path}: sha256 {sha} differs from the manifest's {info.sha256}"
                )
        else:
            top = int(np.memmap(path, dtype=NP_DTYPE, mode="r").max()) if info.num_tokens else -1
        if top >= self.vocab_size:
            raise TokenRangeError(f"{path} holds token id {top} >= vocab_size {self.vocab_size}")

    @property
    def num_tokens(self) -> int:
        return self.info.num_tokens

    @property
    def num_samples(self) -> int:
        """Whole samples in this shard (the tail shorter than T is not a sample)."""
        return self.info.num_samples

    def __len__(self) -> int:
        return self.num_samples

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample id {i} out of range [0, {self.num_samples}) in {self.path}")

    def sample(self, i: int) -> NDArray[np.uint32]:
        """Tokens ``[i*T, (i+1)*T)`` as a read-only uint32 view."""
        i = int(i)
        self._check_id(i)
        return self.tokens[i * self.seq_len : (i + 1) * self.seq_len]

    def batch(self, ids: Sequence[int] | NDArray[np.integer[Any]]) -> torch.Tensor:
        """Samples ``ids`` stacked into an int64 tensor of shape ``(len(ids), T)``."""
        # Imported here so that `covenant data prepare` and validators' assignment checks do not
        # pay for importing torch.
        import torch

        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            bad = int(idx[(idx < 0) | (idx >= self.num_samples)][0])
            self._check_id(bad)
        t = self.seq_len
        rows = self.tokens[: self.num_samples * t].reshape(self.num_samples, t)
        return torch.from_numpy(rows[idx].astype(np.int64))


def open_active_shard(
    data_dir: Path,
    outer_step: int,
    windows_per_shard: int,
    *,
    verify_hash: bool = True,
    expected_tokenizer_hash: str | None = None,
    manifest: Manifest | None = None,
) -> ShardDataset:
    """Open the train shard that is active at ``outer_step`` (see :func:`active_shard`)."""
    m = manifest if manifest is not None else load_manifest(Path(data_dir))
    index = active_shard(outer_step, len(m.train), windows_per_shard)
    return ShardDataset(
        data_dir,
        "train",
        index,
        verify_hash=verify_hash,
        expected_tokenizer_hash=expected_tokenizer_hash,
        manifest=m,
    )


def verify_data_dir(
    data_dir: Path, *, verify_hash: bool = True, expected_tokenizer_hash: str | None = None
) -> Manifest:
    """Check a whole data directory: manifest, every shard, and the tokenizer file's hash.

    Returns the manifest; raises the first :class:`~covenant.engine.data.errors.DataError`.
    """
    data_dir = Path(data_dir)
    m = load_manifest(data_dir)
    load_tokenizer(data_dir / m.tokenizer.file, expected_hash=m.tokenizer.sha256)
    splits: tuple[Split, ...] = ("train", "val")
    for split in splits:
        for i in range(len(m.shards(split))):
            ShardDataset(
                data_dir,
                split,
                i,
                verify_hash=verify_hash,
                expected_tokenizer_hash=expected_tokenizer_hash,
                manifest=m,
            )
    return m
