"""Shards and the reader: sample boundaries, tail dropping, held-out split, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_testutil import snapshot

from covenant.engine.data.errors import (
    DataError,
    ManifestError,
    ShardDtypeError,
    ShardHashError,
    ShardMissingError,
    ShardSizeError,
    TokenizerMismatchError,
    TokenRangeError,
)
from covenant.engine.data.prepare import is_val_document
from covenant.engine.data.shards import (
    Manifest,
    ShardDataset,
    ShardWriter,
    load_manifest,
    open_active_shard,
    verify_data_dir,
)
from covenant.engine.data.sources import BigTxtSource
from covenant.engine.data.tokenizer import load_tokenizer


def test_manifest_describes_the_files(small_data: tuple[Path, Manifest]) -> None:
    folder, m = small_data
    assert load_manifest(folder) == m
    assert len(m.train) >= 3, "small shard_tokens should give several train shards"
    assert [s.file for s in m.train] == [f"train-{i:05d}.bin" for i in range(len(m.train))]
    for s in m.train + m.val:
        data = (folder / s.file).read_bytes()
        assert len(data) == 4 * s.num_tokens
        assert hashlib.sha256(data).hexdigest() == s.sha256
        assert s.num_samples == s.num_tokens // m.seq_len
        assert int(np.frombuffer(data, "<u4").max()) == s.max_token_id < m.tokenizer.vocab_size
    # Only the last shard of a split may have a tail.
    assert all(s.num_tokens % m.seq_len == 0 for s in m.train[:-1])
    tok_bytes = (folder / "tokenizer.json").read_bytes()
    assert hashlib.sha256(tok_bytes).hexdigest() == m.tokenizer.sha256
    assert m.tokenizer.eod_id == 0 and m.tokenizer.vocab_size == 512


def test_samples_are_t_token_slices_and_tail_is_dropped(small_data: tuple[Path, Manifest]) -> None:
    folder, m = small_data
    last = len(m.train) - 1
    ds = ShardDataset(folder, "train", last)
    raw = np.fromfile(folder / m.train[last].file, dtype="<u4")
    t = m.seq_len
    assert ds.num_samples == len(raw) // t == len(ds)
    assert ds.num_samples * t <= len(raw) < (ds.num_samples + 1) * t  # tail is not a sample
    for i in (0, 1, ds.num_samples - 1):
        np.testing.assert_array_equal(ds.sample(i), raw[i * t : (i + 1) * t])
    with pytest.raises(IndexError, match="out of range"):
        ds.sample(ds.num_samples)  # the tail is not a sample
    with pytest.raises(IndexError):
        ds.batch([0, -1])
    b = ds.batch(np.array([3, 0, 3]))
    assert b.dtype == torch.int64 and b.shape == (3, t)
    np.testing.assert_array_equal(b[0].numpy(), raw[3 * t : 4 * t])
    np.testing.assert_array_equal(b[1].numpy(), raw[:t])
    assert ds.batch([]).shape == (0, t)


def test_writer_rounds_shards_to_whole_samples_and_merges_small_tail(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, "train", shard_tokens=105, seq_len=10)  # -> 100 per shard
    w.write(np.arange(230, dtype=np.uint32))  # 100 + 100 + 30 -> 30 < 50: merged into shard 1
    staged = w.finish()
    assert [s.info.num_tokens for s in staged] == [100, 130]
    assert [s.info.num_samples for s in staged] == [10, 13]
    assert np.fromfile(staged[1].tmp_path, dtype="<u4").tolist() == list(range(100, 230))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_val_split_holds_out_whole_documents(small_data: tuple[Path, Manifest]) -> None:
    folder, m = small_data
    tok = load_tokenizer(folder / "tokenizer.json", m.tokenizer.sha256)

    def docs_of(split: str) -> list[str]:
        ids = np.concatenate([np.fromfile(folder / s.file, "<u4") for s in m.shards(split)])  # type: ignore[arg-type]
        cuts = np.flatnonzero(ids == m.tokenizer.eod_id)
        assert cuts[-1] == len(ids) - 1, "every document ends with EOD"
        return [tok.decode(part.tolist()) for part in np.split(ids[:-1], cuts[:-1] + 1 - 0)]

    all_docs = list(BigTxtSource(doc_max_chars=2000).iter_documents())[:120]
    expected_val = [d for i, d in enumerate(all_docs) if is_val_document(i, 0.05)]
    expected_train = [d for i, d in enumerate(all_docs) if not is_val_document(i, 0.05)]
    val = [d.removesuffix("<|endoftext|>") for d in docs_of("val")]
    train = [d.removesuffix("<|endoftext|>") for d in docs_of("train")]
    assert val == expected_val and len(val) == m.split.num_val_documents == 6
    assert train == expected_train
    assert not set(val) & set(train)


def test_open_active_shard_follows_outer_step(small_data: tuple[Path, Manifest]) -> None:
    folder, m = small_data
    n = len(m.train)
    assert open_active_shard(folder, 0, 2).index == 0
    assert open_active_shard(folder, 3, 2).index == 1 % n
    assert open_active_shard(folder, 2 * n, 2).index == 0


# ---------------------------------------------------------------------------------------------
# Bad input: a typed error naming the file, and nothing on disk changed
# ---------------------------------------------------------------------------------------------


def _edit_manifest(folder: Path, split: str, index: int, **changes: object) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data[split][index].update(changes)
    path.write_text(json.dumps(data))


def test_missing_shard(data_copy: Path) -> None:
    (data_copy / "train-00001.bin").unlink()
    before = snapshot(data_copy)
    with pytest.raises(ShardMissingError, match=r"train-00001\.bin is missing"):
        ShardDataset(data_copy, "train", 1)
    with pytest.raises(ShardMissingError):
        verify_data_dir(data_copy)
    assert snapshot(data_copy) == before


@pytest.mark.parametrize(("cut", "word"), [(-4, "truncated"), (8, "too large")])
def test_truncated_or_padded_shard(data_copy: Path, cut: int, word: str) -> None:
    path = data_copy / "train-00000.bin"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut < 0 else data + b"\0" * cut)
    before = snapshot(data_copy)
    with pytest.raises(
        ShardSizeError, match=rf"train-00000\.bin is {word}: \d+ bytes, manifest says"
    ):
        ShardDataset(data_copy, "train", 0, verify_hash=False)
    assert snapshot(data_copy) == before


def test_wrong_dtype_in_manifest(data_copy: Path) -> None:
    _edit_manifest(data_copy, "train", 0, dtype="uint16")
    before = snapshot(data_copy)
    with pytest.raises(ShardDtypeError, match=r"train-00000\.bin: manifest says dtype 'uint16'"):
        ShardDataset(data_copy, "train", 0)
    assert snapshot(data_copy) == before


def test_changed_bytes_fail_the_hash(data_copy: Path) -> None:
    path = data_copy / "val-00000.bin"
    data = bytearray(path.read_bytes())
    data[8] ^= 1  # still a valid token id, same size
    path.write_bytes(bytes(data))
    before = snapshot(data_copy)
    with pytest.raises(ShardHashError, match=r"val-00000\.bin: sha256 [0-9a-f]{64} differs"):
        ShardDataset(data_copy, "val", 0)
    ShardDataset(data_copy, "val", 0, verify_hash=False)  # size and range still fine
    assert snapshot(data_copy) == before


@pytest.mark.parametrize("verify_hash", [True, False])
def test_token_id_out_of_vocab(data_copy: Path, verify_hash: bool) -> None:
    path = data_copy / "train-00000.bin"
    arr = np.fromfile(path, "<u4")
    arr[5] = 512  # == vocab_size
    arr.tofile(path)
    # Make the manifest's hash agree, so only the range check can catch it.
    _edit_manifest(data_copy, "train", 0, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    before = snapshot(data_copy)
    with pytest.raises(
        TokenRangeError, match=r"train-00000\.bin holds token id 512 >= vocab_size 512"
    ):
        ShardDataset(data_copy, "train", 0, verify_hash=verify_hash)
    assert snapshot(data_copy) == before


def test_tokenizer_hash_differs_from_manifest(data_copy: Path) -> None:
    with pytest.raises(TokenizerMismatchError, match="was written with tokenizer"):
        ShardDataset(data_copy, expected_tokenizer_hash="ab" * 32)
    tok_path = data_copy / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["added_tokens"][0]["content"] = "<|eot|>"
    tok_path.write_text(json.dumps(tok))
    before = snapshot(data_copy)
    with pytest.raises(TokenizerMismatchError, match=r"tokenizer\.json has hash .* was expected"):
        verify_data_dir(data_copy)
    assert snapshot(data_copy) == before


def test_bad_manifests(data_copy: Path) -> None:
    path = data_copy / "manifest.json"
    good = path.read_text()
    data = json.loads(good)
    data["train"][0]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="not of the form"):
        load_manifest(data_copy)
    path.write_text("{}")
    with pytest.raises(ManifestError, match="not a valid manifest"):
        load_manifest(data_copy)
    path.unlink()
    with pytest.raises(ManifestError, match="does not exist"):
        ShardDataset(data_copy)
    path.write_text(good)
    with pytest.raises(ShardMissingError, match="index 99 does not exist"):
        ShardDataset(data_copy, "val", 99)


def test_every_data_error_is_a_value_error_and_a_covenant_error() -> None:
    from covenant.engine.errors import CovenantError

    assert issubclass(DataError, ValueError) and issubclass(DataError, CovenantError)
    assert DataError("x").exit_code == 2
    for cls in (
        ShardMissingError,
        ShardSizeError,
        ShardDtypeError,
        ShardHashError,
        TokenRangeError,
        TokenizerMismatchError,
        ManifestError,
    ):
        assert issubclass(cls, DataError)
