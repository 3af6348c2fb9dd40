"""Configuration of the Gauntlet validator: the ``[gauntlet]`` config section (SPEC.md section 7).

Every number section 7 names is a field here with the spec's default, so ``GauntletConfig()`` is
the production behaviour (with the spec's **(fix)** departures). The scoring rules in
:mod:`covenant.plugins.gauntlet.rules` take these values as arguments and
:class:`covenant.plugins.gauntlet.scoring.Gauntlet` passes them through; no rule hard-codes one.

Windows are counted in chain windows; "for N windows" always includes the window in which the
rule fired (an exclusion decided at ``S`` with ``N = 20`` covers ``S .. S+19``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["GauntletConfig"]


class GauntletConfig(BaseModel):
    """Options of the Gauntlet validator (defaults = production run, with the spec's fixes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- timing (SPEC 7 "When") ------------------------------------------------------------
    gather_wait_s: float = Field(
        90.0, gt=0.0, description="the gather waits at most this long for in-interval objects"
    )

    # --- stage 2 selection (SPEC 7 "Selection for stage 2") --------------------------------
    uids_per_window: int = Field(20, ge=1, description="peers evaluated in stage 2 per window")
    selection_bins: int = Field(5, ge=1, description="ordinal bins when the swarm is large")
    selection_bin_min_candidates: int = Field(
        100, ge=1, description="candidates from which on they are cut into bins first"
    )
    validator_stake_threshold: float = Field(
        20000.0,
        ge=0.0,
        description="stake above which a uid counts as a validator (not evaluated, not listed)",
    )

    # --- stage 2 loss score (SPEC 7 "Stage 2, loss score") ---------------------------------
    eval_own_samples: int = Field(8, ge=1, description="sequences drawn from the peer's own pool")
    eval_random_samples: int = Field(
        8, ge=1, description="sequences drawn from the active shard, shared by all peers"
    )
    eval_lr_factor: float = Field(
        0.2, gt=0.0, description="the peer's update is applied at eval_lr_factor * outer lr"
    )
    eval_clip_eps: float = Field(
        1e-8, ge=0.0, description="per-tensor clip min(1, median / (norm + eps)) at evaluation"
    )
    bma_decay: float = Field(
        0.95, gt=0.0, lt=1.0, description="BMA <- decay*BMA + (1-decay)*b, b = +1 or -1"
    )
    bma_threshold: float = Field(
        0.10, ge=0.0, le=1.0, description="a BMA below this counts as 0 in the final score"
    )

    # --- ratings (SPEC 7 "Ratings") --------------------------------------------------------
    rating_beta: float = Field(7.0, gt=0.0, description="OpenSkill PlackettLuce beta")
    rating_tau: float = Field(0.1, ge=0.0, description="OpenSkill PlackettLuce tau")
    rating_mu: float = Field(25.0, description="mu of a new rating")
    rating_sigma: float = Field(25.0 / 3.0, gt=0.0, description="sigma of a new rating")
    rating_z: float = Field(3.0, ge=0.0, description="ordinal = mu - z*sigma")
    match_missing_score: float = Field(
        -99.0, description="match score of missing, late, invalid, skipped and excluded peers"
    )
    match_min_entries: int = Field(
        2, ge=2, description="a match needs this many entries; fewer carry to the next window"
    )

    # --- sync score (SPEC 7 "Sync score") --------------------------------------------------
    sync_positions: tuple[int, int] = Field(
        (10, 11), description="global flat positions of the published sync sample (SPEC 6)"
    )
    sync_ema_alpha: float = Field(
        0.2, gt=0.0, le=1.0, description="step-size EMA: alpha*|dtheta| + (1-alpha)*ema"
    )
    sync_step_floor: float = Field(1e-9, gt=0.0, description="the step-size EMA is floored here")
    sync_x_cap: float = Field(3.0, gt=0.0, description="sync = max(0, 1 - min(x, cap)/cap)^power")
    sync_power: float = Field(2.5, gt=0.0, description="exponent of the sync score")
    sync_slash_x: float = Field(
        2.0, ge=0.0, description="gather peers with x above this (or no sample) are slashed"
    )
    sync_slash_multiplier: float = Field(
        0.75, ge=0.0, le=1.0, description="multiplier of the sync slash (final and BMA)"
    )

    # --- copy detection (SPEC 7 "Copy detection") ------------------------------------------
    copy_min_outer_steps: int = Field(
        20, ge=0, description="copy detection runs once this many outer steps have passed"
    )
    copy_levels: tuple[float, float, float] = Field(
        (0.4, 0.5, 0.6),
        description="overlap thresholds: [l0, l1) slash, [l1, l2) reset, >= l2 reset + exclude",
    )
    copy_slash_multiplier: float = Field(
        0.5, ge=0.0, le=1.0, description="multiplier of the lowest copy level (final and BMA)"
    )
    copy_exclude_windows: int = Field(
        20, ge=1, description="windows a copier at the top level is excluded for"
    )
    copy_workers: int = Field(
        1, ge=1, description="threads for the pairwise index overlaps (same result for any value)"
    )

    # --- slashing (SPEC 7 "Slashing") ------------------------------------------------------
    gather_miss_multipliers: tuple[float, ...] = Field(
        (0.75, 0.5, 0.0),
        min_length=1,
        description="multiplier of the 1st, 2nd, ... consecutive gather miss (the last repeats)",
    )
    gather_min_ratio: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="gathered/listed below this: every missing gather peer gets x0",
    )
    gather_miss_limit: int = Field(
        4, ge=1, description="this many misses in the last gather_miss_history windows excludes"
    )
    gather_miss_history: int = Field(8, ge=1, description="gather windows the miss count spans")
    gather_exclude_windows: int = Field(
        20, ge=1, description="windows a peer is excluded for after too many gather misses"
    )
    eval_miss_multiplier: float = Field(
        0.75, ge=0.0, le=1.0, description="selected for stage 2 but upload missing or late"
    )
    inactive_multiplier: float = Field(
        0.75, ge=0.0, le=1.0, description="per window of inactivity (final score only)"
    )
    inactive_windows: int = Field(
        3, ge=0, description="windows of inactivity slashing before the peer's scores reset"
    )
    active_windows: int = Field(
        3, ge=1, description="active = a gradient object in the last this many windows (S-2..S)"
    )
    neg_eval_history: int = Field(8, ge=1, description="evaluations the negative count spans")
    neg_eval_limit: int = Field(
        4, ge=0, description="more than this many negatives in the history: slashed"
    )
    neg_eval_multiplier: float = Field(
        0.25, ge=0.0, le=1.0, description="multiplier while the negative-count rule holds"
    )
    neg_eval_consecutive: int = Field(
        3, ge=1, description="this many consecutive negatives: out of peer lists until positive"
    )
    neg_eval_suspend_rank: int = Field(
        5, ge=1, description="both negative rules are suspended when this-best score is < 0"
    )
    zero_below: float = Field(
        1e-4,
        ge=0.0,
        description="after gather/eval-miss and negative-eval slashes a final below this is 0",
    )

    # --- weights (SPEC 7 "Weights") --------------------------------------------------------
    burn_uid: int = Field(1, ge=0, description="uid that receives burn_rate of the weight")
    burn_rate: float = Field(0.5, ge=0.0, le=1.0, description="share of the weight burnt")
    gather_peers: int = Field(20, ge=1, description="G: peers in the gather list / top weights")
    reserve_peers: int = Field(10, ge=0, description="reserve peers after the top G")
    gather_weight_range: tuple[float, float] = Field(
        (2.0, 1.0), description="top-G weights: linspace(first, last, n)"
    )
    reserve_decay: float = Field(
        0.5, gt=0.0, lt=1.0, description="reserve weight i (1-based) = reserve_decay**i"
    )
    reserve_max_ratio: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="largest reserve weight <= this x the smallest gather weight (scaled down)",
    )
    weights_window: int = Field(
        100, ge=1, description="only peers evaluated in the last this many windows earn weight"
    )
    windows_per_weights: int = Field(
        3, ge=1, description="weights are set in windows S with S % this == 0"
    )

    # --- peer list (SPEC 7 "Peer list") ----------------------------------------------------
    peer_list_every: int = Field(
        2, ge=1, description="a new peer list is posted once this many windows have passed"
    )

    @model_validator(mode="after")
    def _check(self) -> GauntletConfig:
        lo, mid, hi = self.copy_levels
        if not 0.0 < lo <= mid <= hi <= 1.0:
            raise ValueError(
                f"copy_levels must satisfy 0 < l0 <= l1 <= l2 <= 1, got {self.copy_levels}"
            )
        if any(not 0.0 <= m <= 1.0 for m in self.gather_miss_multipliers):
            raise ValueError("gather_miss_multipliers must lie in [0, 1]")
        first, last = self.gather_weight_range
        if not first >= last > 0.0:
            raise ValueError(
                f"gather_weight_range must satisfy first >= last > 0, got {first, last}"
            )
        if self.sync_positions[0] < 0 or self.sync_positions[1] < 0:
            raise ValueError("sync_positions must be non-negative")
        if self.sync_positions[0] == self.sync_positions[1]:
            raise ValueError("sync_positions must be two distinct positions")
        if self.gather_miss_limit > self.gather_miss_history:
            raise ValueError("gather_miss_limit cannot exceed gather_miss_history")
        if self.neg_eval_limit >= self.neg_eval_history:
            raise ValueError("neg_eval_limit must be below neg_eval_history (else it never fires)")
        return self
