"""Parameter counts and a per-GPU memory plan for a model shape under a TP x PP x DP layout.

Pure arithmetic from the config (no torch model is built), so ``covenant model-info`` answers
"does covenant-72b with TP=8 fit on 8 x 80 GB?" in milliseconds. The counts are exact (a test
compares them with instantiated models); the activation term is an estimate:

Per layer, per token, with ``p`` bytes per activation element and TP degree ``t`` (no sequence
parallelism), following Korthikanti et al. 2022 adapted to SwiGLU and GQA::

    p * (4h + (q + 2kv)/t + 2q/t + 3*ffn/t + ffn/t) + heads/t * s * (p + 1)   # last term: no flash

where ``q = heads*head_dim`` and ``kv = kv_heads*head_dim``; the ``heads*s`` term (attention
scores and their softmax) applies only to the local backend, whose attention is not fused. With
full recomputation only each layer's input (``p*h``) is kept, plus one layer's working set.
Under 1F1B the first stage holds up to ``pp`` micro-batches in flight. The last stage adds the
fp32 logits and their gradient (``2 * 4 * vocab/t`` per token).
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
) -> int:
    h, q, kv, f = (
        shape.hidden,
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
        shape.ffn,
    )
    a = prec.activation
    per_token = a * (4 * h + (q + 2 * kv) / tp + 2 * q / tp + 3 * f / tp + f / tp)
    if not flash:
        per_token += shape.heads / tp * seq * (a + 1)
    tokens = micro_batch * seq
    layers = shape.layers // pp
    if recompute:
        per_mb = layers * a * h * tokens + per_token * tokens
    else:
        per_mb = layers * per_token * tokens
    in_flight = max(1, pp - stage)  # 1F1B: stage i holds pp - i micro-batches
    total = per_mb * in_flight
    if stage == pp - 1:
        total += 2 * 4 * shape.vocab / tp * tokens
    return int(total)


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
) -> dict[str, Any]:
    """The memory plan of one GPU per pipeline stage; ``per_rank_bytes`` is the largest stage.

    Raises :class:`~covenant.models.config.ModelConfigError` for a layout the shape cannot take.
    """
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
