"""The jsonl consumer: one line per call, crash-safe, non-finite floats, torn lines."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _log_helpers import Run

from covenant.engine.errors import ConfigError
from covenant.plugins.logging import jsonl
from covenant.plugins.logging.jsonl import JsonlWriter, MetricsFileError, read_metrics, repair_tail


def test_hooks_write_one_line_per_call(make_run: Callable[..., Run]) -> None:
    run = make_run("jsonl")
    run.start()
    for step in range(3):
        run.log("train", step, loss=3.0 - step, lr=1e-4, tokens=4096)
    run.log("window", 0, contributors=2.0)
    run.log("eval", 2, val_loss=2.5, val_ppl=math.exp(2.5))
    run.shutdown()

    path = run.dir / "metrics.jsonl"
    raw = path.read_text().splitlines()
    assert len(raw) == 5
    assert json.loads(raw[0])["kind"] == "train"  # plain JSON, readable by anything
    records = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 0),
        ("train", 1),
        ("train", 2),
        ("window", 0),
        ("eval", 2),
    ]
    assert records[1]["loss"] == 2.0 and records[1]["tokens"] == 4096
    assert all(isinstance(r["time"], float) for r in records)
    assert [r["step"] for r in read_metrics(path, kinds=["train"])] == [0, 1, 2]


def test_non_finite_floats_are_strings_on_disk(make_run: Callable[..., Run]) -> None:
    run = make_run("jsonl")
    run.start()
    run.log("train", 0, loss=math.nan, grad_norm=math.inf, lr=-math.inf, name="x")
    run.shutdown()
    path = run.dir / "metrics.jsonl"
    line = path.read_text()
    assert '"loss":"nan"' in line and '"grad_norm":"inf"' in line and '"lr":"-inf"' in line
    record = read_metrics(path)[0]
    assert math.isnan(record["loss"]) and record["grad_norm"] == math.inf
    assert record["lr"] == -math.inf and record["name"] == "x"
    assert read_metrics(path, decode_nonfinite=False)[0]["loss"] == "nan"


def test_scalars_and_reserved_names(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path / "m.jsonl", clock=lambda: 12.5)
    writer.write(
        "score",
        4,
        {
            "score": np.float32(0.5),
            "uid": np.int64(7),
            "step": 99,
            "nested": {"a": np.float64(math.nan)},
        },
    )
    writer.close()
    record = read_metrics(tmp_path / "m.jsonl", decode_nonfinite=False)[0]
    assert record == {
        "kind": "score",
        "step": 4,
        "time": 12.5,
        "score": 0.5,
        "uid": 7,
        "metric_step": 99,
        "nested": {"a": "nan"},
    }


def test_append_mode_keeps_earlier_runs(make_run: Callable[..., Run]) -> None:
    for _ in range(2):
        run = make_run("jsonl")
        run.start()
        run.log("train", 0, loss=1.0)
        run.shutdown()
    assert len(read_metrics(run.dir / "metrics.jsonl")) == 2


def test_flush_every_and_fsync_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(jsonl.os, "fsync", lambda fd: synced.append(fd))
    path = tmp_path / "m.jsonl"
    writer = JsonlWriter(path, flush_every=3)
    writer.write("train", 0, {"loss": 1.0})
    writer.write("train", 1, {"loss": 1.0})
    assert path.read_text() == ""  # still in the write buffer
    writer.write("train", 2, {"loss": 1.0})
    assert len(path.read_text().splitlines()) == 3 and not synced
    writer.write("window", 0, {"n": 1.0})  # window lines go to disk at once
    assert len(path.read_text().splitlines()) == 4 and len(synced) == 1
    writer.write("train", 3, {"loss": 1.0})
    writer.close()
    assert len(path.read_text().splitlines()) == 5 and len(synced) == 2
    writer.close()  # idempotent


def test_reader_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"kind":"train","step":0,"time":1.0,"loss":2.0}\n{"kind":"train","st')
    assert [r["step"] for r in read_metrics(path)] == [0]


def test_reader_refuses_damage_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"kind":"train","step":0,"time":1.0}\n[1, 2]\n{"kind":"train","step":1,"time":2.0}\n'
    )
    with pytest.raises(MetricsFileError, match=r"m\.jsonl:2: damaged metrics line"):
        read_metrics(path)
    with pytest.raises(MetricsFileError, match="not found"):
        read_metrics(tmp_path / "missing.jsonl")


def test_writer_cuts_a_torn_tail_before_appending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"kind":"train","step":0,"time":1.0}\n{"kind":"tra')
    with caplog.at_level(logging.WARNING):
        writer = JsonlWriter(path)
    assert "torn last line (12 bytes)" in caplog.text
    writer.write("train", 1, {"loss": 1.0})
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
    assert path.read_text().count("\n") == 2


def test_complete_tail_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"kind":"train","step":0,"time":1.0}')
    assert repair_tail(path) == 0
    writer = JsonlWriter(path)
    writer.write("train", 1, {})
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1]


def test_repair_finds_a_newline_beyond_one_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl, "_TAIL_CHUNK", 8)
    path = tmp_path / "m.jsonl"
    path.write_text('{"kind":"train","step":0,"time":1.0}\n{"kind":"train","step":1,"ti')
    assert repair_tail(path) == len('{"kind":"train","step":1,"ti')
    assert path.read_text() == '{"kind":"train","step":0,"time":1.0}\n'


def test_config_file_name_is_a_plain_name(make_run: Callable[..., Run]) -> None:
    run = make_run("jsonl", overrides=["jsonl.file=custom.jsonl", "jsonl.flush_every=2"])
    run.start()
    run.log("train", 0, loss=1.0)
    run.shutdown()
    assert (run.dir / "custom.jsonl").exists()
    with pytest.raises(ConfigError, match=r"\[jsonl\] file"):
        make_run("jsonl", overrides=["jsonl.file='../escape.jsonl'"])


def test_only_rank_zero_writes(
    make_run: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    run = make_run("jsonl")
    run.start()
    run.log("train", 0, loss=1.0)
    run.shutdown()
    assert not (run.dir / "metrics.jsonl").exists()


def test_write_failure_is_contained(
    make_run: Callable[..., Run], caplog: pytest.LogCaptureFixture
) -> None:
    run = make_run("jsonl")
    run.start()
    run.log("train", 0, loss=1.0)

    class FullDisk:
        closed = False

        def write(self, _text: str) -> int:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            self.closed = True

    writer = jsonl._writer
    assert writer is not None
    real = writer._file
    real.close()
    writer._file = FullDisk()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING):
        run.log("train", 1, loss=1.0)  # must not raise
        run.log("train", 2, loss=1.0)
        run.shutdown()
    assert writer.disabled
    assert caplog.text.count("metrics consumer 'jsonl' failed") == 1
    assert [r["step"] for r in read_metrics(run.dir / "metrics.jsonl")] == [0]


def test_unwritable_run_dir_is_contained(
    make_run: Callable[..., Run], caplog: pytest.LogCaptureFixture
) -> None:
    run = make_run("jsonl")
    run.session.write_resolved()
    (run.dir / "metrics.jsonl").mkdir()  # a folder where the file should be
    with caplog.at_level(logging.WARNING):
        run.start()
        run.log("train", 0, loss=1.0)
        run.shutdown()
    assert "metrics consumer 'jsonl' could not start" in caplog.text
