"""Parameter counts and a per-GPU memory plan for a model shape under a TP x PP x DP layout.

Pure arithmetic from the config (no torch model is built), so ``covenant model-info`` answers
"does covenant-72b with TP=8 fit on 8 x 80 GB?" in milliseconds. The counts are exact (a test
compares them with instantiated models). The activation term is an account, tensor by tensor, of
what autograd keeps for backward in megatron-core 0.16's Llama layer (``GPTModel``, RMSNorm,
SwiGLU, GQA, RoPE, unfused bias/dropout/softmax as :mod:`covenant.models.spec` configures it).
``tests/models/test_model_activation_memory.py`` counts the bytes that
``torch.autograd.graph.saved_tensors_hooks`` see during a CPU training step and checks the plan
against them (they agree to a few bytes); for templar-1b on an H200 (local backend, bf16,
micro-batch 4 x 2048) the plan gives 49.1 GiB against a measured peak of 49.2 GiB.

Per layer and per token, with ``p`` bytes per activation element (2 in bf16, 4 in fp32), TP
degree ``t`` (no sequence parallelism), ``q = heads*head_dim/t``, ``kv = kv_heads*head_dim/t``,
``f = ffn/t``, ``n = heads/t``, sequence ``s``, micro-batch ``b``::

    norm  = p*h + 4          # one RMSNorm: its input and fp32 rstd (torch's fused CUDA kernel;
                             #   the composite CPU version keeps 4h + 4 + 4h: the fp32 input,
                             #   the rstd and the fp32 normalised product)
    attn  = norm + p*h       # input norm, and its output = the QKV GEMM's input
          + 4*head_dim*p/b   # rope: cos and sin for q and for k, [s, 1, 1, head_dim] each
          + p*q              # the rotated q
          + k, v             # GQA: 2*p*q, repeat_interleave's full-width copies of k and v;
                             #   MHA: p*kv for k and p*(q + 2kv) for v, a view that keeps the
                             #   whole QKV output alive
          + n*s*(4 + p')     # scores: the fp32 softmax output and, below fp32, its cast back
                             #   for the bmm (p' = p if p < 4 else 0)
          + s/b              # the bool causal mask [s, s], built per layer and micro-batch
          + p*q              # the attention output = the output projection's input
    mlp   = norm + p*h       # pre-MLP norm, and its output = fc1's input
          + 2*p*f            # fc1's output (silu keeps the gate half, a view of all of it)
          + 3*p*f            # silu(gate), the copy ``up + glu_linear_offset``, their product

With flash attention (Transformer Engine) the attention keeps ``p*(q + 2kv)`` for q, k, v and
the fp32 logsumexp ``4*n`` instead of the k/v copies, scores and mask. Once per stage and
micro-batch: the first stage's int64 token ids (8 bytes per token); the last stage's head,
``norm + p*h + 4*vocab/t + 13`` per token (final norm, the output layer's input, the
vocab-parallel cross-entropy's fp32 softmax, its bool/int64 targets and the fp32 loss mask),
plus ``p*vocab/t`` below fp32: the activation-dtype logits beside their fp32 copy in the
forward and their gradient beside the softmax at the start of backward, not saved but alive at
the step's peak. Once per GPU without flash attention: megatron's persistent "mpu" buffer for
the raw scores, ``b*n*s*s*p``. Under 1F1B stage ``i`` holds ``pp - i`` micro-batches. With
full recomputation a layer keeps only its input (``p*h``) plus the rope angles once per
micro-batch, and backward holds either one recomputed layer (whose input is its checkpoint) or
the head, whichever is larger. Short-lived backward buffers (the attention's score gradients,
cuBLAS workspaces) and allocator fragmentation are left to :func:`fits`' headroom.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from covenant.models.config import ModelShape, check_layout
from covenant.models.layout import global_params, rank_layout, stage_of

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state (defaults: bf16 training, fp32 master/moments)."""

    param: int = 2
    grad: int = 4  # megatron DDP reduces grads in fp32 (grad_reduce_in_fp32)
    master: int = 4  # fp32 master copy; 0 when params are already fp32
    moment: int = 4  # each of AdamW's two moments
    activation: int = 2
    snapshot: int = 4  # the outer step's theta_start copy
    error_buffer: int = 4  # SparseLoCo's error-feedback buffer

    @classmethod
    def named(cls, name: str) -> Precision:
        if name == "fp32":
            return cls(param=4, master=0, activation=4)
        if name in ("bf16", "fp8"):
            # FP8 keeps bf16 weights and fp32 master weights; activations are mostly bf16.
            return cls()
        raise ValueError(f"unknown precision {name!r}")


