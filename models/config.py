"""Typed config for the model (`[model]`) and the inner optimizer (`[optim]`), and preset merging.

A preset is data (:file:`presets.toml`), not a class: :meth:`ModelConfig.resolve` merges the
preset named by ``preset`` with the per-field overrides and validates the result into a frozen
:class:`ModelShape`. Everything here is checked *before* any process group starts, so a bad
shape or layout is one clear error instead of a hang in a collective:

* :meth:`ModelConfig.resolve` checks the shape (multiples of ``dim_multiple``, GQA grouping);
* :func:`check_layout` checks a shape against a TP/PP/DP layout and a world size.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from covenant.engine.errors import ConfigError


class ModelConfigError(ConfigError):
    """A model shape, preset or parallel layout that cannot work (raised before any collective)."""


@functools.cache
def presets() -> dict[str, dict[str, Any]]:
    """All presets shipped in :file:`presets.toml`, by name."""
    text = resources.files("covenant.models").joinpath("presets.toml").read_text("utf-8")
    return tomllib.loads(text)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The fully resolved dimensions of one Llama-style model (no layout, no precision)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def q_per_group(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.heads // self.kv_heads

    @property
    def qkv_rows(self) -> int:
        """Rows of megatron's fused QKV weight: per query group, its queries, one key, one value."""
        return self.kv_heads * (self.q_per_group + 2) * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ModelConfigError(f"unknown model shape fields {sorted(unknown)}")
        return cls(**data)


_SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len")


def validate_shape(shape: ModelShape, dim_multiple: int = 64) -> ModelShape:
    """Raise :class:`ModelConfigError` if ``shape`` cannot be built or tiled; return it."""
    where = f"model {shape.name!r}"
    for name in _SHAPE_FIELDS:
        if getattr(shape, name) < 1:
            raise ModelConfigError(f"{where}: {name} must be >= 1, got {getattr(shape, name)}")
    if shape.hidden % shape.heads:
        raise ModelConfigError(
            f"{where}: hidden {shape.hidden} is not divisible by heads {shape.heads}"
        )
    if shape.heads % shape.kv_heads:
        raise ModelConfigError(
            f"{where}: heads {shape.heads} is not divisible by kv_heads {shape.kv_heads}"
        )
    for name, value in (
        ("hidden", shape.hidden),
        ("ffn", shape.ffn),
        ("vocab", shape.vocab),
        ("head_dim", shape.head_dim),
    ):
        if value % dim_multiple:
            raise ModelConfigError(
                f"{where}: {name} {value} is not a multiple of {dim_multiple} "
                "(compression tiles need it; see SPEC section 2)"
            )
    if not shape.norm_eps > 0 or not shape.rope_theta > 0 or not shape.init_std > 0:
        raise ModelConfigError(f"{where}: norm_eps, rope_theta and init_std must be positive")
    return shape


