"""Top-k selection, 2-bit quantisation and error feedback (SPEC.md 4.2-4.6), layout-agnostic.

The encoder works on *slices*: a TP/DP rank hands over the part of a tensor it owns plus the
slice's offset in the global tensor, and gets back a :class:`TensorPiece` covering exactly the
tiles inside that slice. Pieces from the ranks of a shard group :func:`merge` into full tensors,
which :func:`covenant.plugins.sparseloco.wire.pack_payload` turns into bytes. A full tensor is
just the one-slice case, so every layout runs the same code and yields the same bytes.

Per-tile work (selection) needs no communication. The quantiser's per-tensor statistics do: they
run as a small generator that yields int64 vectors to be *summed across the shard group* (three
rounds: sum of kept values, sum of squared deviations, per-bin counts and sums) and receives the
sums back. The sums are exact (:mod:`.exact`), so the result does not depend on how the tensor
was split or on which device ran it. :func:`encode_slices` batches the rounds of many tensors so
a rank does three small all-reduces per window in total; pass ``reduce`` (e.g. a
``torch.distributed.all_reduce`` over the TP group) or ``None`` when the rank owns whole tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.errors import EncodeError
from covenant.plugins.sparseloco.exact import NUM_BUCKETS, accumulate, exact_value, to_float32
from covenant.plugins.sparseloco.tiling import (
    TileBlock,
    TileGeometry,
    flat_positions,
    full_block,
    kept_per_tile,
    slice_block,
    tile_geometry,
    to_tiles,
)

logger = logging.getLogger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sum an int64 vector across the shard group (every rank gets the sum); identity if unsharded."""

_DEFAULT = SparseLoCoConfig()
_NUM_LEVELS = 4  # 2-bit codes


class TensorSlice(NamedTuple):
    """The part of a tensor one rank owns: ``local`` sits at ``offset`` of ``shape`` (global)."""

    local: torch.Tensor
    shape: tuple[int, ...]
    offset: tuple[int, ...]


@dataclass
class TensorPiece:
    """The encoded tiles of one tensor over a block of its tile grid (the whole grid once merged).

    ``indices``: ``(T, k)`` int64 in-tile indices, ascending per tile; ``codes``: ``(T, k)`` uint8
    2-bit codes (``None`` for ``quantizer="none"``, which carries fp32 ``values`` instead);
    ``table``: ``(shift, lut0, lut1, lut2, lut3)`` as float32-representable floats.
    """

    name: str
    geometry: TileGeometry
    k: int
    block: TileBlock
    indices: torch.Tensor
    codes: torch.Tensor | None
    values: torch.Tensor | None
    table: tuple[float, ...]
    quantizer: str

    @property
    def is_full(self) -> bool:
        g = self.geometry
        return self.block == TileBlock(0, g.grid_rows, 0, g.grid_cols)

    def decoded_values(self) -> torch.Tensor:
        """``(T, k)`` float32 decoded kept values (``lut[q] + shift``, or the raw values)."""
        if self.values is not None:
            return self.values
        assert self.codes is not None
        return decode_levels(self.table, self.codes.device)[self.codes.to(torch.int64)]

    def to_dense(self, local: bool = False) -> torch.Tensor:
        """Dense float32 decoded tensor: the global tensor, or with ``local`` the owned slice."""
        g, b = self.geometry, self.block
        dev = self.indices.device
        if local:
            shape = _local_shape(g, b)
            numel = math.prod(shape)
        else:
            shape, numel = g.shape, g.numel
        out = torch.zeros(numel, dtype=torch.float32, device=dev)
        out[flat_positions(self.indices, g, b, rel=local)] = self.decoded_values().reshape(-1)
        return out.reshape(shape)


def decode_levels(table: Sequence[float], device: torch.device | str) -> torch.Tensor:
    """The four decoded levels ``lut[b] + shift`` in float32 (same arithmetic everywhere)."""
    t = torch.tensor(list(table), dtype=torch.float32, device=device)
    return t[1:] + t[0]


