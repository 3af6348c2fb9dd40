"""The layout-independent coordinate system of the model's parameters.

Every later component (error buffers, compression tiles, checkpoints, HF export) talks about
parameters by **global name** and **global shape**, the same on a TP=8 x PP=4 peer as on a single
CPU process. This module defines those coordinates and maps megatron's local, sharded parameters
onto them.

Global tensors (``i`` is the global layer index, 0-based, also under PP)::

    embedding.word_embeddings.weight                      [vocab, hidden]      TP rows
    decoder.layers.{i}.input_layernorm.weight             [hidden]             replicated
    decoder.layers.{i}.self_attention.linear_qkv.weight   [qkv_rows, hidden]   TP rows
    decoder.layers.{i}.self_attention.linear_proj.weight  [hidden, q_dim]      TP columns
    decoder.layers.{i}.pre_mlp_layernorm.weight           [hidden]             replicated
    decoder.layers.{i}.mlp.linear_fc1_gate.weight         [ffn, hidden]        TP rows
    decoder.layers.{i}.mlp.linear_fc1_up.weight           [ffn, hidden]        TP rows
    decoder.layers.{i}.mlp.linear_fc2.weight              [hidden, ffn]        TP columns
    decoder.final_layernorm.weight                        [hidden]             replicated
    output_layer.weight                                   [vocab, hidden]      TP rows

**The choice: every TP rank owns one contiguous block of every global tensor.**

* The fused QKV weight keeps megatron's own TP=1 order: for each key/value group ``g`` its
  ``q_per_group`` query heads, then its key head, then its value head (``head_dim`` rows each).
  megatron gives TP rank ``r`` the groups ``[r*G/tp, (r+1)*G/tp)``, so that rank's rows are one
  contiguous block of this global tensor, and concatenating the TP shards in rank order
  reproduces it exactly.
* megatron's fused ``linear_fc1`` stacks ``[gate; up]`` *per TP rank*, so its TP=1 order is not a
  concatenation of shards. It is therefore split into two global tensors, ``linear_fc1_gate`` and
  ``linear_fc1_up`` (as in the HF layout); each rank's gate and up rows are contiguous blocks of
  them, and :meth:`Binding.local_view` returns *live views* (not copies) of the fused local
  parameter, so writing into them writes the model.

With that choice a :class:`~covenant.engine.protocols.ParamShard` is always a box
(``offsets``/``local_shape``), and compression tiles in global coordinates never depend on the
layout. Transformer Engine's fused norm names (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``) map onto the local spec's norm names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from covenant.engine.protocols import ParamShard
from covenant.models.config import ModelShape
from covenant.models.parallel import Coords


class LayoutError(ValueError):
    """A parameter does not match the layout computed from the config."""


@dataclasses.dataclass(frozen=True)
class GlobalParam:
    """One global tensor: name, shape, TP split dimension (``None`` = replicated), PP stage."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    layer: int | None  # global layer index, None for embedding / final norm / output


def global_params(shape: ModelShape) -> list[GlobalParam]:
    """Every global tensor of ``shape`` in the canonical order (embedding, layers, head)."""
    h, q_dim = shape.hidden, shape.heads * shape.head_dim
    out = [GlobalParam("embedding.word_embeddings.weight", (shape.vocab, h), 0, None)]
    for i in range(shape.layers):
        p = f"decoder.layers.{i}."
        out += [
            GlobalParam(p + "input_layernorm.weight", (h,), None, i),
            GlobalParam(p + "self_attention.linear_qkv.weight", (shape.qkv_rows, h), 0, i),
            GlobalParam(p + "self_attention.linear_proj.weight", (h, q_dim), 1, i),
            GlobalParam(p + "pre_mlp_layernorm.weight", (h,), None, i),
            GlobalParam(p + "mlp.linear_fc1_gate.weight", (shape.ffn, h), 0, i),
            GlobalParam(p + "mlp.linear_fc1_up.weight", (shape.ffn, h), 0, i),
            GlobalParam(p + "mlp.linear_fc2.weight", (h, shape.ffn), 1, i),
        ]
    out += [
        GlobalParam("decoder.final_layernorm.weight", (h,), None, None),
        GlobalParam("output_layer.weight", (shape.vocab, h), 0, None),
    ]
    return out