class ModelConfig(BaseModel):
    """The ``[model]`` section: a preset, per-field overrides, the parallel layout, precision."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"
    # Per-field overrides of the preset (None = the preset's value).
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    vocab: int | None = None
    seq_len: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    init_std: float = 0.02
    dim_multiple: int = Field(64, ge=1, description="every dimension must be a multiple of this")

    # Parallel layout of one peer.
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dp: int | Literal["auto"] = "auto"
    micro_batch: int = Field(1, ge=1)

    backend: Literal["auto", "local", "te"] = "auto"
    attention: Literal["auto", "sdpa", "unfused"] = Field(
        "auto",
        description="core attention of the local backend: 'sdpa' (torch's "
        "scaled_dot_product_attention: flash / memory-efficient kernels on a GPU) or 'unfused' "
        "(megatron's DotProductAttention); 'auto' = sdpa on a GPU, unfused on a CPU",
    )
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fusions: list[Literal["swiglu", "cross_entropy"]] = Field(
        default_factory=list,
        description="megatron fusions that need neither apex nor Transformer Engine: 'swiglu' "
        "(bias_activation_fusion: the gated SiLU in one jit kernel) and 'cross_entropy' "
        "(cross_entropy_loss_fusion, native implementation, bf16/fp8 only: it returns bf16 "
        "logits gradients); same maths, to float rounding",
    )
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    recompute: bool = Field(False, description="full activation recomputation per layer")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="refuse to start if the memory plan exceeds this per GPU"
    )
    seed: int = 0
    init_weights: str | None = Field(
        None,
        description="start from these full weights (a weights or run directory) instead of "
        "the seeded initialisation; any layout may have written them",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        # Validate the shape, and everything about the layout that does not depend on the
        # world size, at load time: a typo fails before anything starts.
        shape = self.resolve()
        if isinstance(self.dp, int) and self.dp < 1:
            raise ModelConfigError(f"[model] dp must be >= 1 or 'auto', got {self.dp}")
        check_layout(shape, self.tp, self.pp, 1, None)
        return self

    def resolve(self) -> ModelShape:
        """Merge the preset with the overrides and validate the result."""
        table = presets()
        if self.preset not in table:
            raise ModelConfigError(
                f"[model] unknown preset {self.preset!r}; known: {', '.join(sorted(table))}"
            )
        base = dict(table[self.preset])
        for name in _SHAPE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                base[name] = value
        shape = ModelShape(
            name=self.preset,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            init_std=self.init_std,
            **{k: int(base[k]) for k in _SHAPE_FIELDS},
        )
        return validate_shape(shape, self.dim_multiple)


class OptimConfig(BaseModel):
    """The ``[optim]`` section: the inner AdamW (SPEC section 3). The LR comes per step."""

    model_config = ConfigDict(extra="forbid")

    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    decay_1d: bool = Field(True, description="apply weight decay to 1-D params (norms) too")
    grad_clip: float = Field(1.0, ge=0.0, description="global L2 clip; 0 disables")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A checked parallel layout: ``tp * pp * dp == world``."""

    tp: int
    pp: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def check_layout(shape: ModelShape, tp: int, pp: int, dp: int | str, world: int | None) -> Layout:
    """Check that ``shape`` can be split ``tp`` x ``pp`` x ``dp`` over ``world`` processes.

    ``dp="auto"`` means ``world // (tp * pp)``. Raises :class:`ModelConfigError` naming the
    offending numbers; call it before initialising any process group.
    """
    where = f"model {shape.name!r} with tp={tp} pp={pp}"
    if tp < 1 or pp < 1:
        raise ModelConfigError(f"{where}: tp and pp must be >= 1")
    for name, value in (
        ("heads", shape.heads),
        ("kv_heads", shape.kv_heads),
        ("ffn", shape.ffn),
        ("vocab", shape.vocab),
    ):
        if value % tp:
            raise ModelConfigError(f"{where}: {name} {value} is not divisible by tp={tp}")
    if pp > shape.layers:
        raise ModelConfigError(f"{where}: pp={pp} is larger than the layer count {shape.layers}")
    if shape.layers % pp:
        raise ModelConfigError(f"{where}: layers {shape.layers} do not divide evenly into pp={pp}")
    if dp == "auto":
        if world is None:
            raise ModelConfigError(f"{where}: dp='auto' needs a known world size")
        if world % (tp * pp):
            raise ModelConfigError(
                f"{where}: world size {world} is not divisible by tp*pp={tp * pp}"
            )
        dp_n = world // (tp * pp)
    else:
        dp_n = int(dp)
        if dp_n < 1:
            raise ModelConfigError(f"{where}: dp must be >= 1, got {dp}")
    layout = Layout(tp=tp, pp=pp, dp=dp_n)
    if world is not None and layout.world != world:
        raise ModelConfigError(
            f"{where} dp={dp_n}: needs {layout.world} processes but the world has {world}"
        )
    return layout
