"""The offline byte-level BPE: determinism, hash round trip, piece cutting, EOD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from covenant.engine.data.errors import TokenizerMismatchError
from covenant.engine.data.sources import BigTxtSource
from covenant.engine.data.tokenizer import (
    EOD_TOKEN,
    cut_pieces,
    encode_documents,
    eod_id,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(BigTxtSource(doc_max_chars=2000).iter_documents())[:60]


@pytest.fixture(scope="module")
def tok(docs: list[str]) -> Tokenizer:
    return train_tokenizer(docs, 512)


def test_training_is_deterministic(docs: list[str], tok: Tokenizer) -> None:
    again = train_tokenizer(docs, 512)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    assert tok.get_vocab_size() == 512
    assert eod_id(tok) == 0 and tok.id_to_token(0) == EOD_TOKEN


def test_save_load_hash_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    h = save_tokenizer(tok, path)
    assert h == tokenizer_hash(tok)
    loaded = load_tokenizer(path, expected_hash=h)
    assert tokenizer_hash(loaded) == h
    # The hash is of the canonical JSON: pretty-printing the file does not change it.
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4))
    assert tokenizer_hash(load_tokenizer(path, expected_hash=h)) == h


def test_load_with_other_hash_fails_and_leaves_file(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    before = path.read_bytes()
    with pytest.raises(
        TokenizerMismatchError, match=r"tokenizer\.json has hash [0-9a-f]{64}, but 0+ was expected"
    ):
        load_tokenizer(path, expected_hash="0" * 64)
    assert path.read_bytes() == before
    with pytest.raises(TokenizerMismatchError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{nope")
    with pytest.raises(TokenizerMismatchError, match="not valid JSON"):
        load_tokenizer(tmp_path / "junk.json")


def test_cut_pieces_tokenizes_like_the_whole_text(tok: Tokenizer, docs: list[str]) -> None:
    text = "\n\n".join(docs[:5])
    pieces = cut_pieces(text, 256)
    assert "".join(pieces) == text
    assert all(len(p) <= 256 for p in pieces)
    whole = tok.encode(text).ids
    cut = [i for p in pieces for i in tok.encode(p).ids]
    assert cut == whole


def test_encode_documents_appends_eod_and_decodes_back(tok: Tokenizer) -> None:
    texts = ["Hello  world,\n\nthe  quick brown fox.", "Second  document " * 300]
    arrays = encode_documents(tok, texts, eod_id(tok), piece_chars=128)
    assert len(arrays) == 2
    for text, arr in zip(texts, arrays, strict=True):
        assert arr.dtype.name == "uint32"
        assert arr[-1] == 0 and 0 not in arr[:-1].tolist()
        assert tok.decode(arr[:-1].tolist()) == text


def test_vocab_too_small_rejected(docs: list[str]) -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_tokenizer(docs, 100)
