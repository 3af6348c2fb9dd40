"""The Gauntlet's pure scoring rules and config (SPEC 7), rule by rule, hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from openskill.models import PlackettLuce
from pydantic import ValidationError

from covenant.plugins.gauntlet import rules
from covenant.plugins.gauntlet.config import GauntletConfig

# ------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_spec_numbers() -> None:
    c = GauntletConfig()
    assert (c.uids_per_window, c.eval_own_samples, c.eval_random_samples) == (20, 8, 8)
    assert (c.eval_lr_factor, c.bma_decay, c.bma_threshold) == (0.2, 0.95, 0.10)
    assert (c.rating_beta, c.rating_tau, c.rating_mu, c.rating_sigma) == (7.0, 0.1, 25.0, 25 / 3)
    assert (c.sync_ema_alpha, c.sync_step_floor, c.sync_x_cap, c.sync_power) == (
        0.2,
        1e-9,
        3.0,
        2.5,
    )
    assert (c.sync_slash_x, c.sync_slash_multiplier, c.sync_positions) == (2.0, 0.75, (10, 11))
    assert (c.selection_bins, c.selection_bin_min_candidates) == (5, 100)
    assert c.validator_stake_threshold == 20000
    assert (c.copy_min_outer_steps, c.copy_levels, c.copy_slash_multiplier) == (
        20,
        (0.4, 0.5, 0.6),
        0.5,
    )
    assert c.copy_exclude_windows == 20
    assert c.gather_miss_multipliers == (0.75, 0.5, 0.0)
    assert (c.gather_min_ratio, c.gather_miss_limit, c.gather_miss_history) == (0.4, 4, 8)
    assert c.gather_exclude_windows == 20
    assert (c.eval_miss_multiplier, c.inactive_multiplier, c.inactive_windows) == (0.75, 0.75, 3)
    assert (c.neg_eval_history, c.neg_eval_limit, c.neg_eval_multiplier) == (8, 4, 0.25)
    assert (c.neg_eval_consecutive, c.neg_eval_suspend_rank) == (3, 5)
    assert (c.zero_below, c.match_missing_score) == (1e-4, -99.0)
    assert (c.burn_uid, c.burn_rate, c.gather_peers, c.reserve_peers) == (1, 0.5, 20, 10)
    assert (c.weights_window, c.windows_per_weights, c.peer_list_every) == (100, 3, 2)
    assert c.active_windows == 3  # S-2..S
    assert c.gather_wait_s == 90


def test_config_forbids_unknown_keys_and_checks_ranges() -> None:
    with pytest.raises(ValidationError):
        GauntletConfig(uid_per_window=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        GauntletConfig(burn_rate=1.5)
    with pytest.raises(ValidationError):
        GauntletConfig(copy_levels=(0.6, 0.5, 0.4))
    with pytest.raises(ValidationError):
        GauntletConfig(gather_miss_multipliers=(0.75, 1.5))
    with pytest.raises(ValidationError):
        GauntletConfig(bma_decay=1.0)
    with pytest.raises(ValidationError):
        GauntletConfig(sync_positions=(3, 3))
    assert all(f.description for f in GauntletConfig.model_fields.values())


# ------------------------------------------------------------------------------------ sync


def _validator() -> dict[str, torch.Tensor]:
    # flat positions 10, 11 are (10, 11) in "a" and (110, 111) in "b"
    return {"a": torch.arange(20.0).reshape(4, 5), "b": torch.arange(100.0, 120.0)}


def test_sync_score_iqm_drops_the_outlier() -> None:
    """SPEC 7 sync: ratios |peer - validator| / step, x = IQM (linear quantiles, inclusive)."""
    sample = {"a": [10.5, 11.0], "b": [110.0, 113.0]}
    step = {"a": [0.5, 1.0], "b": [1.0, 0.2]}
    # ratios: 0.5/0.5 = 1, 0/1 = 0, 0/1 = 0, 2/0.2 = 10 -> sorted 0, 0, 1, 10
    # Q1 = 0, Q3 = 1 + 0.25*(10 - 1) = 3.25 -> inside: 0, 0, 1 -> x = 1/3
    res = rules.sync_score(_validator(), sample, step)
    assert res.x == pytest.approx(1 / 3, abs=1e-12)
    assert res.sync == pytest.approx((1 - (1 / 3) / 3) ** 2.5, abs=1e-12)
    assert (res.tensors, res.ratios) == (2, 4)
    assert rules.interquartile_mean([0, 0, 1, 10]) == pytest.approx(1 / 3)
    assert rules.interquartile_mean([5.0]) == 5.0
    assert rules.interquartile_mean([0.0, 1.0]) == 0.5  # both quartiles fall between the two
    assert rules.interquartile_mean([0.0, 1.0, 50.0]) == 1.0
    assert math.isinf(rules.interquartile_mean([]))
    assert np.quantile([0, 0, 1, 10], 0.75) == 3.25  # numpy's default is linear


def test_sync_score_accepts_two_element_inputs() -> None:
    """The validator's values may come already extracted (a 2-element tensor or sequence)."""
    sample = {"a": [10.5, 11.0], "b": [110.0, 113.0]}
    step = {"a": [0.5, 1.0], "b": [1.0, 0.2]}
    full = rules.sync_score(_validator(), sample, step)
    as_list = rules.sync_score({"a": [10.0, 11.0], "b": [110.0, 111.0]}, sample, step)
    as_tensor = rules.sync_score(
        {"a": torch.tensor([10.0, 11.0]), "b": np.array([110.0, 111.0])}, sample, step
    )
    assert full == as_list == as_tensor
    bf16 = {"a": torch.arange(20.0, dtype=torch.bfloat16), "b": torch.arange(100.0, 120.0)}
    assert rules.sync_score(bf16, sample, step).x == pytest.approx(1 / 3)


