"""Deterministic (uid, window) -> sample ids: the one module miners and validators both import.

SPEC.md section 3:

- ``seed = ((uid * 1000003) ^ window) & 0xFFFFFFFF``;
- ``pool = numpy.random.default_rng(seed).choice(N, H*B, replace=False)``, N = samples in the
  active shard, B = the run-wide global batch per inner step (the draw is not prefix-stable, so
  ``H*B`` must be a run constant);
- inner step ``i`` trains on ``pool[i*B:(i+1)*B]``; DP rank ``r`` of ``D`` takes entries
  ``r, r+D, ...`` of that slice (TP/PP ranks share ids); ``B % (micro_batch*D) == 0``;
- receipt: BLAKE2b-128 of the ascending little-endian uint64 ids of the pool, plus the count.

The active shard is ``(outer_step // windows_per_shard) % num_shards``: every peer agrees on the
outer step (it is in every aggregate record), so every peer and validator picks the same shard.

Changing anything here (including the numpy version's ``choice`` algorithm) changes which data
each peer must train on: the golden tests pin the values.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from covenant.engine.data.errors import AssignmentError

__all__ = [
    "SEED_MULTIPLIER",
    "Receipt",
    "active_shard",
    "check_batch_layout",
    "rank_share",
    "receipt",
    "sample_pool",
    "step_ids",
    "verify_receipt",
    "window_seed",
]

#: The multiplier of the seed rule (SPEC.md section 3); part of the protocol, not a tunable.
SEED_MULTIPLIER = 1000003
_SEED_MASK = 0xFFFFFFFF
_RECEIPT_DIGEST_BYTES = 16  # BLAKE2b-128


def _nonneg_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise AssignmentError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise AssignmentError(f"{name} must be >= 0, got {value}")
    return int(value)


def _pos_int(name: str, value: int) -> int:
    v = _nonneg_int(name, value)
    if v == 0:
        raise AssignmentError(f"{name} must be >= 1, got 0")
    return v


def window_seed(uid: int, window: int) -> int:
    """``((uid * 1000003) ^ window) & 0xFFFFFFFF``."""
    uid = _nonneg_int("uid", uid)
    window = _nonneg_int("window", window)
    return ((uid * SEED_MULTIPLIER) ^ window) & _SEED_MASK


def sample_pool(
    uid: int, window: int, num_samples: int, inner_steps: int, batch_size: int
) -> NDArray[np.int64]:
    """The ``H*B`` distinct sample ids peer ``uid`` trains on in ``window`` (in training order)."""
    n = _pos_int("num_samples", num_samples)
    h = _pos_int("inner_steps (H)", inner_steps)
    b = _pos_int("batch_size (B)", batch_size)
    if h * b > n:
        raise AssignmentError(
            f"H*B = {h}*{b} = {h * b} sample ids are drawn without replacement, but the active "
            f"shard has only {n} samples (use a larger shard, a smaller batch or fewer inner steps)"
        )
    rng = np.random.default_rng(window_seed(uid, window))
    return rng.choice(n, h * b, replace=False).astype(np.int64, copy=False)


def step_ids(pool: NDArray[np.int64], step: int, batch_size: int) -> NDArray[np.int64]:
    """``pool[step*B:(step+1)*B]``: the global batch of inner step ``step`` (0-based)."""
    b = _pos_int("batch_size (B)", batch_size)
    step = _nonneg_int("step", step)
    if len(pool) % b:
        raise AssignmentError(f"pool length {len(pool)} is not a multiple of B = {b}")
    steps = len(pool) // b
    if step >= steps:
        raise AssignmentError(f"inner step {step} out of range: the pool holds {steps} steps")
    return pool[step * b : (step + 1) * b]


def rank_share(ids: NDArray[np.int64], dp_rank: int, dp_size: int) -> NDArray[np.int64]:
    """Entries ``dp_rank, dp_rank + D, ...`` of ``ids`` (DP rank's strided share)."""
    d = _pos_int("dp_size", dp_size)
    r = _nonneg_int("dp_rank", dp_rank)
    if r >= d:
        raise AssignmentError(f"dp_rank {r} out of range for dp_size {d}")
    if len(ids) % d:
        raise AssignmentError(f"{len(ids)} ids do not split evenly over dp_size {d}")
    return ids[r::d]


def check_batch_layout(batch_size: int, micro_batch: int, dp_size: int) -> None:
    """Raise unless ``B % (micro_batch * D) == 0`` (every rank runs whole micro-batches)."""
    b = _pos_int("batch_size (B)", batch_size)
    m = _pos_int("micro_batch", micro_batch)
    d = _pos_int("dp_size", dp_size)
    if b % (m * d):
        raise AssignmentError(
            f"global batch B = {b} must be a multiple of micro_batch * dp_size = {m}*{d} = {m * d}"
        )


def active_shard(outer_step: int, num_shards: int, windows_per_shard: int) -> int:
    """``(outer_step // windows_per_shard) % num_shards``: shards in turn, cycling."""
    s = _nonneg_int("outer_step", outer_step)
    n = _pos_int("num_shards", num_shards)
    w = _pos_int("windows_per_shard", windows_per_shard)
    return (s // w) % n


class Receipt(BaseModel):
    """What goes with every upload: a hash of the pool's sorted ids and how many there are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hash: str = Field(pattern=r"^[0-9a-f]{32}$", description="BLAKE2b-128 hex")
    count: int = Field(ge=0)


def receipt(pool: NDArray[np.integer[Any]]) -> Receipt:
    """BLAKE2b-128 of the ascending little-endian uint64 ids, plus their count."""
    ids = np.asarray(pool)
    if ids.ndim != 1:
        raise AssignmentError(f"pool must be 1-D, got shape {ids.shape}")
    if ids.size and int(ids.min()) < 0:
        raise AssignmentError("pool holds a negative sample id")
    data = np.sort(ids).astype("<u8", copy=False).tobytes()
    digest = hashlib.blake2b(data, digest_size=_RECEIPT_DIGEST_BYTES).hexdigest()
    return Receipt(hash=digest, count=int(ids.size))


def verify_receipt(claimed: Receipt, pool: NDArray[np.integer[Any]]) -> bool:
    """True iff ``claimed`` is the receipt of ``pool`` (count and hash; constant-time compare)."""
    mine = receipt(pool)
    return claimed.count == mine.count and hmac.compare_digest(claimed.hash, mine.hash)
