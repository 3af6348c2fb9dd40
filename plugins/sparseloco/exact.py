"""Exact, order-independent sums of float32 values.

The quantiser statistics (mean, sigma, bin means) and the aggregation norms must come out
bit-identical on every device and in every sharding layout, or a TP=8 peer and a TP=1 peer would
upload different bytes and peers would apply different updates. Floating-point reductions are
not associative, so we sum exactly instead: every float32 ``x`` is ``m * 2**(e - 24)`` with an
integer ``|m| < 2**24``; we add the integer mantissas into one int64 bucket per exponent (a
"superaccumulator", 280 int64 values). Integer addition is associative, so the buckets are the
same whatever the order, device or shard split, and summing bucket vectors across ranks is a plain
integer all-reduce. Each bucket holds at least ``2**39`` terms before it could overflow.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

# frexp exponents of float32 lie in [-148, 128]; bucket = exponent + _BIAS.
_BIAS = 148
NUM_BUCKETS = 280
_MANTISSA_BITS = 24
_MAX_TERMS = 1 << 39
_ROWS = 1024


def accumulate(
    x: torch.Tensor, groups: torch.Tensor | None = None, num_groups: int = 1
) -> torch.Tensor:
    """Bucket vector (int64) whose exact value is the sum of ``x`` (finite float32).

    With ``groups`` (int64, same size as ``x``, values in ``[0, num_groups)``) the result holds
    ``num_groups`` bucket vectors back to back, one exact sum per group.
    """
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    if n >= _MAX_TERMS:
        raise ValueError(f"cannot sum {n} terms exactly (limit {_MAX_TERMS})")
    mant, expo = torch.frexp(flat)
    buckets = (expo.to(torch.int64) + _BIAS).clamp_(0, NUM_BUCKETS - 1)
    if groups is not None:
        buckets += groups.reshape(-1).to(torch.int64) * NUM_BUCKETS
    size = num_groups * NUM_BUCKETS
    if flat.device.type == "cpu":
        return _bucket_sums_cpu(flat, buckets, size)
    ints = (mant * float(1 << _MANTISSA_BITS)).to(torch.int64)  # exact: |mant| < 1, 24 bits
    # Two levels: many rows, each adding into its own bucket vector, then a column sum. Most
    # values share a handful of exponents, so one shared vector would serialise the atomic adds
    # on a GPU; integer addition keeps the result exact and order-free either way.
    rows = max(1, min(_ROWS, n // 512, _MAX_ROW_CELLS // size))
    pad = (-n) % rows
    if pad:
        ints = torch.cat([ints, ints.new_zeros(pad)])
        buckets = torch.cat([buckets, buckets.new_zeros(pad)])
    acc = torch.zeros((rows, size), dtype=torch.int64, device=flat.device)
    acc.scatter_add_(1, buckets.view(rows, -1), ints.view(rows, -1))
    return acc.sum(0)


# Bound on the GPU path's (rows x buckets) scratch (many groups -> fewer rows).
_MAX_ROW_CELLS = 1 << 22
# float64 adds of values that share a bucket are exact while the running sum stays below
# 2**53 units of that bucket: at most 2**29 terms of |mantissa| < 2**24 per chunk.
_F64_EXACT_TERMS = 1 << 29


def _bucket_sums_cpu(flat: torch.Tensor, buckets: torch.Tensor, size: int) -> torch.Tensor:
    """CPU: the same int64 bucket vector from one float64 ``bincount`` per chunk.

    Every value in bucket ``b`` is an integer multiple of ``2**(b - 172)`` below ``2**24`` of
    those units, so float64 sums of up to ``2**29`` of them are exact (any order); scaling by a
    power of two and converting to int64 is exact too. One pass instead of a scatter into a
    per-row scratch matrix.
    """
    unit = torch.arange(size, dtype=torch.int64) % NUM_BUCKETS
    to_units = torch.pow(2.0, (_BIAS + _MANTISSA_BITS - unit).to(torch.float64))
    total = torch.zeros(size, dtype=torch.int64)
    for start in range(0, flat.numel(), _F64_EXACT_TERMS):
        stop = start + _F64_EXACT_TERMS
        sums = torch.bincount(
            buckets[start:stop], weights=flat[start:stop].to(torch.float64), minlength=size
        )
        total += (sums * to_units).to(torch.int64)
    return total


def exact_value(acc: torch.Tensor | list[int]) -> Fraction:
    """The exact rational value of a bucket vector."""
    values = acc.tolist() if isinstance(acc, torch.Tensor) else acc
    total = 0
    for b, a in enumerate(values):
        if a:
            total += int(a) << b
    return Fraction(total, 1 << (_BIAS + _MANTISSA_BITS))


def to_float32(value: Fraction | float) -> float:
    """Round to float64 (correctly), then to float32 (round-half-even); inf on overflow."""
    try:
        as_f64 = float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf
    with np.errstate(over="ignore"):
        return float(np.float32(as_f64))
