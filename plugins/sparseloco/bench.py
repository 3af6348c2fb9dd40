"""Codec benchmark: wire size, throughput and memory, side by side with a reference path.

``run_codec_benchmark(**opts)`` returns a JSON-able dict; ``tools/bench_codec.py`` (and
``covenant bench codec --json``) print it. The tensor set is one transformer layer of a preset
(megatron names and shapes); covenant-72b figures are scaled from exact payload sizes and the
measured throughput.

Paths compared in the same run, on the same tensors:

* ``covenant``: this codec (sorted Elias-Fano indices, packed 2-bit codes, reference quantiser);
* ``covenant_symmetric``: the same with the symmetric quantiser option;
* ``reference``: a straightforward production-style path: raw ``torch.topk`` order, one uint8
  per code, 12-bit packed index pairs, serialised with ``torch.save``; decode with
  ``torch.load(weights_only=True)``. That deserialiser only ever reads bytes this benchmark just
  made: it is a baseline for speed and size, never a way to read peer data.
"""

from __future__ import annotations

import io
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

import covenant.plugins.sparseloco as sl
from covenant.plugins.sparseloco.tiling import (
    flat_positions,
    full_block,
    kept_per_tile,
    tile_geometry,
    to_tiles,
)
from covenant.plugins.sparseloco.wire import header_size

logger = logging.getLogger(__name__)

# One decoder layer per preset (SPEC.md 2): hidden, heads, kv heads, ffn, layers, vocab.
PRESETS: dict[str, dict[str, int]] = {
    "templar-1b": {
        "hidden": 2048,
        "heads": 8,
        "kv_heads": 8,
        "ffn": 8192,
        "layers": 16,
        "vocab": 32000,
    },
    "covenant-72b": {
        "hidden": 8192,
        "heads": 64,
        "kv_heads": 8,
        "ffn": 28672,
        "layers": 80,
        "vocab": 262144,
    },
    "sparseloco-512m": {
        "hidden": 1536,
        "heads": 12,
        "kv_heads": 12,
        "ffn": 5440,
        "layers": 12,
        "vocab": 32000,
    },
}


def layer_shapes(preset: str, layer: int = 0) -> dict[str, tuple[int, ...]]:
    """Megatron parameter names and global shapes of one decoder layer (fused QKV and fc1)."""
    p = PRESETS[preset]
    h, ffn = p["hidden"], p["ffn"]
    head_dim = h // p["heads"]
    qkv = h + 2 * p["kv_heads"] * head_dim
    pre = f"decoder.layers.{layer}"
    return {
        f"{pre}.self_attention.linear_qkv.layer_norm_weight": (h,),
        f"{pre}.self_attention.linear_qkv.weight": (qkv, h),
        f"{pre}.self_attention.linear_proj.weight": (h, h),
        f"{pre}.mlp.linear_fc1.layer_norm_weight": (h,),
        f"{pre}.mlp.linear_fc1.weight": (2 * ffn, h),
        f"{pre}.mlp.linear_fc2.weight": (h, ffn),
    }


def model_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """All parameter shapes of a preset (untied embeddings)."""
    p = PRESETS[preset]
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(p["layers"]):
        shapes.update(layer_shapes(preset, layer))
    shapes["embedding.word_embeddings.weight"] = (p["vocab"], p["hidden"])
    shapes["decoder.final_layernorm.weight"] = (p["hidden"],)
    shapes["output_layer.weight"] = (p["vocab"], p["hidden"])
    return shapes


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------


