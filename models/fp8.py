"""FP8 linear layers through native PyTorch, for the local spec where Transformer Engine is absent.

The recipe is torchao's float8 training with *tensorwise current scaling* (``fp8_recipe =
"tensorwise"``): in every matmul each operand is scaled by ``max_representable / amax`` of that
very tensor, cast to FP8, and multiplied with ``torch._scaled_mm`` (FP8 tensor cores on Hopper
and Ada), which dequantises with the reciprocal scales and accumulates in higher precision::

    forward   y  = x W^T          x, W in e4m3
    backward  dx = dy W           dy in e5m2 (range for gradients), W in e4m3
              dW = dy^T x         dy in e5m2, x in e4m3

Only the cast copies are FP8: master weights stay in the optimizer's fp32 (megatron's mixed
precision with bf16 model weights), the output and the gradients leave in the weight's dtype,
and autograd saves the FP8 copies of ``x`` and ``W`` (half the memory of bf16). The layers are
megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` with only the matmul replaced
(``_forward_impl``), so tensor parallelism, the weight layout and checkpoints are unchanged; the
input-gradient all-reduce of a column-parallel layer under TP happens here as megatron does it.
Sequence parallelism and gradient-accumulation fusion are not supported on this path (the local
spec supports neither). The ``delayed`` recipe (amax history) and the others need TE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
E5M2_MAX = float(torch.finfo(E5M2).max)  # 57344
AMAX_EPS = 1e-12

#: The FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer.
MIN_COMPUTE_CAPABILITY = (8, 9)


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` scaled to the range of ``dtype`` by its own amax and cast; returns the FP8 tensor
    and the fp32 reciprocal scale that ``torch._scaled_mm`` multiplies back."""
    top = E4M3_MAX if dtype == E4M3 else E5M2_MAX
    amax = t.detach().abs().amax().float().clamp(min=AMAX_EPS)
    scale = top / amax
    t8 = (t.float() * scale).clamp(-top, top).to(dtype)
    return t8, scale.reciprocal()


def _mm(
    a8: torch.Tensor, a_inv: torch.Tensor, b8: torch.Tensor, b_inv: torch.Tensor, out: torch.dtype
) -> torch.Tensor:
    """``a @ b`` for FP8 ``a`` (row-major) and ``b`` (any layout: made column-major here)."""
    b_col = b8.t().contiguous().t()
    return torch._scaled_mm(a8.contiguous(), b_col, scale_a=a_inv, scale_b=b_inv, out_dtype=out)


class _Float8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        allreduce_dgrad: bool,
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        x8, x_inv = to_fp8(x2, E4M3)
        w8, w_inv = to_fp8(weight, E4M3)
        y = _mm(x8, x_inv, w8.t(), w_inv, x.dtype)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        g8, g_inv = to_fp8(g2, E5M2)
        dx = _mm(g8, g_inv, w8, w_inv, ctx.x_dtype)  # [N, out] @ [out, in]
        if ctx.allreduce_dgrad:
            dist.all_reduce(dx, group=ctx.tp_group)
        dw = _mm(g8.t(), g_inv, x8, x_inv, ctx.w_dtype)  # [out, N] @ [N, in]
        return dx.reshape(ctx.x_shape), dw, None, None


def float8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gradient_accumulation_fusion: bool = False,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    **_: Any,
) -> torch.Tensor:
    """megatron's ``linear_with_grad_accumulation_and_async_allreduce`` contract, in FP8."""
    if sequence_parallel or gradient_accumulation_fusion:
        raise ValueError(
            "the native FP8 linear supports neither sequence parallelism nor gradient "
            "accumulation fusion (use backend='te')"
        )
    out = _Float8Matmul.apply(input, weight, allreduce_dgrad and tp_group is not None, tp_group)
    return out if bias is None else out + bias


class Float8ColumnParallelLinear(ColumnParallelLinear):  # type: ignore[misc]
    """``ColumnParallelLinear`` whose matmul runs in FP8 (see the module docstring)."""

    def _forward_impl(
        self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kw: Any
    ) -> Any:
        return float8_linear(input, weight, *args, **kw)


class Float8RowParallelLinear(RowParallelLinear):  # type: ignore[misc]
    """``RowParallelLinear`` whose matmul runs in FP8 (see the module docstring)."""

    def _forward_impl(
        self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kw: Any
    ) -> Any:
        return float8_linear(input, weight, *args, **kw)


def use_float8_linears(spec: Any) -> Any:
    """The local layer spec with its four large linears (QKV, attention output, MLP in and out)
    in FP8; the embedding and output layer stay in bf16."""
    attn = spec.submodules.self_attention.submodules
    attn.linear_qkv = Float8ColumnParallelLinear
    attn.linear_proj = Float8RowParallelLinear
    mlp = spec.submodules.mlp.submodules
    mlp.linear_fc1 = Float8ColumnParallelLinear
    mlp.linear_fc2 = Float8RowParallelLinear
    return spec


__all__ = [
    "Float8ColumnParallelLinear",
    "Float8RowParallelLinear",
    "float8_linear",
    "to_fp8",
    "use_float8_linears",
]
