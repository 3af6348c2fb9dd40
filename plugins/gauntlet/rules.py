"""The Gauntlet's scoring rules as pure functions (SPEC.md section 7).

Nothing here does I/O, reads a clock or keeps global state: every rule is a function of its
arguments, so a record of the inputs is enough to recompute and explain any score. The numbers
default to the spec's production values; :class:`~covenant.plugins.gauntlet.config.GauntletConfig`
holds the run's values and :mod:`covenant.plugins.gauntlet.scoring` passes them in.

Where a rule departs from the production validator (one-covenant/templar 142666f0) its docstring
says so, marked **(fix)** as in the spec. Where the spec leaves a choice open, the docstring
says which reading this module takes ("Interpretation").

Random draws all come from ``numpy.random.default_rng([eval_seed, tag])``: the tag keeps each
purpose's stream independent of the others (own-data draws use the uid as tag, the shared
random-data draw ``2**32``, selection and bin choice the two tags after it), and the seed is the
public block hash recorded with the window, so anybody can replay a draw.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "BIN_TAG",
    "RANDOM_DATA_TAG",
    "SELECTION_TAG",
    "CopyFlag",
    "Selection",
    "SyncResult",
    "apply_multiplier",
    "bma_effective",
    "bma_update",
    "check_eval_seed",
    "copy_flags",
    "copy_level",
    "eval_indicator",
    "eval_rng",
    "fifth_best_negative",
    "final_score",
    "gather_miss_excluded",
    "gather_miss_multiplier",
    "index_overlap",
    "initial_peer_list",
    "interquartile_mean",
    "loss_score",
    "negative_eval_rules",
    "next_peer_list",
    "ordinal",
    "own_eval_ids",
    "pairwise_overlaps",
    "random_eval_ids",
    "rate_match",
    "relative_improvement",
    "sample_values",
    "select_for_evaluation",
    "selection_bins",
    "selection_weight",
    "sync_from_x",
    "sync_score",
    "sync_slashed",
    "update_step_ema",
    "weights_from_scores",
]

#: ``default_rng([eval_seed, RANDOM_DATA_TAG])`` draws the random-data sample ids (SPEC 7).
RANDOM_DATA_TAG = 2**32
#: Tag of the weighted stage-2 draw. Above every uid and the random-data tag: streams never meet.
SELECTION_TAG = 2**32 + 1
#: Tag of the uniform bin choice when the candidates are binned.
BIN_TAG = 2**32 + 2

_SYNC_POSITIONS = (10, 11)


# ----------------------------------------------------------------------------------------------
# sync score
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncResult:
    """Outcome of :func:`sync_score`: ``x`` (``math.inf`` when nothing compared) and ``sync``."""

    x: float
    sync: float
    tensors: int = 0  # how many tensors were comparable
    ratios: int = 0  # how many per-position ratios went into the quantiles


def _finite_pair(value: Any) -> tuple[float, float] | None:
    """Two floats from a 2-element sequence/array/tensor, or None (wrong length, not numbers)."""
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    if arr.size != 2:
        return None
    return float(arr[0]), float(arr[1])


def sample_values(
    value: Any, positions: tuple[int, int] = _SYNC_POSITIONS
) -> tuple[float, float] | None:
    """The two sync-sample values of one tensor (SPEC 6-7), or None when it has none.

    A tensor (torch or numpy, any shape) with more elements than the largest position gives its
    elements at those global flat positions, read in place (no flattened copy of a large
    tensor); a tensor or sequence of exactly two elements is taken as the already-extracted pair.
    Anything else (a small tensor, which peers do not publish) has no sample.
    """
    shape = getattr(value, "shape", None)
    if shape is None:
        return _finite_pair(value)
    dims = tuple(int(d) for d in shape)
    numel = math.prod(dims)
    if numel == 2:
        positions = (0, 1)
    elif numel <= max(positions):
        return None
    out: list[float] = []
    for pos in positions:
        index = tuple(int(i) for i in np.unravel_index(pos, dims))
        out.append(float(value[index]))
    return out[0], out[1]


def interquartile_mean(values: ArrayLike) -> float:
    """Mean of the values within ``[Q1, Q3]`` inclusive (numpy's default linear quantiles).

    ``math.inf`` for no value. One huge outlier cannot move it, which is why the sync score uses
    it: a single tensor out of place (or crafted) does not decide a peer's sync.

    Two distinct values have both quartiles strictly between them, so nothing lies inside;
    their mean (which is also their median) is taken then (a model with one sampled tensor).
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        return math.inf
    q1, q3 = np.quantile(arr, [0.25, 0.75])
    inside = arr[(arr >= q1) & (arr <= q3)]
    return float(inside.mean() if inside.size else arr.mean())


def sync_from_x(x: float, *, x_cap: float = 3.0, power: float = 2.5) -> float:
    """``max(0, 1 - min(x, cap)/cap) ** power`` (SPEC 7 "Sync score"); ``x = inf`` gives 0."""
    if math.isnan(x):
        return 0.0
    return max(0.0, 1.0 - min(x, x_cap) / x_cap) ** power


def sync_score(
    validator: Mapping[str, Any],
    sample: Mapping[str, Sequence[float]] | None,
    step: Mapping[str, Sequence[float]],
    *,
    positions: tuple[int, int] = _SYNC_POSITIONS,
    step_floor: float = 1e-9,
    x_cap: float = 3.0,
    power: float = 2.5,
) -> SyncResult:
    """How far a peer's published model sample sits from the validator's, in step sizes.

    SPEC 7 "Sync score": per position, ratio = ``|peer - validator| / step`` (step floored at
    1e-9); ``x`` = interquartile mean of all ratios over all comparable tensors; ``sync =
    max(0, 1 - min(x, 3)/3) ** 2.5``. ``sample`` is the peer's ``debug/{S-1}`` (tensor name ->
    its two values), ``step`` the validator's step-size EMA (name -> two values), ``validator``
    the validator's own tensors before applying ``S`` (or their extracted pairs, see
    :func:`sample_values`).

    A name missing from any of the three, or whose values are not two finite numbers, is not
    comparable; no comparable tensor gives ``x = inf`` (sync 0), and so does an unreadable or
    absent sample (``sample is None``).

    **(fix)** the validator compares the same positions it publishes (10 and 11; production
    compared 0 and 1 with its own sample at other positions), and ``step`` is the measured EMA
    of the validator's own outer steps, not the outer learning rate.
    """
    if sample is None:
        return SyncResult(x=math.inf, sync=0.0)
    ratios: list[float] = []
    tensors = 0
    for name in sorted(set(validator) & set(sample) & set(step)):
        mine = sample_values(validator[name], positions)
        peer = _finite_pair(sample[name])
        size = _finite_pair(step[name])
        if mine is None or peer is None or size is None:
            continue
        if not all(math.isfinite(v) for v in (*mine, *peer, *size)):
            continue
        tensors += 1
        for p, v, s in zip(peer, mine, size, strict=True):
            ratios.append(abs(p - v) / max(s, step_floor))
    if not ratios:
        return SyncResult(x=math.inf, sync=0.0)
    x = interquartile_mean(ratios)
    return SyncResult(
        x=x, sync=sync_from_x(x, x_cap=x_cap, power=power), tensors=tensors, ratios=len(ratios)
    )


def update_step_ema(
    step: Mapping[str, Sequence[float]] | None,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    alpha: float = 0.2,
    *,
    positions: tuple[int, int] = _SYNC_POSITIONS,
    floor: float = 1e-9,
) -> dict[str, list[float]]:
    """The validator's step-size EMA after one of its own outer steps (SPEC 7 "Sync score").

    Per tensor present in both ``before`` and ``after`` (values as in :func:`sample_values`) and
    per position: ``d = |after - before|``; a new entry (no EMA yet, or none for this name) is
    ``d``, else ``alpha*d + (1-alpha)*ema``; the result is floored at ``floor`` (1e-9). Entries
    of ``step`` whose tensor did not move through this call (absent, or non-finite values) are
    carried over unchanged. Returns a new dict; the inputs are not modified.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    out: dict[str, list[float]] = {}
    for name, vals in (step or {}).items():
        pair = _finite_pair(vals)
        if pair is not None and all(math.isfinite(v) for v in pair):
            out[name] = [pair[0], pair[1]]
    for name in sorted(set(before) & set(after)):
        b = sample_values(before[name], positions)
        a = sample_values(after[name], positions)
        if a is None or b is None:
            continue
        d = [abs(x - y) for x, y in zip(a, b, strict=True)]
        if not all(math.isfinite(v) for v in d):
            continue
        prev = out.get(name)
        new = (
            d
            if prev is None
            else [alpha * x + (1.0 - alpha) * e for x, e in zip(d, prev, strict=True)]
        )
        out[name] = [max(v, floor) for v in new]
    return out


# ----------------------------------------------------------------------------------------------
# copy detection
# ----------------------------------------------------------------------------------------------

_WORD_BITS = 64
_BUILD_TILES = 128  # tiles per packed block: 128 x 4096 bools = 512 KiB, stays in cache


def _index_array(value: Any, name: str) -> NDArray[np.int64]:
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"tile indices of {name!r} must be 2-D (tiles, k), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tile indices of {name!r} must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _bitmaps(
    arrays: Sequence[NDArray[np.int64]], lo: int, hi: int, tile_bits: int
) -> NDArray[np.uint64]:
    """Tiles ``lo:hi`` of every upload as packed bitmaps: shape (uploads, (hi-lo)*words)."""
    n = hi - lo
    words = tile_bits // _WORD_BITS
    out = np.empty((len(arrays), n * words), dtype=np.uint64)
    dense = np.zeros(n * tile_bits, dtype=bool)
    offsets = (np.arange(n, dtype=np.int64) * tile_bits)[:, None]
    for row, arr in enumerate(arrays):
        flat = (offsets + arr[lo:hi]).reshape(-1)
        dense[flat] = True  # a repeated index sets the same bit: counted once, as a set
        packed = np.packbits(dense.reshape(n, tile_bits), axis=1, bitorder="little")
        out[row] = packed.view(np.uint64).reshape(-1)
        dense[flat] = False
    return out


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_rows(words: NDArray[np.uint64]) -> NDArray[np.int64]:
    """Set bits per row of a 2-D uint64 array (numpy >= 2 has a popcount ufunc)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    as_bytes = words.view(np.uint8).reshape(words.shape[0], -1)
    return _BYTE_BITS[as_bytes].sum(axis=1, dtype=np.int64)


@dataclass(frozen=True)
class _Block:
    """Tiles ``lo:hi`` of one tensor, held by the uploads at ``rows`` (positions in uid order)."""

    rows: NDArray[np.intp]
    arrays: Sequence[NDArray[np.int64]]
    tile_bits: int
    lo: int
    hi: int


def _count_blocks(blocks: Sequence[_Block], n: int) -> NDArray[np.int64]:
    """Common indices of every pair over ``blocks``: an (n, n) upper-triangular count matrix."""
    common = np.zeros((n, n), dtype=np.int64)
    for blk in blocks:
        bits = _bitmaps(blk.arrays, blk.lo, blk.hi, blk.tile_bits)
        h = len(blk.arrays)
        counts = np.zeros((h, h), dtype=np.int64)
        for i in range(h - 1):
            counts[i, i + 1 :] = _popcount_rows(np.bitwise_and(bits[i], bits[i + 1 :]))
        common[np.ix_(blk.rows, blk.rows)] += counts
    return common


def pairwise_overlaps(
    uploads: Mapping[int, Mapping[str, Any]],
    *,
    block_tiles: int = _BUILD_TILES,
    workers: int = 1,
) -> dict[tuple[int, int], float]:
    """:func:`index_overlap` of every pair of uploads, ``{(i, j): overlap}`` with ``i < j``.

    Each upload's tiles become packed bitmaps (64 bits per word, one tile = tile length / 64
    words), block by block of tiles so that the working set stays in cache; a pair's common
    indices are then ``popcount(A & B)``, for all pairs of a block at once. ``workers > 1``
    spreads the blocks over threads (numpy releases the GIL in these loops); the counts are
    integers, so the result is identical for any number of workers. Raises ValueError when two
    uploads disagree on a tensor's shape or hold a negative index: only uploads that passed
    stage 1 (which checks shapes, ``k`` and index ranges) belong here.
    """
    uids = sorted(uploads)
    n = len(uids)
    pos = {uid: i for i, uid in enumerate(uids)}
    total = np.zeros((n, n), dtype=np.int64)
    blocks: list[_Block] = []
    for name in sorted({name for uid in uids for name in uploads[uid]}):
        holders = [uid for uid in uids if name in uploads[uid]]
        if len(holders) < 2:
            continue
        arrays = [_index_array(uploads[uid][name], name) for uid in holders]
        shape = arrays[0].shape
        for uid, arr in zip(holders, arrays, strict=True):
            if arr.shape != shape:
                raise ValueError(
                    f"tile indices of {name!r} disagree in shape: uid {holders[0]} has {shape}, "
                    f"uid {uid} has {arr.shape}"
                )
        tiles, k = shape
        if tiles * k == 0:
            continue
        if min(int(arr.min()) for arr in arrays) < 0:
            raise ValueError(f"tile indices of {name!r} hold a negative index")
        top = max(int(arr.max()) for arr in arrays)
        tile_bits = _WORD_BITS * (top // _WORD_BITS + 1)
        rows = np.array([pos[uid] for uid in holders], dtype=np.intp)
        total[np.ix_(rows, rows)] += tiles * k
        for lo in range(0, tiles, block_tiles):
            blocks.append(_Block(rows, arrays, tile_bits, lo, min(lo + block_tiles, tiles)))
    if workers <= 1 or len(blocks) < 2:
        common = _count_blocks(blocks, n)
    else:
        from concurrent.futures import ThreadPoolExecutor

        shares = [blocks[w::workers] for w in range(workers)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            common = sum(
                pool.map(lambda share: _count_blocks(share, n), shares),
                np.zeros((n, n), dtype=np.int64),
            )
    out: dict[tuple[int, int], float] = {}
    for i in range(n):
        for j in range(i + 1, n):
            out[(uids[i], uids[j])] = float(common[i, j] / total[i, j]) if total[i, j] else 0.0
    return out


def index_overlap(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Share of two uploads' top-k index sets that coincide (SPEC 7 "Copy detection").

    ``a[name]``/``b[name]``: an int array (tiles, k) of one upload's in-tile indices (unique
    within a tile).
    ``overlap = sum_t C_t*k_t * mean_tiles(|idx_a ∩ idx_b| / k_t) / sum_t C_t*k_t``
    over the tensors present in both, which is the count of common indices over the count of
    indices; 0.0 when no tensor is comparable. Symmetric. A tensor whose shapes disagree raises
    ValueError (it cannot come from two valid uploads: stage 1 checks shapes and ``k``; skipping
    it would let a malformed pair look less alike than it is).
    """
    return pairwise_overlaps({0: a, 1: b})[(0, 1)]


def copy_level(overlap: float, levels: Sequence[float] = (0.4, 0.5, 0.6)) -> int:
    """The copy level of an overlap (SPEC 7 "Copy detection").

    0 below ``levels[0]``; 1 in ``[l0, l1)`` (x0.5); 2 in ``[l1, l2)`` (reset); 3 at ``>= l2``
    (reset and excluded).
    """
    return sum(1 for level in levels if overlap >= level)


@dataclass(frozen=True)
class CopyFlag:
    """The worst copy level a peer reached this window, with the overlap and the other uid."""

    level: int
    overlap: float
    partner: int


def copy_flags(
    overlaps: Mapping[tuple[int, int], float],
    timestamps: Mapping[int, int | None],
    levels: Sequence[float] = (0.4, 0.5, 0.6),
) -> dict[int, CopyFlag]:
    """Who is flagged as the copier in each pair at or above the lowest level.

    SPEC 7: the upload with the later storage timestamp of **this window** is flagged (fix:
    production read window S-1's timestamps); equal timestamps flag both. A peer flagged by
    several pairs keeps the **worst** level (fix: production kept the last pair's); ties between
    pairs of the same level keep the higher overlap, then the lower partner uid. A missing
    timestamp counts as the latest: an upload that cannot show when it landed cannot claim to
    have been first.
    """
    out: dict[int, CopyFlag] = {}
    for (i, j), overlap in sorted(overlaps.items()):
        level = copy_level(overlap, levels)
        if level == 0:
            continue
        ti = timestamps.get(i)
        tj = timestamps.get(j)
        fi = math.inf if ti is None else ti
        fj = math.inf if tj is None else tj
        flagged = [(i, j)] if fi > fj else [(j, i)] if fj > fi else [(i, j), (j, i)]
        for uid, partner in flagged:
            flag = CopyFlag(level=level, overlap=float(overlap), partner=partner)
            old = out.get(uid)
            if old is None or (flag.level, flag.overlap, -flag.partner) > (
                old.level,
                old.overlap,
                -old.partner,
            ):
                out[uid] = flag
    return out


# ----------------------------------------------------------------------------------------------
# stage 2: loss score, indicator, BMA, ratings, final score
# ----------------------------------------------------------------------------------------------


def loss_score(rand_before: float, rand_after: float) -> float:
    """``(L_rand_before - L_rand_after) / L_rand_before`` in float32 (SPEC 7 "loss score").

    Computed in float32 as production did, so a replay gives the same bits. A non-positive or
    non-finite ``rand_before`` carries no information and gives 0.0 (cross-entropy is > 0).
    """
    before = np.float32(rand_before)
    after = np.float32(rand_after)
    if not np.isfinite(before) or before <= 0:
        return 0.0
    return float((before - after) / before)


def relative_improvement(before: float, after: float) -> float:
    """``(before - after) / before`` in float32; a loss ``before <= 0`` gives 0.0 (SPEC 7)."""
    b = np.float32(before)
    a = np.float32(after)
    if not np.isfinite(b) or b <= 0:
        return 0.0
    return float((b - a) / b)


def eval_indicator(own_improvement: float, random_improvement: float) -> int:
    """``+1`` if the own-data improvement is strictly larger than the random one, else ``-1``.

    The test of "did you train on your own data" (SPEC 7): a peer that trained on its assigned
    pool improves those sequences more than random ones.
    """
    return 1 if own_improvement > random_improvement else -1


def bma_update(bma: float, indicator: int, decay: float = 0.95) -> float:
    """``BMA <- decay*BMA + (1-decay)*b`` (SPEC 7; starts at 0)."""
    return decay * bma + (1.0 - decay) * indicator


def bma_effective(bma: float, threshold: float = 0.10) -> float:
    """The BMA as the final score sees it: below ``threshold`` it counts as 0 (SPEC 7)."""
    return 0.0 if bma < threshold else bma


def ordinal(mu: float, sigma: float, z: float = 3.0) -> float:
    """``mu - z*sigma``, OpenSkill's conservative rating (``Rating.ordinal()``)."""
    return mu - z * sigma


def final_score(
    rating: tuple[float, float] | None,
    bma: float,
    sync: float,
    *,
    threshold: float = 0.10,
    z: float = 3.0,
    mu: float = 25.0,
    sigma: float = 25.0 / 3.0,
) -> float:
    """``ordinal(mu - 3 sigma) * max(0, BMA') * sync`` (SPEC 7 "Final score").

    ``BMA'`` is the BMA after the threshold; no rating means a new one (``mu``, ``sigma``),
    whose ordinal is 0. The caller applies the window's slashing multipliers afterwards
    **(fix: production recomputed after slashing, so "invalid -> 0" did not stick)**.
    """
    m, s = rating if rating is not None else (mu, sigma)
    # "+ 0.0" turns the -0.0 of a negative ordinal times a zero BMA into a plain 0.0
    return ordinal(m, s, z) * max(0.0, bma_effective(bma, threshold)) * sync + 0.0


def rate_match(
    scores: Mapping[int, float],
    ratings: Mapping[int, tuple[float, float] | None],
    *,
    beta: float = 7.0,
    tau: float = 0.1,
    mu: float = 25.0,
    sigma: float = 25.0 / 3.0,
) -> dict[int, tuple[float, float]]:
    """One free-for-all OpenSkill match (SPEC 7 "Ratings"): ``{uid: (mu, sigma)}`` after it.

    ``PlackettLuce(beta=7, tau=0.1)``; every entry is a team of one, ranked by ``scores``
    (higher is better; -99 for missing, invalid, gather-skipped and excluded peers). Players
    without a rating (absent from ``ratings`` or None) start at ``(mu, sigma)``. Entries are
    passed in ascending uid order so the call is reproducible. Needs at least two entries
    (ValueError otherwise: the caller carries a lone entry to the next window).

    Uses openskill >= 6.2 (production pinned 6.1.3, whose handling of a 0.0 score and of ties
    differs).
    """
    if len(scores) < 2:
        raise ValueError(f"a match needs at least 2 entries, got {len(scores)}")
    values = {uid: float(v) for uid, v in scores.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise ValueError("match scores must be finite")
    from openskill.models import PlackettLuce  # import here: keeps this module light to import

    model = PlackettLuce(beta=beta, tau=tau, mu=mu, sigma=sigma)
    uids = sorted(values)
    teams = []
    for uid in uids:
        r = ratings.get(uid)
        teams.append([model.rating() if r is None else model.rating(mu=r[0], sigma=r[1])])
    rated = model.rate(teams, scores=[values[uid] for uid in uids])
    return {
        uid: (float(team[0].mu), float(team[0].sigma))
        for uid, team in zip(uids, rated, strict=True)
    }


# ----------------------------------------------------------------------------------------------
# reproducible draws and stage-2 selection
# ----------------------------------------------------------------------------------------------


def check_eval_seed(eval_seed: int) -> int:
    """``eval_seed`` as a Python int; TypeError/ValueError unless it is an int >= 0."""
    if isinstance(eval_seed, bool) or not isinstance(eval_seed, int | np.integer):
        raise TypeError(f"eval_seed must be an int, got {type(eval_seed).__name__}")
    if eval_seed < 0:
        raise ValueError(f"eval_seed must be >= 0, got {eval_seed}")
    return int(eval_seed)


def eval_rng(eval_seed: int, tag: int) -> np.random.Generator:
    """``numpy.random.default_rng([eval_seed, tag])``: one independent stream per purpose."""
    return np.random.default_rng([check_eval_seed(eval_seed), int(tag)])


def own_eval_ids(eval_seed: int, uid: int, pool: ArrayLike, n: int = 8) -> NDArray[np.int64]:
    """The own-data sample ids of ``uid`` (SPEC 7 "Reproducible sampling", fix).

    ``default_rng([eval_seed, uid]).choice(pool, n, replace=False)`` where ``pool`` is the peer's
    assigned pool for ``S`` (SPEC 3). A pool smaller than ``n`` is used whole, in drawn order.
    Production seeded from the wall clock and could not be replayed.
    """
    ids = np.asarray(pool, dtype=np.int64).reshape(-1)
    rng = eval_rng(eval_seed, uid)
    return rng.choice(ids, min(n, ids.size), replace=False).astype(np.int64, copy=False)


def random_eval_ids(eval_seed: int, num_samples: int, n: int = 8) -> NDArray[np.int64]:
    """The random-data sample ids of the window, shared by every peer (SPEC 7, fix).

    ``default_rng([eval_seed, 2**32]).choice(N, n, replace=False)``, N = samples in the active
    shard (``n`` is capped at N).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng = eval_rng(eval_seed, RANDOM_DATA_TAG)
    return rng.choice(num_samples, min(n, num_samples), replace=False).astype(np.int64)


def selection_weight(window: int, last_attempted: int | None, first_seen: int) -> float:
    """``1 + windows since last attempted`` (SPEC 7 "Selection for stage 2").

    A missing or invalid attempt counts as attempted. Interpretation: a peer never attempted
    counts from the window the validator first saw its hotkey, so a newcomer starts at weight 1
    and gains one per window, as production's per-peer counter did.
    """
    since = window - (first_seen if last_attempted is None else last_attempted)
    return 1.0 + max(0, since)


def selection_bins(
    candidates: Collection[int], ordinals: Mapping[int, float], bins: int = 5
) -> list[list[int]]:
    """Cut the candidates into ``bins`` bins by ordinal (SPEC 7).

    Ordered by ordinal, best first (no rating = 0), ties by uid; the first ``n mod bins`` bins
    get one extra. Each bin is returned in ascending uid order, so what a bin holds, not how it
    was sorted, decides the draw.
    """
    order = sorted(set(candidates), key=lambda u: (-float(ordinals.get(u, 0.0)), u))
    base, extra = divmod(len(order), bins)
    out: list[list[int]] = []
    start = 0
    for b in range(bins):
        size = base + (1 if b < extra else 0)
        out.append(sorted(order[start : start + size]))
        start += size
    return out


@dataclass(frozen=True)
class Selection:
    """The stage-2 draw: ``uids`` in evaluation order, the bin (None when not binned)."""

    uids: list[int]
    bin: int | None
    pool: list[int]  # the uids drawn from (the chosen bin, or every candidate)
    weights: dict[int, float]


def select_for_evaluation(
    candidates: Collection[int],
    weights: Mapping[int, float],
    ordinals: Mapping[int, float],
    eval_seed: int,
    *,
    count: int = 20,
    bins: int = 5,
    bin_min_candidates: int = 100,
) -> Selection:
    """Choose up to ``count`` candidates for stage 2 (SPEC 7 "Selection for stage 2").

    With at least ``bin_min_candidates`` candidates they are first cut into ``bins`` bins by
    ordinal (:func:`selection_bins`) and one bin is chosen uniformly
    (``default_rng([eval_seed, BIN_TAG])``). Then up to ``count`` are drawn without replacement
    with probability proportional to ``weights`` (see :func:`selection_weight`), from
    ``default_rng([eval_seed, SELECTION_TAG])``; the draw order is the evaluation order.
    **(fix)** seeded from the public ``eval_seed`` instead of the wall clock.
    """
    pool = sorted(set(candidates))
    chosen_bin: int | None = None
    if len(pool) >= bin_min_candidates and bins > 1:
        cut = selection_bins(pool, ordinals, bins)
        chosen_bin = int(eval_rng(eval_seed, BIN_TAG).integers(bins))
        pool = cut[chosen_bin]
    w = np.array([float(weights.get(uid, 1.0)) for uid in pool], dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("selection weights must be finite and > 0")
    n = min(count, len(pool))
    picked: list[int] = []
    if n:
        rng = eval_rng(eval_seed, SELECTION_TAG)
        idx = rng.choice(len(pool), size=n, replace=False, p=w / w.sum())
        picked = [pool[int(i)] for i in idx]
    return Selection(
        uids=picked,
        bin=chosen_bin,
        pool=pool,
        weights={uid: float(x) for uid, x in zip(pool, w, strict=True)},
    )


# ----------------------------------------------------------------------------------------------
# slashing
# ----------------------------------------------------------------------------------------------


def apply_multiplier(
    final: float,
    bma: float,
    multiplier: float,
    *,
    touches_bma: bool = True,
    zero_below: float | None = None,
) -> tuple[float, float]:
    """One slash: ``(final, bma)`` after it (SPEC 7 "Slashing").

    Multipliers apply only while the final score is > 0 (a negative or zero score is left as it
    is, as production did), and also multiply the BMA unless ``touches_bma`` is False
    (inactivity and invalid touch only the final score). With ``zero_below`` (gather-miss,
    evaluation-miss and negative-evaluation slashes) a final score left below it becomes 0.
    """
    if final <= 0.0:
        return final, bma
    final *= multiplier
    if touches_bma:
        bma *= multiplier
    if zero_below is not None and final < zero_below:
        final = 0.0
    return final, bma


def gather_miss_multiplier(
    consecutive: int,
    ratio: float,
    *,
    multipliers: Sequence[float] = (0.75, 0.5, 0.0),
    min_ratio: float = 0.4,
) -> float:
    """Multiplier of a gather miss (SPEC 7 "Slashing").

    ``consecutive`` counts this miss (1 = first in a row): x0.75, x0.5, then x0 (the last
    multiplier repeats). If the window's gathered / listed ratio is below ``min_ratio`` every
    missing peer gets x0.
    """
    if consecutive < 1:
        raise ValueError(f"consecutive must be >= 1 for a miss, got {consecutive}")
    if ratio < min_ratio:
        return 0.0
    return float(multipliers[min(consecutive, len(multipliers)) - 1])


def gather_miss_excluded(history: Sequence[bool], *, limit: int = 4, span: int = 8) -> bool:
    """``>= limit`` misses (True) in the last ``span`` gather windows: exclude and reset."""
    return sum(1 for miss in list(history)[-span:] if miss) >= limit


def sync_slashed(
    x: float | None, has_sample: bool, *, threshold: float = 2.0, sample_due: bool = True
) -> bool:
    """A gather peer is sync-slashed when it has no sample or ``x > threshold`` (SPEC 7).

    ``x is None`` means no sync score was computed this window (no step EMA yet, fix): then
    only a missing sample is slashed. ``sample_due=False``: window ``S-1`` precedes the run's
    start window, so no peer can have published its sample; a missing one is not slashed
    (the spec is silent; slashing every gather peer of the first window for it is no signal).
    """
    if not has_sample:
        return sample_due
    return x is not None and x > threshold


def negative_eval_rules(
    history: Sequence[bool], *, span: int = 8, limit: int = 4, consecutive: int = 3
) -> tuple[bool, bool]:
    """``(slash, hold_out)`` from a peer's evaluation history (True = negative score).

    SPEC 7: more than ``limit`` negatives in the last ``span`` evaluations: x0.25 (``slash``);
    ``consecutive`` negatives in a row: left out of peer lists until a positive evaluation
    (``hold_out``). The caller suspends both in a window whose 5th-best score is negative
    (:func:`fifth_best_negative`).
    """
    recent = list(history)[-span:]
    slash = sum(1 for neg in recent if neg) > limit
    tail = list(history)[-consecutive:]
    hold = len(tail) == consecutive and all(tail)
    return slash, hold


def fifth_best_negative(scores: Collection[float], rank: int = 5) -> bool:
    """True when the ``rank``-th best score of the window is negative (rules suspended).

    Interpretation: with fewer than ``rank`` scores there is no such score and nothing is
    suspended.
    """
    ordered = sorted(scores, reverse=True)
    return len(ordered) >= rank and ordered[rank - 1] < 0


# ----------------------------------------------------------------------------------------------
# weights and peer lists
# ----------------------------------------------------------------------------------------------


def _ranked(final: Mapping[int, float], exclude: int | None) -> list[int]:
    cands = [
        int(uid)
        for uid, score in final.items()
        if uid != exclude and math.isfinite(float(score)) and float(score) > 0.0
    ]
    return sorted(cands, key=lambda u: (-float(final[u]), u))


def weights_from_scores(
    final: Mapping[int, float],
    *,
    burn_uid: int = 1,
    burn_rate: float = 0.5,
    gather_peers: int = 20,
    reserve_peers: int = 10,
    gather_range: tuple[float, float] = (2.0, 1.0),
    reserve_decay: float = 0.5,
    reserve_max_ratio: float = 0.5,
) -> dict[int, float]:
    """Normalised incentive weights, the burn uid included (SPEC 7 "Weights").

    Candidates: uids with a final score > 0 other than ``burn_uid``, by score descending, ties
    by uid ascending. The top ``G`` get ``linspace(2, 1, n)`` (n = how many; n = 1 gives 2);
    the next up to ``reserve_peers`` get ``0.5**i`` (i = 1, 2, ...), scaled down only if needed
    so that the largest is at most half the smallest gather weight; everything is renormalised
    to ``1 - burn_rate`` and ``burn_uid`` gets ``burn_rate``. No candidate: ``{burn_uid: 1.0}``.
    At the defaults with 30+ candidates the reserve holds about 3 % of the non-burn share
    (0.999 / 30.999). The caller restricts ``final`` to peers evaluated within the weights
    window (**fix**: production never pruned).
    """
    ranked = _ranked(final, burn_uid)
    if not ranked:
        return {burn_uid: 1.0}
    top = ranked[:gather_peers]
    rest = ranked[gather_peers : gather_peers + reserve_peers]
    gw = np.linspace(gather_range[0], gather_range[1], len(top), dtype=np.float64)
    rw = reserve_decay ** np.arange(1, len(rest) + 1, dtype=np.float64)
    if rw.size:
        cap = reserve_max_ratio * float(gw.min())
        if float(rw.max()) > cap:
            rw = rw * (cap / float(rw.max()))
    raw = np.concatenate([gw, rw])
    share = (1.0 - burn_rate) * raw / raw.sum()
    out = {uid: float(w) for uid, w in zip(top + rest, share, strict=True)}
    out[burn_uid] = float(burn_rate)
    return out


def next_peer_list(
    eligible: Collection[int],
    weights: Mapping[int, float],
    final: Mapping[int, float],
    *,
    gather_peers: int = 20,
    reserve_peers: int = 10,
) -> tuple[list[int], list[int]]:
    """The next ``(gather, reserve)`` lists (SPEC 7 "Peer list").

    ``eligible`` are the peers that may be listed (the caller keeps only active ones, not
    excluded, not held out by the negative-evaluation rule, not validators, not the burn uid).
    They are ranked by weight (those with weight > 0 first, largest first), the remaining places
    filled by final score, then uid; the first ``G`` gather, the next ``reserve_peers`` are the
    reserve.
    """

    def key(uid: int) -> tuple[int, float, float, int]:
        w = float(weights.get(uid, 0.0))
        has = w > 0.0
        return (0 if has else 1, -w if has else 0.0, -float(final.get(uid, 0.0)), uid)

    order = sorted(set(eligible), key=key)
    return order[:gather_peers], order[gather_peers : gather_peers + reserve_peers]


def initial_peer_list(
    candidates: Collection[int],
    incentive: Mapping[int, float],
    *,
    gather_peers: int = 20,
    reserve_peers: int = 10,
) -> tuple[list[int], list[int]]:
    """The start-up ``(gather, reserve)`` lists, ranked by chain incentive then uid (SPEC 7)."""
    order = sorted(set(candidates), key=lambda u: (-float(incentive.get(u, 0.0)), u))
    return order[:gather_peers], order[gather_peers : gather_peers + reserve_peers]
