"""``covenant data prepare`` / ``inspect`` through typer's test runner: output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from data_testutil import snapshot
from typer.testing import CliRunner

from covenant.engine.cli.data import app
from covenant.engine.data.shards import Manifest

runner = CliRunner()


def test_prepare_json_then_cached(tmp_path: Path) -> None:
    args = [
        "prepare",
        "--out",
        str(tmp_path),
        "--vocab",
        "300",
        "--seq-len",
        "32",
        "--max-docs",
        "30",
        "--val-fraction",
        "0.1",
        "--json",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["vocab_size"] == 300 and summary["seq_len"] == 32
    assert summary["documents"] == 30 and summary["train_samples"] > 0
    before = snapshot(tmp_path)
    res = runner.invoke(app, args[:-1])  # rich table this time, and a cache hit
    assert res.exit_code == 0, res.output
    assert "train" in res.stdout and "samples" in res.stdout
    assert snapshot(tmp_path) == before


def test_inspect_prints_summary_and_decoded_sample(small_data: tuple[Path, Manifest]) -> None:
    folder, m = small_data
    res = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["tokenizer_sha256"] == m.tokenizer.sha256
    assert len(out["sample_ids"]) == m.seq_len
    assert out["sample_text"].startswith("(Additional editing")
    res = runner.invoke(app, ["inspect", str(folder)])
    assert res.exit_code == 0 and "Additional editing" in res.stdout


def test_bad_input_exits_2_with_one_clear_line(data_copy: Path, tmp_path: Path) -> None:
    shard = data_copy / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    before = snapshot(data_copy)
    res = runner.invoke(app, ["inspect", str(data_copy)])
    assert res.exit_code == 2
    assert "error:" in res.stderr and "train-00000.bin is truncated" in res.stderr
    assert snapshot(data_copy) == before

    res = runner.invoke(app, ["prepare", "--out", str(tmp_path / "x"), "--source", "nope.jsonl"])
    assert res.exit_code == 2
    assert "nope.jsonl" in res.stderr and "Traceback" not in res.output

    res = runner.invoke(app, ["prepare", "--out", str(tmp_path / "y"), "--vocab", "10"])
    assert res.exit_code == 2 and "vocab_size" in res.stderr
