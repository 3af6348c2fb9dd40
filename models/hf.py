"""Weights users can use elsewhere: covenant's global layout <-> the Hugging Face Llama layout.

The global layout (:mod:`covenant.models.layout`) is megatron's TP=1 layout with ``linear_fc1``
already split into gate and up, so the adapter is a renaming plus one reshuffle: megatron's fused
QKV is grouped per key/value head (``[q_0..q_{n-1}, k, v]`` for each group) and HF keeps
separate ``q_proj``/``k_proj``/``v_proj``. Rotary embeddings need no permutation: megatron's
non-interleaved RoPE is HF Llama's rotate-half.

:func:`export_hf` writes ``model.safetensors`` and a ``config.json`` with ``LlamaConfig`` fields,
which ``transformers.LlamaForCausalLM.from_pretrained(out_dir)`` loads without the hub.

The full-weight file format of this package (``save_full_weights`` / ``load_full_weights``) is
the same safetensors file in the *global* layout plus ``covenant_model.json`` holding the
resolved :class:`ModelShape`; :func:`load_full_weights` bounds sizes before reading and never
unpickles.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from covenant.engine.fs import atomic_write_bytes
from covenant.models.config import ModelConfigError, ModelShape
from covenant.models.layout import global_params

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
SHAPE_FILE = "covenant_model.json"
#: Largest sidecar JSON read (bytes); a model config is a few hundred bytes.
MAX_JSON_BYTES = 1 << 20


class WeightsError(ValueError):
    """A weights directory or file that is missing, malformed or for another model shape."""


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


def check_full_state(full: Mapping[str, torch.Tensor], shape: ModelShape) -> None:
    """Raise :class:`WeightsError` unless ``full`` has exactly the global tensors of ``shape``."""
    expected = {p.name: p.shape for p in global_params(shape)}
    missing = sorted(set(expected) - set(full))
    extra = sorted(set(full) - set(expected))
    if missing or extra:
        raise WeightsError(
            f"weights do not match {shape.name}: missing {missing[:3]}, extra {extra[:3]}"
        )
    for name, want in expected.items():
        if tuple(full[name].shape) != want:
            raise WeightsError(f"{name}: shape {tuple(full[name].shape)}, expected {want}")


def to_hf(full: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Global-layout weights -> HF ``LlamaForCausalLM`` state dict."""
    check_full_state(full, shape)
    out = {hf: full[g] for g, hf in _TOP.items()}
    for i in range(shape.layers):
        out.update({hf: full[g] for g, hf in _names(i).items()})
        q, k, v = _split_qkv(full[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], shape)
        a = f"model.layers.{i}.self_attn."
        out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
    return {k: v.contiguous() for k, v in out.items()}


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


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def export_hf(
    full: Mapping[str, torch.Tensor],
    shape: ModelShape,
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` loadable by ``LlamaForCausalLM``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf(full, shape).items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    _atomic_write_text(out / HF_CONFIG_FILE, json.dumps(hf_config(shape, dtype), indent=2))
    logger.info("exported %s (%d tensors) to %s", shape.name, len(tensors), out)
    return out


def save_full_weights(
    full: Mapping[str, torch.Tensor], shape: ModelShape, out_dir: str | os.PathLike[str]
) -> Path:
    """Write covenant's own full-weight format: global-layout safetensors + shape sidecar."""
    check_full_state(full, shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in full.items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "covenant-global"})
    os.replace(tmp, out / WEIGHTS_FILE)
    _atomic_write_text(out / SHAPE_FILE, json.dumps(shape.to_dict(), indent=2))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise WeightsError(f"{path} is larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object")
    return data


def load_full_weights(
    path: str | os.PathLike[str], max_bytes: int | None = None
) -> tuple[dict[str, torch.Tensor], ModelShape]:
    """Read a directory written by :func:`save_full_weights`: (global weights, shape).

    Checks the shape sidecar, bounds the file size by what that shape implies (fp32, plus 1 MiB
    of header), and checks every tensor's name and shape. safetensors never executes code.
    """
    root = Path(path)
    try:
        shape = ModelShape.from_dict(_read_json(root / SHAPE_FILE))
    except (TypeError, ModelConfigError) as exc:
        raise WeightsError(f"{root / SHAPE_FILE}: {exc}") from exc
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"{weights} does not exist")
    numel = sum(int(torch.Size(p.shape).numel()) for p in global_params(shape))
    limit = max_bytes if max_bytes is not None else numel * 4 + (1 << 20)
    if weights.stat().st_size > limit:
        raise WeightsError(
            f"{weights} is {weights.stat().st_size} bytes, more than {limit} for {shape.name}"
        )
    full: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            full[key] = f.get_tensor(key)
    check_full_state(full, shape)
    return full, shape


def find_full_weights(path: str | os.PathLike[str]) -> Path:
    """The full-weight directory at ``path``: ``path`` itself if it holds
    ``covenant_model.json``, else the most recently written such directory below it (a run
    directory's newest saved weights)."""
    root = Path(path)
    if (root / SHAPE_FILE).is_file():
        return root
    if not root.is_dir():
        raise WeightsError(f"{root} is not a directory")
    found = [p.parent for p in root.rglob(SHAPE_FILE) if (p.parent / WEIGHTS_FILE).is_file()]
    if not found:
        raise WeightsError(f"no {SHAPE_FILE} + {WEIGHTS_FILE} under {root}")
    return max(found, key=lambda d: (d / WEIGHTS_FILE).stat().st_mtime)