def test_sync_score_none_sample_and_nothing_comparable() -> None:
    """SPEC 7: unreadable sample -> sync 0; no comparable tensor -> x = inf."""
    step = {"a": [0.5, 1.0]}
    none = rules.sync_score(_validator(), None, step)
    assert math.isinf(none.x) and none.sync == 0.0
    missing = rules.sync_score(_validator(), {"a": [10.0, 11.0]}, {"b": [1.0, 1.0]})
    assert math.isinf(missing.x) and missing.sync == 0.0
    bad = rules.sync_score(_validator(), {"a": [float("nan"), 11.0], "zz": [1, 2]}, step)
    assert math.isinf(bad.x) and bad.tensors == 0
    # a small tensor (fewer than 12 elements, not 2) has no sample
    assert rules.sync_score({"a": torch.zeros(5)}, {"a": [0.0, 0.0]}, step).tensors == 0
    # a non-finite tensor is left out, the others still count
    ok = rules.sync_score(_validator(), {"a": [10.0, 11.0], "b": [math.inf, 1.0]}, step)
    assert (ok.x, ok.sync, ok.tensors) == (0.0, 1.0, 1)


def test_sync_from_x_shape_and_step_floor() -> None:
    """sync = max(0, 1 - min(x, 3)/3)^2.5; step floored at 1e-9."""
    assert rules.sync_from_x(0.0) == 1.0
    assert rules.sync_from_x(1.5) == pytest.approx(0.5**2.5)
    assert rules.sync_from_x(3.0) == 0.0 and rules.sync_from_x(7.0) == 0.0
    assert rules.sync_from_x(math.inf) == 0.0
    res = rules.sync_score({"a": [0.0, 0.0]}, {"a": [1e-9, 0.0]}, {"a": [0.0, 0.0]})
    assert res.x == pytest.approx(0.5)  # ratios 1e-9/1e-9 = 1 and 0 -> IQM of (0, 1) = 0.5


