"""GPU benchmark of one inner step of a preset on one GPU: tokens/s, step time, MFU, peak memory.

Self-contained on purpose: it needs only torch and megatron-core 0.16.1 (and Transformer Engine
for ``--backend te`` / ``--precision fp8``), not the covenant package, so it runs on a bare GPU
machine with ``python tools/bench_gpu.py``. It reads the preset table from
``models/presets.toml`` next to it and builds the same model as covenant.models.runtime:
megatron ``GPTModel`` (RMSNorm, RoPE theta 500000, SwiGLU, GQA, no biases, untied output) from
the local or TE layer spec, bf16 params under ``Float16Module``, megatron DDP with fp32 grad
reduction, megatron AdamW (betas 0.9/0.95, wd 0.1, clip 1.0), ``get_forward_backward_func``.

    python tools/bench_gpu.py --preset templar-1b --steps 10 --micro-batch 4 --seq 2048 --json

MFU = (6 * N * tokens + 12 * layers * heads * head_dim * seq * tokens) / step_time / peak, where
N counts every parameter except the input embedding (a lookup, not a matmul) and the second term
is the attention score/value matmuls (forward + backward, causal masking not discounted). Peak is
the H100/H200 dense tensor-core rate: 989e12 FLOP/s for bf16, 1979e12 for fp8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

PEAK_FLOPS = {"bf16": 989e12, "fp8": 1979e12}
PRESETS = Path(__file__).resolve().parent.parent / "models" / "presets.toml"


def _shape(args: argparse.Namespace) -> dict[str, Any]:
    table = tomllib.loads(PRESETS.read_text("utf-8"))
    if args.preset not in table:
        sys.exit(f"error: unknown preset {args.preset!r}; known: {', '.join(table)}")
    shape = dict(table[args.preset])
    if args.layers:
        shape["layers"] = args.layers
    return shape


def _backend(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import transformer_engine  # noqa: F401

        return "te"
    except Exception:
        return "local"


def _attention(requested: str, backend: str) -> str:
    if backend == "te":
        if requested not in ("auto",):
            sys.exit(f"error: --attention {requested} applies to --backend local (te: TE's own)")
        return "te"
    return "sdpa" if requested == "auto" else requested


def _build_config(
    args: argparse.Namespace, shape: dict[str, Any], backend: str, attention: str
) -> tuple[Any, Any]:
    """The megatron TransformerConfig and layer spec of this run (nothing is built)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_config import TransformerConfig

    fp8: dict[str, Any] = {}
    if args.precision == "fp8" and backend == "te":
        fp8 = {
            "fp8": "hybrid" if args.fp8_recipe == "delayed" else "e4m3",
            "fp8_recipe": args.fp8_recipe,
        }
    recompute: dict[str, Any] = {}
    if args.recompute:
        recompute = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    head_dim = shape["hidden"] // shape["heads"]
    cfg = TransformerConfig(
        num_layers=shape["layers"],
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        num_query_groups=shape["kv_heads"],
        kv_channels=head_dim,
        ffn_hidden_size=shape["ffn"],
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        bf16=True,
        bias_activation_fusion="swiglu" in args.fusions,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion="cross_entropy" in args.fusions,
        cross_entropy_fusion_impl="native",
        attention_softmax_in_fp32=True,
        **recompute,
        **fp8,
    )
    spec = (
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        if backend == "te"
        else gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    )
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = _models("attention").SDPAttention
    if args.precision == "fp8" and backend != "te":
        _models("fp8").use_float8_linears(spec)  # native FP8: tensorwise, torch._scaled_mm
    return cfg, spec


