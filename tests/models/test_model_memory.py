"""Parameter counts equal the instantiated model's; the memory plan and ``model-info``."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from covenant.models import memory
from covenant.models.cli import model_info
from covenant.models.config import ModelConfig
from covenant.models.runtime import build_runtime


@pytest.mark.parametrize("preset", ["tiny-2l", "tiny"])
def test_counts_equal_the_instantiated_model(preset: str) -> None:
    cfg = ModelConfig(preset=preset)
    counts = memory.param_counts(cfg.resolve())
    rt = build_runtime(cfg)
    assert counts["params_total"] == sum(p.numel() for p in rt.gpt.parameters())
    emb = rt.gpt.embedding.word_embeddings.weight.numel() + rt.gpt.output_layer.weight.numel()
    assert counts["params_embedding"] == emb


def test_covenant_72b_is_about_72_7_billion_untied() -> None:
    counts = memory.param_counts(ModelConfig(preset="covenant-72b").resolve(), pp=8)
    assert counts["params_total"] == pytest.approx(72.7e9, rel=0.002)
    assert counts["params_total"] - counts["params_embedding"] / 2 == pytest.approx(
        70.6e9, rel=0.002
    )
    assert sum(counts["params_per_stage"]) == counts["params_total"]
    assert counts["params_per_stage"][0] > counts["params_per_stage"][1]  # embedding on stage 0


def test_plan_scales_with_layout() -> None:
    shape = ModelConfig(preset="templar-1b").resolve()
    one = memory.plan(shape, 1, 1, 1)
    tp2 = memory.plan(shape, 2, 1, 1)
    dist_opt = memory.plan(shape, 1, 1, 4, distributed_optimizer=True)
    assert tp2["per_rank_bytes"]["weights"] < one["per_rank_bytes"]["weights"]
    assert dist_opt["per_rank_bytes"]["optimizer"] == pytest.approx(
        one["per_rank_bytes"]["optimizer"] / 4, rel=1e-6
    )
    assert memory.fits(one, 80 * memory.GIB) and not memory.fits(one, 8 * memory.GIB)
    rb = one["per_rank_bytes"]
    assert rb["total"] == sum(v for k, v in rb.items() if k != "total")


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("model-info")(model_info)
    app.command("noop")(lambda: None)
    return app


def test_model_info_json() -> None:
    result = CliRunner().invoke(
        _app(), ["model-info", "--preset", "covenant-72b", "--tp", "8", "--pp", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params_total"] == 72_747_327_488
    assert {"params_total", "params_embedding", "per_rank_bytes"} <= set(data)
    assert len(data["params_per_stage"]) == 4


def test_model_info_local_backend_without_outer_state() -> None:
    base = ["model-info", "--preset", "templar-1b", "--micro-batch", "4", "--json"]
    te = json.loads(CliRunner().invoke(_app(), base).output)["per_rank_bytes"]
    args = [*base, "--backend", "local", "--attention", "unfused", "--no-outer-state"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    local = json.loads(result.output)["per_rank_bytes"]
    assert local["outer_snapshot"] == local["error_buffer"] == 0 < te["outer_snapshot"]
    assert local["activations"] > te["activations"]  # the unfused attention keeps its scores
    # The H200 measurement of this step (docs/BENCHMARKS.md) peaked at 49.2 GiB.
    assert local["total"] / memory.GIB == pytest.approx(49.2, rel=0.03)


def test_model_info_local_backend_with_sdpa_counts_no_scores() -> None:
    """SDPA on a GPU (flash / memory-efficient kernels) stores no score matrix: the local
    backend's default plan has the activations of a flash attention."""
    base = ["model-info", "--preset", "templar-1b", "--micro-batch", "4", "--json"]
    sdpa = json.loads(CliRunner().invoke(_app(), [*base, "--backend", "local"]).output)
    unfused = json.loads(
        CliRunner().invoke(_app(), [*base, "--backend", "local", "--attention", "unfused"]).output
    )
    assert sdpa["per_rank_bytes"]["activations"] < unfused["per_rank_bytes"]["activations"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--preset", "templar-1b", "--tp", "3"], "not divisible by tp=3"),
        (["--preset", "tiny", "--pp", "8"], "larger than the layer count"),
        (["--preset", "covenant-72b", "--tp", "8", "--gpu-gb", "80"], "per GPU, more than 80"),
        (["--preset", "nope"], "unknown preset"),
        (["--backend", "flash"], "unknown --backend"),
        (["--attention", "flash"], "unknown --attention"),
    ],
)
def test_model_info_bad_input_exits_2(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(_app(), ["model-info", *args])
    assert result.exit_code == 2
    assert fragment in result.output
