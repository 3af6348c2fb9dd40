"""``prepare``: caching, atomicity on failure, tokenizer reuse/pinning, sources, defaults."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_testutil import SMALL, snapshot

from covenant.engine.data.config import DataConfig
from covenant.engine.data.errors import DataError, SourceError, TokenizerMismatchError
from covenant.engine.data.prepare import (
    PrepareProgress,
    default_data_dir,
    is_val_document,
    prepare,
    prepare_from_config,
)
from covenant.engine.data.shards import Manifest, ShardDataset, verify_data_dir

TINY: dict[str, Any] = {
    "vocab_size": 300,
    "seq_len": 32,
    "doc_max_chars": 1500,
    "max_documents": 40,
    "val_fraction": 0.1,
}


def _tiny(out: Path, **over: Any) -> Manifest:
    kw = {**TINY, **over}
    sources = kw.pop("sources", ["bigtxt"])
    return prepare(out, sources, **kw)


def test_second_prepare_is_a_cache_hit_and_writes_nothing(tmp_path: Path) -> None:
    events: list[PrepareProgress] = []
    m1 = _tiny(tmp_path, on_progress=events.append)
    assert {e.stage for e in events} >= {"tokenizer", "encode", "done"}
    before = snapshot(tmp_path)
    events.clear()
    m2 = _tiny(tmp_path, on_progress=events.append)
    assert m2 == m1
    assert [e.stage for e in events] == ["cached"]
    assert snapshot(tmp_path) == before  # same bytes, same mtimes


def test_same_request_gives_identical_bytes(tmp_path: Path) -> None:
    _tiny(tmp_path / "a")
    _tiny(tmp_path / "b")
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}


def test_changed_request_or_damaged_cache_prepares_again(tmp_path: Path) -> None:
    m1 = _tiny(tmp_path, shard_tokens=3000)
    assert len(m1.train) > 1
    m2 = _tiny(tmp_path, seq_len=16)  # one big shard now: the old extra shards must go
    assert m2.seq_len == 16 and len(m2.train) == 1
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["train-00000.bin", "val-00000.bin"]
    verify_data_dir(tmp_path)
    shard = tmp_path / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    m3 = _tiny(tmp_path, seq_len=16)
    assert m3 == m2
    verify_data_dir(tmp_path)


class _Exploding:
    """Yields some documents, then fails: simulates a source that breaks half-way."""

    name = "exploding"

    def __init__(self, after: int) -> None:
        self.after = after

    def iter_documents(self) -> Iterator[str]:
        for i in range(self.after):
            yield f"document number {i} " * 30
        raise RuntimeError("disk on fire")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "after": self.after}


def test_failure_leaves_previous_data_untouched(tmp_path: Path) -> None:
    _tiny(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _tiny(tmp_path, sources=[_Exploding(20)])
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_source_fails_before_creating_anything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=r"missing\.jsonl"):
        _tiny(out, sources=["bigtxt", str(tmp_path / "missing.jsonl")])
    assert not out.exists()


def test_empty_held_out_split_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="held-out split is empty"):
        _tiny(tmp_path, val_fraction=0.01, max_documents=20)
    assert not list(tmp_path.glob("*.bin")) and not (tmp_path / "manifest.json").exists()
    m = _tiny(tmp_path, val_fraction=0.0, max_documents=20)
    assert m.val == [] and m.split.num_val_documents == 0


def test_tokenizer_reuse_and_pinning(tmp_path: Path) -> None:
    a = _tiny(tmp_path / "a")
    tok_file = tmp_path / "a" / "tokenizer.json"
    (tmp_path / "doc.txt").write_text("Some other text entirely. " * 400)
    b = _tiny(
        tmp_path / "b",
        sources=[str(tmp_path / "doc.txt")],
        tokenizer_path=tok_file,
        vocab_size=None,
        max_documents=None,
        val_fraction=0.0,
    )
    assert b.tokenizer.sha256 == a.tokenizer.sha256 and b.tokenizer.vocab_size == 300
    with pytest.raises(TokenizerMismatchError, match="has vocab 300, but vocab_size 512"):
        _tiny(tmp_path / "c", tokenizer_path=tok_file, vocab_size=512)
    with pytest.raises(TokenizerMismatchError, match="was required"):
        _tiny(tmp_path / "d", tokenizer_hash="0" * 64)
    assert not (tmp_path / "d" / "manifest.json").exists()
    # A pin that matches the deterministic training result is fine.
    assert (
        _tiny(tmp_path / "e", tokenizer_hash=a.tokenizer.sha256).tokenizer.sha256
        == a.tokenizer.sha256
    )


def test_jsonl_and_txt_sources_end_to_end(tmp_path: Path) -> None:
    texts = [f"Record {i}: " + "lorem ipsum dolor sit amet " * (5 + i % 9) for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "b.txt").write_text("A plain text file.\n\nWith two paragraphs.\n")
    out = tmp_path / "out"
    m = prepare(out, [str(tmp_path / "a.jsonl"), f"txt:{tmp_path / 'b.txt'}"], 300, 16, 0.1)
    assert m.split.num_documents == 61
    assert m.split.num_val_documents == sum(is_val_document(i, 0.1) for i in range(61))
    assert [s["name"] for s in m.sources] == ["jsonl", "txt"]
    ds = ShardDataset(out)
    eods = int((ds.tokens == m.tokenizer.eod_id).sum())
    assert eods == 61 - m.split.num_val_documents


def test_concurrent_prepares_agree(tmp_path: Path) -> None:
    results: list[Manifest] = []
    threads = [threading.Thread(target=lambda: results.append(_tiny(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    verify_data_dir(tmp_path)


def test_prepare_from_config(tmp_path: Path) -> None:
    cfg = DataConfig(dir=tmp_path, vocab_size=300, seq_len=32, max_documents=30, val_fraction=0.1)
    m = prepare_from_config(cfg)
    assert m.tokenizer.vocab_size == 300 and m.seq_len == 32
    with pytest.raises(ValueError):
        DataConfig(seq_len=1)
    with pytest.raises(ValueError):
        DataConfig(unknown=1)  # type: ignore[call-arg]


def test_bad_numbers_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        _tiny(tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="val_fraction"):
        _tiny(tmp_path, val_fraction=1.5)


def test_default_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVENANT_DATA_DIR", str(tmp_path / "env"))
    assert default_data_dir() == tmp_path / "env"
    monkeypatch.delenv("COVENANT_DATA_DIR")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")
    assert default_data_dir() == repo / ".cache" / "data"


def test_val_rule_spreads_documents() -> None:
    held = [i for i in range(100) if is_val_document(i, 0.05)]
    assert held == [19, 39, 59, 79, 99]
    assert not any(is_val_document(i, 0.0) for i in range(100))


def test_whole_bigtxt_at_vocab_8192(tmp_path: Path) -> None:
    m = prepare(tmp_path, ["bigtxt"], 8192, 128, 0.02)
    assert m.tokenizer.vocab_size == 8192
    assert 1_500_000 < m.train_tokens < 1_800_000  # ~1.7M tokens per docs/DATA.md
    assert m.val_samples > 100
    ds = ShardDataset(tmp_path)
    assert ds.batch(np.arange(0, ds.num_samples, 1000)).max() < 8192
    assert SMALL["vocab_size"] == 512  # the shared fixture stays small