def _models(name: str) -> Any:
    """``models/{name}.py`` loaded from its file (no covenant install needed; those two modules
    import only torch and megatron)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "models" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"covenant_bench_{name}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="templar-1b")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0 = preset)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--backend", choices=["auto", "local", "te"], default="auto")
    ap.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument(
        "--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "mxfp8", "blockwise"]
    )
    ap.add_argument("--recompute", action="store_true", help="full activation recomputation")
    ap.add_argument(
        "--attention",
        choices=["auto", "sdpa", "unfused"],
        default="auto",
        help="local backend's core attention: sdpa (models/attention.py: torch's flash kernels) "
        "or unfused (megatron's DotProductAttention); auto = sdpa (te: TE's own)",
    )
    ap.add_argument(
        "--fusions",
        nargs="*",
        default=[],
        choices=["swiglu", "cross_entropy"],
        help="megatron fusions that need no apex/TE: swiglu (bias_activation_fusion), "
        "cross_entropy (cross_entropy_loss_fusion, native)",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and validate the configuration and layer spec, print it, build nothing "
        "(runs without a GPU)",
    )
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    backend = _backend(args.backend)
    attention = _attention(args.attention, backend)
    if args.precision == "fp8" and backend != "te" and args.fp8_recipe != "tensorwise":
        sys.exit(
            f"error: --fp8-recipe {args.fp8_recipe} needs Transformer Engine (--backend te); "
            "--backend local runs FP8 natively (models/fp8.py) with --fp8-recipe tensorwise"
        )
    shape = _shape(args)
    if args.dry_run:
        cfg, spec = _build_config(args, shape, backend, attention)
        core = spec.submodules.self_attention.submodules.core_attention
        print(
            json.dumps(
                {
                    "dry_run": True,
                    "preset": args.preset,
                    "layers": shape["layers"],
                    "backend": backend,
                    "attention": attention,
                    "core_attention": f"{core.__module__}.{core.__name__}",
                    "linear_fc1": spec.submodules.mlp.submodules.linear_fc1.__name__,
                    "fusions": {
                        "bias_activation_fusion": cfg.bias_activation_fusion,
                        "cross_entropy_loss_fusion": cfg.cross_entropy_loss_fusion,
                    },
                    "precision": args.precision,
                    "micro_batch": args.micro_batch,
                    "seq": args.seq,
                }
            )
        )
        return
    if not torch.cuda.is_available():
        sys.exit("error: bench_gpu.py needs a CUDA GPU (--dry-run checks the configuration)")

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    if dist.get_world_size() != 1:
        sys.exit("error: bench_gpu.py measures one GPU (world size 1)")

    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0, te_rng_tracker=backend == "te")

    cfg, spec = _build_config(args, shape, backend, attention)
    t0 = time.perf_counter()
    gpt = GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=shape["vocab"],
        max_sequence_length=args.seq,
        position_embedding_type="rope",
        rotary_base=500000,
        share_embeddings_and_output_weights=False,
    ).cuda()
    n_params = sum(p.numel() for p in gpt.parameters())
    n_matmul = n_params - gpt.embedding.word_embeddings.weight.numel()
    ddp = DistributedDataParallel(
        config=cfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=Float16Module(cfg, gpt),
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            clip_grad=1.0,
            bf16=True,
            params_dtype=torch.bfloat16,
        ),
        [ddp],
        config_overrides={},
    )
    build_s = time.perf_counter() - t0
    fwd_bwd = get_forward_backward_func()

    mb, seq = args.micro_batch, args.seq
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, shape["vocab"], (mb, seq), device="cuda", generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones(mb, seq, device="cuda")
    mask[:, -1] = 0

    def loss_func(out: Any) -> Any:
        loss = (out.float() * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach().clone()}

    def forward_step(it: Any, model: Any) -> Any:
        next(it)
        return model(tokens, None, None, labels=labels), loss_func

    def step() -> float:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iter(range(args.grad_accum)),
            model=[ddp],
            num_microbatches=args.grad_accum,
            seq_length=seq,
            micro_batch_size=mb,
            forward_only=False,
        )
        opt.step()
        return float(out[-1]["loss"]) if out else float("nan")

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()  # .item() inside synchronises
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    n_tokens = mb * seq * args.grad_accum
    flops = 6 * n_matmul * n_tokens + 12 * shape["layers"] * shape["hidden"] * seq * n_tokens
    peak_key = "fp8" if args.precision == "fp8" else "bf16"
    result = {
        "bench": "model_step_gpu",
        "preset": args.preset,
        "layers": shape["layers"],
        "params": n_params,
        "backend": backend,
        "attention": attention,
        "fusions": sorted(args.fusions),
        "precision": args.precision,
        "fp8_recipe": args.fp8_recipe if args.precision == "fp8" else None,
        "micro_batch": mb,
        "grad_accum": args.grad_accum,
        "seq": seq,
        "recompute": args.recompute,
        "steps": args.steps,
        "build_s": round(build_s, 2),
        "step_s_median": round(step_s, 4),
        "step_s_min": round(min(times), 4),
        "tokens_per_s": round(n_tokens / step_s, 1),
        "tflops_per_s": round(flops / step_s / 1e12, 1),
        "mfu": round(flops / step_s / PEAK_FLOPS[peak_key], 4),
        "mfu_peak": f"{PEAK_FLOPS[peak_key]:.0f} FLOP/s dense {peak_key} (H100/H200 SXM)",
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "last_loss": round(loss, 4),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
