"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

A drop-in ``core_attention`` submodule for megatron's local layer spec: same constructor, same
inputs (``[s, b, heads, head_dim]`` query, ``[s, b, groups, head_dim]`` key and value per
tensor-parallel rank) and the same output (``[s, b, heads * head_dim]``) as megatron's
``DotProductAttention``, so nothing around it changes. PyTorch picks the kernel: FlashAttention
or the memory-efficient kernel on a GPU (the ``[b, heads, s, s]`` score matrix is never stored),
the math kernel on a CPU. Causal masking is SDPA's own (``is_causal``); grouped-query attention
is SDPA's ``enable_gqa`` (no ``repeat_interleave`` copies of K and V).

The numerics contract is the one of megatron's unfused attention: the same softmax scale, the
softmax computed in fp32 (every SDPA kernel accumulates in fp32), no dropout (covenant trains
with ``attention_dropout = 0``). Losses and gradients match it to float rounding under TP=1,
TP=2 and PP=2 (``tests/models/test_model_attention.py``); the results are not bit-identical
because the reduction order differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):  # type: ignore[misc]
    """megatron's ``DotProductAttention`` with its score matrix, softmax and context product
    replaced by one ``scaled_dot_product_attention`` call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.softmax_type != "vanilla":
            raise ValueError("SDPAttention supports softmax_type='vanilla' only")
        if self.config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not implement apply_query_key_layer_scaling")
        if self.config.window_size is not None:
            raise ValueError("SDPAttention does not implement sliding-window attention")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.size(0), query.size(1)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # an explicit mask wins, as in megatron's softmax (there True = masked out; SDPA: True =
        # attend); without one, a causal layer masks causally
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=q.size(1) != k.size(1),
        )
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


__all__ = ["SDPAttention"]