def test_update_step_ema_init_update_floor_and_no_mutation() -> None:
    """SPEC 7: EMA (alpha 0.2) of |dtheta|, initialised by the first, floored at 1e-9."""
    before = {"a": torch.arange(20.0), "b": [1.0, 1.0], "small": torch.zeros(3)}
    after = {"a": torch.arange(20.0) + 0.5, "b": [1.0, 3.0], "small": torch.ones(3)}
    first = rules.update_step_ema(None, before, after)
    assert first == {"a": [0.5, 0.5], "b": [1e-9, 2.0]}
    step = {"a": [0.5, 0.5], "b": [1e-9, 2.0], "gone": [7.0, 7.0]}
    second = rules.update_step_ema(step, after, {"a": torch.arange(20.0) + 1.5, "b": [1.0, 3.0]})
    assert second["a"] == pytest.approx([0.2 * 1.0 + 0.8 * 0.5] * 2)
    assert second["b"] == pytest.approx([0.8e-9 if 0.8e-9 > 1e-9 else 1e-9, 0.8 * 2.0])
    assert second["gone"] == [7.0, 7.0]  # carried over
    assert step == {"a": [0.5, 0.5], "b": [1e-9, 2.0], "gone": [7.0, 7.0]}  # not mutated
    assert rules.update_step_ema(None, {"a": [0.0, 0.0]}, {"a": [0.1, 0.3]}, alpha=0.5) == {
        "a": [0.1, 0.3]
    }
    with pytest.raises(ValueError):
        rules.update_step_ema(None, {}, {}, alpha=0.0)


# ------------------------------------------------------------------------------------ overlap


def test_index_overlap_identical_disjoint_partial() -> None:
    """SPEC 7 copy detection: sum_t C*k * mean |a ∩ b|/k / sum_t C*k."""
    a = {"w": np.array([[0, 1, 2, 3], [4, 5, 6, 7]])}
    assert rules.index_overlap(a, a) == 1.0
    disjoint = {"w": np.array([[8, 9, 10, 11], [0, 1, 2, 3]])}
    assert rules.index_overlap(a, disjoint) == 0.0
    # tile 0 shares {2, 3} (2/4), tile 1 shares {4} (1/4): mean 3/8
    part = {"w": np.array([[2, 3, 40, 41], [4, 50, 51, 52]])}
    assert rules.index_overlap(a, part) == pytest.approx(3 / 8)
    assert rules.index_overlap(part, a) == rules.index_overlap(a, part)
    # weighted by C*k: "v" has 1 tile of k = 2 fully shared; (2*4 * 3/8 + 1*2 * 1) / (8 + 2)
    a2 = {**a, "v": np.array([[100, 4000]])}
    p2 = {**part, "v": np.array([[4000, 100]]), "only_here": np.array([[1, 2]])}
    assert rules.index_overlap(a2, p2) == pytest.approx((3 + 2) / 10)
    assert rules.index_overlap(a, {"other": np.array([[0]])}) == 0.0
    assert rules.index_overlap({}, {}) == 0.0
    # torch tensors work too (what sparseloco.tile_indices returns)
    assert (
        rules.index_overlap({"w": torch.tensor([[0, 1, 2, 3]])}, {"w": np.array([[3, 9, 1, 8]])})
        == 0.5
    )


def test_index_overlap_shape_mismatch_and_negative_raise() -> None:
    with pytest.raises(ValueError, match="disagree in shape"):
        rules.index_overlap({"w": np.zeros((2, 4), int)}, {"w": np.zeros((2, 3), int)})
    with pytest.raises(ValueError, match="negative"):
        rules.index_overlap({"w": np.array([[-1, 2]])}, {"w": np.array([[1, 2]])})
    with pytest.raises(ValueError, match="2-D"):
        rules.index_overlap({"w": np.array([1, 2])}, {"w": np.array([1, 2])})


def test_index_overlap_matches_brute_force_on_real_tiles() -> None:
    """Tiles of 4096 with k = 64 (production), several blocks of tiles, vs set intersection."""
    rng = np.random.default_rng(7)
    tiles = 300  # more than one packed block

    def upload() -> np.ndarray:
        return np.sort(rng.random((tiles, 4096)).argpartition(64, axis=1)[:, :64], axis=1)

    base = upload()
    mixed = base.copy()
    mixed[:, :32] = upload()[:, :32]  # about half the indices replaced
    mixed = np.sort(mixed, axis=1)
    other = upload()
    ups = {0: {"t": base}, 1: {"t": mixed}, 2: {"t": other}}
    pairs = rules.pairwise_overlaps(ups, block_tiles=128)
    assert rules.pairwise_overlaps(ups, block_tiles=64, workers=3) == pairs  # exact integers
    for (i, j), got in pairs.items():
        a, b = ups[i]["t"], ups[j]["t"]
        want = sum(len(np.intersect1d(a[t], b[t])) for t in range(tiles)) / (tiles * 64)
        assert got == pytest.approx(want, abs=1e-12)
        assert rules.index_overlap(ups[i], ups[j]) == got
    assert pairs[(0, 1)] > 0.45 and pairs[(0, 2)] < 0.05


