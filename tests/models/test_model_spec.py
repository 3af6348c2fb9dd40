"""Backend / precision / FP8 recipe selection (CPU-checkable parts of the GPU path)."""

from __future__ import annotations

import pytest

from covenant.models.config import ModelConfig, ModelConfigError
from covenant.models.spec import choose, fp8_settings, resolve_backend, resolve_precision


def test_auto_backend_and_precision() -> None:
    assert resolve_backend("auto", cuda=False, te=False) == "local"
    assert resolve_backend("auto", cuda=True, te=False) == "local"
    assert resolve_backend("auto", cuda=True, te=True) == "te"
    assert resolve_precision("auto", cuda=False) == "fp32"
    assert resolve_precision("auto", cuda=True) == "bf16"


def test_te_backend_needs_gpu_and_te() -> None:
    with pytest.raises(ModelConfigError, match="needs a CUDA GPU"):
        resolve_backend("te", cuda=False, te=True)
    with pytest.raises(ModelConfigError, match="not importable"):
        resolve_backend("te", cuda=True, te=False)
    with pytest.raises(ModelConfigError, match="needs a GPU"):
        resolve_precision("bf16", cuda=False)


@pytest.mark.parametrize(
    ("recipe", "te_ver", "cc", "expected"),
    [
        ("delayed", "2.20.2", (9, 0), {"fp8": "hybrid", "fp8_recipe": "delayed"}),
        ("tensorwise", "2.2.0", (9, 0), {"fp8": "e4m3", "fp8_recipe": "tensorwise"}),
        ("blockwise", "2.3.0.dev0+abc", (9, 0), {"fp8": "e4m3", "fp8_recipe": "blockwise"}),
        ("mxfp8", "2.5", (10, 0), {"fp8": "e4m3", "fp8_recipe": "mxfp8"}),
    ],
)
def test_fp8_recipe_selection(
    recipe: str, te_ver: str, cc: tuple[int, int], expected: dict[str, str]
) -> None:
    assert fp8_settings("fp8", recipe, "te", te_ver=te_ver, compute_capability=cc) == expected


@pytest.mark.parametrize(
    ("recipe", "backend", "te_ver", "cc", "fragment"),
    [
        ("delayed", "local", "2.2", (9, 0), "needs backend='te'"),
        ("mxfp8", "local", None, (10, 0), "fp8_recipe='tensorwise' only"),
        ("tensorwise", "local", None, (8, 0), "compute capability >= 8.9"),
        ("tensorwise", "local", None, None, "needs FP8 tensor cores"),
        ("tensorwise", "te", "2.1.0", (9, 0), "needs Transformer Engine >= 2.2"),
        ("blockwise", "te", "2.2.9", (9, 0), "needs Transformer Engine >= 2.3"),
        ("mxfp8", "te", "2.5", (9, 0), "needs a Blackwell GPU"),
        ("delayed", "te", None, (9, 0), "not installed"),
        ("fancy", "te", "2.5", (9, 0), "unknown fp8_recipe"),
    ],
)
def test_fp8_recipe_errors(
    recipe: str, backend: str, te_ver: str | None, cc: tuple[int, int], fragment: str
) -> None:
    with pytest.raises(ModelConfigError, match=fragment):
        fp8_settings("fp8", recipe, backend, te_ver=te_ver, compute_capability=cc)


def test_native_fp8_on_ada_or_hopper_needs_no_te() -> None:
    """backend='local' + tensorwise: no TE fields for megatron (the spec carries FP8 linears)."""
    assert fp8_settings("fp8", "tensorwise", "local", te_ver=None, compute_capability=(9, 0)) == {}
    assert fp8_settings("fp8", "tensorwise", "local", compute_capability=(8, 9)) == {}


def test_no_fp8_fields_unless_fp8() -> None:
    assert fp8_settings("bf16", "mxfp8", "local") == {}


def test_sequence_parallel_is_a_clear_error_on_cpu() -> None:
    with pytest.raises(ModelConfigError, match="sequence_parallel needs Transformer Engine"):
        choose(ModelConfig(preset="tiny", tp=2, sequence_parallel=True))


def test_fp8_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(ModelConfigError, match="needs a GPU"):
        choose(ModelConfig(preset="tiny", precision="fp8"))
