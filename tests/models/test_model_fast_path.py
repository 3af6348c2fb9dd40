"""The fast path of the local spec against megatron's plain one: SDPA core attention
(``[model] attention = "sdpa"``) and the fusions that need no apex or Transformer Engine
(``[model] fusions = ["swiglu"]``; ``"cross_entropy"`` is refused in fp32, see below).

Same weights, same batch: the loss and every gathered gradient of a forward/backward, and the
weights after one AdamW step, match the plain TP=1 reference to float rounding: each change
alone with TP=1 in this process, and all of them together with TP=2 and PP=2 on two gloo
processes. The model has grouped-query
attention (4 heads, 2 KV groups; under TP=2 each rank holds 2 heads and 1 group), so SDPA's
``enable_gqa`` is exercised against megatron's ``repeat_interleave``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from covenant.models.config import ModelConfig, ModelConfigError
from covenant.models.spec import choose, layer_spec, resolve_attention

LR = 1e-2


@pytest.fixture(scope="module")
def gqa_kwargs(tiny_model_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**tiny_model_kwargs, "heads": 4, "kv_heads": 2, "dim_multiple": 32}


@pytest.fixture(scope="module")
def job(
    tmp_path_factory: pytest.TempPathFactory, gqa_kwargs: dict[str, Any], tiny_batch: torch.Tensor
) -> dict[str, Any]:
    from covenant.models.runtime import build_runtime

    root = tmp_path_factory.mktemp("attention")
    rt = build_runtime(ModelConfig(**gqa_kwargs, attention="unfused"))
    rt.save_full_weights(str(root / "weights"))
    save_file({"tokens": tiny_batch}, str(root / "tokens.safetensors"))
    return {
        "model": gqa_kwargs,
        "optim": {"grad_clip": 0.5, "eps": 1e-3},
        "weights": str(root / "weights"),
        "saved": str(root / "saved"),
        "tokens": str(root / "tokens.safetensors"),
        "lr": LR,
        "root": str(root),
    }


def _with(
    job: dict[str, Any], attention: str, fusions: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    model = {**job["model"], "attention": attention, "fusions": fusions or []}
    return {**job, "model": model, **extra}


@pytest.fixture(scope="module")
def unfused(job: dict[str, Any], dist_worker: ModuleType) -> dict[str, Any]:
    out = dist_worker.run_layout(_with(job, "unfused", saved=job["saved"] + "/unfused"), 1, 1, 1)
    assert out is not None
    return out


def _assert_close(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert got["fb_loss"] == pytest.approx(ref["fb_loss"], rel=1e-6)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert set(got["grads"]) == set(ref["grads"])
    attn = [n for n in ref["grads"] if "linear_qkv" in n]
    assert attn and all(float(ref["grads"][n].abs().sum()) > 0 for n in attn)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_sdpa_matches_unfused_in_one_process(
    job: dict[str, Any], dist_worker: ModuleType, unfused: dict[str, Any]
) -> None:
    got = dist_worker.run_layout(_with(job, "sdpa", saved=job["saved"] + "/sdpa"), 1, 1, 1)
    assert got is not None
    _assert_close(got, unfused)
    # it really is another code path: not bit-identical everywhere
    assert any(not torch.equal(got["grads"][n], g) for n, g in unfused["grads"].items())


def test_the_swiglu_fusion_matches_the_plain_path_in_one_process(
    job: dict[str, Any], dist_worker: ModuleType, unfused: dict[str, Any]
) -> None:
    saved = job["saved"] + "/swiglu"
    got = dist_worker.run_layout(_with(job, "unfused", ["swiglu"], saved=saved), 1, 1, 1)
    assert got is not None
    _assert_close(got, unfused)


def test_the_fused_cross_entropy_is_refused_in_fp32() -> None:
    """megatron's native fused cross-entropy casts the logits gradient to bf16: measured here
    it changed every gradient of an fp32 run by ~0.1 % (same loss). A clear error, not a silent
    change of numerics."""
    with pytest.raises(ModelConfigError, match="needs precision bf16 or fp8"):
        choose(ModelConfig(preset="tiny-2l", fusions=["cross_entropy"]))


def test_the_fast_path_under_tp2_and_pp2_matches_the_plain_tp1(
    job: dict[str, Any], dist_worker: ModuleType, unfused: dict[str, Any]
) -> None:
    root = Path(job["root"]) / "launch"
    root.mkdir()
    fast = ["swiglu"]
    sdpa = _with(job, "sdpa", fast, layouts=[(2, 1, 1, False), (1, 2, 1, False)])
    dist_worker.launch({k: v for k, v in sdpa.items() if k != "root"}, world=2, workdir=root)
    results = torch.load(root / "results.pt", weights_only=True)  # our own local test output
    for layout in ("tp2_pp1_dp1", "tp1_pp2_dp1"):
        _assert_close(results[layout], unfused)


def test_the_spec_swaps_only_the_core_attention() -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from covenant.models.attention import SDPAttention

    plain = layer_spec("local", "unfused")
    fast = layer_spec("local", "sdpa")
    assert plain.submodules.self_attention.submodules.core_attention is DotProductAttention
    assert fast.submodules.self_attention.submodules.core_attention is SDPAttention
    assert fast.submodules.mlp == plain.submodules.mlp


def test_attention_choice() -> None:
    assert resolve_attention("auto", "local", cuda=True) == "sdpa"
    assert resolve_attention("auto", "local", cuda=False) == "unfused"
    assert resolve_attention("sdpa", "local", cuda=False) == "sdpa"  # the math kernel
    assert resolve_attention("auto", "te", cuda=True) == "te"
    with pytest.raises(ModelConfigError, match="applies to backend='local'"):
        resolve_attention("sdpa", "te", cuda=True)
    with pytest.raises(ModelConfigError, match="unknown attention"):
        resolve_attention("flash", "local")
    assert choose(ModelConfig(preset="tiny-2l", attention="sdpa")).attention == "sdpa"
    auto = choose(ModelConfig(preset="tiny-2l"))
    assert auto.attention == "unfused"  # this CPU machine
    assert "attention auto -> unfused (no CUDA GPU" in auto.why
    assert "backend auto -> local (no CUDA GPU" in auto.why
    assert (
        choose(
            ModelConfig(preset="tiny-2l", backend="local", precision="fp32", attention="sdpa")
        ).why
        == "as configured"
    )
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(preset="tiny-2l", attention="flash")  # type: ignore[arg-type]
