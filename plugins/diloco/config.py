"""``[diloco]``: the outer optimizer and wire precision of the DiLoCo baseline.

Defaults are the DiLoCo paper's (Douillard et al. 2023): outer SGD, learning rate 0.7, Nesterov
momentum 0.9, pseudo-gradients in fp32.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MiB = 1 << 20


class DiLoCoConfig(BaseModel):
    """``[diloco]`` section (see docs/outer.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(
        0.7,
        gt=0,
        description="outer learning rate; multiplied by [outer] alpha / alpha_schedule (1.0 "
        "unless set), so a schedule there scales DiLoCo's rate",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="outer momentum mu: m <- mu*m + g")
    nesterov: bool = Field(
        True, description="Nesterov step g + mu*m (torch.optim.SGD's rule), else the plain m"
    )
    wire_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="precision of the pseudo-gradient on the wire (bf16 halves the bytes)"
    )
    # --- decoder limits (untrusted bytes) ------------------------------------------------
    max_header_bytes: int = Field(16 * MiB, ge=64, description="cap on the JSON header's length")
    max_name_length: int = Field(512, ge=1, description="cap on a tensor name's length")
    check_chunk_elements: int = Field(
        1 << 24, ge=1024, description="finite-value checks read this many elements at a time"
    )
