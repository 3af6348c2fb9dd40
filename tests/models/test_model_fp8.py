"""Native FP8 linears (``models/fp8.py``: tensorwise current scaling through
``torch._scaled_mm``), checked on this CPU where ``_scaled_mm`` runs the same FP8 arithmetic.

* one layer: the FP8 forward and both backward products against fp32 matmuls, within FP8's
  precision (e4m3 has 3 mantissa bits, e5m2 2), scales that map each tensor's amax onto the
  format's largest value, nothing non-finite for an all-zero input;
* the whole model (tiny-2l, GQA) with the four large linears of every layer in FP8: the loss and
  the gradients of a forward/backward stay close to the fp32 model's (same weights, same batch)
  with TP=1 in this process and with TP=2 and PP=2 on two gloo processes (the column-parallel
  input-gradient all-reduce runs inside the FP8 matmul's backward).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from covenant.models.config import ModelConfig
from covenant.models.fp8 import E4M3, E4M3_MAX, E5M2, E5M2_MAX, float8_linear, to_fp8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_scales_map_amax_onto_the_format_range() -> None:
    t = torch.tensor([0.5, -2.0, 1.0])
    t8, inv = to_fp8(t, E4M3)
    assert t8.dtype == E4M3 and float(t8.float().abs().max()) == E4M3_MAX
    assert float(inv) == pytest.approx(2.0 / E4M3_MAX)
    g8, ginv = to_fp8(t * 1e-6, E5M2)
    assert float(g8.float().abs().max()) == E5M2_MAX
    torch.testing.assert_close(g8.float() * ginv, t * 1e-6, rtol=0.13, atol=0)
    z8, zinv = to_fp8(torch.zeros(4, 4), E4M3)
    assert bool(torch.isfinite(z8.float()).all()) and bool(torch.isfinite(zinv))


def test_one_fp8_linear_against_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 64, generator=g, requires_grad=True)
    w = torch.randn(96, 64, generator=g, requires_grad=True)
    dy = torch.randn(4, 8, 96, generator=g)
    y = float8_linear(x, w)
    y.backward(dy)
    assert y.shape == (4, 8, 96) and x.grad is not None and w.grad is not None
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = xr @ wr.t()
    yr.backward(dy)
    assert _rel(y.detach(), yr.detach()) < 0.06  # e4m3 x e4m3
    assert _rel(x.grad, xr.grad) < 0.09  # e5m2 x e4m3
    assert _rel(w.grad, wr.grad) < 0.09
    assert _rel(y.detach(), yr.detach()) > 0  # it really ran in FP8
    zero = float8_linear(torch.zeros(2, 64), w.detach())
    assert bool(torch.isfinite(zero).all()) and float(zero.abs().max()) == 0.0


def test_sequence_parallel_is_refused() -> None:
    with pytest.raises(ValueError, match="sequence parallelism"):
        float8_linear(torch.ones(2, 64), torch.ones(64, 64), sequence_parallel=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_model_kwargs: dict[str, Any]) -> Any:
    from covenant.models.runtime import build_runtime

    root = tmp_path_factory.mktemp("fp8")
    model = {**tiny_model_kwargs, "heads": 4, "kv_heads": 2, "dim_multiple": 32}
    rt = build_runtime(ModelConfig(**model))
    rt.save_full_weights(str(root / "weights"))
    tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(5))
    save_file({"tokens": tokens}, str(root / "tokens.safetensors"))
    return {
        "model": model,
        "optim": {"grad_clip": 0.5, "eps": 1e-3},
        "weights": str(root / "weights"),
        "saved": str(root / "saved"),
        "tokens": str(root / "tokens.safetensors"),
        "lr": 1e-2,
        "root": str(root),
    }


@pytest.fixture(scope="module")
def reference(job: dict[str, Any], dist_worker: ModuleType) -> dict[str, Any]:
    out = dist_worker.run_layout({**job, "saved": job["saved"] + "/fp32"}, 1, 1, 1)
    assert out is not None
    return out


def _assert_fp8_close(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert got["fb_loss"] == pytest.approx(ref["fb_loss"], rel=2e-3)
    assert got["fb_loss"] != ref["fb_loss"]  # the FP8 linears were used
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=0.05)
    for name, g in ref["grads"].items():
        cos = torch.nn.functional.cosine_similarity(
            got["grads"][name].flatten().double(), g.flatten().double(), dim=0
        )
        assert float(cos) > 0.99, (name, float(cos))


def test_fp8_model_stays_close_to_fp32_in_one_process(
    job: dict[str, Any], dist_worker: ModuleType, reference: dict[str, Any]
) -> None:
    import covenant.models.runtime as runtime_mod

    before = runtime_mod.layer_spec
    try:
        got = dist_worker.run_layout(
            {**job, "fp8_linears": True, "saved": job["saved"] + "/fp8"}, 1, 1, 1
        )
    finally:
        runtime_mod.layer_spec = before
    assert got is not None
    _assert_fp8_close(got, reference)


def test_fp8_model_under_tp2_and_pp2(
    job: dict[str, Any], dist_worker: ModuleType, reference: dict[str, Any]
) -> None:
    root = Path(job["root"]) / "launch"
    root.mkdir()
    fp8 = {**job, "fp8_linears": True, "layouts": [(2, 1, 1, False), (1, 2, 1, False)]}
    dist_worker.launch({k: v for k, v in fp8.items() if k != "root"}, world=2, workdir=root)
    results = torch.load(root / "results.pt", weights_only=True)  # our own local test output
    for layout in ("tp2_pp1_dp1", "tp1_pp2_dp1"):
        _assert_fp8_close(results[layout], reference)
