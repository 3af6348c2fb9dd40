"""Shared fixtures for the model tests: the tiny model, its weights and batch, the launcher."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

#: The parallel-test model: 2 layers (PP=2), 2 heads / 2 kv heads (TP=2), small vocab.
TINY: dict[str, Any] = {"preset": "tiny-2l", "vocab": 512, "micro_batch": 1, "seed": 7}


def _load_worker() -> ModuleType:
    path = Path(__file__).with_name("dist_worker.py")
    spec = importlib.util.spec_from_file_location("covenant_tests_dist_worker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The model tests share two cores with other work: one torch thread, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("COVENANT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dist_worker() -> ModuleType:
    return _load_worker()


@pytest.fixture(scope="session")
def tiny_model_kwargs() -> dict[str, Any]:
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_batch() -> torch.Tensor:
    return torch.randint(0, TINY["vocab"], (4, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _teardown_groups() -> Iterator[None]:
    """No test leaves megatron's groups or a world-of-one process group behind for the next."""
    yield
    from covenant.models import parallel

    parallel.teardown()
