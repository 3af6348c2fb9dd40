"""The ``ddp`` outer step: there is none; gradients are averaged across peers every inner step.

What this baseline is, and what ships:

* **In a trusted cluster** DDP is what a peer's own data-parallel group already does: run
  ``covenant train`` under ``torchrun`` over the machines with ``[model] dp = R`` and
  ``[outer] name = "none"``; megatron's DDP all-reduces the gradients of every inner step.
  Across *separate* peers of a permissionless run there is no shared process group (and no
  trust to build one on), so this outer step refuses to run in a miner
  (:meth:`DDPOuterStep.begin` raises :class:`~covenant.engine.errors.ConfigError` saying so),
  and the plugin declares itself miner-only (the validator refuses it).
* **In the in-process lockstep study** (``tools/study_outer.py``) R peers start from the same
  weights and optimizer state and apply the same averaged gradient at every step, so they stay
  identical: R replicas are one model. :meth:`DDPOuterStep.train_step` takes the inner step of
  all R at once on the union of their batches. The loss is the mean over sequences, so with
  equal per-peer batches the gradient of the union's loss *is* the mean of the R peers'
  gradients; clipping the global norm of that mean and the AdamW step follow as in DDP (where
  the all-reduce precedes the clip). Exact up to floating-point summation order.

The bytes a DDP peer would send are those of a ring all-reduce of the fp32 gradient at every
inner step, :func:`allreduce_bytes` (nothing crosses a network in the study).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from covenant.engine.errors import ConfigError
from covenant.engine.protocols import ModelRuntime, StepResult, Upload, WindowContext

REFUSAL = (
    "[outer] name = 'ddp' cannot run in a miner: averaging gradients every inner step needs a "
    "process group spanning the peers, which separate peers of a run do not share. In a "
    "trusted cluster run `covenant train` under torchrun with [model] dp = <peers> and [outer] "
    'name = "none" (megatron\'s DDP all-reduces every inner step); to compare with the outer '
    "steps use tools/study_outer.py"
)


def allreduce_bytes(numel: int, peers: int, bytes_per_value: int = 4) -> float:
    """Bytes one peer sends in a ring all-reduce of ``numel`` values among ``peers`` peers:
    ``2 (R - 1) / R`` times the tensor (reduce-scatter, then all-gather)."""
    if peers < 1:
        raise ValueError(f"peers must be >= 1, got {peers}")
    return 2.0 * (peers - 1) / peers * numel * bytes_per_value


class DDPOuterStep:
    """The ``ddp`` baseline (see the module docstring): no outer step, miner-only."""

    name = "ddp"
    codec = None  # nothing is uploaded at window ends

    def alpha(self, outer_step: int) -> float:
        """Nothing is applied at window ends."""
        return 0.0

    def begin(self, ctx: WindowContext, model: ModelRuntime) -> None:
        raise ConfigError(REFUSAL)

    def end(self, ctx: WindowContext, model: ModelRuntime) -> dict[str, float]:
        raise ConfigError(REFUSAL)

    def apply(
        self, ctx: WindowContext, model: ModelRuntime, uploads: Sequence[Upload]
    ) -> dict[str, float]:
        raise ConfigError(REFUSAL)

    def train_step(
        self, model: ModelRuntime, batches: Sequence[torch.Tensor], lr: float
    ) -> StepResult:
        """One DDP inner step of ``len(batches)`` lockstep peers (one batch each, same shape):
        the step of the union batch, i.e. of the peers' averaged gradient (module docstring)."""
        if not batches:
            raise ValueError("ddp: no batches")
        shapes = {tuple(b.shape) for b in batches}
        if len(shapes) != 1:
            raise ValueError(f"ddp: every peer's batch must have the same shape, got {shapes}")
        return model.train_step(torch.cat(list(batches)), lr)

    def state_dict(self) -> dict[str, Any]:
        return {"format": 1}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != 1:
            raise ValueError(f"unknown ddp state format {state.get('format')!r}")


__all__ = ["REFUSAL", "DDPOuterStep", "allreduce_bytes"]
