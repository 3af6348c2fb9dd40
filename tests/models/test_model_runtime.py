"""MegatronRuntime on one CPU process: the ModelRuntime contract, determinism, checkpoints."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from covenant.engine.protocols import ModelRuntime
from covenant.models import parallel
from covenant.models.config import ModelConfig, ModelConfigError
from covenant.models.layout import gather_full_state, global_params, load_full_state
from covenant.models.runtime import MegatronRuntime, StepError, build_runtime, make_batches


@pytest.fixture()
def runtime(tiny_model_kwargs: dict[str, Any]) -> MegatronRuntime:
    return build_runtime(ModelConfig(**tiny_model_kwargs))


def test_implements_the_protocol_and_maps_every_parameter(runtime: MegatronRuntime) -> None:
    assert isinstance(runtime, ModelRuntime)
    names = [s.name for s in runtime.layout()]
    assert names == [p.name for p in global_params(runtime.shape)]
    params = runtime.local_parameters()
    for shard in runtime.layout():
        assert tuple(params[shard.name].shape) == shard.local_shape == shard.global_shape
    total = sum(p.numel() for p in runtime.gpt.parameters())
    assert total == sum(t.numel() for t in params.values())


def test_local_parameters_are_live_storage(
    runtime: MegatronRuntime, tiny_batch: torch.Tensor
) -> None:
    params = runtime.local_parameters()
    gate = params["decoder.layers.0.mlp.linear_fc1_gate.weight"]
    fused = dict(runtime.gpt.named_parameters())["decoder.layers.0.mlp.linear_fc1.weight"]
    assert gate.data_ptr() == fused.data_ptr()
    before = runtime.eval_loss(tiny_batch)
    with torch.no_grad():
        params["output_layer.weight"].zero_()
    after = runtime.eval_loss(tiny_batch)
    # Zero logits give exactly log(vocab).
    assert after == pytest.approx(float(torch.log(torch.tensor(512.0))), rel=1e-6)
    assert after != before


def test_training_is_deterministic_and_learns(
    tiny_model_kwargs: dict[str, Any], tiny_batch: torch.Tensor
) -> None:
    losses = []
    for _ in range(2):
        rt = build_runtime(ModelConfig(**tiny_model_kwargs))
        losses.append([rt.train_step(tiny_batch, 3e-3).loss for _ in range(4)])
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0]


def test_recomputation_trains_on_cpu_like_storing_activations(
    tiny_model_kwargs: dict[str, Any], tiny_batch: torch.Tensor
) -> None:
    # megatron's checkpoint saves the CUDA RNG state; cpu_compat redirects it to the CPU one.
    losses = []
    for recompute in (False, True):
        rt = build_runtime(ModelConfig(**tiny_model_kwargs, recompute=recompute))
        losses.append([rt.train_step(tiny_batch, 3e-3).loss for _ in range(3)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_step_result(runtime: MegatronRuntime, tiny_batch: torch.Tensor) -> None:
    r = runtime.train_step(tiny_batch, 1e-3)
    assert r.tokens == 4 * 31 and not r.skipped and r.grad_norm > 0
    assert r.loss == pytest.approx(float(torch.log(torch.tensor(512.0))), rel=0.05)


def test_state_dict_round_trip_restores_model_and_adam(
    runtime: MegatronRuntime, tiny_batch: torch.Tensor
) -> None:
    runtime.train_step(tiny_batch, 1e-3)
    state = runtime.state_dict()
    state = {k: v for k, v in state.items()}
    import copy

    saved = copy.deepcopy(state)
    expected = runtime.train_step(tiny_batch, 1e-3).loss
    expected_next = runtime.train_step(tiny_batch, 1e-3).loss
    runtime.load_state_dict(saved)
    assert runtime.train_step(tiny_batch, 1e-3).loss == expected
    assert runtime.train_step(tiny_batch, 1e-3).loss == expected_next


def test_load_state_dict_rejects_another_shape(runtime: MegatronRuntime) -> None:
    state = runtime.state_dict()
    state["shape"] = {**state["shape"], "layers": 3}
    with pytest.raises(ModelConfigError, match="checkpoint is for shape"):
        runtime.load_state_dict(state)


def test_full_state_round_trip(runtime: MegatronRuntime, tiny_batch: torch.Tensor) -> None:
    full = gather_full_state(runtime)
    assert full is not None
    loss = runtime.eval_loss(tiny_batch)
    runtime.train_step(tiny_batch, 1e-2)
    assert runtime.eval_loss(tiny_batch) != loss
    load_full_state(runtime, full)
    runtime.reload_params()
    assert runtime.eval_loss(tiny_batch) == pytest.approx(loss, rel=1e-7)


def test_bad_batches_are_rejected() -> None:
    with pytest.raises(StepError, match="not divisible by micro_batch=2"):
        make_batches(torch.zeros(3, 8, dtype=torch.int64), 2, torch.device("cpu"))
    with pytest.raises(StepError, match="int"):
        make_batches(torch.zeros(2, 8), 1, torch.device("cpu"))
    _inputs, labels, mask = make_batches(torch.arange(8).reshape(1, 8), 1, torch.device("cpu"))[0]
    assert labels[0, :-1].tolist() == list(range(1, 8)) and mask[0].tolist() == [1.0] * 7 + [0.0]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"dp": 2}, "needs 2 processes but the world has 1"),
        ({"preset": "covenant-72b", "gpu_memory_gb": 80.0}, "more than gpu_memory_gb=80.0"),
    ],
)
def test_bad_layouts_fail_before_any_process_group(
    kwargs: dict[str, Any], fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_groups(*a: Any, **k: Any) -> None:
        raise AssertionError("process groups must not be touched")

    monkeypatch.setattr(parallel, "initialize_model_parallel", no_groups)
    monkeypatch.setattr(parallel, "init_distributed", no_groups)
    with pytest.raises(ModelConfigError, match=fragment):
        build_runtime(ModelConfig(**{"preset": "tiny", **kwargs}))


def test_agree_and_run_on_rank0_in_a_world_of_one() -> None:
    assert parallel.agree({"a": 1}) == {"a": 1}
    assert parallel.run_on_rank0(lambda: 5) == 5

    def boom() -> int:
        raise OSError("disk gone")

    with pytest.raises(parallel.ParallelError, match="rank 0 failed: OSError: disk gone"):
        parallel.run_on_rank0(boom)