def param_counts(shape: ModelShape, pp: int = 1) -> dict[str, Any]:
    """Total, embedding (input + output), and per-pipeline-stage parameter counts."""
    total = 0
    embedding = 0
    per_stage = [0] * pp
    for p in global_params(shape):
        n = 1
        for d in p.shape:
            n *= d
        total += n
        if p.name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            embedding += n
        per_stage[stage_of(p, shape.layers, pp)] += n
    return {"params_total": total, "params_embedding": embedding, "params_per_stage": per_stage}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclasses.dataclass(frozen=True)
class _Activations:
    """Activation bytes of one micro-batch on one TP rank, by part (see the module docstring)."""

    layer: float  # saved for backward by one transformer layer
    checkpoint: float  # one layer's input, all that full recomputation keeps per layer
    rope_freqs: float  # the rotary angles a recomputing layer keeps (once per micro-batch)
    embedding: float  # first stage: the token ids
    head: float  # last stage: final norm, output layer, loss
    scores_buffer: float  # megatron's persistent "mpu" buffer for the unfused scores (once)


def _activation_parts(
    shape: ModelShape,
    tp: int,
    micro_batch: int,
    seq: int,
    prec: Precision,
    *,
    flash: bool,
    fused_norm: bool,
) -> _Activations:
    """The terms of the module docstring for one micro-batch (bytes)."""
    p = prec.activation
    b, s, h, hd = micro_batch, seq, shape.hidden, shape.head_dim
    n = shape.heads / tp
    q, kv, f, vocab = n * hd, shape.kv_heads / tp * hd, shape.ffn / tp, shape.vocab / tp
    narrow = p if p < 4 else 0  # an extra copy in the activation dtype next to an fp32 one
    norm = p * h + 4 if fused_norm else 4 * h + 4 + 4 * h

    # ---- attention sub-layer, per token
    attn = norm + p * h  # input norm; its output is the QKV GEMM's input
    attn += 4 * hd * p / b  # rope: cos and sin for q and for k, [s, 1, 1, hd] each
    if flash:
        attn += p * (q + 2 * kv) + 4 * n  # q, k, v and the fp32 logsumexp per head
    else:
        attn += p * q  # the rotated q
        if shape.heads > shape.kv_heads:
            attn += 2 * p * q  # repeat_interleave's full-width copies of k and v
        else:
            attn += p * kv + p * (q + 2 * kv)  # k; v is a view keeping the QKV output alive
        attn += n * s * (4 + narrow)  # fp32 softmax output (+ its cast back for the bmm)
        attn += s / b  # bool causal mask [s, s], built per layer and micro-batch
    attn += p * q  # attention output = the output projection's input

    # ---- SwiGLU MLP sub-layer, per token
    mlp = norm + p * h  # pre-MLP norm; its output is fc1's input
    mlp += 2 * p * f  # fc1's output (silu keeps the gate half, a view of all of it)
    mlp += 3 * p * f  # silu(gate), the copy up + glu_linear_offset, and their product

    # ---- last stage, per token: final norm and the output layer's input; the cross-entropy's
    # fp32 softmax (in fp32, the logits themselves, updated in place); 13 bytes of bool/int64
    # targets and the fp32 loss mask; below fp32 the activation-dtype logits (forward) and
    # their gradient (backward) next to the fp32 softmax: not saved, but alive at the peak.
    head = norm + p * h + 4 * vocab + 13 + narrow * vocab

    tokens = b * s
    return _Activations(
        layer=(attn + mlp) * tokens,
        checkpoint=p * h * tokens,
        rope_freqs=4 * s * hd,  # fp32 [s, 1, 1, hd], shared by the layers' checkpoints
        embedding=8 * tokens,  # the int64 token ids
        head=head * tokens,
        scores_buffer=0 if flash else b * n * s * s * p,
    )


