"""``tools/bench_gpu.py --dry-run``: the device script's configuration is checked on a CPU first
(the flags reach megatron's config and the layer spec), and bad combinations exit with a clear
error before any device time is spent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def test_dry_run_resolves_the_fast_path() -> None:
    res = _run("--dry-run", "--backend", "local", "--fusions", "swiglu", "cross_entropy")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout.strip().splitlines()[-1])
    assert plan["attention"] == "sdpa"  # the default of the local backend
    assert plan["core_attention"].endswith(".SDPAttention")
    assert plan["fusions"] == {"bias_activation_fusion": True, "cross_entropy_loss_fusion": True}
    plain = json.loads(
        _run("--dry-run", "--backend", "local", "--attention", "unfused").stdout.splitlines()[-1]
    )
    assert plain["core_attention"].endswith("DotProductAttention")
    assert not any(plain["fusions"].values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "te", "--attention", "sdpa", "--dry-run"], "applies to --backend local"),
        (["--backend", "local", "--precision", "fp8", "--dry-run"], "needs Transformer Engine"),
        (["--backend", "local", "--precision", "fp8", "--fp8-recipe", "mxfp8"], "tensorwise"),
        (["--backend", "local"], "needs a CUDA GPU"),
    ],
)
def test_bad_combinations_exit_with_the_reason(args: list[str], message: str) -> None:
    res = _run(*args)
    assert res.returncode != 0 and message in res.stderr


def test_dry_run_of_native_fp8() -> None:
    res = _run(
        "--dry-run", "--backend", "local", "--precision", "fp8", "--fp8-recipe", "tensorwise"
    )
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout.strip().splitlines()[-1])
    assert plan["precision"] == "fp8" and plan["linear_fc1"] == "Float8ColumnParallelLinear"
