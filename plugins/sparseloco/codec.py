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
from typing import NamedTuple, TypeVar

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
)

logger = logging.getLogger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sum an int64 vector across the shard group (every rank gets the sum); identity if unsharded."""

_DEFAULT = SparseLoCoConfig()
_NUM_LEVELS = 4  # 2-bit codes
_R = TypeVar("_R")


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
    every device. NaN and infinity sort above every finite magnitude, so any non-finite input
    value is among the kept values (the caller checks those).
    """
    tiles = tiles.to(torch.float32)
    keys = tiles.view(torch.int32) & _ABS_MASK
    idx = _topk_keys(keys, k)
    return idx, torch.gather(tiles, 1, idx)


# Clearing the sign bit of a float32 gives |x|; as int32 these bit patterns order exactly like
# the magnitudes (NaN above infinity above every finite value, -0.0 == +0.0). Integer top-k
# skips the float comparator's NaN handling, which makes it about twice as fast on CPU.
_ABS_MASK = 0x7FFFFFFF


def _topk_keys(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted in-tile indices of the ``k`` largest int32 magnitude keys per row, ties to the lower index.

    Fast path: one integer top-(k+1). When the smallest of those k+1 keys is unique it is the
    (k+1)-th largest and strictly below the k-th, so the other k are the unique top-k; rows where
    it is not unique (a tie straddles the cut, e.g. blocks of zeros) are redone with unique keys.
    This replaces a full extra pass counting the keys at or above each row's k-th largest.
    """
    n_tiles, length = keys.shape
    if k >= length:
        return torch.arange(length, device=keys.device).expand(n_tiles, length).contiguous()
    top, idx = torch.topk(keys, k + 1, dim=1, sorted=False)
    at_min = top == top.amin(dim=1, keepdim=True)
    ambiguous = at_min.sum(dim=1) != 1
    # The dropped (k+1)-th index becomes `length`, which sorts after every real index.
    idx = torch.sort(idx.masked_fill_(at_min, length), dim=1).values[:, :k]
    if bool(ambiguous.any()):
        rows = torch.nonzero(ambiguous).squeeze(1)
        idx[rows] = torch.sort(_canonical_topk(keys[rows], k), dim=1).values
    return idx


def _canonical_topk(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of int32 magnitude keys with ties to the lower index, via unique int64 keys.

    The magnitude key goes to the high bits, the reversed index to the low bits, so every key is
    unique and a tie is won by the lower index.
    """
    length = keys.shape[1]
    low_bits = max(1, (length - 1).bit_length())
    wide = keys.to(torch.int64) << low_bits
    wide |= (length - 1) - torch.arange(length, device=keys.device, dtype=torch.int64)
    return torch.topk(wide, k, dim=1, sorted=False).indices


def _select_block(
    matrix: torch.Tensor, geom: TileGeometry, k: int, chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select top-k in every tile of a (block-shaped) float32 matrix, a few tile rows at a time.

    The magnitude keys are written straight into tile order (one strided pass, no tile copy of
    the values); the kept values are then read from the matrix at their row-major positions.
    """
    th, tw = geom.tile_rows, geom.tile_cols
    cols = matrix.shape[1]
    gc = cols // tw
    rows_per_chunk = max(1, chunk_elements // max(1, cols * th)) * th
    # Row-major offset of each in-tile index relative to its tile's corner.
    lane = torch.arange(geom.tile_len, device=matrix.device, dtype=torch.int64)
    in_tile = torch.div(lane, tw, rounding_mode="floor") * cols + lane % tw
    idx_parts, val_parts = [], []
    for r0 in range(0, matrix.shape[0], rows_per_chunk):
        chunk = matrix[r0 : r0 + rows_per_chunk]
        gr = chunk.shape[0] // th
        keys = torch.empty((gr, gc, th, tw), dtype=torch.int32, device=matrix.device)
        bits = chunk.view(torch.int32).reshape(gr, th, gc, tw).permute(0, 2, 1, 3)
        torch.bitwise_and(bits, _ABS_MASK, out=keys)
        idx = _topk_keys(keys.view(gr * gc, th * tw), k)
        t = torch.arange(gr * gc, device=matrix.device, dtype=torch.int64)
        corner = torch.div(t, gc, rounding_mode="floor") * (th * cols) + (t % gc) * tw
        pos = corner.unsqueeze(1) + in_tile[idx]
        idx_parts.append(idx)
        val_parts.append(torch.take(chunk, pos))
    if len(idx_parts) == 1:
        return idx_parts[0], val_parts[0]
    return torch.cat(idx_parts), torch.cat(val_parts)


# --------------------------------------------------------------------------------------------
# Quantisation statistics as a reduction protocol
# --------------------------------------------------------------------------------------------

QuantResult = tuple[tuple[float, ...], torch.Tensor | None]
QuantSteps = Generator[torch.Tensor, torch.Tensor, QuantResult]
BatchSteps = Generator[torch.Tensor, torch.Tensor, list[QuantResult]]


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
    results = yield from quantize_batch([vals], [n_total], config)
    return results[0]


def quantize_batch(
    vals_list: Sequence[torch.Tensor], n_totals: Sequence[int], config: SparseLoCoConfig
) -> BatchSteps:
    """:func:`quantize_steps` for several tensors at once (one pass per step, not one per tensor).

    Each yielded vector is exactly the concatenation, in list order, of the vectors the
    per-tensor generators would yield in that round, so the reduction is the same; the
    elementwise float32 arithmetic is the same too (each value is combined with its own
    tensor's shift and scale). Returns one ``(table, codes)`` per tensor.
    """
    m = len(vals_list)
    if m == 0:
        return []
    dev = vals_list[0].device
    sizes = [int(x.numel()) for x in vals_list]
    if m == 1:
        v = vals_list[0].reshape(-1).to(torch.float32)
        tid: torch.Tensor | None = None
    else:
        v = torch.cat([x.reshape(-1).to(torch.float32) for x in vals_list])
        tid = torch.repeat_interleave(
            torch.arange(m, device=dev), torch.tensor(sizes, device=dev), output_size=v.numel()
        )

    def per_value(scalars: list[float]) -> torch.Tensor:
        """Each value's own tensor's float32 scalar (a device tensor, see the division below)."""
        t = torch.tensor(scalars, dtype=torch.float32, device=dev)
        return t if tid is None else t[tid]

    nb = NUM_BUCKETS
    # Round 1: exact sum of the kept values -> shift.
    got = (yield accumulate(v, tid, m)).tolist()
    shifts = [to_float32(exact_value(got[i * nb : (i + 1) * nb]) / n_totals[i]) for i in range(m)]
    c = v - per_value(shifts)
    sq = c * c
    # Round 2: exact sum of squared deviations (+ a count of overflowed squares) -> sigma.
    # The squares are >= 0, so a finite float sum proves every square finite (the usual case,
    # one reduction); otherwise count the overflowed ones exactly.
    if math.isfinite(float(sq.sum())):
        overflow = torch.zeros(m, dtype=torch.int64, device=dev)
        sq_sums = accumulate(sq, tid, m).view(m, nb)
    else:
        finite_sq = torch.isfinite(sq)
        overflow = (
            (~finite_sq).sum().reshape(1).to(torch.int64)
            if tid is None
            else torch.bincount(tid[~finite_sq], minlength=m).to(torch.int64)
        )
        sq_sums = accumulate(torch.where(finite_sq, sq, 0.0), tid, m).view(m, nb)
    got = (yield torch.cat([sq_sums, overflow.view(m, 1)], dim=1).reshape(-1)).tolist()
    factor = (
        config.scale_sigmas if config.quantizer == "reference" else config.symmetric_scale_sigmas
    )
    scales = []
    for i in range(m):
        row = got[i * (nb + 1) : (i + 1) * (nb + 1)]
        if n_totals[i] > 1 and int(row[-1]) == 0:
            sigma = math.sqrt(float(exact_value(row[:-1]) / (n_totals[i] - 1)))
        else:
            sigma = math.inf
        scale = to_float32(factor * sigma)
        scales.append(1.0 if scale == 0.0 or not math.isfinite(scale) else scale)
    # A device tensor (not a Python scalar) keeps the division a true IEEE division on CUDA.
    scale_t = per_value(scales)
    if config.quantizer == "reference":
        q = torch.round(c / scale_t + 2.0)
    else:
        q = torch.floor(c / scale_t) + 2.0
    q = q.clamp_(0, _NUM_LEVELS - 1).to(torch.int64)
    # Round 3: per-bin counts and exact sums of c -> decoder table.
    groups = q if tid is None else tid * _NUM_LEVELS + q
    counts_local = torch.bincount(groups, minlength=m * _NUM_LEVELS).to(torch.int64)
    bin_sums = accumulate(c, groups, m * _NUM_LEVELS).view(m, _NUM_LEVELS * nb)
    sent = torch.cat([counts_local.view(m, _NUM_LEVELS), bin_sums], dim=1).reshape(-1)
    got = (yield sent).tolist()
    width = _NUM_LEVELS + _NUM_LEVELS * nb
    codes = q.to(torch.uint8)
    results: list[QuantResult] = []
    offset = 0
    for i in range(m):
        row = got[i * width : (i + 1) * width]
        counts = row[:_NUM_LEVELS]
        lut = []
        for b in range(_NUM_LEVELS):
            acc = row[_NUM_LEVELS + b * nb : _NUM_LEVELS + (b + 1) * nb]
            lut.append(to_float32(exact_value(acc) / counts[b]) if counts[b] else 0.0)
        piece = codes[offset : offset + sizes[i]].view(vals_list[i].shape)
        offset += sizes[i]
        results.append(((shifts[i], *lut), piece))
    return results


def _drive(
    rank_gens: Sequence[Sequence[Generator[torch.Tensor, torch.Tensor, _R]]],
    reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> list[list[_R]]:
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
    if config.selection == "random":
        return _prepare_random(name, matrix, geom, k, block)
    idx, vals = _select_block(matrix, geom, k, config.chunk_elements)
    # Non-finite magnitudes always win the top-k, so checking the kept values covers the tensor.
    # A finite sum proves every kept value finite (NaN or inf would make it non-finite); only
    # an overflowing sum needs the elementwise check.
    if not math.isfinite(float(vals.sum())) and not bool(torch.isfinite(vals).all()):
        raise EncodeError(f"tensor {name!r}: contains NaN or infinity; refusing to encode it")
    return _Prepared(name, geom, k, block, idx, vals)


def _prepare_random(
    name: str, matrix: torch.Tensor, geom: TileGeometry, k: int, block: TileBlock
) -> _Prepared:
    """``selection="random"``: a uniformly random k-subset of every tile (an ablation of top-k).

    Random int32 keys from torch's default generator on the matrix's device take the place of
    the magnitude keys, so the indices come out of the same canonical top-k (sorted, no
    repeats). Top-k's argument that non-finite values always win does not hold here, so the
    whole matrix is checked.
    """
    if not bool(torch.isfinite(matrix).all()):
        raise EncodeError(f"tensor {name!r}: contains NaN or infinity; refusing to encode it")
    th, tw = geom.tile_rows, geom.tile_cols
    gr, gc = matrix.shape[0] // th, matrix.shape[1] // tw
    tiles = matrix.reshape(gr, th, gc, tw).permute(0, 2, 1, 3).reshape(gr * gc, th * tw)
    keys = torch.randint(0, _ABS_MASK, tiles.shape, dtype=torch.int32, device=matrix.device)
    idx = _topk_keys(keys, k)
    return _Prepared(name, geom, k, block, idx, torch.gather(tiles, 1, idx))


def _batch_steps(prepared: Sequence[_Prepared], config: SparseLoCoConfig) -> BatchSteps:
    """One generator quantising all of a rank's tensors; only sliced tensors take part in rounds.

    A rank holding a whole tensor (unsharded, or replicated like TP norms) needs no group
    reduction; every replica computes the same result on its own. The sliced tensors are
    quantised together, and their round vectors are reduced across the shard group.
    """
    if config.quantizer == "none":
        return [((), None) for _ in prepared]
    results: list[QuantResult | None] = [None] * len(prepared)
    whole = [i for i, p in enumerate(prepared) if p.block == full_block(p.geometry)]
    sliced = [i for i, p in enumerate(prepared) if p.block != full_block(p.geometry)]
    mine = quantize_batch(
        [prepared[i].values for i in whole], [_n_total(prepared[i]) for i in whole], config
    )
    local = _drive([[mine]], lambda vs: vs)[0][0]
    for i, r in zip(whole, local, strict=True):
        results[i] = r
    if sliced:
        shared = yield from quantize_batch(
            [prepared[i].values for i in sliced], [_n_total(prepared[i]) for i in sliced], config
        )
        for i, r in zip(sliced, shared, strict=True):
            results[i] = r
    return [r for r in results if r is not None]


def _n_total(p: _Prepared) -> int:
    return p.geometry.num_tiles * p.k


def _finish(p: _Prepared, result: QuantResult, config: SparseLoCoConfig) -> TensorPiece:
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
    gens = [_batch_steps(prepared, config)]
    if reduce is None:
        results = _drive([gens], lambda vs: vs)[0][0]
    else:
        results = _drive([gens], lambda vs: [reduce(vs[0])])[0][0]
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
        gens.append([_batch_steps(ps, config)])

    def _sum(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        total = torch.stack([v.to("cpu") for v in vs]).sum(0)
        return [total.to(v.device) for v in vs]

    results = _drive(gens, _sum)
    return [
        {p.name: _finish(p, r, config) for p, r in zip(ps, rs[0], strict=True)}
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
