"""The megatron CPU redirection: scoped to the listed modules, idempotent, a no-op with CUDA."""

from __future__ import annotations

import importlib

import pytest
import torch

from covenant.models import cpu_compat


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirection is for CPU-only builds")
def test_redirects_only_the_listed_modules() -> None:
    cpu_compat.install()
    assert cpu_compat.install() is False  # idempotent
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.Tensor is torch.Tensor
    # Everything else still sees the real torch.
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    assert layers.torch is torch
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirection is for CPU-only builds")
def test_cuda_type_names_are_scoped_to_the_wrapped_calls() -> None:
    t = torch.zeros(2)
    with cpu_compat._cuda_type_names():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64
    assert t.type() == "torch.FloatTensor"


def test_noop_when_cuda_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_compat, "_installed", False)
    monkeypatch.setattr(cpu_compat, "cuda_present", lambda: True)
    assert cpu_compat.install() is False
    assert cpu_compat.is_installed() is False