def _local_shape(g: TileGeometry, b: TileBlock) -> tuple[int, ...]:
    if b == full_block(g):
        return g.shape
    rows = (b.row1 - b.row0) * g.tile_rows
    cols = (b.col1 - b.col0) * g.tile_cols
    return (cols,) if len(g.shape) == 1 else (rows, cols)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def select_topk(tiles: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``tiles`` (T, L), the ``k`` largest |values|, returned sorted by index.

    Ties at the k-th magnitude break towards the lower index, so the choice is canonical on
    every device. Fast path: a float top-k; only tiles with more than k magnitudes at or
    above their k-th largest (a tie straddles the cut, e.g. blocks of zeros) are redone with
    unique integer keys. NaN and infinity sort above every finite magnitude, so any
    non-finite input value is among the kept values (the caller checks those).
    """
    n_tiles, length = tiles.shape
    if k >= length:
        idx = torch.arange(length, device=tiles.device).expand(n_tiles, length).contiguous()
        return idx, tiles.to(torch.float32)
    mag = tiles.abs()
    top, idx = torch.topk(mag, k, dim=1, sorted=False)
    # Every tile has at least k magnitudes >= its k-th largest; exactly k everywhere means no
    # tie straddles any cut. One global count is much cheaper than per-row sums.
    above = mag >= top.amin(dim=1, keepdim=True)
    if int(torch.count_nonzero(above)) != n_tiles * k:
        ambiguous = torch.count_nonzero(above, dim=1) > k
        rows = torch.nonzero(ambiguous).squeeze(1)
        idx[rows] = _canonical_topk(mag[rows], k)
    idx, _ = torch.sort(idx, dim=1)
    return idx, torch.gather(tiles, 1, idx)


def _canonical_topk(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of non-negative floats with ties to the lower index, via unique int64 keys.

    The float32 bit pattern of a non-negative float is monotonic in its value; shifted left,
    with the reversed index in the low bits, every key is unique.
    """
    length = mag.shape[1]
    low_bits = max(1, (length - 1).bit_length())
    keys = mag.view(torch.int32).to(torch.int64) << low_bits
    keys |= (length - 1) - torch.arange(length, device=mag.device, dtype=torch.int64)
    return torch.topk(keys, k, dim=1, sorted=False).indices


def _select_block(
    matrix: torch.Tensor, geom: TileGeometry, k: int, chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select top-k in every tile of a (block-shaped) matrix, a few tile rows at a time."""
    th = geom.tile_rows
    rows_per_chunk = max(1, chunk_elements // max(1, matrix.shape[1] * th)) * th
    idx_parts, val_parts = [], []
    for r0 in range(0, matrix.shape[0], rows_per_chunk):
        tiles = to_tiles(matrix[r0 : r0 + rows_per_chunk], geom)
        i, v = select_topk(tiles, k)
        idx_parts.append(i)
        val_parts.append(v)
    return torch.cat(idx_parts), torch.cat(val_parts)


# --------------------------------------------------------------------------------------------
# Quantisation statistics as a reduction protocol
# --------------------------------------------------------------------------------------------

QuantSteps = Generator[torch.Tensor, torch.Tensor, tuple[tuple[float, ...], torch.Tensor | None]]


def quantize_steps(vals: torch.Tensor, n_total: int, config: SparseLoCoConfig) -> QuantSteps:
    """Quantise this rank's kept values; yields int64 vectors to sum across the shard group.

    Reference quantiser (SPEC 4.5): ``shift = mean(v)``, ``c = v - shift``,
    ``sigma = ||c|| / sqrt(n - 1)``, ``scale = 1.5 * sigma`` (6 sigma / 4; 1.0 if zero or not
    finite), ``q = clamp(round_half_even(c / scale + 2), 0, 3)``, ``lut[b]`` = mean of the ``c``
    in bin ``b`` (0 if empty). Symmetric option: ``q = clamp(floor(c / s) + 2, 0, 3)`` with
    ``s = symmetric_scale_sigmas * sigma``. Sums are exact; the final values are rounded to
    float32, and elementwise arithmetic is float32 like the reference.
    Returns ``(table, codes)``.
    """
    dev = vals.device
    v = vals.to(torch.float32)
    # Round 1: exact sum of the kept values -> shift.
    total = yield accumulate(v)
    shift = to_float32(exact_value(total) / n_total)
    c = v - torch.tensor(shift, dtype=torch.float32, device=dev)
    sq = c * c
    finite_sq = torch.isfinite(sq)
    # Round 2: exact sum of squared deviations (+ a count of overflowed squares) -> sigma.
    sent = torch.cat(
        [accumulate(torch.where(finite_sq, sq, 0.0)), (~finite_sq).sum().reshape(1).to(torch.int64)]
    )
    got = yield sent
    if n_total > 1 and int(got[-1]) == 0:
        sigma = math.sqrt(float(exact_value(got[:-1]) / (n_total - 1)))
    else:
        sigma = math.inf
    factor = (
        config.scale_sigmas if config.quantizer == "reference" else config.symmetric_scale_sigmas
    )
    scale = to_float32(factor * sigma)
    if scale == 0.0 or not math.isfinite(scale):
        scale = 1.0
    # A device tensor (not a Python scalar) keeps the division a true IEEE division on CUDA.
    scale_t = torch.tensor([scale], dtype=torch.float32, device=dev)
    if config.quantizer == "reference":
        q = torch.round(c / scale_t + 2.0)
    else:
        q = torch.floor(c / scale_t) + 2.0
    q = q.clamp_(0, _NUM_LEVELS - 1).to(torch.int64)
    # Round 3: per-bin counts and exact sums of c -> decoder table.
    counts_local = torch.bincount(q.reshape(-1), minlength=_NUM_LEVELS).to(torch.int64)
    got = yield torch.cat([counts_local, accumulate(c, q, _NUM_LEVELS)])
    counts = got[:_NUM_LEVELS].tolist()
    lut = []
    for b in range(_NUM_LEVELS):
        acc = got[_NUM_LEVELS + b * NUM_BUCKETS : _NUM_LEVELS + (b + 1) * NUM_BUCKETS]
        lut.append(to_float32(exact_value(acc) / counts[b]) if counts[b] else 0.0)
    return (shift, *lut), q.to(torch.uint8)


def _no_steps(vals: torch.Tensor) -> QuantSteps:
    """quantizer="none": no statistics, no rounds."""
    return (), None
    yield vals  # pragma: no cover - makes this a generator


def _drive(
    rank_gens: Sequence[Sequence[QuantSteps]],
    reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> list[list[tuple[tuple[float, ...], torch.Tensor | None]]]:
    """Run per-rank lists of quantiser generators in lockstep, batching each round.

    ``reduce`` receives one concatenated vector per rank and returns the summed vector for each.
    All ranks hold generators for the same tensors, so every rank has the same rounds.
    """
    n_ranks = len(rank_gens)
    results: list[list] = [[None] * len(g) for g in rank_gens]
    pending: list[list[tuple[int, torch.Tensor]]] = []
    for r, gens in enumerate(rank_gens):
        reqs = []
        for i, g in enumerate(gens):
            try:
                reqs.append((i, next(g)))
            except StopIteration as stop:
                results[r][i] = stop.value
        pending.append(reqs)
    while any(pending):
        sizes = [[t.numel() for _, t in reqs] for reqs in pending]
        if any(s != sizes[0] for s in sizes):
            raise EncodeError("shard group ranks disagree on the tensors being encoded")
        vectors = [torch.cat([t.reshape(-1) for _, t in reqs]) for reqs in pending]
        summed = reduce(vectors)
        new_pending: list[list[tuple[int, torch.Tensor]]] = []
        for r in range(n_ranks):
            reqs, out = [], summed[r]
            for (i, _), part in zip(pending[r], torch.split(out, sizes[r]), strict=True):
                try:
                    reqs.append((i, rank_gens[r][i].send(part)))
                except StopIteration as stop:
                    results[r][i] = stop.value
            new_pending.append(reqs)
        pending = new_pending
    return results


# --------------------------------------------------------------------------------------------
# Public encoding API
# --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    name: str
    geometry: TileGeometry
    k: int
    block: TileBlock
    indices: torch.Tensor
    values: torch.Tensor


def _prepare(name: str, sl: TensorSlice, config: SparseLoCoConfig) -> _Prepared:
    local = sl.local
    if not torch.is_floating_point(local):
        raise EncodeError(f"tensor {name!r}: dtype {local.dtype} is not floating point")
    geom = tile_geometry(sl.shape, config.tile_max)
    block = slice_block(geom, tuple(local.shape), tuple(sl.offset), name)
    matrix = (
        local.detach()
        .to(torch.float32)
        .reshape(
            (block.row1 - block.row0) * geom.tile_rows, (block.col1 - block.col0) * geom.tile_cols
        )
    )
    k = kept_per_tile(geom, config)
    idx, vals = _select_block(matrix, geom, k, config.chunk_elements)
    # Non-finite magnitudes always win the top-k, so checking the kept values covers the tensor.
    if not bool(torch.isfinite(vals).all()):
        raise EncodeError(f"tensor {name!r}: contains NaN or infinity; refusing to encode it")
    return _Prepared(name, geom, k, block, idx, vals)


def _steps(p: _Prepared, config: SparseLoCoConfig) -> QuantSteps:
    if config.quantizer == "none":
        return _no_steps(p.values)
    steps = quantize_steps(p.values, p.geometry.num_tiles * p.k, config)
    if p.block == full_block(p.geometry):
        # A rank holding the whole tensor (unsharded, or replicated like TP norms) needs no
        # group reduction; every replica computes the same result on its own.
        return _finished(_drive([[steps]], lambda vs: vs)[0][0])
    return steps


def _finished(result: tuple[tuple[float, ...], torch.Tensor | None]) -> QuantSteps:
    """A generator that yields nothing and returns ``result``."""
    return result
    yield torch.empty(0)  # pragma: no cover - makes this a generator


def _finish(
    p: _Prepared, result: tuple[tuple[float, ...], torch.Tensor | None], config: SparseLoCoConfig
) -> TensorPiece:
    if config.quantizer == "none":
        return TensorPiece(p.name, p.geometry, p.k, p.block, p.indices, None, p.values, (), "none")
    table, codes = result
    return TensorPiece(
        p.name, p.geometry, p.k, p.block, p.indices, codes, None, table, config.quantizer
    )


def encode_slices(
    slices: Mapping[str, TensorSlice],
    config: SparseLoCoConfig | None = None,
    reduce: Reduce | None = None,
) -> dict[str, TensorPiece]:
    """Encode the slices this rank owns; three batched ``reduce`` calls in total.

    Every rank of a shard group must call this with the same tensor names (in any order);
    ``reduce=None`` means this rank owns its tensors whole.
    """
    config = config or _DEFAULT
    names = sorted(slices)
    prepared = [_prepare(n, slices[n], config) for n in names]
    gens = [_steps(p, config) for p in prepared]
    if reduce is None:
        results = _drive([gens], lambda vs: vs)[0]
    else:
        results = _drive([gens], lambda vs: [reduce(vs[0])])[0]
    return {p.name: _finish(p, r, config) for p, r in zip(prepared, results, strict=True)}


def encode_slice(
    name: str,
    local: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    offset: tuple[int, ...],
    config: SparseLoCoConfig | None = None,
    reduce: Reduce | None = None,
) -> TensorPiece:
    """Encode one tensor's slice (see :func:`encode_slices`)."""
    return encode_slices({name: TensorSlice(local, tuple(shape), tuple(offset))}, config, reduce)[
        name
    ]


def encode_tensors(
    tensors: Mapping[str, torch.Tensor], config: SparseLoCoConfig | None = None
) -> dict[str, TensorPiece]:
    """Encode whole tensors (one rank owning everything)."""
    return encode_slices(
        {n: TensorSlice(t, tuple(t.shape), (0,) * t.dim()) for n, t in tensors.items()}, config
    )


def encode_slices_lockstep(
    ranks: Sequence[Mapping[str, TensorSlice]], config: SparseLoCoConfig | None = None
) -> list[dict[str, TensorPiece]]:
    """Encode the slices of several ranks of one shard group in this process.

    The in-process stand-in for a group of ranks each calling :func:`encode_slices` with an
    all-reduce: used by tests and by single-process tools that hold shards.
    """
    config = config or _DEFAULT
    prepared, gens = [], []
    for rank in ranks:
        names = sorted(rank)
        ps = [_prepare(n, rank[n], config) for n in names]
        prepared.append(ps)
        gens.append([_steps(p, config) for p in ps])

    def _sum(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        total = torch.stack([v.to("cpu") for v in vs]).sum(0)
        return [total.to(v.device) for v in vs]

    results = _drive(gens, _sum)
    return [
        {p.name: _finish(p, r, config) for p, r in zip(ps, rs, strict=True)}
        for ps, rs in zip(prepared, results, strict=True)
    ]


def merge(pieces: Iterable[TensorPiece]) -> dict[str, TensorPiece]:
    """Combine pieces (any layout, any order) into one full :class:`TensorPiece` per tensor.

    Raises :class:`EncodeError` when pieces overlap, leave tiles uncovered, or disagree on the
    tensor's shape, k or quantiser table.
    """
    by_name: dict[str, list[TensorPiece]] = {}
    for p in pieces:
        by_name.setdefault(p.name, []).append(p)
    out: dict[str, TensorPiece] = {}
    for name in sorted(by_name):
        group = by_name[name]
        first = group[0]
        g = first.geometry
        if len(group) == 1 and first.is_full:
            out[name] = first
            continue
        for p in group[1:]:
            if (p.geometry, p.k, p.table, p.quantizer) != (
                g,
                first.k,
                first.table,
                first.quantizer,
            ):
                raise EncodeError(
                    f"tensor {name!r}: pieces disagree on shape, k or quantiser table"
                )
        owner = torch.full((g.grid_rows, g.grid_cols), -1, dtype=torch.int64)
        for i, p in enumerate(group):
            b = p.block
            region = owner[b.row0 : b.row1, b.col0 : b.col1]
            if bool((region >= 0).any()):
                raise EncodeError(f"tensor {name!r}: pieces overlap in tile block {b}")
            region.fill_(i)
        if bool((owner < 0).any()):
            raise EncodeError(
                f"tensor {name!r}: pieces leave {int((owner < 0).sum())} tiles uncovered"
            )
        dev = first.indices.device
        indices = torch.empty((g.num_tiles, first.k), dtype=torch.int64, device=dev)
        codes = (
            torch.empty((g.num_tiles, first.k), dtype=torch.uint8, device=dev)
            if first.codes is not None
            else None
        )
        values = (
            torch.empty((g.num_tiles, first.k), dtype=torch.float32, device=dev)
            if first.values is not None
            else None
        )
        grid = torch.arange(g.num_tiles, device=dev).reshape(g.grid_rows, g.grid_cols)
        for p in group:
            b = p.block
            dest = grid[b.row0 : b.row1, b.col0 : b.col1].reshape(-1)
            indices[dest] = p.indices.to(dev)
            if codes is not None and p.codes is not None:
                codes[dest] = p.codes.to(dev)
            if values is not None and p.values is not None:
                values[dest] = p.values.to(dev)
        out[name] = TensorPiece(
            name,
            g,
            first.k,
            TileBlock(0, g.grid_rows, 0, g.grid_cols),
            indices,
            codes,
            values,
            first.table,
            first.quantizer,
        )
    return out


# --------------------------------------------------------------------------------------------
# Error feedback
# --------------------------------------------------------------------------------------------


def compress_steps(
    errors: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    config: SparseLoCoConfig | None = None,
    *,
    outer_lr: float = 1.0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    offsets: Mapping[str, tuple[int, ...]] | None = None,
    reduce: Reduce | None = None,
) -> tuple[dict[str, TensorPiece], dict[str, torch.Tensor]]:
    """Error feedback + encode + residual for many tensors (SPEC 4.2-4.6), batched reductions.

    ``e = beta * error + delta`` (``delta * outer_lr`` with ``ef_outer_lr_factor``), encode ``e``,
    and return the pieces plus the new error buffers ``e - decode(encode(e))`` (float32, the
    shapes of the local slices). ``shapes``/``offsets`` give each slice's place in the global
    tensor (default: the tensors are whole).
    """
    config = config or _DEFAULT
    lr = outer_lr if config.ef_outer_lr_factor else 1.0
    fed: dict[str, torch.Tensor] = {}
    slices: dict[str, TensorSlice] = {}
    for name, delta in deltas.items():
        if name not in errors:
            raise EncodeError(f"tensor {name!r}: no error buffer for this pseudo-gradient")
        err = errors[name]
        if err.shape != delta.shape:
            raise EncodeError(
                f"tensor {name!r}: error buffer {tuple(err.shape)} vs delta {tuple(delta.shape)}"
            )
        e = err.to(torch.float32) * config.beta + delta.to(torch.float32) * lr
        fed[name] = e
        shape = tuple(shapes[name]) if shapes else tuple(e.shape)
        offset = tuple(offsets[name]) if offsets else (0,) * e.dim()
        slices[name] = TensorSlice(e, shape, offset)
    pieces = encode_slices(slices, config, reduce)
    new_errors = {n: fed[n] - pieces[n].to_dense(local=True).reshape(fed[n].shape) for n in fed}
    return pieces, new_errors


def compress_step(
    error: torch.Tensor,
    delta: torch.Tensor,
    config: SparseLoCoConfig | None = None,
    *,
    name: str = "tensor",
    outer_lr: float = 1.0,
    shape: tuple[int, ...] | None = None,
    offset: tuple[int, ...] | None = None,
    reduce: Reduce | None = None,
) -> tuple[TensorPiece, torch.Tensor]:
    """One tensor's error feedback + encode + residual; see :func:`compress_steps`."""
    pieces, errs = compress_steps(
        {name: error},
        {name: delta},
        config,
        outer_lr=outer_lr,
        shapes={name: shape} if shape is not None else None,
        offsets={name: offset} if offset is not None else None,
        reduce=reduce,
    )
    return pieces[name], errs[name]


__all__ = [
    "Reduce",
    "TensorPiece",
    "TensorSlice",
    "compress_step",
    "compress_steps",
    "decode_levels",
    "encode_slice",
    "encode_slices",
    "encode_slices_lockstep",
    "encode_tensors",
    "merge",
    "quantize_steps",
    "select_topk",
]
