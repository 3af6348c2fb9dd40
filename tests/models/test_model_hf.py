"""Weights users can use elsewhere: the HF export loads into transformers with the same logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from covenant.models.config import ModelConfig
from covenant.models.hf import INDEX_FILE, WEIGHTS_FILE, export_hf, from_hf, to_hf
from covenant.models.layout import gather_full_state
from covenant.models.runtime import build_runtime
from covenant.models.weights import (
    WeightsError,
    load_full_weights,
    open_full_weights,
    save_full_weights,
)

transformers = pytest.importorskip("transformers")

# GQA (4 query heads over 2 key/value heads) so the QKV reshuffle is really exercised.
GQA: dict[str, Any] = {"preset": "tiny", "layers": 2, "vocab": 512, "seed": 11}


@pytest.fixture(scope="module")
def trained() -> tuple[Any, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    rt = build_runtime(ModelConfig(**GQA))
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # move away from the init so every tensor matters
        rt.train_step(tokens, 1e-2)
    full = gather_full_state(rt)
    assert full is not None
    return rt.shape, tokens, rt.logits(tokens), full


def _hf_logits(out_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(str(out_dir), torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def test_exported_weights_give_megatrons_logits_in_transformers(
    trained: Any, tmp_path: Path
) -> None:
    shape, tokens, logits, full = trained
    export_hf(full, shape, tmp_path)
    hf = _hf_logits(tmp_path, tokens)
    assert hf.shape == logits.shape == (2, 48, 512)
    torch.testing.assert_close(hf, logits, rtol=1e-4, atol=1e-4)


def test_hf_round_trip_is_exact(trained: Any) -> None:
    shape, _, _, full = trained
    back = from_hf(to_hf(full, shape), shape)
    assert set(back) == set(full)
    for name, t in full.items():
        assert torch.equal(back[name], t), name


def test_export_cli_from_full_weights_dir(trained: Any, tmp_path: Path) -> None:
    from covenant.models.cli import export

    shape, tokens, logits, full = trained
    run = tmp_path / "run" / "weights" / "step-2"
    save_full_weights(full, shape, run)
    app = typer.Typer()
    app.command()(export)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", tokens), logits, rtol=1e-4, atol=1e-4)
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a directory" in bad.output


def test_full_weights_round_trip_and_bad_index(trained: Any, tmp_path: Path) -> None:
    shape, _, _, full = trained
    save_full_weights(full, shape, tmp_path)
    loaded, shape2 = load_full_weights(tmp_path)
    assert shape2 == shape and all(torch.equal(loaded[k], full[k]) for k in full)
    (tmp_path / "covenant_model.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match="JSON object"):
        load_full_weights(tmp_path)


def test_streaming_export_splits_files_and_transformers_loads_them(
    trained: Any, tmp_path: Path
) -> None:
    shape, tokens, logits, full = trained
    src = tmp_path / "weights"
    save_full_weights(full, shape, src)
    out = tmp_path / "hf"
    out.mkdir()
    (out / WEIGHTS_FILE).write_bytes(b"stale single-file export")  # replaced, not left behind
    weights = open_full_weights(src)
    largest = max(t.numel() * 4 for t in full.values())
    export_hf(weights, shape, out, max_shard_bytes=largest)
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 2 and not (out / WEIGHTS_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in full.values())
    torch.testing.assert_close(_hf_logits(out, tokens), logits, rtol=1e-4, atol=1e-4)


def test_to_hf_rejects_wrong_shapes(trained: Any) -> None:
    shape, _, _, full = trained
    broken = dict(full)
    broken["output_layer.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match=r"output_layer\.weight: shape"):
        to_hf(broken, shape)
