"""The one place that adapts megatron-core 0.16.1 to a CPU-only torch build.

megatron-core hard-codes CUDA in a handful of modules (see docs/MEGATRON_CPU.md for the list and
for what was checked). On a machine with CUDA this module does nothing. On a CPU-only build,
:func:`install` redirects exactly those calls and nothing else:

1. **Module-local ``torch``.** In each module of :data:`_TORCH_PROXY_MODULES` the global name
   ``torch`` is replaced by :class:`_TorchOnCpu`, a module object that forwards every attribute to
   the real ``torch`` except that ``torch.cuda.current_device()`` answers ``cpu`` and the tensor
   factories (``zeros``, ``ones``, ``empty``, ``tensor``, ``full``, ``arange``) turn a
   ``device="cuda"`` into ``"cpu"``. Affected lines (0.16.1): rotary embedding ``get_emb`` /
   ``inv_freq``, ``GlobalMemoryBuffer``, ``local_multi_tensor_l2_norm``, the pipeline p2p receive
   buffers and ``torch.cuda.synchronize``, the DDP grad buffers, the schedules'
   ``total_num_tokens``, the default causal mask, the optimizers' ``found_inf`` / ``_scale``
   tensors, the grad-norm and clipping buffers, and the distributed optimizer's gather buffers.
   Replacing the name *inside those modules* (rather than patching ``torch`` itself) keeps every
   other library, and every other megatron module, untouched.
2. **``Tensor.type()`` string checks.** The optimizers assert that parameters and gradients are
   ``'torch.cuda.FloatTensor'`` (``Float16OptimizerWithFloat16Params.__init__``,
   ``DistributedOptimizer._build_model_and_main_param_groups``,
   ``clip_grad_by_total_norm_fp32``). Those three callables are wrapped so that, *only while they
   run*, ``Tensor.type()`` without arguments reports a CPU tensor under its CUDA name.

3. **Activation recomputation's RNG state.** ``tensor_parallel.random.checkpoint`` (used by
   ``recompute = true``) saves and restores the *CUDA* generator around each recomputed layer
   through the module functions ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``; on CPU they
   read and restore the CPU generator instead (the only one dropout draws from there).

Seeding needs no patch: :mod:`covenant.models.parallel` seeds megatron's RNG tracker in its
CPU-capable mode (``inference_rng_tracker=True``). :func:`install` is idempotent and
thread-unsafe only in the sense that (2) swaps a class attribute for the duration of a call,
which megatron makes from the training thread alone.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: megatron modules whose module-global ``torch`` is redirected on CPU (0.16.1).
_TORCH_PROXY_MODULES: tuple[str, ...] = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
)

_FACTORIES: tuple[str, ...] = ("zeros", "ones", "empty", "tensor", "full", "arange")

_installed = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _factory_on_cpu(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            # Pinned memory needs a CUDA runtime; it is only a transfer optimisation.
            kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _CudaOnCpu(types.ModuleType):
    """Stands in for ``torch.cuda`` inside the redirected modules."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """Nothing to wait for: CPU ops are synchronous."""


class _TorchOnCpu(types.ModuleType):
    """Stands in for ``torch`` inside the redirected modules (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, ``t.type()`` of a CPU tensor answers e.g. ``'torch.cuda.FloatTensor'``."""
    original = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if dtype is None and not kw and self.device.type == "cpu":
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kw)

    torch.Tensor.type = type_  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__covenant_cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``_get_cuda_rng_state`` on CPU: the CPU generator's state (already a copy)."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    """``_set_cuda_rng_state`` on CPU."""
    torch.set_rng_state(new_state)


def cuda_present() -> bool:
    """Whether this process can use CUDA (then :func:`install` is a no-op)."""
    return torch.cuda.is_available()


def install() -> bool:
    """Redirect megatron's hard-coded CUDA calls to the CPU; return whether anything changed.

    A no-op (returning ``False``) when CUDA is present or when already installed.
    """
    global _installed
    if _installed or cuda_present():
        return False
    proxy = _TorchOnCpu()
    for name in _TORCH_PROXY_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy  # type: ignore[attr-defined]

    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")

    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip  # type: ignore[attr-defined]
    optimizer.clip_grad_by_total_norm_fp32 = clip  # type: ignore[attr-defined]
    f16 = optimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = _with_cuda_type_names(f16.__init__)  # type: ignore[method-assign]
    build = distrib.DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]
    distrib.DistributedOptimizer._build_model_and_main_param_groups = classmethod(  # type: ignore[method-assign]
        _with_cuda_type_names(build.__func__)
    )
    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    rng._get_cuda_rng_state = _cpu_rng_state  # type: ignore[attr-defined]
    rng._set_cuda_rng_state = _set_cpu_rng_state  # type: ignore[attr-defined]
    _installed = True
    logger.debug(
        "megatron-core CUDA calls redirected to CPU in %d modules", len(_TORCH_PROXY_MODULES)
    )
    return True


def is_installed() -> bool:
    """Whether :func:`install` changed anything in this process."""
    return _installed
