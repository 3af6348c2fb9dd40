"""TP=2, PP=2 and DP=2 (also with the distributed optimizer) on two gloo processes match one process on the same weights and batch.

One launch runs the three layouts in sequence (imports dominate the cost); the reference runs in
this process. Each comparison covers the loss and gathered gradients of a forward/backward, and
the loss, global grad norm and gathered weights after one AdamW step with clipping.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

LAYOUTS = [(2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, False), (1, 1, 2, True)]
LR = 1e-2


@pytest.fixture(scope="module")
def job(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_kwargs: dict[str, Any],
    tiny_batch: torch.Tensor,
) -> dict[str, Any]:
    from covenant.models.config import ModelConfig
    from covenant.models.runtime import build_runtime

    root = tmp_path_factory.mktemp("parallel")
    rt = build_runtime(ModelConfig(**tiny_model_kwargs))
    rt.save_full_weights(str(root / "weights"))
    save_file({"tokens": tiny_batch}, str(root / "tokens.safetensors"))
    # A small clip so that clipping (on the global norm across shards) is exercised; a large
    # Adam eps because Adam's first step, g/(|g|+eps), turns the last-bit differences of
    # near-zero gradients (reduction order differs per layout) into lr-sized differences.
    return {
        "model": tiny_model_kwargs,
        "optim": {"grad_clip": 0.5, "eps": 1e-3},
        "weights": str(root / "weights"),
        "saved": str(root / "saved"),
        "tokens": str(root / "tokens.safetensors"),
        "lr": LR,
        "layouts": LAYOUTS,
        "root": str(root),
    }


@pytest.fixture(scope="module")
def reference(job: dict[str, Any], dist_worker: ModuleType) -> dict[str, Any]:
    out = dist_worker.run_layout(job, 1, 1, 1)
    assert out is not None
    return out


@pytest.fixture(scope="module")
def parallel_results(job: dict[str, Any], dist_worker: ModuleType) -> dict[str, Any]:
    root = Path(job["root"])
    dist_worker.launch({k: v for k, v in job.items() if k != "root"}, world=2, workdir=root)
    return torch.load(root / "results.pt", weights_only=True)  # our own local test output


def _assert_same(got: dict[str, Any], ref: dict[str, Any], grads: bool) -> None:
    assert got["fb_loss"] == pytest.approx(ref["fb_loss"], rel=1e-6)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert ref["grad_norm"] > 0.5  # the clip was active
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items() if grads else ():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "layout", ["tp2_pp1_dp1", "tp1_pp2_dp1", "tp1_pp1_dp2", "tp1_pp1_dp2_distopt"]
)
def test_two_process_layout_matches_one_process(
    layout: str, parallel_results: dict[str, Any], reference: dict[str, Any]
) -> None:
    # The distributed optimizer reduce-scatters: each DP rank holds only its own slice of the
    # reduced gradient, so gathered grads are compared for the other layouts only.
    _assert_same(parallel_results[layout], reference, grads="distopt" not in layout)


# Files written by save_full_weights: one per rank that owns a unique piece (DP replica 0 only).
SAVED_FILES = {"tp2_pp1_dp1": 2, "tp1_pp2_dp1": 2, "tp1_pp1_dp2": 1, "tp1_pp1_dp2_distopt": 1}


@pytest.mark.parametrize("layout", sorted(SAVED_FILES))
def test_each_rank_saves_its_own_pieces_and_they_assemble_to_the_weights(
    layout: str, parallel_results: dict[str, Any], reference: dict[str, Any]
) -> None:
    from covenant.models.weights import open_full_weights

    got = parallel_results[layout]
    weights = open_full_weights(got["saved"])
    assert len(list(Path(got["saved"]).glob("shard-*.safetensors"))) == SAVED_FILES[layout]
    saved = weights.to_dict()
    assert set(saved) == set(got["params"])
    for name, p in got["params"].items():
        assert torch.equal(saved[name], p), name
    # and the single-process reference saved the same weights the layouts trained to
    ref = open_full_weights(reference["saved"]).to_dict()
    for name, p in ref.items():
        torch.testing.assert_close(saved[name], p, rtol=1e-5, atol=1e-6, msg=name)
