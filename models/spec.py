"""The layer spec and megatron ``TransformerConfig`` for a :class:`ModelShape`.

One code path for CPU and GPU: the only difference is the *backend* chosen by
:func:`resolve_backend` (megatron's ``ModuleSpec`` mechanism swaps Transformer Engine modules for
megatron's local ones without touching block code). ``local`` works everywhere (CPU tests, a GPU
without TE); ``te`` is required for FP8 and for sequence parallelism (TE's norm). Transformer
Engine is imported lazily and only when the ``te`` backend is asked for, so a CPU install never
needs it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Any, Literal

import torch

from covenant.models.config import ModelConfig, ModelConfigError, ModelShape

logger = logging.getLogger(__name__)

Backend = Literal["local", "te"]
Attention = Literal["te", "sdpa", "unfused"]
Precision = Literal["fp32", "bf16", "fp8"]

# Oldest Transformer Engine version that implements each FP8 recipe through megatron-core 0.16
# (megatron.core.fp8_utils.get_fp8_recipe); mxfp8 also needs a Blackwell GPU (compute 10.x).
FP8_RECIPE_MIN_TE: dict[str, str] = {
    "delayed": "1.0",
    "tensorwise": "2.2",
    "blockwise": "2.3",
    "mxfp8": "2.1",
}
MXFP8_MIN_COMPUTE_CAPABILITY = (10, 0)
# Without Transformer Engine, FP8 runs through native PyTorch (models/fp8.py): tensorwise
# current scaling on the FP8 tensor cores of Ada / Hopper or newer.
NATIVE_FP8_RECIPE = "tensorwise"
NATIVE_FP8_MIN_CC = (8, 9)


def te_available() -> bool:
    """Whether Transformer Engine can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def te_version() -> str | None:
    """The installed Transformer Engine version, or ``None``."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    for dist in ("transformer-engine", "transformer_engine"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def resolve_backend(requested: str, *, cuda: bool | None = None, te: bool | None = None) -> Backend:
    """``auto`` -> ``te`` where CUDA and Transformer Engine exist, else ``local``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te = te_available() if te is None else te
    if requested == "auto":
        return "te" if (cuda and te) else "local"
    if requested == "te":
        if not cuda:
            raise ModelConfigError("[model] backend='te' needs a CUDA GPU; use 'local' on CPU")
        if not te:
            raise ModelConfigError(
                "[model] backend='te' but transformer_engine is not importable "
                "(install the 'gpu' extra)"
            )
        return "te"
    if requested == "local":
        return "local"
    raise ModelConfigError(f"[model] unknown backend {requested!r}")


def resolve_attention(requested: str, backend: Backend, *, cuda: bool | None = None) -> Attention:
    """The core attention: Transformer Engine's own with ``te``; for ``local``, ``auto`` ->
    ``sdpa`` on a GPU (flash kernels), ``unfused`` on a CPU (megatron's path, which the CPU
    tests' fixtures were made with; ``sdpa`` is allowed there too and runs the math kernel)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested not in ("auto", "sdpa", "unfused"):
        raise ModelConfigError(f"[model] unknown attention {requested!r} (auto | sdpa | unfused)")
    if backend == "te":
        if requested != "auto":
            raise ModelConfigError(
                f"[model] attention={requested!r} applies to backend='local'; backend='te' "
                "uses Transformer Engine's fused attention (set attention='auto')"
            )
        return "te"
    if requested == "auto":
        return "sdpa" if cuda else "unfused"
    return requested  # type: ignore[return-value]


def resolve_precision(requested: str, *, cuda: bool | None = None) -> Precision:
    """``auto`` -> bf16 on GPU, fp32 on CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        return "bf16" if cuda else "fp32"
    if requested in ("bf16", "fp8") and not cuda:
        raise ModelConfigError(f"[model] precision={requested!r} needs a GPU; use fp32 on CPU")
    if requested not in ("fp32", "bf16", "fp8"):
        raise ModelConfigError(f"[model] unknown precision {requested!r}")
    return requested  # type: ignore[return-value]


