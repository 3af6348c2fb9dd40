"""Benchmark: covenant's model runtime vs a plain megatron-core loop, same model, same process.

Measures one inner step (forward + backward + AdamW with clipping) of a tiny preset on this CPU
through :class:`covenant.models.runtime.MegatronRuntime` and through a hand-written megatron-core
loop (``GPTModel`` + ``DistributedDataParallel`` + ``get_megatron_optimizer`` +
``get_forward_backward_func`` + ``optimizer.step()``) built from the same ``TransformerConfig``
and weights. The two are timed in alternating rounds so machine noise hits both alike; the
result is the median step time of each, their ratio (goal <= 1.05) and tokens/s. Prints JSON.

    python tools/bench_model.py --preset tiny --batch 8 --micro-batch 2 --steps 20
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from typing import Any


def _plain_loop(rt: Any, tokens: Any) -> Any:
    """A textbook megatron-core training step on a fresh copy of ``rt``'s model."""
    import torch
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from covenant.models.spec import layer_spec, transformer_config

    cfg = transformer_config(rt.shape, rt.model_cfg, rt.choice, tp=1, pp=1)
    gpt = GPTModel(
        config=cfg,
        transformer_layer_spec=layer_spec(rt.choice.backend, rt.choice.attention),
        vocab_size=rt.shape.vocab,
        max_sequence_length=rt.shape.seq_len,
        position_embedding_type="rope",
        rotary_base=int(rt.shape.rope_theta),
        share_embeddings_and_output_weights=False,
    )
    gpt.load_state_dict(rt.gpt.state_dict())
    ddp = DistributedDataParallel(
        config=cfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=gpt,
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    o = rt.optim_cfg
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            weight_decay=o.weight_decay,
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=o.grad_clip,
        ),
        [ddp],
        config_overrides={},
    )
    fwd_bwd = get_forward_backward_func()
    mb = rt.model_cfg.micro_batch
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    mask = torch.ones(tokens.shape, dtype=torch.float32)
    mask[:, -1] = 0

    def loss_func(m: Any, out: Any) -> Any:
        loss = (out.float() * m).sum() / m.sum()
        return loss, {"loss": loss.detach().clone()}

    def forward_step(it: Any, model: Any) -> Any:
        t, lab, m = next(it)
        return model(t, None, None, labels=lab), functools.partial(loss_func, m)

    batches = [
        (tokens[i : i + mb], labels[i : i + mb], mask[i : i + mb])
        for i in range(0, tokens.shape[0], mb)
    ]

    def step() -> None:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[ddp],
            num_microbatches=len(batches),
            seq_length=tokens.shape[1],
            micro_batch_size=mb,
            forward_only=False,
        )
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="default: the preset's seq_len")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()

    import logging

    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    from covenant.models.config import ModelConfig
    from covenant.models.runtime import build_runtime

    t0 = time.perf_counter()
    rt = build_runtime(ModelConfig(preset=args.preset, micro_batch=args.micro_batch))
    build_s = time.perf_counter() - t0
    seq = args.seq or rt.shape.seq_len
    tokens = torch.randint(
        0, rt.shape.vocab, (args.batch, seq), generator=torch.Generator().manual_seed(0)
    )
    plain = _plain_loop(rt, tokens)

    def covenant_step() -> None:
        rt.train_step(tokens, 1e-4)

    for _ in range(args.warmup):
        covenant_step()
        plain()
    times: dict[str, list[float]] = {"covenant": [], "plain": []}
    # Alternate in rounds of one step each so drift and neighbours' load hit both alike.
    for _ in range(args.steps):
        for name, fn in (("covenant", covenant_step), ("plain", plain)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    cov = statistics.median(times["covenant"])
    ref = statistics.median(times["plain"])
    n_tokens = args.batch * seq
    import megatron.core

    print(
        json.dumps(
            {
                "bench": "model_step_cpu",
                "preset": args.preset,
                "params": sum(p.numel() for p in rt.gpt.parameters()),
                "batch": args.batch,
                "micro_batch": args.micro_batch,
                "seq": seq,
                "threads": args.threads,
                "steps": args.steps,
                "build_s": round(build_s, 3),
                "covenant_step_s": round(cov, 5),
                "plain_megatron_step_s": round(ref, 5),
                "overhead_ratio": round(cov / ref, 4),
                "tokens_per_s": round(n_tokens / cov, 1),
                "plain_tokens_per_s": round(n_tokens / ref, 1),
                "torch": torch.__version__,
                "megatron_core": megatron.core.__version__,
                "cpu": platform.processor() or platform.machine(),
            },
            indent=2,
        )
    )
    rt.close()


if __name__ == "__main__":
    main()
