"""Smoke test of tools/bench_window.py: one window of a tiny-2l miner against synthetic peers,
both outer steps, every phase timed and the 72B projection computed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from covenant.engine.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-data")
    prepare(out, ["bigtxt"], vocab_size=512, seq_len=64, val_fraction=0.1, max_documents=40)
    return out


@pytest.mark.parametrize("outer", ["sparseloco", "diloco"])
def test_one_window(outer: str, small_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location("bench_window", ROOT / "tools/bench_window.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = [
        "--preset", "tiny-2l", "--outer", outer, "--peers", "3", "--windows", "1",
        "--measure-steps", "1", "--inner-steps", "4", "--batch", "2", "--micro-batch", "2",
        "--data-dir", str(small_data), "--vocab", "512", "--seq-len", "64",
        "--max-documents", "40", "--val-fraction", "0.1",
    ]  # fmt: skip
    assert tool.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["peers_aggregated"] == 3.0
    assert set(result["outer_s"]) == {
        "snapshot", "encode", "pack", "upload", "fetch_validate", "aggregate_apply", "sync_sample"
    }  # fmt: skip
    assert all(v >= 0 for v in result["outer_s"].values())
    assert result["bytes"]["download"] == 3 * result["bytes"]["payload"]
    p72 = result["projection_covenant_72b"]
    assert p72["params"] == 72_747_327_488
    if outer == "sparseloco":
        assert 1.3e9 < p72["payload_bytes"] < 1.5e9  # ~0.156 bits per parameter
        assert "h200_s_per_rank" in p72
    else:
        assert p72["payload_bytes"] > 4 * p72["params"]
        assert "h200_s_per_rank" not in p72
