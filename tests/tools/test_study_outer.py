"""Smoke test of the convergence study's machinery (tools/study_outer.py): tiny-2l on a small
slice of big.txt, 2 peers, 1-2 windows, every method through the real outer steps, chain and
storage; the JSON's table, claims and plot are produced."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from covenant.engine.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"vocab": 512, "seq_len": 64, "max_documents": 40, "val_fraction": 0.1}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("study_outer", ROOT / "tools/study_outer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_outer"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study-data")
    prepare(
        out,
        ["bigtxt"],
        vocab_size=SMALL["vocab"],
        seq_len=SMALL["seq_len"],
        val_fraction=SMALL["val_fraction"],
        max_documents=SMALL["max_documents"],
    )
    return out


def settings(tool: ModuleType, data: Path, methods: tuple[str, ...], hs: tuple[int, ...]):  # type: ignore[no-untyped-def]
    return tool.StudySettings(
        preset="tiny-2l",
        peers=2,
        batch=2,
        micro_batch=2,
        steps=max(hs),
        hs=hs,
        methods=methods,
        eval_samples=16,
        eval_batch=8,
        data_dir=str(data),
        **SMALL,
    )


def check(result: dict, steps: int) -> dict:  # type: ignore[type-arg]
    runs = {(r["method"], r["H"]): r for r in result["runs"]}
    for (label, _h), run in runs.items():
        assert math.isfinite(run["final_val_loss"]), label
        assert run["tokens"] == result["tokens_per_method"], label
        assert run["curve"][0][1] == result["initial_val_loss"]
        if run["outer"] == "ddp":
            continue
        assert run["windows"] == run["applied_windows"] == steps // run["H"], label
        assert run["max_peer_divergence"] == 0.0, label  # peers apply identical updates
        assert all(w["uploaded"] == 2.0 and w["peers_gathered"] == 2.0 for w in run["window_log"])
        assert run["final_val_loss"] < result["initial_val_loss"], label
    json.dumps(result)  # JSON-ready
    return runs


def test_study_core_methods(small_data: Path, tmp_path: Path) -> None:
    tool = load_tool()
    s = settings(tool, small_data, ("ddp", "diloco", "sparseloco-k64"), (2,))  # one window
    result = tool.run_study(s, log=lambda _msg: None)
    assert result["tokens_per_method"] == 2 * 2 * 2 * 63
    runs = check(result, steps=2)
    dense = result["dense_fp32_bytes"]
    assert runs[("diloco", 2)]["bytes_per_peer_per_window"] == pytest.approx(dense, rel=0.01)
    assert runs[("sparseloco-k64", 2)]["bytes_per_peer_per_window"] < dense / 100
    assert runs[("ddp", None)]["bytes_per_peer_per_window"]["2"] == 2 * 0.5 * 2 * dense
    assert {row["method"] for row in result["table"]} == {"ddp", "diloco", "sparseloco-k64"}
    claim = result["claims"]["sparseloco-k64_at_or_below_diloco_H2"]
    assert claim["holds"] == (claim["loss_difference"] <= 0)
    path = tool.plot(result, tmp_path / "study.png")
    if path is not None:
        assert (tmp_path / "study.png").stat().st_size > 1000


def test_study_every_method(small_data: Path) -> None:
    tool = load_tool()
    s = settings(tool, small_data, tuple(tool.METHODS), (1, 2))
    result = tool.run_study(s, log=lambda _msg: None)
    runs = check(result, steps=2)
    assert {m for m, _h in runs} == set(tool.METHODS)
    k64 = runs[("sparseloco-k64", 2)]["bytes_per_peer_per_window"]
    assert runs[("sparseloco-k128", 2)]["bytes_per_peer_per_window"] > k64
    assert runs[("sparseloco-random-k", 2)]["bytes_per_peer_per_window"] == k64
    assert "sparseloco-no-ef_worse_than_sparseloco-k64_H1" in result["claims"]


def test_cli_writes_json(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tool = load_tool()
    out = tmp_path / "r.json"
    args = [
        "--preset", "tiny-2l", "--peers", "2", "--batch", "2", "--micro-batch", "2",
        "--steps", "2", "--hs", "1,2", "--methods", "ddp,sparseloco-k64",
        "--eval-samples", "8", "--eval-batch", "8", "--data-dir", str(small_data), "--vocab", "512",
        "--seq-len", "64", "--max-documents", "40", "--val-fraction", "0.1",
        "--out", str(out), "--no-plot",
    ]  # fmt: skip
    assert tool.main(args) == 0
    result = json.loads(out.read_text())
    assert [(r["method"], r["H"]) for r in result["runs"]] == [
        ("ddp", None),
        ("sparseloco-k64", 1),
        ("sparseloco-k64", 2),
    ]
    at = args.index("--steps") + 1
    with pytest.raises(SystemExit, match="multiple of every H"):
        tool.main([*args[:at], "3", *args[at + 1 :]])