def _version_tuple(v: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


def fp8_settings(
    precision: str,
    recipe: str,
    backend: str,
    *,
    te_ver: str | None = None,
    compute_capability: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``TransformerConfig`` fields for FP8 (empty unless ``precision == "fp8"``).

    Raises :class:`ModelConfigError` when the recipe needs the TE backend, a newer TE, or a newer
    GPU than this one.
    """
    if precision != "fp8":
        return {}
    if backend != "te":
        # the native path (models/fp8.py): tensorwise current scaling through torch._scaled_mm
        if recipe != NATIVE_FP8_RECIPE:
            raise ModelConfigError(
                f"[model] fp8_recipe={recipe!r} needs backend='te' (Transformer Engine); "
                f"backend='local' runs FP8 natively with fp8_recipe='{NATIVE_FP8_RECIPE}' only"
            )
        if compute_capability is None or compute_capability < NATIVE_FP8_MIN_CC:
            raise ModelConfigError(
                "[model] precision='fp8' needs FP8 tensor cores (compute capability >= 8.9: "
                f"Ada, Hopper or newer); this GPU is {compute_capability}"
            )
        return {}  # nothing for megatron's config: the layer spec carries the FP8 linears
    if recipe not in FP8_RECIPE_MIN_TE:
        raise ModelConfigError(
            f"[model] unknown fp8_recipe {recipe!r}; known: {', '.join(FP8_RECIPE_MIN_TE)}"
        )
    if te_ver is None:
        raise ModelConfigError("[model] precision='fp8' but Transformer Engine is not installed")
    need = FP8_RECIPE_MIN_TE[recipe]
    if _version_tuple(te_ver) < _version_tuple(need):
        raise ModelConfigError(
            f"[model] fp8_recipe={recipe!r} needs Transformer Engine >= {need}, found {te_ver}"
        )
    if recipe == "mxfp8" and (
        compute_capability is None or compute_capability < MXFP8_MIN_COMPUTE_CAPABILITY
    ):
        raise ModelConfigError(
            f"[model] fp8_recipe='mxfp8' needs a Blackwell GPU (compute >= 10.0), "
            f"this one is {compute_capability}"
        )
    # e4m3 forward and backward except delayed scaling, which uses e5m2 for gradients (hybrid).
    return {"fp8": "hybrid" if recipe == "delayed" else "e4m3", "fp8_recipe": recipe}


def layer_spec(
    backend: Backend, attention: Attention | None = None, native_fp8: bool = False
) -> Any:
    """megatron's Llama-style layer ``ModuleSpec`` for ``backend`` (RMSNorm, SwiGLU, GQA), with
    ``attention='sdpa'`` its core attention swapped for :class:`~covenant.models.attention.
    SDPAttention` and with ``native_fp8`` its large linears for :mod:`covenant.models.fp8`'s
    (the spec mechanism: no block code changes)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention == "sdpa":
        from covenant.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if native_fp8:
        from covenant.models.fp8 import use_float8_linears

        use_float8_linears(spec)
    return spec


@dataclasses.dataclass(frozen=True)
class BuildChoice:
    """What :func:`choose` resolved from ``[model]`` for this machine."""

    backend: Backend
    precision: Precision
    fp8: dict[str, Any]
    attention: Attention = "unfused"
    why: str = ""  # what each "auto" resolved to, and from what (the startup log says it)

    @property
    def native_fp8(self) -> bool:
        """FP8 through native PyTorch (models/fp8.py) rather than Transformer Engine."""
        return self.precision == "fp8" and self.backend == "local"

    @property
    def flash_attention(self) -> bool:
        """Whether the attention never stores the score matrix (for the memory plan)."""
        return self.attention == "te" or (self.attention == "sdpa" and torch.cuda.is_available())

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "fp32" else torch.bfloat16


def choose(cfg: ModelConfig) -> BuildChoice:
    """Resolve backend, precision and FP8 settings; every error here precedes any collective."""
    backend = resolve_backend(cfg.backend)
    precision = resolve_precision(cfg.precision)
    cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    fp8 = fp8_settings(
        precision, cfg.fp8_recipe, backend, te_ver=te_version(), compute_capability=cc
    )
    if cfg.sequence_parallel and backend != "te":
        raise ModelConfigError(
            "[model] sequence_parallel needs Transformer Engine's norm (backend='te', GPU only); "
            "megatron's local spec does not support it"
        )
    if cfg.sequence_parallel and cfg.tp == 1:
        raise ModelConfigError("[model] sequence_parallel needs tp > 1")
    if "cross_entropy" in cfg.fusions and precision == "fp32":
        # megatron-core 0.16.1's native fused cross-entropy casts the logits gradient to bf16
        # (fusions/fused_cross_entropy.py): harmless in bf16 training, a silent loss of
        # precision in fp32 (gradients off by ~0.1 % on the tiny model)
        raise ModelConfigError(
            "[model] fusions=['cross_entropy'] needs precision bf16 or fp8: megatron's native "
            "fused cross-entropy returns bf16 logits gradients, which would silently change an "
            "fp32 run's numerics"
        )
    attention = resolve_attention(cfg.attention, backend)
    return BuildChoice(
        backend=backend,
        precision=precision,
        fp8=fp8,
        attention=attention,
        why=_why(cfg, backend, precision, attention),
    )


def _why(cfg: ModelConfig, backend: str, precision: str, attention: str) -> str:
    """One line for the startup log: what each ``auto`` resolved to, and from what."""
    cuda = torch.cuda.is_available()
    where = "a CUDA GPU" if cuda else "no CUDA GPU"
    parts = []
    if cfg.backend == "auto":
        te = "Transformer Engine importable" if te_available() else "no Transformer Engine"
        parts.append(f"backend auto -> {backend} ({where}, {te})")
    if cfg.precision == "auto":
        parts.append(f"precision auto -> {precision} ({where})")
    if cfg.attention == "auto":
        parts.append(f"attention auto -> {attention} ({where}, backend {backend})")
    if precision == "fp8":
        parts.append("FP8 through " + ("Transformer Engine" if backend == "te" else "torch"))
    return "; ".join(parts) or "as configured"


def transformer_config(
    shape: ModelShape,
    cfg: ModelConfig,
    choice: BuildChoice,
    *,
    tp: int,
    pp: int,
) -> Any:
    """The megatron ``TransformerConfig`` for ``shape`` under this layout and build choice."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    recompute: dict[str, Any] = {}
    if cfg.recompute:
        recompute = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=choice.params_dtype,
        pipeline_dtype=choice.params_dtype,
        bf16=choice.precision in ("bf16", "fp8"),
        use_cpu_initialization=on_cpu,
        # Most fused kernels need CUDA extensions (apex / TE); the unfused paths are the same
        # maths. Two need neither and are opt-in ([model] fusions): the SwiGLU and the native
        # fused cross-entropy (jit-scripted torch).
        bias_activation_fusion="swiglu" in cfg.fusions,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion="cross_entropy" in cfg.fusions,
        cross_entropy_fusion_impl="native",
        # gloo cannot batch p2p with a sync on CPU; with NCCL megatron's default is fine.
        batch_p2p_sync=not on_cpu,
        attention_softmax_in_fp32=True,
        **recompute,
        **choice.fp8,
    )
