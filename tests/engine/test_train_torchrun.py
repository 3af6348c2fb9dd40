"""`covenant train` under torchrun: the same command trains with TP=2 (and PP=2) on CPU/gloo.

Each test launches the real CLI in fresh processes (``python -m torch.distributed.run
--standalone --nproc-per-node 2 -m covenant.engine.cli.main train ...``) on a small slice of
big.txt (vocab 512, T = 64, the ``tiny-2l`` preset) and compares the loss written to
``metrics.jsonl`` with a single-process run of the same settings. Tensor parallelism on CPU
initialises each full weight on every rank before slicing it, so TP=2 must reproduce TP=1's
losses to float rounding. Slow (each launch imports megatron in two processes): ``-m slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covenant.engine.data.prepare import prepare

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

STEPS = 6
#: Losses of the same run under another layout agree to float rounding (reduction order).
TOLERANCE = 1e-5
LAUNCH_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(out, ["bigtxt"], vocab_size=512, seq_len=64, val_fraction=0.1, max_documents=40)
    return out


def _overrides(data: Path, root: Path, run_id: str, *extra: str) -> list[str]:
    sets = [
        'plugins.enable=["model", "jsonl", "wandb"]',
        'wandb.mode="disabled"',  # configs/tiny.toml has a [wandb] section: keep it loaded, off
        f"run.root={json.dumps(str(root))}",
        f"run.id={json.dumps(run_id)}",
        f"data.dir={json.dumps(str(data))}",
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
        f"train.steps={STEPS}",
        "train.checkpoint_every=3",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def _train(args: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``covenant train --config tiny ARGS``, under torchrun when ``nproc > 1``."""
    cli = ["-m", "covenant.engine.cli.main", "train", "--config", "tiny", *args]
    if nproc > 1:
        # --standalone picks a free rendezvous port: no clash with other torchrun jobs here.
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *cli,
        ]
    else:
        cmd = [sys.executable, *cli]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(x["loss"]) for x in lines if x["kind"] == "train"]


def _assert_checkpoint(run_dir: Path, ranks: int) -> None:
    root = run_dir / "checkpoints"
    latest = (root / "latest").read_text().strip()
    assert latest == f"step-{STEPS:06d}"
    files = sorted(p.name for p in (root / latest).iterdir())
    assert files == ["meta.json", *(f"rank-{r:05d}.pt" for r in range(ranks)), "weights"], files
    # each rank wrote its own pieces of the full weights; rank 0 the layout-independent index
    assert sorted(p.name for p in (root / latest / "weights").iterdir()) == [
        "covenant_model.json",
        *(f"shard-{r:05d}.safetensors" for r in range(ranks)),
    ]
    meta = json.loads((root / latest / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == ranks
    assert not list(root.glob(".tmp-*")), "a temporary checkpoint folder was left behind"


@pytest.fixture(scope="module")
def reference(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The single-process (TP=1, PP=1) losses of the shared settings."""
    root = tmp_path_factory.mktemp("runs")
    _train(_overrides(small_data, root, "ref"), 1, root)
    losses = _losses(root / "ref")
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses  # it trains
    return losses


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(
        abs(a - b) <= TOLERANCE for a, b in zip(got, want, strict=True)
    )


def test_tp2_under_torchrun_matches_single_process(
    small_data: Path, reference: list[float], tmp_path: Path
) -> None:
    _train(_overrides(small_data, tmp_path, "tp2", "model.tp=2"), 2, tmp_path)
    run_dir = tmp_path / "tp2"
    got = _losses(run_dir)
    assert _close(got, reference), (got, reference)
    _assert_checkpoint(run_dir, ranks=2)
    resolved = json.loads((run_dir / "resolved_config.json").read_text())
    assert resolved["config"]["model"]["tp"] == 2


@pytest.fixture(scope="module")
def pp2_run(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs-pp2")
    _train(_overrides(small_data, root, "pp2", "model.pp=2"), 2, root)
    return root / "pp2"


def test_pp2_under_torchrun_runs_and_checkpoints(pp2_run: Path) -> None:
    got = _losses(pp2_run)
    assert len(got) == STEPS and all(math.isfinite(x) for x in got)
    assert abs(got[0] - math.log(512)) < 0.5, got  # starts near the uniform guess
    assert got[-1] < got[0], got
    _assert_checkpoint(pp2_run, ranks=2)
    # compared with the single-process losses in the next test


def test_pp2_losses_match_single_process(pp2_run: Path, reference: list[float]) -> None:
    got = _losses(pp2_run)
    assert _close(got, reference), (got, reference)


def test_pp2_run_exports_to_hf_through_the_cli(pp2_run: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "hf"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "covenant.engine.cli.main",
            "export",
            str(pp2_run),
            str(out),
            "--dtype",
            "bf16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype.is_floating_point
    assert len(names) == 2 * 9 + 3 and "lm_head.weight" in names  # both stages' tensors
