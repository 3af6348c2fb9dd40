"""Weights users can use elsewhere: covenant's global layout <-> the Hugging Face Llama layout.

The global layout (:mod:`covenant.models.layout`) is megatron's TP=1 layout with ``linear_fc1``
already split into gate and up, so the adapter is a renaming plus one reshuffle: megatron's fused
QKV is grouped per key/value head (``[q_0..q_{n-1}, k, v]`` for each group) and HF keeps
separate ``q_proj``/``k_proj``/``v_proj``. Rotary embeddings need no permutation: megatron's
non-interleaved RoPE is HF Llama's rotate-half.

:func:`export_hf` writes the safetensors files and a ``config.json`` with ``LlamaConfig``
fields, which ``transformers.LlamaForCausalLM.from_pretrained(out_dir)`` loads without the hub.
It streams: global tensors are read one at a time (from a :class:`~covenant.models.weights.
FullWeights` directory, or a dict) and written in files of at most ``max_shard_bytes`` (HF's
``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json`` when more than one), so
exporting covenant-72b needs one file's worth of memory, not the whole model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from covenant.engine.fs import atomic_write_bytes
from covenant.models.config import ModelShape
from covenant.models.layout import GlobalParam, global_params
from covenant.models.weights import FullWeights, WeightsError, check_full_state

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_CONFIG_FILE = "config.json"
#: Largest HF weights file written (bytes), as ``save_pretrained``'s default "5GB".
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_OWN_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def _split_qkv(qkv: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, ...]:
    g, n, d, h = shape.kv_heads, shape.q_per_group, shape.head_dim, shape.hidden
    grouped = qkv.reshape(g, n + 2, d, h)
    q = grouped[:, :n].reshape(g * n * d, h)
    k = grouped[:, n].reshape(g * d, h)
    v = grouped[:, n + 1].reshape(g * d, h)
    return q, k, v


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    g, n, d, h = shape.kv_heads, shape.q_per_group, shape.head_dim, shape.hidden
    parts = [q.reshape(g, n, d, h), k.reshape(g, 1, d, h), v.reshape(g, 1, d, h)]
    return torch.cat(parts, dim=1).reshape(shape.qkv_rows, h)


def _names(i: int) -> dict[str, str]:
    """Global name -> HF name for layer ``i`` (qkv handled separately)."""
    p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": q + "input_layernorm.weight",
        p + "self_attention.linear_proj.weight": q + "self_attn.o_proj.weight",
        p + "pre_mlp_layernorm.weight": q + "post_attention_layernorm.weight",
        p + "mlp.linear_fc1_gate.weight": q + "mlp.gate_proj.weight",
        p + "mlp.linear_fc1_up.weight": q + "mlp.up_proj.weight",
        p + "mlp.linear_fc2.weight": q + "mlp.down_proj.weight",
    }


_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def to_hf(full: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Global-layout weights -> HF ``LlamaForCausalLM`` state dict."""
    check_full_state(full, shape)
    return {
        name: t.contiguous()
        for p in global_params(shape)
        for name, t in _hf_pieces(p, full[p.name], shape)
    }


def from_hf(hf: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> global-layout weights."""
    try:
        out = {g: hf[h] for g, h in _TOP.items()}
        for i in range(shape.layers):
            out.update({g: hf[h] for g, h in _names(i).items()})
            a = f"model.layers.{i}.self_attn."
            out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = _fuse_qkv(
                hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], shape
            )
    except KeyError as exc:
        raise WeightsError(f"HF state dict lacks {exc.args[0]}") from exc
    check_full_state(out, shape)
    return out


def hf_config(shape: ModelShape, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` fields of ``transformers.LlamaConfig`` for ``shape``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.seq_len,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": shape.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _hf_pieces(
    p: GlobalParam, tensor: torch.Tensor, shape: ModelShape
) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors made from global tensor ``p`` (three for the fused QKV)."""
    if p.name in _TOP:
        yield _TOP[p.name], tensor
        return
    assert p.layer is not None
    if p.name.endswith("self_attention.linear_qkv.weight"):
        a = f"model.layers.{p.layer}.self_attn."
        q, k, v = _split_qkv(tensor, shape)
        yield from ((a + "q_proj.weight", q), (a + "k_proj.weight", k), (a + "v_proj.weight", v))
        return
    yield _names(p.layer)[p.name], tensor


def _plan_files(
    params: list[GlobalParam], itemsize: int, max_bytes: int
) -> list[list[GlobalParam]]:
    """Group global tensors (in order) into files of at most ``max_bytes`` (a tensor larger
    than that gets a file of its own); a fused QKV's three HF tensors share one file."""
    groups: list[list[GlobalParam]] = [[]]
    size = 0
    for p in params:
        n = itemsize
        for d in p.shape:
            n *= d
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += n
    return groups


def export_hf(
    weights: FullWeights | Mapping[str, torch.Tensor],
    shape: ModelShape,
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``LlamaForCausalLM`` safetensors + ``config.json`` from global-layout ``weights``.

    Reads one global tensor at a time; each file is written atomically, the index and
    ``config.json`` last. Earlier exports' weight files in ``out_dir`` are replaced.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    read: Callable[[str], torch.Tensor]
    if isinstance(weights, FullWeights):
        weights.check_matches(shape)
        source = weights
        read = lambda name: source.read(name, dtype=dtype)  # noqa: E731
    else:
        check_full_state(weights, shape)
        mapping = weights
        read = lambda name: mapping[name].detach().to("cpu", dtype)  # noqa: E731
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if _OWN_FILES.match(stale.name):
            stale.unlink()
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups = _plan_files(global_params(shape), itemsize, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        name = (
            WEIGHTS_FILE
            if len(groups) == 1
            else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors: dict[str, torch.Tensor] = {}
        for p in group:
            for hf_name, t in _hf_pieces(p, read(p.name), shape):
                tensors[hf_name] = t.contiguous()
        tmp = out / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        logger.info("export: wrote %s (%d tensors)", name, len(tensors))
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_bytes(out / INDEX_FILE, json.dumps(index, indent=2).encode("utf-8"))
    config = json.dumps(hf_config(shape, dtype), indent=2)
    atomic_write_bytes(out / HF_CONFIG_FILE, config.encode("utf-8"))
    logger.info(
        "exported %s (%d tensors, %d files) to %s", shape.name, len(weight_map), len(groups), out
    )
    return out