def _activation_bytes(
    shape: ModelShape,
    tp: int,
    pp: int,
    stage: int,
    micro_batch: int,
    seq: int,
    prec: Precision,
    *,
    flash: bool,
    recompute: bool,
    fused_norm: bool = True,
) -> int:
    parts = _activation_parts(shape, tp, micro_batch, seq, prec, flash=flash, fused_norm=fused_norm)
    layers = shape.layers // pp
    first, last = stage == 0, stage == pp - 1
    in_flight = max(1, pp - stage)  # 1F1B: stage i holds pp - i micro-batches
    per_mb = parts.embedding if first else 0.0
    head = parts.head if last else 0.0
    if recompute:
        # Each layer keeps only its input; backward recomputes one layer at a time (whose own
        # input is that checkpoint), after the head's backward has freed the head's tensors.
        per_mb += layers * parts.checkpoint + parts.rope_freqs
        total = in_flight * per_mb + max(parts.layer - parts.checkpoint, head)
    else:
        per_mb += layers * parts.layer
        total = in_flight * per_mb + head
    return int(total + parts.scores_buffer)


def plan(
    shape: ModelShape,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    micro_batch: int = 1,
    seq: int | None = None,
    *,
    precision: str = "bf16",
    distributed_optimizer: bool = False,
    outer_state_on_gpu: bool = True,
    flash_attention: bool = True,
    recompute: bool = False,
    device: str = "cuda",
) -> dict[str, Any]:
    """The memory plan of one GPU per pipeline stage; ``per_rank_bytes`` is the largest stage.

    ``flash_attention``: Transformer Engine's fused attention (the ``te`` backend) rather than the
    local backend's unfused scores. ``device="cpu"`` accounts for torch's composite RMSNorm on CPU
    (the CPU tests compare the plan with measured saved tensors); every GPU plan uses ``"cuda"``.

    Raises :class:`~covenant.models.config.ModelConfigError` for a layout the shape cannot take.
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"unknown device {device!r} (cuda | cpu)")
    check_layout(shape, tp, pp, dp, None)
    seq = seq or shape.seq_len
    prec = Precision.named(precision)
    counts = param_counts(shape, pp)
    stages: list[dict[str, int]] = []
    for stage in range(pp):
        # TP rank 0 holds the largest share (replicated norms count in full on every rank).
        n = sum(_numel(s.local_shape) for s in rank_layout(shape, tp, 0, pp, stage))
        opt_share = dp if distributed_optimizer else 1
        row = {
            "params": n,
            "weights": n * prec.param,
            "grads": n * prec.grad,
            "optimizer": (n * (prec.master + 2 * prec.moment)) // opt_share,
            "outer_snapshot": n * prec.snapshot if outer_state_on_gpu else 0,
            "error_buffer": n * prec.error_buffer if outer_state_on_gpu else 0,
            "activations": _activation_bytes(
                shape,
                tp,
                pp,
                stage,
                micro_batch,
                seq,
                prec,
                flash=flash_attention,
                recompute=recompute,
                fused_norm=device == "cuda",
            ),
        }
        row["total"] = sum(v for k, v in row.items() if k != "params")
        stages.append(row)
    worst = max(stages, key=lambda r: r["total"])
    return {
        "preset": shape.name,
        "layout": {"tp": tp, "pp": pp, "dp": dp, "gpus": tp * pp * dp},
        "micro_batch": micro_batch,
        "seq": seq,
        "precision": precision,
        **counts,
        "per_rank_bytes": {k: v for k, v in worst.items() if k != "params"},
        "per_stage": stages,
    }


def fits(memory_plan: dict[str, Any], gpu_bytes: int, headroom: float = 0.1) -> bool:
    """Whether the largest stage fits in ``gpu_bytes`` keeping ``headroom`` free (CUDA context,
    allocator fragmentation, communication buffers)."""
    return bool(memory_plan["per_rank_bytes"]["total"] <= gpu_bytes * (1.0 - headroom))