def test_copy_level_boundaries() -> None:
    """Levels [0.4, 0.5) x0.5, [0.5, 0.6) reset, >= 0.6 exclude."""
    assert [rules.copy_level(v) for v in (0.0, 0.3999, 0.4, 0.4999, 0.5, 0.5999, 0.6, 1.0)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]


def test_copy_flags_later_timestamp_equal_both_and_worst_level() -> None:
    """SPEC 7 (fix): later timestamp of this window flagged, equal flags both, worst level."""
    overlaps = {(2, 3): 0.45, (3, 4): 0.7, (2, 5): 0.55, (5, 6): 0.2, (6, 7): 0.9}
    ts = {2: 100, 3: 101, 4: 90, 5: 100, 6: 50, 7: None}
    flags = rules.copy_flags(overlaps, ts)
    # (2,3): 3 later -> level 1; (3,4): 3 later -> level 3; worst for 3 is level 3 with 4
    assert flags[3] == rules.CopyFlag(level=3, overlap=0.7, partner=4)
    # (2,5): equal timestamps -> both flagged at level 2
    assert flags[2] == rules.CopyFlag(level=2, overlap=0.55, partner=5)
    assert flags[5] == rules.CopyFlag(level=2, overlap=0.55, partner=2)
    assert 4 not in flags and 6 not in flags  # earlier uploads are not flagged
    assert flags[7].level == 3  # no timestamp counts as the latest


# ------------------------------------------------------------------------------------ stage 2


def test_loss_score_is_float32() -> None:
    """score = (L_rand_before - L_rand_after) / L_rand_before in float32."""
    got = rules.loss_score(3.1, 3.0)
    want = float((np.float32(3.1) - np.float32(3.0)) / np.float32(3.1))
    assert got == want
    assert got != (3.1 - 3.0) / 3.1  # the float64 value differs in the last bits
    assert rules.loss_score(2.0, 2.5) == pytest.approx(-0.25)
    assert rules.loss_score(0.0, 1.0) == 0.0


def test_relative_improvement_and_indicator() -> None:
    """Own/random relative improvements (loss <= 0 gives 0); b = +1 iff own > random."""
    assert rules.relative_improvement(4.0, 3.0) == 0.25
    assert rules.relative_improvement(0.0, -1.0) == 0.0
    assert rules.relative_improvement(-2.0, -3.0) == 0.0
    assert rules.eval_indicator(0.3, 0.2) == 1
    assert rules.eval_indicator(0.2, 0.2) == -1  # strictly
    assert rules.eval_indicator(0.1, 0.2) == -1


def test_bma_update_and_threshold() -> None:
    """BMA <- 0.95 BMA + 0.05 b from 0; a BMA below 0.10 counts as 0."""
    bma = 0.0
    seen = []
    for _ in range(3):
        bma = rules.bma_update(bma, +1)
        seen.append(bma)
    assert seen == pytest.approx([0.05, 0.0975, 0.142625])
    assert rules.bma_effective(0.0975) == 0.0
    assert rules.bma_effective(0.142625) == 0.142625
    assert rules.bma_update(0.1, -1) == pytest.approx(0.045)


def test_final_score_formula() -> None:
    """final = ordinal(mu - 3 sigma) * max(0, BMA') * sync."""
    assert rules.final_score((30.0, 5.0), 0.2, 0.5) == pytest.approx(15.0 * 0.2 * 0.5)
    assert rules.final_score((30.0, 5.0), 0.05, 1.0) == 0.0  # BMA under threshold
    assert rules.final_score((30.0, 5.0), -0.5, 1.0) == 0.0
    assert rules.final_score((10.0, 5.0), 0.5, 1.0) == pytest.approx(-2.5)  # negative ordinal
    assert rules.final_score(None, 0.9, 1.0) == pytest.approx(0.0)  # new rating: ordinal 0
    assert rules.ordinal(25.0, 25 / 3) == pytest.approx(0.0)