class _PeakMemory:
    """Peak memory above the start of a block: CUDA allocator peak, or sampled process RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            self._base = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self._base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float, int]:
    """(result, best seconds, peak bytes above baseline) over ``repeats`` runs."""
    best, peak, result = math.inf, 0, None
    for _ in range(repeats):
        result = None
        with _PeakMemory(device) as mem:
            t0 = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, mem.peak)
    return result, best, peak


# --------------------------------------------------------------------------------------------
# Reference (production-style) path
# --------------------------------------------------------------------------------------------


def reference_encode(tensors: Mapping[str, torch.Tensor], config: sl.SparseLoCoConfig) -> bytes:
    """Production-style: raw topk order, uint8 codes, 12-bit index pairs, torch.save."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, x in tensors.items():
        g = tile_geometry(tuple(x.shape), config.tile_max)
        k = kept_per_tile(g, config)
        k += k % 2  # production forced an even k for its pair packing
        tiles = to_tiles(x.to(torch.float32).reshape(g.rows, g.cols), g)
        k = min(k, g.tile_len)
        idx = torch.topk(tiles.abs(), k, dim=1).indices
        v = torch.gather(tiles, 1, idx)
        shift = v.mean()
        c = v - shift
        scale = 6 * (c.norm() / math.sqrt(max(1, v.numel() - 1))) / 4
        if not bool(torch.isfinite(scale)) or float(scale) == 0.0:
            scale = torch.tensor(1.0, device=x.device)
        q = torch.round(c / scale + 2).clamp(0, 3).to(torch.uint8)
        lut = torch.stack(
            [c[q == b].mean() if bool((q == b).any()) else c.new_zeros(()) for b in range(4)]
        )
        flat = idx.reshape(-1).to(torch.int32)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        a, b = flat[0::2], flat[1::2]
        packed = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], dim=1).to(torch.uint8)
        out[name] = {
            "idx": packed.reshape(-1).cpu(),
            "vals": q.reshape(-1).cpu(),
            "lut": lut.cpu(),
            "shift": shift.reshape(1).cpu(),
            "k": torch.tensor([k]),
        }
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def reference_decode(
    data: bytes,
    shapes: Mapping[str, tuple[int, ...]],
    config: sl.SparseLoCoConfig,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Decode the reference path's own bytes (trusted: made by this benchmark run)."""
    obj = torch.load(io.BytesIO(data), weights_only=True)
    out = {}
    for name, d in obj.items():
        g = tile_geometry(tuple(shapes[name]), config.tile_max)
        k = int(d["k"][0])
        p = d["idx"].to(device).to(torch.int32).reshape(-1, 3)
        a = p[:, 0] | ((p[:, 1] & 0xF) << 8)
        b = (p[:, 1] >> 4) | (p[:, 2] << 4)
        idx = (
            torch.stack([a, b], dim=1)
            .reshape(-1)[: g.num_tiles * k]
            .reshape(g.num_tiles, k)
            .to(torch.int64)
        )
        vals = (d["lut"].to(device) + d["shift"].to(device))[d["vals"].to(device).to(torch.int64)]
        dense = torch.zeros(g.numel, dtype=torch.float32, device=device)
        dense[flat_positions(idx, g, full_block(g), rel=False)] = vals
        out[name] = dense.reshape(g.shape)
    return out


def reference_aggregate(
    payloads: list[bytes],
    shapes: Mapping[str, tuple[int, ...]],
    config: sl.SparseLoCoConfig,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Straightforward dense aggregation, peer by peer (dense decode of every peer)."""
    total: dict[str, torch.Tensor] = {}
    count: dict[str, torch.Tensor] = {}
    norms = {n: [] for n in shapes}  # type: dict[str, list[torch.Tensor]]
    for p in payloads:
        for n, t in reference_decode(p, shapes, config, device).items():
            norms[n].append(t.norm())
    med = {n: torch.median(torch.stack(v)) for n, v in norms.items()}
    for i, p in enumerate(payloads):
        for n, t in reference_decode(p, shapes, config, device).items():
            f = torch.clamp(med[n] / (norms[n][i] + config.norm_eps), max=1.0)
            total[n] = total.get(n, torch.zeros_like(t)) + t * f
            count[n] = count.get(n, torch.zeros_like(t)) + (t != 0).to(torch.float32)
    return {n: torch.where(count[n] > 0, total[n] / count[n].clamp(min=1), 0.0) for n in total}


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _relative_error(
    decoded: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Error of the decoded update vs the error-fed tensor, overall and on the kept values only."""
    num = den = num_kept = den_kept = 0.0
    for n, x in tensors.items():
        d = decoded[n].to(x.device)
        num += float((d - x).double().square().sum())
        den += float(x.double().square().sum())
        kept = d != 0
        num_kept += float((d[kept] - x[kept]).double().square().sum())
        den_kept += float(x[kept].double().square().sum())
    return {
        "rel_l2_error_total": math.sqrt(num / den) if den else 0.0,
        "rel_l2_error_kept": math.sqrt(num_kept / den_kept) if den_kept else 0.0,
    }


def run_codec_benchmark(
    preset: str = "templar-1b",
    peers: int = 20,
    distinct_peers: int = 4,
    repeats: int = 2,
    device: str | None = None,
    seed: int = 0,
    include_reference: bool = True,
    include_symmetric: bool = True,
    scale_to: str = "covenant-72b",
) -> dict[str, Any]:
    """Benchmark encode/decode/aggregate on one layer of ``preset``; returns a JSON-able dict.

    ``peers`` payloads are aggregated (``distinct_peers`` different updates, repeated);
    ``repeats`` takes the best time of that many runs; ``device`` defaults to CUDA if present.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = layer_shapes(preset)
    numel = sum(math.prod(s) for s in shapes.values())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    updates = [
        {
            n: (torch.randn(s, generator=gen) * 1e-3 * (1 + 0.25 * i)).to(dev)
            for n, s in shapes.items()
        }
        for i in range(max(1, distinct_peers))
    ]
    tensors = updates[0]
    paths: dict[str, Any] = {}

    def _measure(
        encode: Callable[[dict[str, torch.Tensor]], bytes],
        decode: Callable[[bytes], dict[str, torch.Tensor]],
        aggregate: Callable[[list[bytes]], Any],
    ) -> dict[str, Any]:
        """Time one codec path (encode, decode, aggregate of ``peers``) on the same tensors."""
        payload, t_enc, m_enc = _timed(lambda: encode(tensors), dev, repeats)
        decoded, t_dec, m_dec = _timed(lambda: decode(payload), dev, repeats)
        payloads = [payload] + [encode(u) for u in updates[1:]]
        peer_list = [payloads[i % len(payloads)] for i in range(peers)]
        _, t_agg, m_agg = _timed(lambda: aggregate(peer_list), dev, 1)
        bits = len(payload) * 8 / numel
        return {
            "payload_bytes": len(payload),
            "bits_per_param": bits,
            "ratio_vs_fp32": 32 / bits,
            "ratio_vs_bf16": 16 / bits,
            "encode_params_per_s": numel / t_enc,
            "decode_params_per_s": numel / t_dec,
            f"aggregate_{peers}_peers_params_per_s": numel / t_agg,
            "encode_s": t_enc,
            "decode_s": t_dec,
            f"aggregate_{peers}_peers_s": t_agg,
            "peak_bytes": {"encode": m_enc, "decode": m_dec, "aggregate": m_agg},
            **_relative_error(decoded, tensors),
        }

    def _covenant(cfg: sl.SparseLoCoConfig) -> dict[str, Any]:
        result = _measure(
            lambda t: sl.encode(t, cfg),
            lambda data: sl.decode(data, shapes, cfg, device=dev),
            lambda batch: sl.aggregate(batch, shapes, cfg, device=dev),
        )
        assert result["payload_bytes"] == sl.expected_payload_size(shapes, cfg)
        return result

    cfg = sl.SparseLoCoConfig()
    paths["covenant"] = _covenant(cfg)
    if include_symmetric:
        paths["covenant_symmetric"] = _covenant(sl.SparseLoCoConfig(quantizer="symmetric"))
    if include_reference:
        paths["reference"] = _measure(
            lambda t: reference_encode(t, cfg),
            lambda data: reference_decode(data, shapes, cfg, dev),
            lambda batch: reference_aggregate(batch, shapes, cfg, dev),
        )

    big = model_shapes(scale_to)
    big_numel = sum(math.prod(s) for s in big.values())
    big_bytes = sl.expected_payload_size(big, cfg)
    c = paths["covenant"]
    scaled = {
        "preset": scale_to,
        "params": big_numel,
        "payload_bytes": big_bytes,
        "bits_per_param": big_bytes * 8 / big_numel,
        "ratio_vs_fp32": 32 / (big_bytes * 8 / big_numel),
        "header_bytes": header_size(big, cfg),
        "est_encode_s_one_device": big_numel / c["encode_params_per_s"],
        "est_decode_s_one_device": big_numel / c["decode_params_per_s"],
        f"est_aggregate_{peers}_peers_s_one_device": big_numel
        / c[f"aggregate_{peers}_peers_params_per_s"],
    }
    return {
        "benchmark": "sparseloco_codec",
        "preset": preset,
        "tensors": {n: list(s) for n, s in shapes.items()},
        "params": numel,
        "k": cfg.k,
        "tile_max": cfg.tile_max,
        "peers": peers,
        "distinct_peers": distinct_peers,
        "repeats": repeats,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "paths": paths,
        "scaled": scaled,
        "goals": {
            "bits_per_param_le_0_16": paths["covenant"]["bits_per_param"] <= 0.16,
            "ratio_vs_fp32_ge_200": paths["covenant"]["ratio_vs_fp32"] >= 200,
            "encode_not_slower_than_reference": (
                paths["covenant"]["encode_s"] <= paths["reference"]["encode_s"]
                if include_reference
                else None
            ),
            "decode_not_slower_than_reference": (
                paths["covenant"]["decode_s"] <= paths["reference"]["decode_s"]
                if include_reference
                else None
            ),
        },
    }
