"""`covenant train` end to end on real text: falling loss, exact resume, refusing foreign checkpoints.

A small slice of big.txt is prepared once per session (vocab 512, T = 64) and the `tiny-2l`
preset trains on it through the real loop, the real megatron-core runtime and the real plugins.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from covenant.engine.checkpoint import CheckpointError
from covenant.engine.data.prepare import prepare

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(out, ["bigtxt"], vocab_size=512, seq_len=64, val_fraction=0.1, max_documents=40)
    return out


def overrides(data: Path, run_id: str, *extra: str) -> list[str]:
    return [
        f"run.id={run_id!r}".replace("'", '"'),
        f'data.dir="{data}"',
        "data.vocab_size=512",
        "data.seq_len=64",
        'model.preset="tiny-2l"',
        "model.vocab=512",
        "model.seq_len=64",
        "model.micro_batch=2",
        "train.batch_size=4",
        "train.inner_steps=5",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.cosine_steps=100",
        "train.eval_every=0",
        *extra,
    ]


def test_resume_is_bit_identical(covenant_engine, small_data: Path) -> None:  # type: ignore[no-untyped-def]
    straight = covenant_engine(
        enable=["model"],
        overrides=overrides(small_data, "straight", "train.steps=8", "train.checkpoint_every=4"),
    ).train()
    assert len(straight.losses) == 8

    first = covenant_engine(
        enable=["model"],
        overrides=overrides(small_data, "resumed", "train.steps=4", "train.checkpoint_every=4"),
    ).train()
    assert first.losses == straight.losses[:4]
    run = covenant_engine(
        enable=["model"],
        overrides=overrides(small_data, "resumed", "train.steps=8", "train.checkpoint_every=4"),
    )
    from covenant.engine.loop import run_training

    resumed = run_training(run.session, resume=True)
    assert resumed.losses == straight.losses[4:]  # exactly equal, not approximately
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step-000008"


def test_loss_falls_and_outputs_are_written(covenant_engine, small_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = covenant_engine(
        enable=["model", "jsonl", "wandb"],
        overrides=overrides(
            small_data,
            "falls",
            "train.steps=40",
            "train.eval_every=10",
            "train.eval_batches=4",
            "train.checkpoint_every=0",
            'wandb.mode="offline"',
        ),
    )
    result = run.train()
    vals = [result.val_losses[s] for s in sorted(result.val_losses)]
    assert sorted(result.val_losses) == [10, 20, 30, 40]
    assert all(b < a for a, b in itertools.pairwise(vals)), vals  # falls at every evaluation
    assert vals[-1] < math.log(512) - 0.8, vals  # well below the uniform guess
    lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x["kind"] == "train") == 40
    assert sum(1 for x in lines if x["kind"] == "eval") == 4
    assert sum(1 for x in lines if x["kind"] == "window") == 8
    assert list((run.run_dir / "wandb").glob("offline-run-*"))
    resolved = json.loads((run.run_dir / "resolved_config.json").read_text())
    assert resolved["config"]["model"]["preset"] == "tiny-2l" and "model" in resolved["versions"]
    assert run.called("covenant_window_end") and run.called("covenant_train_start")

    # the run directory exports to Hugging Face format through the real CLI
    out = run.run_dir.parent / "hf"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "covenant.engine.cli.main",
            "export",
            "--format",
            "hf",
            str(run.run_dir),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 512
    assert (out / "model.safetensors").stat().st_size > 0


def test_resume_refuses_another_preset_and_damages_nothing(
    covenant_engine, small_data: Path
) -> None:  # type: ignore[no-untyped-def]
    covenant_engine(
        enable=["model"],
        overrides=overrides(small_data, "foreign", "train.steps=2", "train.checkpoint_every=2"),
    ).train()
    run = covenant_engine(
        enable=["model"],
        overrides=overrides(small_data, "foreign", "train.steps=4", "model.layers=4"),
    )
    ckpt = run.run_dir / "checkpoints" / "step-000002"
    before = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    from covenant.engine.loop import run_training

    with pytest.raises(CheckpointError, match="another model preset/layout"):
        run_training(run.session, resume=True)
    assert {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


def test_sigterm_stops_like_ctrl_c(small_data: Path, tmp_path: Path) -> None:
    """A supervisor's SIGTERM (the swarm, torchrun, ``kill``) runs the loop's shutdown: the
    process says "interrupted" and exits 130, and the last saved checkpoint is whole."""
    import signal
    import time

    sets = overrides(small_data, "term", f'run.root="{tmp_path}"', "train.steps=100000")
    sets += ["train.checkpoint_every=5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "covenant.engine.cli.main", "train"]
        + [x for s in sets for x in ("--set", s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = tmp_path / "term" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not latest.is_file():
        time.sleep(0.5)
    time.sleep(1.0)  # in the middle of later steps
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert latest.is_file()
    # and the run resumes from it
    sets = [x for x in sets if not x.startswith("train.steps")] + ["train.steps=40"]
    res = subprocess.run(
        [sys.executable, "-m", "covenant.engine.cli.main", "train", "--resume"]
        + [x for s in sets for x in ("--set", s)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
