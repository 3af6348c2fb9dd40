"""The global coordinate system: shards tile every global tensor exactly once in any layout."""

from __future__ import annotations

import pytest
import torch

from covenant.models.config import ModelConfig
from covenant.models.layout import box, global_names_of, global_params, rank_layout


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
def test_shards_cover_each_global_tensor_exactly_once(tp: int, pp: int) -> None:
    shape = ModelConfig(preset="tiny").resolve()  # 4 layers, 4 heads, 2 kv heads
    cover = {p.name: torch.zeros(p.shape, dtype=torch.int32) for p in global_params(shape)}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            for s in rank_layout(shape, tp, tp_rank, pp, pp_rank):
                if s.replicated_over_tp and tp_rank != 0:
                    assert s.is_full
                    continue
                cover[s.name][box(s)] += 1
    for name, c in cover.items():
        assert bool((c == 1).all()), name


def test_global_names_are_layout_independent() -> None:
    shape = ModelConfig(preset="tiny").resolve()
    names_tp1 = {s.name for s in rank_layout(shape, 1, 0, 1, 0)}
    names_pp2 = {s.name for r in range(2) for s in rank_layout(shape, 2, 1, 2, r)}
    assert names_tp1 == names_pp2 == {p.name for p in global_params(shape)}


def test_local_names_map_to_global_names() -> None:
    assert global_names_of("module.module.decoder.layers.1.mlp.linear_fc2.weight", 2) == [
        "decoder.layers.3.mlp.linear_fc2.weight"
    ]
    assert global_names_of("decoder.layers.0.mlp.linear_fc1.weight", 0) == [
        "decoder.layers.0.mlp.linear_fc1_gate.weight",
        "decoder.layers.0.mlp.linear_fc1_up.weight",
    ]
    # Transformer Engine fuses the norms into the following linear layer.
    assert global_names_of("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", 4) == [
        "decoder.layers.4.input_layernorm.weight"
    ]
    assert global_names_of("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", 0) == [
        "decoder.layers.0.pre_mlp_layernorm.weight"
    ]
    assert global_names_of("output_layer.weight", 3) == ["output_layer.weight"]


def test_row_and_column_parallel_shards() -> None:
    shape = ModelConfig(preset="tiny").resolve()
    by_name = {s.name: s for s in rank_layout(shape, 2, 1, 1, 0)}
    qkv = by_name["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.offsets == (shape.qkv_rows // 2, 0) and qkv.local_shape == (shape.qkv_rows // 2, 256)
    proj = by_name["decoder.layers.0.self_attention.linear_proj.weight"]
    assert proj.offsets == (0, 128) and proj.local_shape == (256, 128)
    emb = by_name["embedding.word_embeddings.weight"]
    assert emb.offsets == (4096, 0)
    assert by_name["decoder.final_layernorm.weight"].replicated_over_tp