def stage_of(param: GlobalParam, layers: int, pp: int) -> int:
    """The pipeline stage that holds ``param``."""
    if param.layer is not None:
        return param.layer // (layers // pp)
    return 0 if param.name.startswith("embedding.") else pp - 1


def shard_of(param: GlobalParam, tp: int, tp_rank: int) -> ParamShard:
    """The box of ``param`` owned by TP rank ``tp_rank`` of ``tp``."""
    offsets = [0] * len(param.shape)
    local = list(param.shape)
    if param.tp_dim is not None and tp > 1:
        d = param.tp_dim
        if param.shape[d] % tp:
            raise LayoutError(f"{param.name}: dim {d} of {param.shape} not divisible by tp={tp}")
        local[d] = param.shape[d] // tp
        offsets[d] = tp_rank * local[d]
    return ParamShard(
        name=param.name,
        global_shape=param.shape,
        offsets=tuple(offsets),
        local_shape=tuple(local),
        replicated_over_tp=param.tp_dim is None and tp > 1,
    )


def rank_layout(
    shape: ModelShape, tp: int, tp_rank: int, pp: int, pp_rank: int
) -> list[ParamShard]:
    """The shards a (tp_rank, pp_rank) process owns, in canonical order, from the config alone."""
    return [
        shard_of(p, tp, tp_rank)
        for p in global_params(shape)
        if stage_of(p, shape.layers, pp) == pp_rank
    ]


def box(shard: ParamShard) -> tuple[slice, ...]:
    """Index of ``shard`` inside its global tensor."""
    return tuple(slice(o, o + n) for o, n in zip(shard.offsets, shard.local_shape, strict=True))


# ------------------------------------------------------------------------------------------
# Local megatron parameter names -> global names
# ------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# TE's fused spec puts the norms inside the following linear layer.
_TE_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_FC1 = "mlp.linear_fc1.weight"