def test_rate_match_matches_openskill_and_ranks_minus_99_last() -> None:
    """PlackettLuce(beta=7, tau=0.1), one free-for-all, higher is better, -99 for failures."""
    ratings = {5: (30.0, 4.0), 3: None, 9: (25.0, 25 / 3)}
    scores = {5: 0.02, 3: 0.01, 9: -99.0}
    got = rules.rate_match(scores, ratings)
    model = PlackettLuce(beta=7, tau=0.1)
    teams = [[model.rating()], [model.rating(mu=30.0, sigma=4.0)], [model.rating(25.0, 25 / 3)]]
    want = model.rate(teams, scores=[0.01, 0.02, -99.0])
    assert got[3] == (want[0][0].mu, want[0][0].sigma)
    assert got[5] == (want[1][0].mu, want[1][0].sigma)
    assert got[9] == (want[2][0].mu, want[2][0].sigma)
    assert got[9][0] < 25.0 < got[3][0]
    # reproducible regardless of the mapping's order
    assert rules.rate_match(dict(reversed(list(scores.items()))), ratings) == got
    with pytest.raises(ValueError, match="at least 2"):
        rules.rate_match({1: 0.5}, {})
    with pytest.raises(ValueError, match="finite"):
        rules.rate_match({1: 0.5, 2: math.nan}, {})


# ------------------------------------------------------------------------------------ draws


def test_eval_sample_draws_are_the_spec_expressions() -> None:
    """Own: default_rng([seed, uid]).choice(pool, 8); random: default_rng([seed, 2**32])."""
    seed = 2**200 + 12345  # a block hash is a big int
    pool = np.arange(1000, 1300)
    own = rules.own_eval_ids(seed, 17, pool)
    assert own.tolist() == np.random.default_rng([seed, 17]).choice(pool, 8, replace=False).tolist()
    rand = rules.random_eval_ids(seed, 50_000)
    want = np.random.default_rng([seed, 2**32]).choice(50_000, 8, replace=False)
    assert rand.tolist() == want.tolist()
    assert rules.own_eval_ids(seed, 18, pool).tolist() != own.tolist()
    assert sorted(rules.own_eval_ids(seed, 3, [4, 5, 6]).tolist()) == [4, 5, 6]  # small pool
    with pytest.raises(ValueError):
        rules.random_eval_ids(-1, 10)
    with pytest.raises(TypeError):
        rules.random_eval_ids(True, 10)


def test_selection_weight() -> None:
    """1 + windows since last attempted; never attempted counts from first seen."""
    assert rules.selection_weight(100, 97, 10) == 4.0
    assert rules.selection_weight(100, None, 100) == 1.0
    assert rules.selection_weight(100, None, 90) == 11.0


def test_selection_reproducible_and_seed_dependent() -> None:
    """Draws come from default_rng([eval_seed, tag]): same seed same draw, another differs."""
    cands = list(range(2, 42))
    w = {u: float(1 + u % 4) for u in cands}
    a = rules.select_for_evaluation(cands, w, {}, 1234)
    b = rules.select_for_evaluation(list(reversed(cands)), w, {}, 1234)
    c = rules.select_for_evaluation(cands, w, {}, 1235)
    assert a.uids == b.uids and len(a.uids) == 20 and len(set(a.uids)) == 20
    assert a.uids != c.uids
    assert a.bin is None and a.pool == cands
    rng = np.random.default_rng([1234, rules.SELECTION_TAG])
    p = np.array([w[u] for u in cands]) / sum(w.values())
    assert a.uids == [cands[i] for i in rng.choice(len(cands), 20, replace=False, p=p)]
    few = rules.select_for_evaluation([5, 6], {5: 1.0, 6: 1.0}, {}, 1)
    assert sorted(few.uids) == [5, 6]
    assert rules.select_for_evaluation([], {}, {}, 1).uids == []


