"""Presets, overrides and the checks that must fail before any process group starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from covenant.models.config import (
    ModelConfig,
    ModelConfigError,
    ModelShape,
    OptimConfig,
    check_layout,
    presets,
)


def test_big_presets_match_the_spec_table() -> None:
    table = {
        "covenant-72b": (80, 8192, 64, 8, 28672, 262144),
        "templar-1b": (16, 2048, 8, 8, 8192, 32000),
        "sparseloco-512m": (12, 1536, 12, 12, 5440, 32000),
    }
    for name, dims in table.items():
        s = ModelConfig(preset=name).resolve()
        assert (s.layers, s.hidden, s.heads, s.kv_heads, s.ffn, s.vocab) == dims
        assert s.seq_len == 2048 and s.norm_eps == 1e-5 and s.rope_theta == 500000.0


def test_every_preset_dimension_is_a_multiple_of_64() -> None:
    for name in presets():
        s = ModelConfig(preset=name).resolve()
        for value in (s.hidden, s.ffn, s.vocab, s.head_dim):
            assert value % 64 == 0, (name, value)


def test_overrides_replace_preset_fields() -> None:
    s = ModelConfig(preset="tiny", layers=2, vocab=512, rope_theta=10000.0).resolve()
    assert (s.layers, s.vocab, s.hidden, s.rope_theta) == (2, 512, 256, 10000.0)
    assert s.qkv_rows == s.kv_heads * (s.q_per_group + 2) * s.head_dim


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"heads": 3, "kv_heads": 1}, "not divisible by heads 3"),
        ({"ffn": 700}, "ffn 700 is not a multiple of 64"),
        ({"vocab": 500}, "vocab 500 is not a multiple of 64"),
        ({"heads": 4, "kv_heads": 3}, "not divisible by kv_heads"),
        ({"preset": "nope"}, "unknown preset 'nope'"),
        ({"tp": 3}, "not divisible by tp=3"),
        ({"pp": 8}, "pp=8 is larger than the layer count 4"),
        ({"pp": 3}, "do not divide evenly into pp=3"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_model_sections_are_rejected_at_load(
    overrides: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ModelConfig(**{"preset": "tiny", **overrides})


def test_check_layout_resolves_auto_dp_and_rejects_wrong_world() -> None:
    s = ModelConfig(preset="tiny").resolve()
    assert check_layout(s, 2, 2, "auto", 8).dp == 2
    with pytest.raises(ModelConfigError, match="needs 4 processes but the world has 2"):
        check_layout(s, 2, 1, 2, 2)
    with pytest.raises(ModelConfigError, match="not divisible by tp\\*pp=4"):
        check_layout(s, 2, 2, "auto", 6)


def test_shape_round_trips_through_dict_and_rejects_unknown_fields() -> None:
    s = ModelConfig(preset="small").resolve()
    assert ModelShape.from_dict(s.to_dict()) == s
    with pytest.raises(ModelConfigError, match="unknown model shape fields"):
        ModelShape.from_dict({**s.to_dict(), "bias": True})


def test_optim_defaults_are_the_spec_values() -> None:
    o = OptimConfig()
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip, o.decay_1d) == (
        0.9,
        0.95,
        1e-8,
        0.1,
        1.0,
        True,
    )
    with pytest.raises(ValidationError):
        OptimConfig(beta2=1.0)
