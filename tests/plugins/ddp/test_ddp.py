"""The DDP baseline: miner-only, refuses to run as a miner's outer step, and its lockstep inner
step (one model on the union batch) equals R replicas averaging their gradients every step."""

from __future__ import annotations

import copy

import pytest
import torch

from covenant.engine.errors import ConfigError
from covenant.engine.protocols import ParallelInfo, StepResult, WindowContext
from covenant.plugins.ddp import plugin
from covenant.plugins.ddp.outer import REFUSAL, DDPOuterStep, allreduce_bytes


class ToyRuntime:
    """A linear regression with the inner loop's shape: mean loss over sequences, global-norm
    clip, AdamW (the parts of ``ModelRuntime`` the DDP step uses)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.parallel = ParallelInfo()
        self.weight = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=g))
        self.opt = torch.optim.AdamW([self.weight], lr=1.0, betas=(0.9, 0.95), weight_decay=0.1)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :6], batch[:, 6]
        return ((x @ self.weight - y) ** 2).mean()  # the mean over the batch's sequences

    def grads(self, batch: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        self.loss(batch).backward()
        assert self.weight.grad is not None
        return self.weight.grad.clone()

    def apply(self, grad: torch.Tensor, lr: float) -> None:
        self.weight.grad = grad.clone()
        torch.nn.utils.clip_grad_norm_([self.weight], 1.0)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()

    def train_step(self, tokens: torch.Tensor, lr: float) -> StepResult:
        loss = float(self.loss(tokens).detach())
        self.apply(self.grads(tokens), lr)
        return StepResult(loss=loss, grad_norm=0.0, tokens=tokens.shape[0])


def batches(step: int, peers: int, b: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(b, 7, dtype=torch.float64, generator=g) * 3 for _ in range(peers)]


def test_union_batch_step_equals_averaged_gradients() -> None:
    ddp = DDPOuterStep()
    union = ToyRuntime()
    replicas = [copy.deepcopy(union) for _ in range(3)]
    for step in range(6):
        lr = 0.05 * (step + 1)
        parts = batches(step, 3)
        out = ddp.train_step(union, parts, lr)
        assert out.tokens == 15
        mean = torch.stack([r.grads(b) for r, b in zip(replicas, parts, strict=True)]).mean(0)
        for r in replicas:  # every replica applies the all-reduced gradient
            r.apply(mean, lr)
        for r in replicas:
            assert torch.allclose(r.weight, union.weight, rtol=0, atol=1e-12), step
    # the equality is not vacuous: a single peer's gradient gives another model
    alone = ToyRuntime()
    for step in range(6):
        alone.train_step(batches(step, 3)[0], 0.05 * (step + 1))
    assert not torch.allclose(alone.weight, union.weight)


def test_train_step_checks_its_batches() -> None:
    ddp = DDPOuterStep()
    with pytest.raises(ValueError, match="no batches"):
        ddp.train_step(ToyRuntime(), [], 0.1)
    with pytest.raises(ValueError, match="same shape"):
        ddp.train_step(ToyRuntime(), [torch.zeros(2, 7), torch.zeros(3, 7)], 0.1)


def test_refuses_to_run_as_a_miners_outer_step() -> None:
    ddp = DDPOuterStep()
    ctx = WindowContext(1, 0, 3, 30)
    for call in (
        lambda: ddp.begin(ctx, ToyRuntime()),  # type: ignore[arg-type]
        lambda: ddp.end(ctx, ToyRuntime()),  # type: ignore[arg-type]
        lambda: ddp.apply(ctx, ToyRuntime(), []),  # type: ignore[arg-type]
    ):
        with pytest.raises(ConfigError) as info:
            call()
        assert "torchrun" in str(info.value) and "study_outer" in str(info.value)
    assert ddp.codec is None and ddp.alpha(5) == 0.0
    from covenant.engine.protocols import OuterStep

    assert isinstance(ddp, OuterStep)
    assert str(ConfigError(REFUSAL)) == REFUSAL
    ddp.load_state_dict(ddp.state_dict())
    with pytest.raises(ValueError):
        ddp.load_state_dict({"format": 9})


def test_allreduce_bytes() -> None:
    assert allreduce_bytes(10, 4) == 2 * 3 / 4 * 10 * 4
    assert allreduce_bytes(10, 1) == 0.0
    assert allreduce_bytes(10, 2, bytes_per_value=2) == 20.0
    with pytest.raises(ValueError):
        allreduce_bytes(10, 0)


def test_plugin_is_miner_only_and_provides_ddp() -> None:
    assert plugin.COVENANT_ROLES == ("miner",)
    assert isinstance(
        plugin.covenant_outer_step(config=None, name="ddp", services=None), DDPOuterStep
    )
    assert plugin.covenant_outer_step(config=None, name="diloco", services=None) is None


def test_the_validator_refuses_the_ddp_plugin() -> None:
    from covenant.engine.session import open_session
    from covenant.engine.validate import check_validator_plugins

    session = open_session(None, ['plugins.enable=["ddp"]'], environ={})
    with pytest.raises(ConfigError, match="'ddp' is for miner only"):
        check_validator_plugins(session)
    outer = session.hook.covenant_outer_step(config=session.config, name="ddp", services=None)
    assert isinstance(outer, DDPOuterStep)
