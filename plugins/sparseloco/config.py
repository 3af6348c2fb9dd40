"""Configuration of the SparseLoCo codec, error feedback and aggregation (SPEC.md sections 4-5).

Every number the spec names is a field here with the spec's default; ``SparseLoCoConfig()`` is
the production behaviour. The lead wires this model in as the plugin's config section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GiB = 1 << 30
MiB = 1 << 20


class SparseLoCoConfig(BaseModel):
    """Options of the SparseLoCo compressor and aggregator (defaults = production run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- error feedback (SPEC 4.2) -------------------------------------------------------
    beta: float = Field(0.95, ge=0.0, le=1.0, description="error-buffer decay: e <- beta*e + delta")
    ef_outer_lr_factor: bool = Field(
        False,
        description="multiply delta by the outer lr inside the error feedback (reference code)",
    )

    # --- tiles and top-k (SPEC 4.3-4.4) --------------------------------------------------
    k: int = Field(64, ge=1, description="values kept per tile")
    tile_max: int = Field(
        64, ge=1, le=1024, description="a tile side is the largest divisor <= this"
    )
    topk_rule: Literal["min_k", "density"] = Field(
        "min_k", description="min_k: min(k, L) per tile; density: max(1, round(L*k/density_tile))"
    )
    density_tile: int = Field(4096, ge=1, description="reference tile length of the density rule")
    selection: Literal["topk", "random"] = Field(
        "topk",
        description="topk: the k largest |values| per tile (SPEC 4.4); random: a uniformly "
        "random k-subset per tile drawn from torch's default generator (an ablation: same wire "
        "format and residual, only the choice of indices differs)",
    )

    # --- quantiser (SPEC 4.5) ------------------------------------------------------------
    quantizer: Literal["reference", "symmetric", "none"] = Field(
        "reference",
        description="reference: asymmetric 2-bit (round(c/scale+2)); symmetric: floor-based "
        "2-bit with two levels each side of the mean; none: fp32 values (tests, ablations)",
    )
    scale_sigmas: float = Field(1.5, gt=0.0, description="reference scale = 6*sigma/4 = 1.5*sigma")
    symmetric_scale_sigmas: float = Field(
        1.0, gt=0.0, description="symmetric quantiser: inner bin edges at shift +- this*sigma"
    )

    # --- aggregation (SPEC 4.8) ----------------------------------------------------------
    clip_to_median: bool = Field(True, description="scale each peer down to the median norm")
    norm_eps: float = Field(1e-8, ge=0.0, description="v * min(1, median / (norm + eps))")
    mean_over_selectors: bool = Field(
        True, description="each coordinate: mean over the peers that selected it (else sum / R)"
    )
    on_nonfinite: Literal["error", "skip"] = Field(
        "error", description="a non-finite aggregated tensor: raise, or leave it out of the result"
    )

    # --- decoder limits (untrusted bytes) ------------------------------------------------
    max_payload_bytes: int = Field(4 * GiB, ge=64, description="hard cap on a payload's length")
    max_header_bytes: int = Field(16 * MiB, ge=64, description="cap on the JSON header's length")
    max_name_length: int = Field(512, ge=1, description="cap on a tensor name's length")
    require_all_tensors: bool = Field(
        True, description="a payload must carry every expected tensor (else PayloadShapeError)"
    )

    # --- working-set bound ---------------------------------------------------------------
    chunk_elements: int = Field(
        1 << 25, ge=4096, description="top-k works on blocks of about this many elements"
    )
