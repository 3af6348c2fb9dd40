"""The model on one CUDA GPU: bf16 steps on both layer specs, one FP8 step per recipe.

Marked ``gpu``; every test skips with its reason where there is no CUDA device, the TE tests
also where ``transformer_engine`` is missing, and each FP8 recipe where the installed TE or the
GPU cannot run it (the same rules :func:`covenant.models.spec.fp8_settings` enforces at start-up:
``delayed`` TE >= 1.0, ``tensorwise`` >= 2.2, ``blockwise`` >= 2.3, ``mxfp8`` >= 2.1 and a
Blackwell GPU; any FP8 needs compute capability >= 8.9). Each test builds the ``tiny`` preset in
a world of one, takes optimizer steps on a fixed batch and checks that the loss is finite and
starts near ``log(vocab)``, that the step was not skipped, and that every parameter moved.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch

from covenant.models.config import ModelConfig, ModelConfigError
from covenant.models.runtime import MegatronRuntime, build_runtime
from covenant.models.spec import FP8_RECIPE_MIN_TE, fp8_settings, te_version

HAS_CUDA = torch.cuda.is_available()
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
#: FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
    ),
]
needs_te = pytest.mark.skipif(
    not HAS_TE, reason="needs Transformer Engine (transformer_engine is not importable)"
)

#: The ``tiny`` preset (4 layers, hidden 256, vocab 8192, T = 128): every FP8 GEMM dimension is a
#: multiple of 32, as mxfp8/blockwise need. Two micro-batches per step.
MODEL: dict[str, Any] = {"preset": "tiny", "micro_batch": 2, "seed": 11}
#: Large enough that every bf16 parameter moves within three steps: a norm weight at 1.0 has a
#: bf16 spacing of 2**-7 above it, so AdamW's ~lr-sized steps of 1e-3 can leave a whole tensor
#: rounding back to 1.0 (seen on an H200) while the fp32 master copy has moved.
BATCH, STEPS, LR = 4, 3, 1e-2


def _batch(vocab: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(5))


def _train_and_check(**overrides: Any) -> MegatronRuntime:
    rt = build_runtime(ModelConfig(**MODEL, **overrides))
    assert rt.device.type == "cuda"
    params = rt.local_parameters()
    before = {name: p.detach().float().clone() for name, p in params.items()}
    tokens = _batch(rt.shape.vocab, rt.shape.seq_len)
    losses = []
    for _ in range(STEPS):
        out = rt.train_step(tokens, LR)
        assert not out.skipped, f"step skipped (grad norm {out.grad_norm})"
        assert math.isfinite(out.loss) and math.isfinite(out.grad_norm) and out.grad_norm > 0
        losses.append(out.loss)
    # A fresh model predicts about uniformly; the same batch three times must get easier.
    assert losses[0] == pytest.approx(math.log(rt.shape.vocab), rel=0.05), losses
    assert min(losses[1:]) < losses[0], losses  # lr 1e-2 (to move bf16 norms) may overshoot late
    unchanged = [
        n for n, p in rt.local_parameters().items() if torch.equal(p.detach().float(), before[n])
    ]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert math.isfinite(rt.eval_loss(tokens))
    return rt


def test_local_spec_bf16_step() -> None:
    rt = _train_and_check(backend="local", precision="bf16")
    assert rt.choice.backend == "local" and rt.choice.precision == "bf16"
    assert all(p.dtype == torch.bfloat16 for p in rt.gpt.parameters())


@needs_te
def test_te_spec_bf16_step() -> None:
    rt = _train_and_check(backend="te", precision="bf16")
    assert rt.choice.backend == "te" and rt.choice.precision == "bf16"
    # The TE spec fuses the pre-attention norm into the QKV projection.
    names = {n for n, _ in rt.gpt.named_parameters()}
    assert any("linear_qkv.layer_norm_weight" in n for n in names), sorted(names)[:8]


@needs_te
def test_te_and_local_specs_agree_on_the_same_weights() -> None:
    """Same global weights, same batch: the two specs compute the same loss (to bf16 rounding)."""
    from covenant.models.layout import gather_full_state, load_full_state

    local = build_runtime(ModelConfig(**MODEL, backend="local", precision="bf16"))
    tokens = _batch(local.shape.vocab, local.shape.seq_len)
    want = local.eval_loss(tokens)
    full = gather_full_state(local)
    assert full is not None  # a world of one: this is rank 0
    local.close()
    te = build_runtime(ModelConfig(**MODEL, backend="te", precision="bf16"))
    load_full_state(te, full)
    assert te.eval_loss(tokens) == pytest.approx(want, abs=2e-2)


def _fp8_skip_reason(recipe: str) -> str | None:
    cc = torch.cuda.get_device_capability()
    if cc < FP8_MIN_COMPUTE_CAPABILITY:
        return f"FP8 needs compute capability >= {FP8_MIN_COMPUTE_CAPABILITY}, this GPU is {cc}"
    try:
        fp8_settings("fp8", recipe, "te", te_ver=te_version(), compute_capability=cc)
    except ModelConfigError as exc:
        return str(exc)
    return None


@needs_te
@pytest.mark.parametrize("recipe", sorted(FP8_RECIPE_MIN_TE))
def test_te_fp8_step(recipe: str) -> None:
    reason = _fp8_skip_reason(recipe)
    if reason is not None:
        pytest.skip(f"fp8_recipe={recipe!r} unsupported here: {reason}")
    rt = _train_and_check(backend="te", precision="fp8", fp8_recipe=recipe)
    assert rt.choice.precision == "fp8" and rt.tf_config.fp8_recipe == recipe
