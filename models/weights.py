"""Covenant's full-weight format: the global layout, written in pieces by the ranks that own them.

A full-weight directory (a checkpoint's ``weights/``, or anything ``save_full_weights`` wrote)::

    covenant_model.json          the index: format, version, the ModelShape, the files, and for
                                 every global tensor the pieces (file, offsets, shape) tiling it
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
(:func:`load_into`). The index is checked before any tensor is read: known format, the shape's
exact tensor set, pieces inside their tensors, tiling them without overlap, file names without
path parts, and every file's size bounded by what its pieces need. safetensors never executes
code, and each piece's stored shape and dtype are checked against the index when read.

Version 1 (one ``model.safetensors`` of whole tensors next to a bare ModelShape JSON) still reads.
"""

from __future__ import annotations

import dataclasses
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

from covenant.engine.fs import atomic_write_bytes
from covenant.engine.protocols import ParamShard
from covenant.models.config import ModelConfigError, ModelShape, validate_shape
from covenant.models.layout import Sharded, global_params, unique_sources

logger = logging.getLogger(__name__)

FORMAT = "covenant-weights"
VERSION = 2
INDEX_FILE = "covenant_model.json"
LEGACY_FILE = "model.safetensors"
#: Largest index read (bytes); covenant-72b at TP=8 needs well under 1 MiB.
MAX_INDEX_BYTES = 16 << 20
#: Room for a safetensors header per file, beyond the tensor bytes its pieces need.
HEADER_ALLOWANCE = 1 << 20
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\.safetensors$")
#: dtypes a piece may be stored in, and their sizes (safetensors' names).
_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}
_WIDEST = max(_DTYPES.values())
_NARROWEST = min(_DTYPES.values())
#: JSON types of ModelShape's fields, by annotation.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}


class WeightsError(ValueError):
    """A weights directory or file that is missing, malformed or for another model shape."""


@dataclass(frozen=True)
class Piece:
    """One stored box of a global tensor: ``tensor[offsets : offsets + shape]`` in ``file``."""

    file: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

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


def build_index(shape: ModelShape, sources: Sequence[tuple[int, ParamShard]]) -> dict[str, Any]:
    """The index for pieces written by ``(rank, shard)`` in ``sources`` (ranks name the files)."""
    files = sorted({rank for rank, _ in sources})
    file_index = {rank: i for i, rank in enumerate(files)}
    pieces: dict[str, list[list[Any]]] = {p.name: [] for p in global_params(shape)}
    for rank, shard in sources:
        pieces[shard.name].append([file_index[rank], list(shard.offsets), list(shard.local_shape)])
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


def write_index(out_dir: Path, index: Mapping[str, Any]) -> None:
    atomic_write_bytes(out_dir / INDEX_FILE, json.dumps(index, indent=1).encode("utf-8"))


def save_full_weights(
    full: Mapping[str, torch.Tensor], shape: ModelShape, out_dir: str | os.PathLike[str]
) -> Path:
    """Write whole global tensors held by this one process (one piece per tensor)."""
    check_full_state(full, shape)
    out = Path(out_dir)
    sources = [(0, _whole(p.name, p.shape)) for p in global_params(shape)]
    write_pieces(out, 0, full)
    write_index(out, build_index(shape, sources))
    return out


def save_sharded(runtime: Sharded, out_dir: str | os.PathLike[str]) -> Path:
    """Collective: every rank writes the pieces it owns; rank 0 then writes the index.

    A failure on any rank is raised on every rank (:func:`parallel.run_on_all`), and no index
    is written, so the directory never looks complete when it is not.
    """
    from covenant.models import parallel

    out = Path(out_dir)
    rank = runtime.coords.rank
    sources = list(unique_sources(runtime))
    own = {b.shard.name: b for b in runtime.bindings()}
    mine = {s.name: own[s.name].local_view() for r, s in sources if r == rank}

    def write() -> None:
        if mine:
            write_pieces(out, rank, mine)

    # An older index in a reused directory must not describe the files being replaced.
    parallel.run_on_rank0(lambda: (out / INDEX_FILE).unlink(missing_ok=True))
    parallel.run_on_all(write)
    parallel.run_on_rank0(lambda: write_index(out, build_index(runtime.shape, sources)))
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

    def _read_piece(self, name: str, piece: Piece, index: tuple[slice, ...]) -> torch.Tensor:
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


