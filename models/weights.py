"""Covenant's full-weight format: the global layout, written in pieces by the ranks that own them.

A full-weight directory (a checkpoint's ``weights/``, or anything ``save_full_weights`` wrote)::

    covenant_model.json          the index: format, version, the ModelShape, the files, and for
                                 every global tensor the pieces tiling it: [file, offsets,
                                 shape, dtype, sha256]
    shard-00000.safetensors      one file per writing rank: the boxes that rank owns, keyed by
    shard-00001.safetensors      global name, in the parameters' own dtype (bf16 on GPU)
    ...

Every tensor is written once: by DP replica 0, and for the replicated norms by TP rank 0, so a
TP=8 x PP=8 x DP=4 peer writes 64 files in parallel and no rank ever holds more than its own
shard. Nothing is gathered: saving covenant-72b costs each rank its own slice, not 291 GB on
rank 0. The index is written last, by rank 0, after every rank has reported its file written,
so an index means a complete directory.

Reading assembles any box of any global tensor from the pieces that overlap it
(:meth:`FullWeights.read`), through safetensors' memory-mapped slices: ``covenant export``
streams one tensor at a time, and a rank of any other layout reads only its own boxes
(:func:`load_into`).

The index is untrusted input (a late joiner reads one from a checkpoint someone else published),
so it is read with the bounded JSON reader and every number in it is bounded *before* the work
it bounds: the model's dimensions and layer count (which set the tensor count) and its total
element count, the number of files and of pieces (in all and per tensor), every piece inside
its tensor, the pieces forming a grid that tiles the tensor (checked in O(n log n): sorted cut
points per dimension, never pairwise), file names without path parts, and every file's size
between what its pieces need in the narrowest and the widest dtype (so no index can make a
reader allocate more than is on disk). safetensors never executes code.

**Content hashes** (version 3): every piece carries the SHA-256 of its bytes as stored in its
safetensors file (the tensor's ``data_offsets`` range, raw little-endian) and its dtype. Per
piece rather than per file, because a rank of another layout reads only the pieces that overlap
its boxes, not whole files. Before the first value of a piece is returned, the reader checks the
file's header entry for it (dtype, shape, byte range inside the file) and hashes the byte range
in fixed-size chunks (streaming: a 100 GB file is never held in memory), once per piece per
:class:`FullWeights`. A piece pointed at another file holding a tensor of the same name and
shape, or a file whose header was edited, is a :class:`WeightsError`, never wrong values. The
index itself is bound by the checkpoint's signed manifest, so a verified index means verified
weights. (A file changed on local disk *after* its piece was verified is out of scope.)

Versions 1 (one ``model.safetensors`` of whole tensors next to a bare ModelShape JSON) and 2
(pieces without hashes) carry nothing to verify: they read only with ``allow_unhashed=True``,
for one's own old directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from covenant.engine.errors import CovenantError
from covenant.engine.fs import atomic_write_bytes
from covenant.engine.protocols import ParamShard
from covenant.engine.untrusted import UntrustedInputError, loads_json
from covenant.models.config import ModelConfigError, ModelShape, validate_shape
from covenant.models.layout import Sharded, global_params, unique_sources

logger = logging.getLogger(__name__)

FORMAT = "covenant-weights"
VERSION = 3
#: Versions without content hashes: read only with ``allow_unhashed=True``.
UNHASHED_VERSIONS = (1, 2)
INDEX_FILE = "covenant_model.json"
LEGACY_FILE = "model.safetensors"
#: Largest index read (bytes); covenant-72b at TP=8 needs well under 1 MiB.
MAX_INDEX_BYTES = 16 << 20
#: Room for a safetensors header per file, beyond the tensor bytes its pieces need.
HEADER_ALLOWANCE = 1 << 20
#: Header bytes allowed per tensor entry of a safetensors file (name, dtype, shape, offsets).
HEADER_BYTES_PER_TENSOR = 256
# Bounds on what an index may declare, each checked before the work it bounds. Generous: a
# covenant-72b index is 80 layers, dims <= 2^17, ~4,500 pieces at TP=8, 64 files at TP=8 x PP=8.
MAX_LAYERS = 1024
MAX_DIM = 1 << 24
MAX_ELEMENTS = 1 << 42  # 4.4 trillion parameters
MAX_FILES = 1 << 16
MAX_PIECES = 1 << 20
MAX_PIECES_PER_TENSOR = 1 << 12
MAX_NAME_CHARS = 128
#: Bytes hashed per read when verifying a piece (a piece is never held whole for hashing).
HASH_CHUNK_BYTES = 8 << 20
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\.safetensors$")
#: dtypes a piece may be stored in, and their sizes (safetensors' names).
_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}
_WIDEST = max(_DTYPES.values())
_NARROWEST = min(_DTYPES.values())
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: JSON types of ModelShape's fields, by annotation.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}


class WeightsError(CovenantError, ValueError):
    """A weights directory or file that is missing, malformed or for another model shape."""


@dataclass(frozen=True)
class Piece:
    """One stored box of a global tensor: ``tensor[offsets : offsets + shape]`` in ``file``.

    ``dtype`` (safetensors' name) and ``sha256`` (of the stored bytes) are ``None`` only in the
    unhashed versions 1 and 2.
    """

    file: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str | None = None
    sha256: str | None = None

    @property
    def numel(self) -> int:
        return _numel(self.shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


#: ``(dtype, sha256)`` of one stored tensor, as :func:`file_digests` computes it.
Digest = tuple[str, str]


def build_index(
    shape: ModelShape,
    sources: Sequence[tuple[int, ParamShard]],
    digests: Mapping[tuple[int, str], Digest],
) -> dict[str, Any]:
    """The index for pieces written by ``(rank, shard)`` in ``sources`` (ranks name the files).

    ``digests[(rank, name)]`` is the dtype and content hash of that piece in rank's file
    (:func:`file_digests` of the file :func:`write_pieces` wrote).
    """
    files = sorted({rank for rank, _ in sources})
    file_index = {rank: i for i, rank in enumerate(files)}
    pieces: dict[str, list[list[Any]]] = {p.name: [] for p in global_params(shape)}
    for rank, shard in sources:
        if (rank, shard.name) not in digests:
            raise WeightsError(f"no content hash for {shard.name} in {shard_file(rank)}")
        dtype, sha256 = digests[(rank, shard.name)]
        pieces[shard.name].append(
            [file_index[rank], list(shard.offsets), list(shard.local_shape), dtype, sha256]
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "shape": shape.to_dict(),
        "files": [shard_file(r) for r in files],
        "pieces": pieces,
    }


def write_pieces(out_dir: Path, rank: int, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write one rank's pieces (global name -> its box) atomically; returns the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_file(rank)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    return path


def file_digests(path: Path) -> dict[str, Digest]:
    """``name -> (dtype, sha256)`` of every tensor in a safetensors file, hashed as stored.

    Reads the file once, in :data:`HASH_CHUNK_BYTES` chunks (the writer's copy is still in the
    page cache); this is exactly what the reader recomputes per piece.
    """
    header, data_start = _read_header(path, expected_tensors=None)
    out: dict[str, Digest] = {}
    with path.open("rb") as f:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, begin, end = _entry_range(path, name, entry)
            out[name] = (dtype, _hash_range(f, data_start + begin, end - begin))
    return out


def write_index(out_dir: Path, index: Mapping[str, Any]) -> None:
    """Write the index atomically (last: an index means a complete directory)."""
    atomic_write_bytes(out_dir / INDEX_FILE, json.dumps(index, indent=1).encode("utf-8"))


def save_full_weights(
    full: Mapping[str, torch.Tensor], shape: ModelShape, out_dir: str | os.PathLike[str]
) -> Path:
    """Write whole global tensors held by this one process (one piece per tensor)."""
    check_full_state(full, shape)
    out = Path(out_dir)
    sources = [(0, _whole(p.name, p.shape)) for p in global_params(shape)]
    digests = file_digests(write_pieces(out, 0, full))
    write_index(out, build_index(shape, sources, {(0, k): v for k, v in digests.items()}))
    return out


def save_sharded(runtime: Sharded, out_dir: str | os.PathLike[str]) -> Path:
    """Collective: every rank writes the pieces it owns and hashes them; rank 0 then gathers the
    hashes (a few bytes per piece, never the data) and writes the index.

    A failure on any rank is raised on every rank (:func:`parallel.run_on_all`), and no index
    is written, so the directory never looks complete when it is not.
    """
    import torch.distributed as dist

    from covenant.models import parallel

    out = Path(out_dir)
    rank = runtime.coords.rank
    sources = list(unique_sources(runtime))
    own = {b.shard.name: b for b in runtime.bindings()}
    mine = {s.name: own[s.name].local_view() for r, s in sources if r == rank}

    def write() -> dict[str, Digest]:
        return file_digests(write_pieces(out, rank, mine)) if mine else {}

    # An older index in a reused directory must not describe the files being replaced.
    parallel.run_on_rank0(lambda: (out / INDEX_FILE).unlink(missing_ok=True))
    local = parallel.run_on_all(write)
    gathered: list[dict[str, Digest] | None] = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    digests = {(r, name): d for r, got in enumerate(gathered) for name, d in (got or {}).items()}
    parallel.run_on_rank0(lambda: write_index(out, build_index(runtime.shape, sources, digests)))
    return out


def _whole(name: str, shape: tuple[int, ...]) -> ParamShard:
    return ParamShard(name=name, global_shape=shape, offsets=(0,) * len(shape), local_shape=shape)


def check_full_state(full: Mapping[str, torch.Tensor], shape: ModelShape) -> None:
    """Raise :class:`WeightsError` unless ``full`` has exactly the global tensors of ``shape``."""
    expected = {p.name: p.shape for p in global_params(shape)}
    missing = sorted(set(expected) - set(full))
    extra = sorted(set(full) - set(expected))
    if missing or extra:
        raise WeightsError(
            f"weights do not match {shape.name}: missing {missing[:3]}, extra {extra[:3]}"
        )
    for name, want in expected.items():
        if tuple(full[name].shape) != want:
            raise WeightsError(f"{name}: shape {tuple(full[name].shape)}, expected {want}")


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


class FullWeights:
    """A validated full-weight directory; tensors are read on demand (see the module docs)."""

    def __init__(self, root: Path, shape: ModelShape, pieces: Mapping[str, list[Piece]]) -> None:
        self.root = root
        self.shape = shape
        self._pieces = dict(pieces)
        self._shapes = {p.name: p.shape for p in global_params(shape)}
        self._per_file: dict[str, int] = {}
        for plist in self._pieces.values():
            for p in plist:
                self._per_file[p.file] = self._per_file.get(p.file, 0) + 1
        self._headers: dict[str, tuple[dict[str, Any], int]] = {}
        self._verified: set[tuple[str, str]] = set()

    def names(self) -> list[str]:
        """Global tensor names in canonical order."""
        return list(self._shapes)

    def global_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(
        self,
        name: str,
        offsets: Sequence[int] | None = None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The box ``[offsets : offsets + shape]`` of global tensor ``name`` (default: all)."""
        if name not in self._shapes:
            raise WeightsError(f"{self.root}: no tensor {name!r} in {self.shape.name}")
        full = self._shapes[name]
        lo = tuple(offsets) if offsets is not None else (0,) * len(full)
        ext = tuple(shape) if shape is not None else full
        if (
            len(lo) != len(full)
            or len(ext) != len(full)
            or any(o < 0 or n < 0 or o + n > f for o, n, f in zip(lo, ext, full, strict=True))
        ):
            raise WeightsError(f"{name}: box {lo}+{ext} is outside {full}")
        out = torch.empty(ext, dtype=dtype)
        for piece in self._pieces[name]:
            a = [max(o, po) for o, po in zip(lo, piece.offsets, strict=True)]
            z = [
                min(o + n, po + pn)
                for o, n, po, pn in zip(lo, ext, piece.offsets, piece.shape, strict=True)
            ]
            if any(x >= y for x, y in zip(a, z, strict=True)):
                continue
            src = tuple(slice(x - po, y - po) for x, y, po in zip(a, z, piece.offsets, strict=True))
            dst = tuple(slice(x - o, y - o) for x, y, o in zip(a, z, lo, strict=True))
            out[dst] = self._read_piece(name, piece, src).to(dtype)
        return out

    def items(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Every global tensor, one at a time (peak memory: the largest tensor)."""
        for name in self._shapes:
            yield name, self.read(name, dtype=dtype)

    def to_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """All tensors at once: for small models and tests."""
        return dict(self.items(dtype))

    def check_matches(self, shape: ModelShape) -> None:
        """Raise unless these weights have exactly ``shape``'s global tensors."""
        want = {p.name: p.shape for p in global_params(shape)}
        if want != self._shapes:
            diff = sorted(
                n for n in set(want) | set(self._shapes) if want.get(n) != self._shapes.get(n)
            )
            raise WeightsError(
                f"{self.root}: weights of {self.shape.name} ({self.shape.layers} layers, hidden "
                f"{self.shape.hidden}, vocab {self.shape.vocab}) do not fit {shape.name} "
                f"({shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}); "
                f"first differing tensor: {diff[0]}"
            )

    def verify(self) -> None:
        """Check every piece's content hash now (``read`` checks each on first use anyway)."""
        for name, plist in self._pieces.items():
            for piece in plist:
                self._verify_piece(name, piece)

    def _verify_piece(self, name: str, piece: Piece) -> None:
        """The file's header entry for ``piece`` matches the index, and so does its hash."""
        if piece.sha256 is None or (piece.file, name) in self._verified:
            return
        path = self.root / piece.file
        if piece.file not in self._headers:
            self._headers[piece.file] = _read_header(path, self._per_file.get(piece.file, 1))
        header, data_start = self._headers[piece.file]
        if name not in header:
            raise WeightsError(f"{path}: lacks tensor {name!r} named by the index")
        dtype, begin, end = _entry_range(path, name, header[name])
        stored = header[name].get("shape")
        if stored != list(piece.shape) or dtype != piece.dtype:
            raise WeightsError(
                f"{path}: {name} is stored as {dtype} {stored}, the index says "
                f"{piece.dtype} {list(piece.shape)}"
            )
        if end - begin != piece.numel * _DTYPES[dtype]:
            raise WeightsError(f"{path}: {name}: byte range does not match its shape and dtype")
        try:
            with path.open("rb") as f:
                digest = _hash_range(f, data_start + begin, end - begin)
        except OSError as exc:
            raise WeightsError(f"{path}: unreadable ({exc})") from None
        if digest != piece.sha256:
            raise WeightsError(
                f"{path}: {name}: content hash {digest[:16]}... does not match the index's "
                f"{piece.sha256[:16]}... (wrong or altered file)"
            )
        self._verified.add((piece.file, name))

    def _read_piece(self, name: str, piece: Piece, index: tuple[slice, ...]) -> torch.Tensor:
        self._verify_piece(name, piece)
        path = self.root / piece.file
        try:
            with safe_open(str(path), framework="pt") as f:
                if name not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                    raise WeightsError(f"{path}: lacks tensor {name!r} named by the index")
                sl = f.get_slice(name)
                stored, dt = tuple(sl.get_shape()), sl.get_dtype()
                if stored != piece.shape:
                    raise WeightsError(
                        f"{path}: {name} is stored as {stored}, the index says {piece.shape}"
                    )
                if dt not in _DTYPES:
                    raise WeightsError(f"{path}: {name} has dtype {dt}; allowed {sorted(_DTYPES)}")
                return sl[index] if index else sl[:]
        except WeightsError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise WeightsError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def open_full_weights(path: str | os.PathLike[str], *, allow_unhashed: bool = False) -> FullWeights:
    """Open and validate a full-weight directory (see the module docstring); reads no tensor.

    ``allow_unhashed`` also reads versions 1 and 2, whose pieces carry no content hash: only for
    one's own directories, never for a checkpoint someone else published.
    """
    root = Path(path)
    where = root / INDEX_FILE
    raw = _read_json(where)
    if "format" not in raw:  # version 1: the index is the bare shape, one file of whole tensors
        _refuse_unhashed(1, where, allow_unhashed)
        shape = _shape(raw, where)
        pieces = {
            p.name: [Piece(LEGACY_FILE, (0,) * len(p.shape), p.shape)] for p in global_params(shape)
        }
    else:
        shape, pieces = _parse_index(raw, where, allow_unhashed)
    _check_files(root, pieces)
    return FullWeights(root, shape, pieces)


def _refuse_unhashed(version: int, where: Path, allow_unhashed: bool) -> None:
    if not allow_unhashed:
        raise WeightsError(
            f"{where}: version {version} has no content hashes, so its weights cannot be "
            f"verified; re-save it with this covenant (version {VERSION}), or open your own "
            "directory with allow_unhashed=True"
        )


def load_full_weights(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], ModelShape]:
    """All global tensors of a full-weight directory at once, and its shape."""
    weights = open_full_weights(path)
    return weights.to_dict(dtype), weights.shape


def load_into(runtime: Sharded, weights: FullWeights) -> None:
    """Copy this rank's boxes out of ``weights`` (any layout wrote them); no communication.

    The caller refreshes derived state afterwards (``MegatronRuntime.reload_params``).
    """
    weights.check_matches(runtime.shape)
    with torch.no_grad():
        for b in runtime.bindings():
            s = b.shard
            view = b.local_view()
            view.copy_(weights.read(s.name, s.offsets, s.local_shape, dtype=view.dtype))


def find_full_weights(path: str | os.PathLike[str]) -> Path:
    """The full-weight directory at ``path``: ``path`` itself if it holds the index, else the
    most recently written one below it (a run directory's newest checkpoint)."""
    root = Path(path)
    if (root / INDEX_FILE).is_file():
        return root
    if not root.is_dir():
        raise WeightsError(f"{root} is not a directory")
    found = [p.parent for p in root.rglob(INDEX_FILE)]
    if not found:
        raise WeightsError(f"no {INDEX_FILE} under {root} (not a run or weights directory)")
    return max(found, key=lambda d: (d / INDEX_FILE).stat().st_mtime)


# ------------------------------------------------------------------------------------------
# Index validation
# ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise WeightsError(f"{path} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)  # the file may have grown since the stat
        # depth: {"pieces": {name: [[file, [offsets], ...]]}} is 5 levels
        data = loads_json(raw, what=str(path), max_bytes=MAX_INDEX_BYTES, max_depth=5)
    except OSError as exc:
        raise WeightsError(f"{path}: unreadable ({exc})") from None
    except UntrustedInputError as exc:
        raise WeightsError(f"{exc.what} is not a valid index: {exc.problem}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object")
    return data


def _read_header(path: Path, expected_tensors: int | None) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (bounded JSON) and the offset where its data starts.

    ``expected_tensors`` (pieces the index puts in the file) bounds the header's size; ``None``
    means our own freshly written file.
    """
    limit = HEADER_ALLOWANCE + HEADER_BYTES_PER_TENSOR * (expected_tensors or 0)
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsError(f"{path}: unreadable (too short for a safetensors header)")
            n = int.from_bytes(prefix, "little")
            if expected_tensors is not None and n > limit:
                raise WeightsError(f"{path}: unreadable (header of {n} bytes, over {limit})")
            if n > os.fstat(f.fileno()).st_size - 8:
                raise WeightsError(f"{path}: unreadable (header claims {n} bytes, file is shorter)")
            raw = f.read(n)
    except OSError as exc:
        raise WeightsError(f"{path}: unreadable ({exc})") from None
    if len(raw) != n:
        raise WeightsError(f"{path}: unreadable (header claims {n} bytes, file holds fewer)")
    try:
        header = loads_json(raw, what=f"{path} header", max_bytes=max(n, 1), max_depth=3)
    except UntrustedInputError as exc:
        raise WeightsError(f"{path}: unreadable ({exc.problem})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: unreadable (header is not a JSON object)")
    return header, 8 + n


def _entry_range(path: Path, name: str, entry: Any) -> tuple[str, int, int]:
    """``(dtype, begin, end)`` of a safetensors header entry, checked for type and order."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise WeightsError(f"{path}: {name}: malformed safetensors entry")
    if dtype not in _DTYPES:
        raise WeightsError(f"{path}: {name} has dtype {dtype!r}; allowed {sorted(_DTYPES)}")
    return dtype, offsets[0], offsets[1]


def _hash_range(f: Any, start: int, length: int) -> str:
    """SHA-256 of ``length`` bytes of open file ``f`` from ``start``, in bounded chunks."""
    h = hashlib.sha256()
    buf = bytearray(min(HASH_CHUNK_BYTES, max(length, 1)))
    view = memoryview(buf)
    f.seek(start)
    left = length
    while left:
        n = f.readinto(view[: min(left, len(buf))])
        if not n:
            raise WeightsError(f"{getattr(f, 'name', 'file')}: ends inside a tensor's bytes")
        h.update(view[:n])
        left -= n
    return h.hexdigest()


def _shape(data: Any, where: Path) -> ModelShape:
    """The index's model shape, its sizes bounded before anything is enumerated from it."""
    if not isinstance(data, dict):
        raise WeightsError(f"{where}: 'shape' must be an object")
    for f in dataclasses.fields(ModelShape):
        value = data.get(f.name)
        kind = _FIELD_TYPES[str(f.type)]
        if f.name in data and (not isinstance(value, kind) or isinstance(value, bool)):
            raise WeightsError(
                f"{where}: bad model shape: {f.name} must be {f.type}, got {_short(value)}"
            )
        bound = MAX_LAYERS if f.name == "layers" else MAX_DIM
        if isinstance(value, int) and kind is int and value > bound:
            raise WeightsError(f"{where}: bad model shape: {f.name} {value} is over {bound}")
        if isinstance(value, str) and len(value) > MAX_NAME_CHARS:
            raise WeightsError(f"{where}: bad model shape: {f.name} is too long")
    try:
        shape = validate_shape(ModelShape.from_dict(data), dim_multiple=1)
    except (TypeError, ModelConfigError) as exc:
        raise WeightsError(f"{where}: bad model shape: {exc}") from None
    if _model_elements(shape) > MAX_ELEMENTS:
        raise WeightsError(f"{where}: bad model shape: more than {MAX_ELEMENTS} parameters")
    return shape


def _model_elements(shape: ModelShape) -> int:
    """The parameter count of ``shape`` in O(1) (what :func:`global_params` would enumerate)."""
    h, q_dim = shape.hidden, shape.heads * shape.head_dim
    per_layer = 2 * h + shape.qkv_rows * h + h * q_dim + 3 * shape.ffn * h
    return 2 * shape.vocab * h + h + shape.layers * per_layer


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int_list(value: Any, n: int, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise WeightsError(f"{what} must be {n} non-negative integers, got {_short(value)}")
    return tuple(value)


def _parse_index(
    raw: dict[str, Any], where: Path, allow_unhashed: bool = False
) -> tuple[ModelShape, dict[str, list[Piece]]]:
    version = raw.get("version")
    if raw.get("format") != FORMAT or version not in (VERSION, *UNHASHED_VERSIONS[1:]):
        raise WeightsError(
            f"{where}: format {_short(raw.get('format'))} version {_short(version)}; this "
            f"covenant reads {FORMAT!r} version {VERSION} (and, unhashed, versions 1 and 2)"
        )
    hashed = version == VERSION
    if not hashed:
        _refuse_unhashed(version, where, allow_unhashed)
    shape = _shape(raw.get("shape"), where)
    files = raw.get("files")
    if (
        not isinstance(files, list)
        or len(files) > MAX_FILES
        or not all(isinstance(f, str) and _FILE_NAME.match(f) for f in files)
        or len(set(files)) != len(files)
    ):
        raise WeightsError(
            f"{where}: 'files' must be at most {MAX_FILES} distinct plain *.safetensors names"
        )
    table = raw.get("pieces")
    if not isinstance(table, dict):
        raise WeightsError(f"{where}: 'pieces' must be an object")
    # bounds on the piece counts come before any per-piece work
    total = sum(len(v) for v in table.values() if isinstance(v, list))
    if total > MAX_PIECES:
        raise WeightsError(f"{where}: {total} pieces, over the bound of {MAX_PIECES}")
    expected = {p.name: p.shape for p in global_params(shape)}
    if set(table) != set(expected):
        missing, extra = sorted(set(expected) - set(table)), sorted(set(table) - set(expected))
        raise WeightsError(
            f"{where}: pieces missing {missing[:3]}, unexpected {[_short(e) for e in extra[:3]]}"
        )
    width = 5 if hashed else 3
    pieces: dict[str, list[Piece]] = {}
    for name, full in expected.items():
        entries = table[name]
        if not isinstance(entries, list) or not entries:
            raise WeightsError(f"{where}: {name}: no pieces")
        if len(entries) > MAX_PIECES_PER_TENSOR:
            raise WeightsError(
                f"{where}: {name}: {len(entries)} pieces, over {MAX_PIECES_PER_TENSOR}"
            )
        out = []
        for entry in entries:
            what = f"{where}: {name}: piece {_short(entry)}"
            if not isinstance(entry, list) or len(entry) != width:
                form = (
                    "[file, offsets, shape, dtype, sha256]" if hashed else "[file, offsets, shape]"
                )
                raise WeightsError(f"{what} must be {form}")
            f = entry[0]
            if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < len(files):
                raise WeightsError(f"{what}: file index out of range")
            dtype = sha256 = None
            if hashed:
                dtype, sha256 = entry[3], entry[4]
                if dtype not in _DTYPES:
                    raise WeightsError(f"{what}: dtype must be one of {sorted(_DTYPES)}")
                if not isinstance(sha256, str) or not _SHA256.match(sha256):
                    raise WeightsError(f"{what}: sha256 must be 64 lower-case hex digits")
            piece = Piece(
                files[f],
                _int_list(entry[1], len(full), f"{what}: offsets"),
                _int_list(entry[2], len(full), f"{what}: shape"),
                dtype,
                sha256,
            )
            if any(
                o + n > d or n == 0
                for o, n, d in zip(piece.offsets, piece.shape, full, strict=True)
            ):
                raise WeightsError(f"{what} lies outside {full}")
            out.append(piece)
        _check_tiling(name, full, out, where)
        pieces[name] = out
    return shape, pieces


def _check_tiling(name: str, full: tuple[int, ...], pieces: list[Piece], where: Path) -> None:
    """Pieces inside ``full`` (checked before) must be the cells of a grid that tiles it.

    Per dimension, the pieces' offsets are the grid's cut points; the pieces' offset tuples must
    be exactly the grid's cells (one piece each) and every piece must reach the next cut point
    (or the tensor's end). That is a partition of the tensor, checked in O(n log n) per
    dimension. Every layout covenant writes is such a grid (TP splits one dimension evenly);
    a piece that reaches past the next cut overlaps its neighbour, one that stops short leaves
    a gap.
    """
    cuts = [sorted({p.offsets[k] for p in pieces}) for k in range(len(full))]
    cells = 1
    for c in cuts:
        cells *= len(c)
        if cells > len(pieces):
            break
    if cells != len(pieces) or len({p.offsets for p in pieces}) != len(pieces):
        raise WeightsError(f"{where}: {name}: pieces overlap or do not form a grid over {full}")
    if any(c[0] != 0 for c in cuts):
        raise WeightsError(f"{where}: {name}: pieces do not cover {full}")
    ends = [dict(zip(c, [*c[1:], d], strict=True)) for c, d in zip(cuts, full, strict=True)]
    for p in pieces:
        for k, (o, n) in enumerate(zip(p.offsets, p.shape, strict=True)):
            if o + n > ends[k][o]:
                raise WeightsError(f"{where}: {name}: pieces at {p.offsets} overlap a neighbour")
            if o + n < ends[k][o]:
                raise WeightsError(f"{where}: {name}: pieces do not cover {full}")


def _check_files(root: Path, pieces: Mapping[str, list[Piece]]) -> None:
    """Every file exists, and its size lies between what its pieces need in the narrowest and
    the widest allowed dtype: so no index can make a reader allocate far more than is on disk."""
    elements: dict[str, int] = {}
    count: dict[str, int] = {}
    for plist in pieces.values():
        for p in plist:
            elements[p.file] = elements.get(p.file, 0) + p.numel
            count[p.file] = count.get(p.file, 0) + 1
    for name, n in elements.items():
        path = root / name
        if not path.is_file():
            raise WeightsError(f"{path} does not exist (named by {root / INDEX_FILE})")
        low, high = n * _NARROWEST, n * _WIDEST + HEADER_ALLOWANCE + 256 * count[name]
        size = path.stat().st_size
        if size > high:
            raise WeightsError(f"{path} is {size} bytes, more than the {high} its pieces need")
        if size < low:
            raise WeightsError(f"{path} is {size} bytes, fewer than the {low} its pieces need")