def strip_wrappers(name: str) -> str:
    """Drop the ``module.`` prefixes that DDP / Float16Module add."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def global_names_of(local_name: str, layer_offset: int) -> list[str]:
    """Global name(s) of a local megatron parameter (two for the fused gate/up weight)."""
    name = strip_wrappers(local_name)
    m = _LAYER.match(name)
    if not m:
        return [name]
    layer = int(m.group(1)) + layer_offset
    rest = _TE_RENAMES.get(m.group(2), m.group(2))
    prefix = f"decoder.layers.{layer}."
    if rest == _FC1:
        return [prefix + "mlp.linear_fc1_gate.weight", prefix + "mlp.linear_fc1_up.weight"]
    return [prefix + rest]


@dataclasses.dataclass(frozen=True)
class Binding:
    """A global shard bound to a local parameter (``part``: 0/1 = gate/up half of fc1)."""

    shard: ParamShard
    param: torch.nn.Parameter
    part: int | None = None

    def local_view(self) -> torch.Tensor:
        """The live storage of this shard (a view of the parameter, never a copy)."""
        return self._part(self.param.data)

    def local_grad(self) -> torch.Tensor:
        """This shard's accumulated gradient (megatron DDP's ``main_grad``, else ``.grad``).

        With the distributed optimizer only this DP rank's slice of the buffer is DP-reduced.
        """
        grad = getattr(self.param, "main_grad", None)
        if grad is None:
            grad = self.param.grad
        if grad is None:
            raise LayoutError(f"{self.shard.name} has no gradient")
        return self._part(grad)

    def _part(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.part is None:
            return tensor
        half = tensor.shape[0] // 2
        return tensor[self.part * half : (self.part + 1) * half]


def bind(
    model: torch.nn.Module,
    shape: ModelShape,
    tp: int,
    tp_rank: int,
    pp: int,
    pp_rank: int,
) -> list[Binding]:
    """Bind every parameter of ``model`` (this rank's GPTModel) to its global shard.

    Checks that the model has exactly the parameters and local shapes the config predicts, so a
    mismatch between megatron and this module is one clear error rather than silent corruption.
    """
    expected = {s.name: s for s in rank_layout(shape, tp, tp_rank, pp, pp_rank)}
    offset = pp_rank * (shape.layers // pp)
    found: dict[str, Binding] = {}
    for local_name, param in model.named_parameters():
        names = global_names_of(local_name, offset)
        for part, gname in enumerate(names):
            if gname not in expected:
                raise LayoutError(f"parameter {local_name!r} -> {gname!r} is not in the layout")
            b = Binding(expected[gname], param, part if len(names) > 1 else None)
            got = tuple(b.local_view().shape)
            if got != expected[gname].local_shape:
                raise LayoutError(
                    f"{gname}: local shape {got} != expected {expected[gname].local_shape}"
                )
            found[gname] = b
    missing = set(expected) - set(found)
    if missing:
        raise LayoutError(f"model lacks parameters {sorted(missing)[:5]}")
    return [found[name] for name in expected]


# ------------------------------------------------------------------------------------------
# Full (unsharded) weights <-> any layout
# ------------------------------------------------------------------------------------------


class Sharded(Protocol):
    """What the full-state helpers need from a runtime (:class:`MegatronRuntime` has it)."""

    @property
    def coords(self) -> Coords: ...

    @property
    def shape(self) -> ModelShape: ...

    def bindings(self) -> Sequence[Binding]: ...


def unique_sources(runtime: Sharded) -> Iterator[tuple[int, ParamShard]]:
    """Collective: (world rank, shard) of every unique shard of the peer (DP replica 0; TP rank 0
    for the replicated norms), in a fixed order that every rank computes alike."""
    coords = runtime.coords
    grid: list[tuple[int, int, int]] = [(0, 0, 0)] * coords.world
    if coords.world > 1:
        dist.all_gather_object(grid, (coords.tp_rank, coords.pp_rank, coords.dp_rank))
    else:
        grid = [(coords.tp_rank, coords.pp_rank, coords.dp_rank)]
    lay = coords.layout
    for rank, (tp_rank, pp_rank, dp_rank) in enumerate(grid):
        if dp_rank != 0:
            continue
        for shard in rank_layout(runtime.shape, lay.tp, tp_rank, lay.pp, pp_rank):
            if shard.replicated_over_tp and tp_rank != 0:
                continue
            yield rank, shard


def gather_full_state(
    runtime: Sharded, what: Literal["params", "grads"] = "params"
) -> dict[str, torch.Tensor] | None:
    """Collective: the full unsharded fp32 weights (or grads) on world rank 0, ``None`` elsewhere.

    One point-to-point message per shard, sent only by DP replica 0 (and TP rank 0 for the
    replicated norms), received in a fixed order by rank 0. For tests, parity checks and small
    models: rank 0 holds the whole model in fp32. Checkpoints and exports never gather; they use
    :func:`covenant.models.weights.save_sharded`, where every rank writes its own pieces.
    """

    def local(b: Binding) -> torch.Tensor:
        return (b.local_view() if what == "params" else b.local_grad()).detach()

    rank = runtime.coords.rank
    own = {b.shard.name: b for b in runtime.bindings()}
    full: dict[str, torch.Tensor] = {}
    if rank == 0:
        full = {
            p.name: torch.empty(p.shape, dtype=torch.float32) for p in global_params(runtime.shape)
        }
    for src, shard in unique_sources(runtime):
        if src == rank == 0:
            full[shard.name][box(shard)] = local(own[shard.name]).float().cpu()
        elif rank == 0:
            dev = next(iter(own.values())).param.device if own else torch.device("cpu")
            buf = torch.empty(shard.local_shape, dtype=torch.float32, device=dev)
            dist.recv(buf, src=src)
            full[shard.name][box(shard)] = buf.float().cpu()
        elif src == rank:
            dist.send(local(own[shard.name]).float().contiguous(), dst=0)
    return full if rank == 0 else None


def load_full_state(runtime: Sharded, full: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's slices out of ``full`` (present on every rank); no communication."""
    missing = [b.shard.name for b in runtime.bindings() if b.shard.name not in full]
    if missing:
        raise LayoutError(f"full state lacks {missing[:5]}")
    with torch.no_grad():
        for b in runtime.bindings():
            src = full[b.shard.name]
            if tuple(src.shape) != b.shard.global_shape:
                raise LayoutError(
                    f"{b.shard.name}: shape {tuple(src.shape)} != {b.shard.global_shape}"
                )
            b.local_view().copy_(src[box(b.shard)])
