"""An offline tokenizer: byte-level BPE trained locally with HuggingFace ``tokenizers``.

No hub and no download: the tokenizer is trained on the prepared training documents (seconds
for big.txt), saved as canonical JSON, and identified by :func:`tokenizer_hash`, the sha256 of
that canonical JSON. The shard manifest records the hash; loading checks it, so shards are never
read with a tokenizer they were not written with.

``<|endoftext|>`` is the only special token (id 0) and separates documents in the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from covenant.engine.data.errors import TokenizerMismatchError
from covenant.engine.fs import atomic_write_bytes

__all__ = [
    "EOD_TOKEN",
    "MAX_TOKENIZER_BYTES",
    "PIECE_CHARS",
    "TOKENIZER_FILE",
    "canonical_tokenizer_bytes",
    "cut_pieces",
    "encode_documents",
    "eod_id",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_hash",
    "train_tokenizer",
]

logger = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
#: Text is cut into pieces of about this many characters before ``encode_batch``: measured
#: 3-5x faster than 64 KB pieces on 2 cores (docs/DATA.md), and cuts fall before a space so the
#: tokens are the same as encoding the whole text.
PIECE_CHARS = 2048
#: A tokenizer.json larger than this is refused before it is read (a 262k BPE vocab is ~20 MB).
MAX_TOKENIZER_BYTES = 256 << 20
#: The smallest useful byte-level vocabulary: 256 byte symbols plus the EOD token.
MIN_VOCAB = 257


def canonical_tokenizer_bytes(raw: str | bytes) -> bytes:
    """The canonical form of a tokenizer.json: keys sorted, no whitespace, UTF-8.

    Hashing this form makes the hash independent of pretty-printing and key order.
    """
    return json.dumps(
        json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 hex digest of the tokenizer's canonical JSON."""
    return hashlib.sha256(canonical_tokenizer_bytes(tokenizer.to_str())).hexdigest()


def eod_id(tokenizer: Tokenizer) -> int:
    """The id of ``<|endoftext|>``; raises :class:`TokenizerMismatchError` if it is absent."""
    tid = tokenizer.token_to_id(EOD_TOKEN)
    if tid is None:
        raise TokenizerMismatchError(f"tokenizer has no {EOD_TOKEN} token")
    return int(tid)


def cut_pieces(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ~``piece_chars`` characters, each cut before a space.

    With the GPT-2 pre-tokenizer regex a space starts a new pre-token, so encoding the pieces
    separately gives exactly the tokens of the whole text. A run without spaces longer than
    ``piece_chars`` is cut hard (rare; costs at most a token or two).
    """
    if len(text) <= piece_chars:
        return [text] if text else []
    pieces: list[str] = []
    start = 0
    n = len(text)
    while start < n:
        end = start + piece_chars
        if end < n:
            cut = text.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        else:
            end = n
        pieces.append(text[start:end])
        start = end
    return pieces


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, *, piece_chars: int = PIECE_CHARS
) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` (EOD included) on ``documents``. Deterministic."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (256 bytes + EOD), got {vocab_size}")

    def pieces() -> Iterator[str]:
        for doc in documents:
            yield from cut_pieces(doc, piece_chars)

    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pieces(), trainer=trainer)
    if tok.get_vocab_size() < vocab_size:
        # BPE stops early when the corpus has no more pairs to merge: say so, the ids stay valid.
        logger.warning(
            "tokenizer training reached only %d of %d tokens (corpus too small)",
            tok.get_vocab_size(),
            vocab_size,
        )
    logger.info(
        "trained byte-level BPE, vocab %d, hash %s", tok.get_vocab_size(), tokenizer_hash(tok)
    )
    return tok


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> str:
    """Write the canonical JSON atomically (temp file + rename); return its hash."""
    data = canonical_tokenizer_bytes(tokenizer.to_str())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tokenizer(path: Path, expected_hash: str | None = None) -> Tokenizer:
    """Load a tokenizer.json; if ``expected_hash`` is given the canonical hash must match.

    Raises :class:`TokenizerMismatchError` naming the file and both hashes on a mismatch, and on
    a missing, oversized or unparsable file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise TokenizerMismatchError(f"tokenizer file {path} does not exist") from e
    if size > MAX_TOKENIZER_BYTES:
        raise TokenizerMismatchError(
            f"tokenizer file {path} is {size} bytes, more than the {MAX_TOKENIZER_BYTES} allowed"
        )
    raw = path.read_bytes()
    try:
        canonical = canonical_tokenizer_bytes(raw)
    except ValueError as e:
        raise TokenizerMismatchError(f"tokenizer file {path} is not valid JSON ({e})") from e
    actual = hashlib.sha256(canonical).hexdigest()
    if expected_hash is not None and actual != expected_hash.lower():
        raise TokenizerMismatchError(
            f"tokenizer file {path} has hash {actual}, but {expected_hash} was expected "
            "(the shards were written with a different tokenizer)"
        )
    try:
        tok = Tokenizer.from_str(canonical.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on schema errors
        raise TokenizerMismatchError(f"tokenizer file {path} is not a tokenizer ({e})") from e
    eod_id(tok)
    return tok


def encode_documents(
    tokenizer: Tokenizer,
    documents: Sequence[str],
    eod: int,
    *,
    piece_chars: int = PIECE_CHARS,
) -> list[NDArray[np.uint32]]:
    """Encode each document and append the EOD id; one uint32 array per document."""
    pieces: list[str] = []
    owner: list[int] = []
    for d, doc in enumerate(documents):
        cut = cut_pieces(doc, piece_chars)
        pieces.extend(cut)
        owner.extend([d] * len(cut))
    encodings = tokenizer.encode_batch_fast(pieces, add_special_tokens=False) if pieces else []
    per_doc: list[list[list[int]]] = [[] for _ in documents]
    for d, enc in zip(owner, encodings, strict=True):
        per_doc[d].append(enc.ids)
    out: list[NDArray[np.uint32]] = []
    for parts in per_doc:
        n = sum(len(p) for p in parts)
        arr = np.empty(n + 1, dtype=np.uint32)
        pos = 0
        for p in parts:
            arr[pos : pos + len(p)] = p
            pos += len(p)
        arr[n] = eod
        out.append(arr)
    return out
