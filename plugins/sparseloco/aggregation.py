"""Aggregation of peers' payloads into one update (SPEC.md 4.8).

Per tensor: decode each peer's kept values; scale each peer down to the median L2 norm over the
peers (``min(1, median / (norm + eps))``, the lower middle value for an even count, as
``torch.median``); then every coordinate gets the mean over the peers that selected it (or the
sum divided by the number of peers). Memory stays bounded: payloads stay compact, and the dense
work happens one tensor at a time (one dense sum and one count buffer). The arithmetic is
deterministic: norms are exact sums, peers are added in list order, and within one peer every
coordinate is written once, so every peer computing the aggregate gets the same bits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.errors import AggregationError, PayloadError
from covenant.plugins.sparseloco.exact import accumulate, exact_value, to_float32
from covenant.plugins.sparseloco.wire import ParsedPayload, parse_payload

logger = logging.getLogger(__name__)
_DEFAULT = SparseLoCoConfig()


def exact_norm(values: torch.Tensor) -> float:
    """L2 norm of float32 values: exact sum of the float32 squares, then rounded to float32."""
    sq = values.to(torch.float32).square()
    if not bool(torch.isfinite(sq).all()):
        return math.inf
    return to_float32(math.sqrt(float(exact_value(accumulate(sq)))))


def lower_median(values: Sequence[float]) -> float:
    """Median, lower middle value for an even count (``torch.median`` semantics)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def clip_factors(norms: Sequence[float], eps: float) -> list[float]:
    """Per-peer factors ``min(1, median / (norm + eps))`` as float32-representable floats.

    ``norm + eps == 0`` (an all-zero peer with ``norm_eps = 0``, which the config allows) has
    factor 1: the limit of ``min(1, median / x)`` as ``x -> 0+``, and, since the peer's values are
    all zero, it contributes nothing whatever its factor. So never a division by zero, never NaN.
    A peer with a non-finite norm gets 0 (it is dropped).
    """
    med = lower_median(norms)

    def factor(n: float) -> float:
        if not math.isfinite(n):
            return 0.0
        if n + eps == 0.0:
            return 1.0
        return to_float32(min(1.0, med / (n + eps)))

    return [factor(n) for n in norms]


Box = tuple[tuple[int, ...], tuple[int, ...]]
"""A rank's slice of a global tensor: ``(offsets, local_shape)`` (as a ``ParamShard`` has)."""


def _box_select(
    pos: torch.Tensor, vals: torch.Tensor, shape: Sequence[int], box: Box
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep the kept values inside ``box``; positions become row-major offsets in the box."""
    offsets, local = tuple(box[0]), tuple(box[1])
    shape = tuple(int(s) for s in shape)
    if local == shape:
        return pos, vals, math.prod(shape)
    if len(shape) == 1:
        lo = offsets[0]
        keep = (pos >= lo) & (pos < lo + local[0])
        return pos[keep] - lo, vals[keep], local[0]
    if len(shape) != 2:
        raise ValueError(f"owned slices of {len(shape)}-D tensors are not supported")
    cols = shape[1]
    r, c = torch.div(pos, cols, rounding_mode="floor"), pos % cols
    (r0, c0), (lr, lc) = offsets, local
    keep = (r >= r0) & (r < r0 + lr) & (c >= c0) & (c < c0 + lc)
    return (r[keep] - r0) * lc + (c[keep] - c0), vals[keep], lr * lc


def aggregate_parsed(
    parsed: Sequence[ParsedPayload],
    expected: Mapping[str, Sequence[int] | torch.Size],
    config: SparseLoCoConfig | None = None,
    device: torch.device | str = "cpu",
    owned: Mapping[str, Box] | None = None,
) -> dict[str, torch.Tensor]:
    """Aggregate already-parsed payloads (see :func:`covenant.plugins.sparseloco.aggregate`).

    With ``owned`` (global name -> ``(offsets, local_shape)``), only those tensors are produced,
    and each only over its box: a rank of a sharded peer gets its own slices, never a dense full
    tensor. The clip factors still come from each peer's whole tensor, and every coordinate sees
    the same additions in the same order, so a slice equals the same slice of the full result
    bit for bit.
    """
    config = config or _DEFAULT
    out: dict[str, torch.Tensor] = {}
    if not parsed:
        return out
    n_peers = len(parsed)
    for name in sorted(expected):
        if owned is not None and name not in owned:
            continue
        holders = [i for i, p in enumerate(parsed) if name in p.entries]
        if not holders:
            continue
        shape = tuple(int(s) for s in expected[name])
        box = owned[name] if owned is not None else ((0,) * len(shape), shape)
        numel = math.prod(box[1])
        sparse: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in holders:
            try:
                sparse[i] = parsed[i].sparse(name, device)
            except PayloadError as exc:
                raise exc.with_peer(i) from None
        if config.clip_to_median:
            norms = [exact_norm(sparse[i][1]) for i in holders]
            factors = clip_factors(norms, config.norm_eps)
        else:
            factors = [1.0] * len(holders)
        total = torch.zeros(numel, dtype=torch.float32, device=device)
        count = (
            torch.zeros(numel, dtype=torch.int32, device=device)
            if config.mean_over_selectors
            else None
        )
        for i, f in zip(holders, factors, strict=True):
            pos, vals = sparse.pop(i)
            pos, vals, _ = _box_select(pos, vals, shape, box)
            # index_add_ with unique positions per peer: one IEEE add per coordinate per peer,
            # in peer order, so the result is deterministic on every device.
            total.index_add_(0, pos, vals * torch.tensor(f, dtype=torch.float32, device=device))
            if count is not None:
                count.index_add_(0, pos, torch.ones_like(pos, dtype=torch.int32))
        # In place, to keep the peak at two dense buffers: an unselected coordinate has total 0,
        # and 0 / 1 = 0. The divisor is a device tensor so CUDA does a true division.
        if count is not None:
            result = total.div_(count.clamp_(min=1))
        else:
            result = total.div_(torch.tensor(float(n_peers), dtype=torch.float32, device=device))
        if not bool(torch.isfinite(result).all()):
            if config.on_nonfinite == "error":
                raise AggregationError("aggregated update is not finite", tensor=name)
            logger.warning(
                "sparseloco: skipping tensor %r, its aggregated update is not finite", name
            )
            continue
        out[name] = result.reshape(tuple(int(s) for s in box[1]))
    return out


def aggregate_payloads(
    payloads: Sequence[bytes],
    expected: Mapping[str, Sequence[int] | torch.Size],
    config: SparseLoCoConfig | None = None,
    device: torch.device | str = "cpu",
    owned: Mapping[str, Box] | None = None,
) -> dict[str, torch.Tensor]:
    """Parse (framing, sizes, checksum, header, tables) every payload, then aggregate."""
    parsed = []
    for i, data in enumerate(payloads):
        try:
            parsed.append(parse_payload(data, expected, config))
        except PayloadError as exc:
            raise exc.with_peer(i) from None
    return aggregate_parsed(parsed, expected, config, device, owned)
