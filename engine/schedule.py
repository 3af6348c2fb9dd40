"""The inner loop's config (``[train]``) and its learning-rate schedule.

The learning rate is a pure function of the *global* inner step ``s = outer_step * H + i``
(SPEC section 3), so every peer, a late joiner included, sits at the same rate:

* warm-up:  ``lr(s) = peak * (warmup_floor + (1 - warmup_floor) * s / warmup_steps)`` for
  ``s < warmup_steps``;
* cosine:   ``peak * (min_ratio + (1 - min_ratio) / 2 * (1 + cos(pi * min(s - warmup, T) / T)))``
  with ``T = cosine_steps``, held at ``min_ratio * peak`` afterwards.

With the production numbers (peak 1.17e-4, warm-up 1500, T 140000, min ratio 0.1) the cosine
term is ``0.1 + 0.45 * (1 + cos(...))``, exactly the spec's formula.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """``[train]``: the inner loop of one peer. Defaults are tiny CPU values; see configs/."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1, description="inner steps to run in `covenant train`")
    inner_steps: int = Field(30, ge=1, description="H: inner steps per window (SPEC: 30)")
    batch_size: int = Field(
        8, ge=1, description="B: global batch in sequences per inner step (SPEC: 192)"
    )
    lr: float = Field(1.17e-4, gt=0, description="peak learning rate")
    warmup_steps: int = Field(1500, ge=0)
    warmup_floor: float = Field(1e-6, ge=0, le=1, description="fraction of peak at step 0")
    cosine_steps: int = Field(140000, ge=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    eval_every: int = Field(
        50, ge=0, description="evaluate validation loss every N steps (0: never)"
    )
    eval_batches: int = Field(4, ge=1, description="validation batches per evaluation")
    checkpoint_every: int = Field(
        100, ge=0, description="local checkpoint every N steps (0: only at the end)"
    )
    log_every: int = Field(1, ge=1)
    uid: int = Field(0, ge=0, description="this peer's uid: selects its data pool")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate at global inner step ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak = cfg.lr
    if step < cfg.warmup_steps:
        return peak * (cfg.warmup_floor + (1.0 - cfg.warmup_floor) * step / cfg.warmup_steps)
    progress = min(step - cfg.warmup_steps, cfg.cosine_steps) / cfg.cosine_steps
    ratio = cfg.min_lr_ratio
    return peak * (ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
