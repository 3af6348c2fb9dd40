"""Golden whole windows: three peers, four windows of the real SparseLoCo outer step.

The swarm of ``tools/make_window_golden.py`` (real services on a manual-clock local chain,
signed uploads in memory stores fetched and verified through the Exchange, the ``sparseloco``
plugin's outer step with a step-wise alpha schedule, a tiny pure-torch model with a real AdamW
inner loop) runs here exactly as when the fixture was written; after every window the weights
must match ``golden/windows.json`` (sums, norms, position-weighted sums and selected values, to
a tolerance for CPU float math) and every peer must hold bit-identical weights.

Regenerate the fixture only on a deliberate change of the outer step's numerics (error
feedback, selection, quantiser, aggregation, alpha), and commit it:

    OMP_NUM_THREADS=1 .venv/bin/python tools/make_window_golden.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).parent / "golden" / "windows.json"


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_window_golden", ROOT / "tools/make_window_golden.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_window_golden"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return load_tool()


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def run(
    tool: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    torch.set_num_threads(1)
    return tool.run_windows(tmp_path_factory.mktemp("window-golden"))  # type: ignore[no-any-return]


def test_every_peer_applies_identical_weights_in_every_window(
    run: tuple[dict[str, Any], list[dict[str, torch.Tensor]]],
) -> None:
    result, weights = run
    assert len(result["windows"]) == len(weights) == result["settings"]["windows"]
    peers = result["settings"]["peers"]
    for i, w in enumerate(result["windows"]):
        assert w["identical"] and w["max_peer_divergence"] == 0.0, w["window"]
        assert w["applied"] == [1.0] * peers and w["peers"] == [float(peers)] * peers
        assert w["uploaded"] == [1.0] * peers
        assert w["reloads"] == [i + 1] * peers  # the optimizer's copy refreshed once a window
        assert w["outer_step"] == i
        assert all(bool(torch.isfinite(t).all()) for t in weights[i].values())
        if i:
            assert any(not torch.equal(weights[i][n], weights[i - 1][n]) for n in weights[i])


def test_windows_match_the_fixture(
    tool: ModuleType,
    golden: dict[str, Any],
    run: tuple[dict[str, Any], list[dict[str, torch.Tensor]]],
) -> None:
    result, weights = run
    assert golden["format"] == tool.FORMAT
    assert golden["settings"] == result["settings"], "the fixture was made with other settings"
    tol = golden["tolerance"]

    def close(got: float, want: float) -> bool:
        return math.isclose(got, want, rel_tol=tol["rtol"], abs_tol=tol["atol"])

    assert len(golden["windows"]) == len(result["windows"])
    for want, got, params in zip(golden["windows"], result["windows"], weights, strict=True):
        w = want["window"]
        assert got["window"] == w
        for key in ("outer_step", "alpha", "applied", "peers", "uploaded", "bytes_up"):
            assert got[key] == want[key], (w, key, got[key], want[key])
        assert close(got["loss"], want["loss"]), (w, got["loss"], want["loss"])
        assert set(params) == set(want["tensors"])
        for name, expected in want["tensors"].items():
            flat = params[name].detach().reshape(-1).double()
            sums = tool.checksums(flat)
            for key in ("sum", "norm", "weighted"):
                assert close(sums[key], expected[key]), (w, name, key, sums[key], expected[key])
            for pos, value in expected["values"].items():
                assert close(float(flat[int(pos)]), value), (w, name, pos, float(flat[int(pos)]))