def test_selection_weights_favour_the_long_unattempted() -> None:
    """Weight 1 + windows since attempted: a weight-50 peer is drawn first far more often."""
    cands = list(range(10))
    w = {u: 1.0 for u in cands} | {7: 50.0}
    firsts = [rules.select_for_evaluation(cands, w, {}, s, count=3).uids[0] for s in range(200)]
    assert firsts.count(7) > 150


def test_selection_bins_at_100_candidates() -> None:
    """>= 100 candidates: 5 bins by ordinal (no rating = 0), first n mod 5 bins one larger."""
    cands = list(range(103))
    ords = {u: float(u) for u in cands if u % 2 == 0}  # odd uids unrated (ordinal 0)
    cut = rules.selection_bins(cands, ords, 5)
    assert [len(b) for b in cut] == [21, 21, 21, 20, 20]
    order = sorted(cands, key=lambda u: (-ords.get(u, 0.0), u))
    assert cut[0] == sorted(order[:21]) and cut[4] == sorted(order[83:])
    sel = rules.select_for_evaluation(cands, {}, ords, 99)
    want_bin = int(np.random.default_rng([99, rules.BIN_TAG]).integers(5))
    assert sel.bin == want_bin and sel.pool == cut[want_bin]
    assert set(sel.uids) <= set(cut[want_bin]) and len(sel.uids) == 20
    bins_seen = {rules.select_for_evaluation(cands, {}, ords, s).bin for s in range(40)}
    assert bins_seen == {0, 1, 2, 3, 4}
    assert rules.select_for_evaluation(cands[:99], {}, ords, 99).bin is None


# ------------------------------------------------------------------------------------ slashing


def test_gather_miss_multiplier_sequence_and_ratio() -> None:
    """Consecutive misses x0.75, x0.5, then x0; gathered/listed < 0.4: x0 for every miss."""
    assert [rules.gather_miss_multiplier(n, 1.0) for n in (1, 2, 3, 4)] == [0.75, 0.5, 0.0, 0.0]
    assert rules.gather_miss_multiplier(1, 0.39) == 0.0
    assert rules.gather_miss_multiplier(1, 0.4) == 0.75
    with pytest.raises(ValueError):
        rules.gather_miss_multiplier(0, 1.0)


def test_gather_miss_exclusion_four_of_last_eight() -> None:
    """>= 4 misses in the last 8 gather windows: excluded."""
    assert rules.gather_miss_excluded([True, False, True, False, True, False, False, True])
    assert not rules.gather_miss_excluded([True, False, True, False, True, False, False, False])
    # misses older than the last 8 do not count
    assert not rules.gather_miss_excluded([True, True, True] + [False] * 7 + [True])


def test_apply_multiplier_only_positive_and_zero_below() -> None:
    """Multipliers apply while final > 0, also to BMA unless inactivity/invalid; < 1e-4 -> 0."""
    assert rules.apply_multiplier(0.8, 0.4, 0.75) == pytest.approx((0.6, 0.3))
    assert rules.apply_multiplier(0.8, 0.4, 0.75, touches_bma=False) == pytest.approx((0.6, 0.4))
    assert rules.apply_multiplier(-0.5, 0.4, 0.0) == (-0.5, 0.4)
    assert rules.apply_multiplier(0.0, 0.4, 0.5) == (0.0, 0.4)
    assert rules.apply_multiplier(1.2e-4, 0.4, 0.75, zero_below=1e-4) == (0.0, pytest.approx(0.3))
    assert rules.apply_multiplier(1.2e-4, 0.4, 0.75)[0] == pytest.approx(0.9e-4)


def test_sync_slashed() -> None:
    """Gather peers with x > 2 or no sample: x0.75."""
    assert rules.sync_slashed(2.5, True) and not rules.sync_slashed(2.0, True)
    assert rules.sync_slashed(None, False) and rules.sync_slashed(0.0, False)
    assert not rules.sync_slashed(None, True)  # nothing computed yet (no step EMA)
    assert rules.sync_slashed(math.inf, True)
    # S-1 before the run's start window: no sample can exist, so a missing one is not slashed
    assert not rules.sync_slashed(None, False, sample_due=False)
    assert rules.sync_slashed(2.5, True, sample_due=False)  # a bad sample still is