def open_full_weights(path: str | os.PathLike[str]) -> FullWeights:
    """Open and validate a full-weight directory (see the module docstring); reads no tensor."""
    root = Path(path)
    raw = _read_json(root / INDEX_FILE)
    if "format" not in raw:  # version 1: the index is the bare shape, one file of whole tensors
        shape = _shape(raw, root / INDEX_FILE)
        pieces = {
            p.name: [Piece(LEGACY_FILE, (0,) * len(p.shape), p.shape)] for p in global_params(shape)
        }
    else:
        shape, pieces = _parse_index(raw, root / INDEX_FILE)
    _check_files(root, pieces)
    return FullWeights(root, shape, pieces)


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
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object")
    return data


def _shape(data: Any, where: Path) -> ModelShape:
    if not isinstance(data, dict):
        raise WeightsError(f"{where}: 'shape' must be an object")
    for f in dataclasses.fields(ModelShape):
        value = data.get(f.name)
        kind = _FIELD_TYPES[str(f.type)]
        if f.name in data and (not isinstance(value, kind) or isinstance(value, bool)):
            raise WeightsError(
                f"{where}: bad model shape: {f.name} must be {f.type}, got {value!r}"
            )
    try:
        return validate_shape(ModelShape.from_dict(data), dim_multiple=1)
    except (TypeError, ModelConfigError) as exc:
        raise WeightsError(f"{where}: bad model shape: {exc}") from None


def _int_list(value: Any, n: int, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise WeightsError(f"{what} must be {n} non-negative integers, got {value!r}")
    return tuple(value)


def _parse_index(raw: dict[str, Any], where: Path) -> tuple[ModelShape, dict[str, list[Piece]]]:
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise WeightsError(
            f"{where}: format {raw.get('format')!r} version {raw.get('version')!r}; this "
            f"covenant reads {FORMAT!r} version {VERSION} (and version 1)"
        )
    shape = _shape(raw.get("shape"), where)
    files = raw.get("files")
    if (
        not isinstance(files, list)
        or not all(isinstance(f, str) and _FILE_NAME.match(f) for f in files)
        or len(set(files)) != len(files)
    ):
        raise WeightsError(f"{where}: 'files' must be distinct plain *.safetensors file names")
    table = raw.get("pieces")
    if not isinstance(table, dict):
        raise WeightsError(f"{where}: 'pieces' must be an object")
    expected = {p.name: p.shape for p in global_params(shape)}
    if set(table) != set(expected):
        missing, extra = sorted(set(expected) - set(table)), sorted(set(table) - set(expected))
        raise WeightsError(f"{where}: pieces missing {missing[:3]}, unexpected {extra[:3]}")
    pieces: dict[str, list[Piece]] = {}
    for name, full in expected.items():
        entries = table[name]
        if not isinstance(entries, list) or not entries:
            raise WeightsError(f"{where}: {name}: no pieces")
        out = []
        for entry in entries:
            what = f"{where}: {name}: piece {entry!r}"
            if not isinstance(entry, list) or len(entry) != 3:
                raise WeightsError(f"{what} must be [file, offsets, shape]")
            f = entry[0]
            if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < len(files):
                raise WeightsError(f"{what}: file index out of range")
            piece = Piece(
                files[f],
                _int_list(entry[1], len(full), f"{what}: offsets"),
                _int_list(entry[2], len(full), f"{what}: shape"),
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
    """Pieces inside ``full`` (checked before) that cover its volume without overlapping tile it."""
    for i, p in enumerate(pieces):
        for q in pieces[i + 1 :]:
            if all(
                max(a, b) < min(a + m, b + n)
                for a, m, b, n in zip(p.offsets, p.shape, q.offsets, q.shape, strict=True)
            ):
                raise WeightsError(f"{where}: {name}: pieces {p.offsets} and {q.offsets} overlap")
    if sum(p.numel for p in pieces) != _numel(full):
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
