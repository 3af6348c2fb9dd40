"""Process groups for one peer: torch.distributed (gloo on CPU, NCCL on GPU) and megatron's
``parallel_state`` (TP x PP x DP), plus the small agreement helpers every collective path uses.

Launch multi-process peers with ``torchrun`` (it sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``);
a plain ``python`` process gets a world of one on a private ``FileStore``. The rule of the house
(DESIGN.md): a decision taken on one rank is broadcast with :func:`agree` before the next
collective, and a failure on rank 0 is turned into the same exception on every rank with
:func:`run_on_rank0`, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from covenant.models import cpu_compat
from covenant.models.config import Layout

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ParallelError(RuntimeError):
    """A distributed set-up or agreement failed (raised identically on every rank)."""


@dataclasses.dataclass(frozen=True)
class Coords:
    """Where this process sits in the peer's TP x PP x DP grid."""

    rank: int
    world: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    layout: Layout

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


_state: dict[str, Any] = {"owns_process_group": False, "tmpdir": None}


def device() -> torch.device:
    """This rank's compute device (its local GPU, else the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_world() -> int:
    """The world size this process will have: the live group's, torchrun's, or 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int]:
    """Make sure ``torch.distributed`` is initialised; return ``(rank, world)``.

    Reuses an existing default group (the engine's or a test's). Under ``torchrun`` it joins
    through ``env://`` with NCCL on GPU and gloo on CPU. A plain process gets a world of one.
    """
    cpu_compat.install()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        tmpdir = tempfile.mkdtemp(prefix="covenant-pg-")
        store = dist.FileStore(os.path.join(tmpdir, "store"), 1)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1)
        _state["tmpdir"] = tmpdir
    _state["owns_process_group"] = True
    logger.info("process group up: backend=%s world=%d", backend, dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()


def initialize_model_parallel(layout: Layout, seed: int) -> Coords:
    """Create megatron's TP/PP/DP groups for ``layout`` and seed its RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    rank, world = init_distributed()
    if layout.world != world:
        raise ParallelError(
            f"layout tp={layout.tp} pp={layout.pp} dp={layout.dp} needs {layout.world} "
            f"processes, the world has {world}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
    )
    torch.manual_seed(seed)
    # On CPU the tracker must not touch CUDA RNG state: the "inference" tracker is megatron's
    # CPU-capable one (MEGATRON_CPU.md). Dropout is zero, so the choice changes no result.
    mp_random.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=not torch.cuda.is_available(), force_reset_rng=True
    )
    coords = Coords(
        rank=rank,
        world=world,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        layout=layout,
    )
    logger.debug("model parallel up: %s", coords)
    return coords


def teardown() -> None:
    """Destroy megatron's groups, and the process group if this module created it."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _state["owns_process_group"] and dist.is_initialized():
        dist.destroy_process_group()
        _state["owns_process_group"] = False


def agree(value: T, src: int = 0) -> T:
    """Return rank ``src``'s ``value`` on every rank (a picklable, *locally produced* value).

    Only for values this peer's own code made: never route untrusted bytes through it.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[no-any-return]


def run_on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give its result to every rank.

    If ``fn`` raises on rank 0, every rank raises :class:`ParallelError` with the same message,
    so the others never wait in a collective for a rank that has failed.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    outcome: tuple[bool, Any]
    error: Exception | None = None
    if rank == 0:
        try:
            outcome = (True, fn())
        except Exception as exc:  # broadcast every failure, re-raised below on all ranks
            error = exc
            outcome = (False, f"{type(exc).__name__}: {exc}")
    else:
        outcome = (True, None)
    ok, payload = agree(outcome)
    if not ok:
        raise ParallelError(f"rank 0 failed: {payload}") from error
    return payload  # type: ignore[return-value]


def run_on_all(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises on any, raise :class:`ParallelError` on all.

    The outcome is agreed through one ``all_gather_object`` that every rank reaches, so a rank
    whose disk is full (say) never leaves the others waiting in the next collective. The error
    names the lowest failing rank and its message.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = fn()
        status: str | None = None
    except Exception as exc:  # gathered and re-raised below on all ranks
        error = exc
        status = f"{type(exc).__name__}: {exc}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        statuses: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, status)
    else:
        statuses = [status]
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        rank, message = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise ParallelError(f"rank {rank} failed: {message}{more}") from error
    return result  # type: ignore[no-any-return]