def test_negative_eval_rules_and_suspension() -> None:
    """> 4 negatives in the last 8: x0.25; 3 consecutive: held out; 5th best < 0 suspends."""
    five = [True, False, True, True, False, True, True, False]
    assert rules.negative_eval_rules(five) == (True, False)
    four = [True, False, True, False, False, True, True, False]
    assert rules.negative_eval_rules(four) == (False, False)
    assert rules.negative_eval_rules([False, True, True, True]) == (False, True)
    assert rules.negative_eval_rules([True, True]) == (False, False)
    assert rules.fifth_best_negative([0.3, 0.2, 0.1, -0.05, -0.1, 0.5])
    assert not rules.fifth_best_negative([0.3, 0.2, 0.1, 0.0, -0.1, 0.5])  # 5th best is 0.0
    assert not rules.fifth_best_negative([-1.0, -2.0])  # no 5th score: nothing suspended


# ------------------------------------------------------------------------------------ weights


def test_weights_top20_ramp_and_reserve_share() -> None:
    """Top 20 linspace(2, 1), next 10 0.5**i; reserve ~3 % of the non-burn half; sums to 1."""
    final = {uid: 100.0 - uid for uid in range(2, 40)}  # 38 candidates, uid 2 best
    w = rules.weights_from_scores(final)
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert w[1] == 0.5
    ranked = sorted(final, key=lambda u: -final[u])
    gw = [w[u] for u in ranked[:20]]
    assert gw == pytest.approx(list(0.5 * np.linspace(2, 1, 20) / (30 + (1 - 0.5**10))))
    rw = [w[u] for u in ranked[20:30]]
    assert rw[0] / gw[-1] == pytest.approx(0.5)  # largest reserve = half the smallest gather
    assert rw[1] / rw[0] == pytest.approx(0.5)
    reserve_share = sum(rw) / 0.5
    assert reserve_share == pytest.approx((1 - 0.5**10) / (30 + 1 - 0.5**10))
    assert 0.03 <= reserve_share <= 0.035
    assert all(u not in w for u in ranked[30:])


def test_weights_edge_cases() -> None:
    """No candidate: burn uid gets all; burn uid never a candidate; ties by uid; n = 1."""
    assert rules.weights_from_scores({}) == {1: 1.0}
    assert rules.weights_from_scores({5: 0.0, 6: -1.0, 1: 3.0}) == {1: 1.0}
    one = rules.weights_from_scores({7: 0.3})
    assert one == {7: 0.5, 1: 0.5}
    tie = rules.weights_from_scores({9: 1.0, 4: 1.0, 6: 1.0}, gather_peers=2, reserve_peers=1)
    assert tie[4] > tie[6] > tie[9]  # ties broken by uid ascending
    assert tie[4] / tie[6] == pytest.approx(2.0) and tie[9] / tie[6] == pytest.approx(0.5)
    # reserve scaled down when it would exceed half the smallest gather weight
    scaled = rules.weights_from_scores(
        {2: 3.0, 3: 2.0, 4: 1.0}, gather_peers=2, reserve_peers=1, gather_range=(2.0, 0.6)
    )
    assert scaled[4] / scaled[3] == pytest.approx(0.5)
    no_burn = rules.weights_from_scores({2: 1.0, 3: 0.5}, burn_rate=0.0)
    assert no_burn[1] == 0.0 and sum(no_burn.values()) == pytest.approx(1.0)


def test_peer_lists() -> None:
    """Top 20 by weight plus 10 reserves, rest by final then uid; start-up by incentive."""
    weights = {5: 0.3, 7: 0.2, 1: 0.5}
    final = {5: 2.0, 7: 1.0, 8: 0.5, 9: 0.5, 10: -1.0, 11: 3.0}
    g, r = rules.next_peer_list(
        [5, 7, 8, 9, 10, 11], weights, final, gather_peers=3, reserve_peers=2
    )
    assert g == [5, 7, 11] and r == [8, 9]
    g, r = rules.initial_peer_list([4, 2, 3, 6], {2: 0.1, 3: 0.1, 6: 0.5}, gather_peers=2)
    assert g == [6, 2] and r == [3, 4]
