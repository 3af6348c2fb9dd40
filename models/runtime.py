"""``MegatronRuntime``: the Llama-style megatron-core model, its AdamW and its parallel layout.

Implements :class:`covenant.engine.protocols.ModelRuntime`. Build order (torchtitan-style plain
functions, in this order): check config -> process groups -> ``GPTModel`` from the backend's
layer spec -> (bf16: ``Float16Module``) -> megatron ``DistributedDataParallel`` -> megatron
optimizer -> bind parameters to the global layout. Every check that can fail runs before the
first collective (see :func:`check_before_start`).

The training step follows megatron's own loop: ``get_forward_backward_func()`` (1F1B schedule
under PP, no-pipelining otherwise), ``finalize_model_grads`` for the DP/embedding reductions,
then the optimizer. Labels are the tokens shifted left with the last position masked, and the
loss is the mean over sequences of the per-sequence mean token loss (every sequence has the same
``T - 1`` targets, so this is the token mean).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from covenant.engine.protocols import ParallelInfo, ParamShard, StepResult
from covenant.models import cpu_compat, memory, parallel
from covenant.models.config import (
    Layout,
    ModelConfig,
    ModelConfigError,
    ModelShape,
    OptimConfig,
    check_layout,
)
from covenant.models.layout import Binding, bind
from covenant.models.spec import BuildChoice, choose, layer_spec, transformer_config

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class StepError(RuntimeError):
    """A batch that this runtime cannot split as configured."""


def check_before_start(cfg: ModelConfig, world: int) -> tuple[ModelShape, Layout, BuildChoice]:
    """Every static check (shape, layout, backend, precision): raises before any collective."""
    shape = cfg.resolve()
    layout = check_layout(shape, cfg.tp, cfg.pp, cfg.dp, world)
    choice = choose(cfg)
    if cfg.gpu_memory_gb is not None:
        need = memory.plan(
            shape,
            layout.tp,
            layout.pp,
            layout.dp,
            cfg.micro_batch,
            precision=choice.precision,
            distributed_optimizer=cfg.distributed_optimizer,
            flash_attention=choice.flash_attention,
            recompute=cfg.recompute,
        )
        limit = int(cfg.gpu_memory_gb * memory.GIB)
        if not memory.fits(need, limit):
            raise ModelConfigError(
                f"model {shape.name!r} tp={layout.tp} pp={layout.pp} dp={layout.dp} "
                f"micro_batch={cfg.micro_batch} needs about "
                f"{need['per_rank_bytes']['total'] / memory.GIB:.1f} GiB per GPU, more than "
                f"gpu_memory_gb={cfg.gpu_memory_gb} allows (see `covenant model-info`)"
            )
    if cfg.init_weights is not None:
        from covenant.models.weights import WeightsError, find_full_weights, open_full_weights

        try:
            open_full_weights(find_full_weights(cfg.init_weights)).check_matches(shape)
        except WeightsError as exc:
            raise ModelConfigError(f"[model] init_weights: {exc}") from None
    return shape, layout, choice


def make_batches(tokens: torch.Tensor, micro_batch: int, device: torch.device) -> list[Batch]:
    """Split ``tokens`` (b, T) into micro-batches of (inputs, labels, loss mask)."""
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise StepError(
            f"tokens must be an int (b, T) tensor, got {tokens.dtype} {tuple(tokens.shape)}"
        )
    b, t = tokens.shape
    if b % micro_batch:
        raise StepError(f"batch of {b} sequences is not divisible by micro_batch={micro_batch}")
    tokens = tokens.to(device=device, dtype=torch.int64)
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    mask = torch.ones(b, t, dtype=torch.float32, device=device)
    mask[:, -1] = 0.0  # the last position has no next token
    return [
        (tokens[i : i + micro_batch], labels[i : i + micro_batch], mask[i : i + micro_batch])
        for i in range(0, b, micro_batch)
    ]


def _loss_func(mask: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    losses = output.float()
    loss = (losses * mask).sum() / mask.sum()
    # The schedules divide the returned loss in place by the number of micro-batches: report a
    # detached clone so the logged value is the micro-batch mean.
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    tokens, labels, mask = next(data)
    output = model(tokens, None, None, labels=labels)
    return output, functools.partial(_loss_func, mask)


_INIT_ROWS = 64


def _init_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit seed from the run seed, a global parameter name and a row-block index."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MegatronRuntime:
    """A megatron-core GPT model with AdamW on this rank; see the module docstring."""

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> None:
        world = dist.get_world_size() if dist.is_initialized() else parallel.launched_world()
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self._shape, layout, self.choice = check_before_start(model_cfg, world)
        self._coords = parallel.initialize_model_parallel(layout, model_cfg.seed)
        c = self._coords
        self.parallel = ParallelInfo(
            rank=c.rank,
            world_size=c.world,
            tp=layout.tp,
            pp=layout.pp,
            dp=layout.dp,
            tp_rank=c.tp_rank,
            pp_rank=c.pp_rank,
            dp_rank=c.dp_rank,
        )
        self.seq_len = self._shape.seq_len
        self.micro_batch = model_cfg.micro_batch
        self.device = parallel.device()
        self.tf_config = transformer_config(
            self._shape, model_cfg, self.choice, tp=layout.tp, pp=layout.pp
        )
        self.gpt = self._build_gpt()
        self.model = self._wrap(self.gpt)
        self.optimizer = self._build_optimizer()
        self._bindings = bind(
            self.gpt,
            self._shape,
            layout.tp,
            self._coords.tp_rank,
            layout.pp,
            self._coords.pp_rank,
        )
        self._init_global()
        if model_cfg.init_weights is not None:
            from covenant.models.weights import find_full_weights

            self.load_full_weights(str(find_full_weights(model_cfg.init_weights)))
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._fwd_bwd = get_forward_backward_func()
        logger.info(
            "model %s built: backend=%s attention=%s precision=%s%s tp=%d pp=%d dp=%d, "
            "%d local params (%s)",
            self._shape.name,
            self.choice.backend,
            self.choice.attention,
            self.choice.precision,
            " (native FP8, tensorwise scaling)" if self.choice.native_fp8 else "",
            layout.tp,
            layout.pp,
            layout.dp,
            sum(p.numel() for p in self.gpt.parameters()),
            self.choice.why,
        )

    # ---------------------------------------------------------------- build

    def _build_gpt(self) -> torch.nn.Module:
        from megatron.core.models.gpt import GPTModel

        model = GPTModel(
            config=self.tf_config,
            transformer_layer_spec=layer_spec(
                self.choice.backend, self.choice.attention, self.choice.native_fp8
            ),
            vocab_size=self._shape.vocab,
            max_sequence_length=self._shape.seq_len,
            pre_process=self._coords.is_first_stage,
            post_process=self._coords.is_last_stage,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=int(self._shape.rope_theta),
            parallel_output=True,
        )
        return model.to(self.device)

    def _wrap(self, gpt: torch.nn.Module) -> Any:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        module: torch.nn.Module = gpt
        if self.tf_config.bf16:
            from megatron.core.transformer.module import Float16Module

            module = Float16Module(self.tf_config, gpt)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.model_cfg.distributed_optimizer,
        )
        ddp = DistributedDataParallel(config=self.tf_config, ddp_config=ddp_config, module=module)
        # Same starting weights on every DP replica (the seeds already agree; this makes it so).
        ddp.broadcast_params()
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.no_sync_func = ddp.no_sync
        return ddp

    def _build_optimizer(self) -> Any:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o = self.optim_cfg
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=0.0,
            min_lr=0.0,
            weight_decay=o.weight_decay,
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=o.grad_clip,
            bf16=self.tf_config.bf16,
            params_dtype=self.choice.params_dtype,
            use_distributed_optimizer=self.model_cfg.distributed_optimizer,
        )
        # {} = no overrides: decay every parameter (production); None = megatron's default of
        # skipping 1-D parameters and biases.
        overrides: dict[Any, Any] | None = {} if o.decay_1d else None
        return get_megatron_optimizer(opt_config, [self.model], config_overrides=overrides)

    # ---------------------------------------------------------------- ModelRuntime

    @property
    def shape(self) -> ModelShape:
        return self._shape

    @property
    def coords(self) -> parallel.Coords:
        return self._coords

    def bindings(self) -> Sequence[Binding]:
        return self._bindings

    def layout(self) -> Sequence[ParamShard]:
        return [b.shard for b in self._bindings]

    def local_parameters(self) -> Mapping[str, torch.Tensor]:
        return {b.shard.name: b.local_view() for b in self._bindings}

    def train_step(self, tokens: torch.Tensor, lr: float) -> StepResult:
        self._set_lr(lr)
        loss = self.forward_backward(tokens)
        ok, grad_norm = self._optimizer_step()
        n_tokens = tokens.shape[0] * (tokens.shape[1] - 1) * self._coords.layout.dp
        return StepResult(loss=loss, grad_norm=grad_norm, tokens=n_tokens, skipped=not ok)

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor) -> float:
        batches = make_batches(tokens, self.model_cfg.micro_batch, self.device)
        self.model.eval()
        outputs = self._run(batches, forward_only=True)
        return self._mean_loss(outputs)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.gpt.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "shape": self._shape.to_dict(),
            "layout": [self._coords.layout.tp, self._coords.layout.pp, self._coords.layout.dp],
        }
        if self.model_cfg.distributed_optimizer:
            state["optimizer_params"] = self.optimizer.get_parameter_state_dp_reshardable()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        lay = self._coords.layout
        if state.get("shape") != self._shape.to_dict() or list(state.get("layout", [])) != [
            lay.tp,
            lay.pp,
            lay.dp,
        ]:
            raise ModelConfigError(
                f"checkpoint is for shape {state.get('shape')} layout {state.get('layout')}, "
                f"this runtime is {self._shape.to_dict()} layout {[lay.tp, lay.pp, lay.dp]}"
            )
        self.gpt.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.model_cfg.distributed_optimizer and "optimizer_params" in state:
            self.optimizer.load_parameter_state_from_dp_reshardable(state["optimizer_params"])
        self.reload_params()

    # ---------------------------------------------------------------- beyond the protocol

    def forward_backward(self, tokens: torch.Tensor) -> float:
        """Zero the grads, run forward and backward over ``tokens`` (this DP rank's share) and
        reduce the grads over DP, without an optimizer step; returns the global mean loss.

        The reduced gradients are readable through :meth:`Binding.local_grad` until the next step.
        """
        batches = make_batches(tokens, self.model_cfg.micro_batch, self.device)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(batches, forward_only=False)
        return self._mean_loss(outputs)

    @torch.no_grad()
    def _init_global(self) -> None:
        """Initialise every parameter from ``(seed, global name, row block)`` alone.

        megatron draws initial weights from one generator in construction order, so a pipeline
        stage that does not build the embedding (or a GPU rank with its seed offsets) starts
        from other weights than a single process would. Drawing each block of 64 rows of every
        global tensor from its own seeded generator makes the initial model identical in every
        TP/PP/DP layout, and a rank draws only the row blocks its slice touches (never a whole
        72B embedding). Norm weights start at 1; ``linear_proj`` and ``linear_fc2`` use
        megatron's scaled std ``init_std / sqrt(2 * layers)``.
        """
        shape, seed = self._shape, self.model_cfg.seed
        for b in self._bindings:
            name, shard = b.shard.name, b.shard
            local = b.local_view()
            if name.endswith("layernorm.weight"):
                local.fill_(1.0)
                continue
            std = shape.init_std
            if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                std = std / math.sqrt(2.0 * shape.layers)
            lo, hi = shard.offsets[0], shard.offsets[0] + shard.local_shape[0]
            cols = tuple(
                slice(o, o + n)
                for o, n in zip(shard.offsets[1:], shard.local_shape[1:], strict=True)
            )
            for block in range(lo // _INIT_ROWS, (hi + _INIT_ROWS - 1) // _INIT_ROWS):
                r0 = block * _INIT_ROWS
                r1 = min(r0 + _INIT_ROWS, shard.global_shape[0])
                g = torch.Generator().manual_seed(_init_seed(seed, name, block))
                rows = torch.randn((r1 - r0, *shard.global_shape[1:]), generator=g) * std
                a, z = max(lo, r0), min(hi, r1)
                local[a - lo : z - lo].copy_(rows[(slice(a - r0, z - r0), *cols)])
        self.reload_params()

    def save_full_weights(self, path: str) -> None:
        """Collective: every rank writes the pieces it owns under ``path`` and rank 0 the index
        (:func:`covenant.models.weights.save_sharded`). ``covenant export`` reads this format."""
        from covenant.models.weights import save_sharded

        save_sharded(self, path)

    def load_full_weights(self, path: str) -> None:
        """Collective: read this rank's slices of the weights under ``path`` (any layout wrote
        them); a bad directory on any rank raises on every rank."""
        from covenant.models.weights import load_into, open_full_weights

        parallel.run_on_all(lambda: load_into(self, open_full_weights(path)))
        self.reload_params()

    def reload_params(self) -> None:
        """Call after writing parameters in place (outer step, full-weight load): refreshes the
        optimizer's fp32 master copies where the model holds bf16 parameters."""
        self.optimizer.reload_model_params()

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (b, T, vocab) in fp32, for checks and export parity (PP=1)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if self._coords.layout.pp != 1:
            raise StepError("logits() needs pp=1; use eval_loss under pipeline parallelism")
        self.model.eval()
        out = self.model(tokens.to(self.device, torch.int64), None, None)  # [b, s, V/tp]
        return gather_from_tensor_model_parallel_region(out.float()).float()

    def group(self, kind: str) -> Any:
        """The process group of ``kind`` (``tp``, ``pp``, ``dp``, ``world``); ``None`` alone."""
        if not dist.is_initialized() or self._coords.world == 1:
            return None
        from megatron.core import parallel_state as ps

        groups = {
            "tp": ps.get_tensor_model_parallel_group,
            "pp": ps.get_pipeline_model_parallel_group,
            "dp": ps.get_data_parallel_group,
            "world": lambda: dist.group.WORLD,
        }
        if kind not in groups:
            raise ValueError(f"unknown process group {kind!r} (tp, pp, dp, world)")
        return groups[kind]()

    def close(self) -> None:
        """Tear down megatron's groups (and the process group if :mod:`parallel` made it)."""
        parallel.teardown()

    # ---------------------------------------------------------------- internals

    def _run(self, batches: list[Batch], *, forward_only: bool) -> list[dict[str, Any]]:
        t = batches[0][0].shape[1]
        out = self._fwd_bwd(
            forward_step_func=_forward_step,
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=len(batches),
            seq_length=t,
            micro_batch_size=self.model_cfg.micro_batch,
            decoder_seq_length=t,
            forward_only=forward_only,
        )
        return list(out or [])

    def _set_lr(self, lr: float) -> None:
        if not math.isfinite(lr) or lr < 0:
            raise StepError(f"learning rate must be finite and >= 0, got {lr}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self.optim_cfg.weight_decay * group.get("wd_mult", 1.0)

    def _optimizer_step(self) -> tuple[bool, float]:
        """Clip on the global norm and step; skip (every rank alike) if the norm is not finite.

        The norm is all-reduced over TP x PP inside megatron and the grads are already DP-reduced,
        so every rank sees the same value and takes the same branch without another broadcast.
        """
        from megatron.core.optimizer import ChainedOptimizer, clip_grads

        opt = self.optimizer
        found_inf = opt.prepare_grads()
        grad_norm = float(opt.get_grad_norm())
        if found_inf or not math.isfinite(grad_norm):
            logger.warning("non-finite gradient norm %s: step skipped", grad_norm)
            opt.zero_grad()
            return False, grad_norm
        clip = self.optim_cfg.grad_clip
        subs = opt.chained_optimizers if isinstance(opt, ChainedOptimizer) else [opt]
        if clip > 0:
            for sub in subs:
                params = sub.get_parameters()
                if params:
                    clip_grads.clip_grad_by_total_norm_fp32(params, clip, grad_norm)
        ok = bool(opt.step_with_ready_grads())
        return ok, grad_norm

    def _mean_loss(self, outputs: list[dict[str, Any]]) -> float:
        """Mean micro-batch loss of the last stage, averaged over DP, equal on every rank."""
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self._coords.is_last_stage and outputs:
            acc[0] = torch.stack([o["loss"].double() for o in outputs]).mean()
            acc[1] = 1.0
        if self._coords.world > 1:
            # Every last-stage rank (all TP x DP) holds one DP mean; the TP copies are equal.
            dist.all_reduce(acc)
        return float(acc[0] / acc[1])


def build_runtime(model_cfg: ModelConfig, optim_cfg: OptimConfig | None = None) -> MegatronRuntime:
    """Build a :class:`MegatronRuntime` (process groups are created if none exist)."""
    cpu_compat.install()
    return MegatronRuntime(model_cfg, optim_cfg or OptimConfig())
