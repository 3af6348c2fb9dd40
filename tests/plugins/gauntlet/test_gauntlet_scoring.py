"""The Gauntlet's per-window state machine (SPEC 7): rule order, slashing sequences, state.

Peers here are hand-made: a tiny "model" of two sampled tensors, synthetic tile indices and
synthetic losses, so every expected number can be worked out by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest

from covenant.plugins.gauntlet import rules
from covenant.plugins.gauntlet.config import GauntletConfig
from covenant.plugins.gauntlet.scoring import (
    Evaluation,
    Gauntlet,
    Observation,
    WindowOutcome,
    WindowPlan,
)

CFG = GauntletConfig()
VALIDATORS = [0]
MODEL = {"w": [10.0, 11.0], "v": [110.0, 111.0]}  # the validator's two sampled values
STEP = {"w": [0.01, 0.01], "v": [0.01, 0.01]}


def tiles(uid: int, window: int) -> dict[str, np.ndarray]:
    """Independent random index sets (4 tiles of 64, k = 8): about 1/8 overlap by chance."""
    rng = np.random.default_rng([uid, window, 99])
    return {"t": np.sort(rng.random((4, 64)).argpartition(8, axis=1)[:, :8], axis=1)}


def obs(
    uid: int,
    window: int,
    *,
    verdict: str = "ok",
    ts: int | None = None,
    sample: Mapping[str, list[float]] | None = MODEL,
    tile: dict[str, np.ndarray] | None = None,
    hotkey: str | None = None,
    uploaded: bool | None = None,
) -> Observation:
    ok = verdict == "ok"
    return Observation(
        uid=uid,
        hotkey=hotkey or f"hk{uid}",
        uploaded=(verdict != "missing") if uploaded is None else uploaded,
        verdict=verdict,
        reason="" if ok else f"{verdict}: test",
        upload_ts=(1000 + uid if ts is None else ts) if verdict != "missing" else None,
        tile_indices=(tile if tile is not None else tiles(uid, window)) if ok else None,
        sync_sample=sample,
        payload_hash=f"h{uid}-{window}",
    )


def good(uid: int, window: int, gain: float = 0.01) -> Evaluation:
    """A peer that trained on its own data: own improves twice as much as random."""
    d = gain * (1 + ((uid * 7 + window) % 5) / 10)
    return Evaluation(
        uid, "ok", own_before=3.0, own_after=3.0 - 2 * d, rand_before=3.0, rand_after=3.0 - d
    )


def bad(uid: int) -> Evaluation:
    """An update that makes both losses worse, its own data more so (score < 0, b = -1)."""
    return Evaluation(uid, "ok", own_before=3.0, own_after=3.2, rand_before=3.0, rand_after=3.1)


def run(
    g: Gauntlet,
    window: int,
    observations: Iterable[Observation],
    *,
    gather: list[int],
    gathered: list[int] | None = None,
    evals: Mapping[int, Evaluation] | None = None,
    evaluator: Any = None,
    outer_step: int = 30,
    reserve: list[int] | None = None,
    seed: int | None = None,
    model: Mapping[str, list[float]] = MODEL,
) -> tuple[WindowPlan, WindowOutcome]:
    observed = {o.uid: o for o in observations}
    if gathered is None:
        gathered = [u for u in gather if u in observed and observed[u].verdict == "ok"]
    plan = g.begin_window(
        window,
        outer_step=outer_step,
        eval_seed=window * 7919 + 13 if seed is None else seed,
        observations=observed,
        validator_values=model,
        gather=gather,
        reserve=reserve or [],
        gathered=gathered,
        validators=VALIDATORS,
    )
    if evals is None:
        evals = {u: evaluator(u, window) for u in plan.evaluate} if evaluator else {}
    out = g.finish_window(plan, {u: e for u, e in evals.items() if u in plan.evaluate})
    json.dumps(out.records, allow_nan=False)  # records are strict JSON, always
    json.dumps(out.summary, allow_nan=False)
    return plan, out


def seeded(
    peers: Mapping[int, Mapping[str, Any]], *, step: Mapping[str, list[float]] | None = STEP
) -> Gauntlet:
    """A Gauntlet whose state already holds these peers (fields of PeerState's JSON)."""
    g = Gauntlet(CFG)
    if step is not None:
        g.observe_outer_step({k: [0.0, 0.0] for k in step}, step)
    state = g.state_dict()
    for uid, fields in peers.items():
        base = {
            "hotkey": f"hk{uid}",
            "first_seen": 0,
            "rating": None,
            "bma": 0.0,
            "final": 0.0,
            "last_upload": None,
            "last_attempted": None,
            "last_evaluated": None,
            "evaluated": [],
            "gather_consecutive": 0,
            "gather_history": [],
            "inactive_count": 0,
            "excluded_until": None,
            "exclusion_reason": "",
            "neg_history": [],
            "held_out": False,
            "sync_x": 0.0,
            "sync": 1.0,
            "sync_window": 0,
        }
        state["peers"][str(uid)] = {**base, **fields}
    return Gauntlet(CFG, json.loads(json.dumps(state)))


STRONG = {"rating": [40.0, 2.0], "bma": 0.5, "final": 4.0}  # ordinal 34 * 0.5 * 1 = 17


# ------------------------------------------------------------------------------ state


def test_state_roundtrip_through_json_gives_an_identical_gauntlet() -> None:
    """state_dict is complete: a reloaded Gauntlet behaves bit for bit like the original."""
    g = Gauntlet(CFG)
    gather = [2, 3, 4, 5]
    for w in range(10, 14):
        run(g, w, [obs(u, w) for u in (2, 3, 4, 5)], gather=gather, evaluator=good)
        g.observe_outer_step({"w": [0.0, 0.0]}, {"w": [0.01, 0.02]})
    text = json.dumps(g.state_dict(), allow_nan=False)
    h = Gauntlet(CFG, json.loads(text))
    assert h.state_dict() == g.state_dict()
    outs = []
    for gg in (g, h):
        _, out = run(gg, 14, [obs(u, 14) for u in (2, 3, 4, 5)], gather=gather, evaluator=good)
        outs.append(out)
    assert outs[0] == outs[1]
    assert g.state_dict() == h.state_dict()
    with pytest.raises(ValueError, match="format"):
        Gauntlet(CFG, {**g.state_dict(), "format": 99})


def test_begin_window_does_not_change_state_and_stale_plans_are_refused() -> None:
    """The window commits atomically in finish_window; a plan is good for one commit."""
    g = seeded({2: STRONG, 3: STRONG})
    before = g.state_dict()
    plan = g.begin_window(
        50,
        outer_step=30,
        eval_seed=1,
        observations={2: obs(2, 50)},
        validator_values=MODEL,
        gather=[2, 3],
        reserve=[],
        gathered=[2],
        validators=[0],
    )
    assert g.state_dict() == before
    g.finish_window(plan, {})
    with pytest.raises(ValueError, match="stale plan"):
        g.finish_window(plan, {})
    with pytest.raises(ValueError, match="not after"):
        g.begin_window(
            50,
            outer_step=30,
            eval_seed=1,
            observations={},
            validator_values=MODEL,
            gather=[],
            reserve=[],
            gathered=[],
            validators=[],
        )


def test_begin_window_checks_its_inputs() -> None:
    g = Gauntlet(CFG)
    kwargs: dict[str, Any] = dict(
        outer_step=0, validator_values=MODEL, gather=[], reserve=[], gathered=[], validators=[]
    )
    with pytest.raises(ValueError, match="is for uid"):
        g.begin_window(5, eval_seed=1, observations={3: obs(2, 5)}, **kwargs)
    with pytest.raises(ValueError, match="verdict"):
        g.begin_window(5, eval_seed=1, observations={2: obs(2, 5, verdict="weird")}, **kwargs)
    with pytest.raises(ValueError):
        g.begin_window(5, eval_seed=-3, observations={}, **kwargs)
    plan = g.begin_window(5, eval_seed=1, observations={2: obs(2, 5)}, **kwargs)
    with pytest.raises(ValueError, match="not selected"):
        g.finish_window(plan, {9: Evaluation(9, "ok")})
    with pytest.raises(ValueError, match="four losses"):
        g.finish_window(plan, {2: Evaluation(2, "ok", own_before=1.0)})


# ------------------------------------------------------------------------------ gather miss


def test_gather_miss_sequence_075_05_0() -> None:
    """Slashing/gather miss: consecutive misses x0.75, x0.5, then x0 (final and BMA)."""
    peers = {u: STRONG for u in (2, 3, 4, 5)}
    g = seeded(peers)
    finals, bmas = [], []
    for w in (60, 61, 62):
        # uid 5 lists but never delivers; 3 of 4 delivered keeps the ratio >= 0.4
        _, out = run(
            g,
            w,
            [obs(u, w) for u in (2, 3, 4)] + [obs(5, w, verdict="missing", sample=None)],
            gather=[2, 3, 4, 5],
        )
        finals.append(out.final_scores[5])
        bmas.append(g.peers[5].bma)
        assert [s.rule for s in out.slashes if s.uid == 5][-1] == "gather_miss"
    # the sync slash (no sample, x0.75) also applies: 4.0 * (0.75*0.75), then * 0.75*0.5, then 0
    assert finals[0] == pytest.approx(4.0 * 0.75 * 0.75)
    assert finals[1] == pytest.approx(4.0 * 0.75 * 0.75 * 0.75 * 0.5)
    assert finals[2] == 0.0
    assert bmas[0] == pytest.approx(0.5 * 0.75 * 0.75)
    rec = out.records[5]
    assert rec["gather"]["consecutive"] == 3 and rec["gather"]["history"] == [True] * 3


def test_gather_ratio_below_04_zeroes_every_missing_peer() -> None:
    """gathered/listed < 0.4: x0 for every missing gather peer."""
    g = seeded({u: STRONG for u in (2, 3, 4, 5, 6)})
    observations = [obs(2, 70), obs(3, 70, verdict="late")] + [
        obs(u, 70, verdict="missing") for u in (4, 5, 6)
    ]
    _, out = run(g, 70, observations, gather=[2, 3, 4, 5, 6])  # 1 of 5 = 0.2 gathered
    for uid in (3, 4, 5, 6):
        assert out.final_scores[uid] == 0.0
        assert any(s.uid == uid and s.rule == "gather_ratio" for s in out.slashes)
    assert out.summary["gathered_ratio"] == pytest.approx(0.2)


def test_four_gather_misses_in_eight_exclude_and_reset() -> None:
    """>= 4 misses in the last 8 gather windows: excluded 20 windows and reset."""
    g = seeded({2: STRONG, 3: STRONG, 4: {**STRONG, "gather_history": [True, False, True, True]}})
    _, out = run(g, 80, [obs(2, 80), obs(3, 80), obs(4, 80, verdict="late")], gather=[2, 3, 4])
    p = g.peers[4]
    assert (p.excluded_until, p.exclusion_reason) == (100, "gather_miss")
    assert (p.rating, p.bma, p.final) == (None, 0.0, 0.0)
    assert [s.rule for s in out.slashes if s.uid == 4] == ["gather_exclude"]
    # excluded peers are neither drawn for evaluation nor listed
    plan, _ = run(g, 81, [obs(u, 81) for u in (2, 3, 4)], gather=[2, 3])
    assert 4 not in plan.candidates


# ------------------------------------------------------------------------------ invalid, eval


def test_invalid_sticks_at_zero_after_the_recompute() -> None:
    """(fix) final recomputed after the match, THEN slashes: invalid -> 0 sticks."""
    g = seeded({2: STRONG, 3: STRONG, 4: STRONG})
    plan, out = run(
        g,
        90,
        [obs(2, 90), obs(3, 90), obs(4, 90, verdict="invalid")],
        gather=[2, 3, 4],
        evaluator=good,
    )
    assert 4 not in plan.evaluate and 4 not in plan.candidates
    rec = out.records[4]
    assert rec["match"]["score"] == -99.0
    assert rec["final"]["recomputed"] and rec["final"]["value_before_slashes"] > 0
    assert out.final_scores[4] == 0.0
    assert g.peers[4].bma == 0.5 * 0.75  # invalid touches only the final (BMA: sync x0.75)
    assert g.peers[4].last_attempted == 90


def test_evaluation_miss_and_invalid_at_evaluation() -> None:
    """Evaluation miss: x0.75 and -99; invalid at evaluation (or non-finite loss): 0, -99."""
    g = seeded({2: STRONG, 3: STRONG, 4: STRONG, 5: STRONG})
    evals = {
        2: good(2, 91),
        3: Evaluation(3, "missing"),
        4: Evaluation(4, "ok", own_before=3.0, own_after=math.nan, rand_before=3.0, rand_after=3.0),
        5: Evaluation(5, "skipped"),
    }
    plan, out = run(g, 91, [obs(u, 91) for u in (2, 3, 4, 5)], gather=[2, 3, 4, 5], evals=evals)
    assert sorted(plan.evaluate) == [2, 3, 4, 5]
    assert out.records[3]["match"]["score"] == -99.0
    assert [s.rule for s in out.slashes if s.uid == 3] == ["eval_miss"]
    r3 = out.records[3]["final"]
    assert out.final_scores[3] == pytest.approx(r3["value_before_slashes"] * 0.75)
    assert out.records[4]["evaluation"]["rule"] == "non_finite_loss"
    assert out.final_scores[4] == 0.0
    # skipped: no effect, not attempted, no match entry
    assert "match" not in out.records[5] and g.peers[5].last_attempted is None
    assert out.final_scores[5] == 4.0


def test_loss_score_bma_and_records() -> None:
    """Stage 2: score in float32, b = +1 iff own improves more, BMA update, all recorded."""
    g = seeded({2: STRONG, 3: STRONG})
    ev = Evaluation(2, "ok", own_before=3.0, own_after=2.9, rand_before=3.1, rand_after=3.0)
    _, out = run(g, 92, [obs(2, 92), obs(3, 92)], gather=[2, 3], evals={2: ev, 3: bad(3)})
    e = out.records[2]["evaluation"]
    assert e["score"] == rules.loss_score(3.1, 3.0)
    assert e["indicator"] == 1 and e["bma_after"] == pytest.approx(0.95 * 0.5 + 0.05)
    assert out.records[3]["evaluation"]["indicator"] == -1
    assert out.scores == {2: e["score"], 3: rules.loss_score(3.0, 3.1)}
    m2, m3 = out.records[2]["match"], out.records[3]["match"]
    assert m2["rating_after"][0] > m3["rating_after"][0]


# ------------------------------------------------------------------------------ negative evals


def test_negative_evaluations_slash_hold_out_and_positive_clears() -> None:
    """> 4 of the last 8 negative: x0.25 each window; 3 in a row: out of peer lists."""
    hist = [True, True, False, True, False, True, False]  # 4 negatives
    g = seeded({2: {**STRONG, "neg_history": hist}, 3: STRONG})
    _, out = run(g, 93, [obs(2, 93), obs(3, 93)], gather=[2, 3], evals={2: bad(2), 3: good(3, 93)})
    assert g.peers[2].neg_history[-1] is True and sum(g.peers[2].neg_history) == 5
    assert [s.rule for s in out.slashes if s.uid == 2].count("neg_eval") == 1
    g2 = seeded({2: {**STRONG, "neg_history": [False, True, True]}, 3: STRONG})
    _, out = run(g2, 94, [obs(2, 94), obs(3, 94)], gather=[2, 3], evals={2: bad(2), 3: good(3, 94)})
    assert g2.peers[2].held_out and out.peer_list is not None
    assert 2 not in out.peer_list[0] + out.peer_list[1]
    _, out = run(g2, 95, [obs(2, 95), obs(3, 95)], gather=[2, 3], evals={2: good(2, 95)})
    assert not g2.peers[2].held_out


def test_negative_rules_suspended_when_fifth_best_is_negative() -> None:
    """Both negative-evaluation rules are suspended in a window whose 5th-best score is < 0."""
    uids = [2, 3, 4, 5, 6]
    g = seeded({u: {**STRONG, "neg_history": [True, True, True, True, False]} for u in uids})
    _, out = run(g, 96, [obs(u, 96) for u in uids], gather=uids, evaluator=lambda u, w: bad(u))
    assert out.summary["fifth_best_negative"] is True
    assert not any(s.rule == "neg_eval" for s in out.slashes)
    assert all(not g.peers[u].held_out for u in uids)
    assert all(len(g.peers[u].neg_history) == 5 for u in uids)  # the window did not count
    # the same window with one good peer among 5: 5th best still negative; with 5 good: not
    _, out = run(
        g,
        97,
        [obs(u, 97) for u in uids],
        gather=uids,
        evaluator=lambda u, w: bad(u) if u != 2 else good(u, w),
    )
    assert out.summary["fifth_best_negative"] is True


# ------------------------------------------------------------------------------ copy


def test_copier_with_later_timestamp_is_excluded_and_minus_99() -> None:
    """Copy detection: overlap 1.0, later timestamp -> reset, -99, excluded 20 windows."""
    g = seeded({2: STRONG, 3: STRONG, 9: STRONG})
    copied = tiles(2, 100)
    observations = [obs(2, 100, ts=1000), obs(3, 100), obs(9, 100, ts=1005, tile=copied)]
    plan, out = run(g, 100, observations, gather=[2, 3, 9], evaluator=good)
    assert 9 not in plan.candidates and 2 in plan.candidates
    assert out.records[9]["copy"]["level"] == 3 and out.records[9]["copy"]["flag_partner"] == 2
    assert out.records[2]["copy"]["level"] == 0
    assert out.records[9]["match"]["score"] == -99.0
    assert out.final_scores[9] == 0.0
    assert g.peers[9].excluded_until == 120 and g.peers[9].exclusion_reason == "copy"
    # a hotkey change does not lift a copy exclusion (only levels < 0.6 are forgiven)
    plan, _ = run(g, 101, [obs(2, 101), obs(3, 101), obs(9, 101, hotkey="new")], gather=[2, 3])
    assert g.peers[9].hotkey == "new" and g.peers[9].excluded_until == 120
    assert 9 not in plan.candidates
    # before 20 outer steps copy detection does not run
    g2 = seeded({2: STRONG, 9: STRONG})
    _, out2 = run(g2, 100, observations[:1] + observations[2:], gather=[2, 9], outer_step=19)
    assert out2.records[9]["copy"]["checked"] is False and g2.peers[9].excluded_until is None


def test_copy_low_level_halves_and_equal_timestamps_flag_both() -> None:
    """[0.4, 0.5): x0.5 on final and BMA; equal timestamps flag both uploads."""
    a = {"t": np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])}
    b = {"t": np.array([[0, 1, 2, 3, 50, 51, 52, 53, 54, 55]])}  # overlap 0.4
    assert rules.index_overlap(a, b) == pytest.approx(0.4)
    g = seeded({2: STRONG, 3: STRONG})
    _, out = run(g, 102, [obs(2, 102, ts=7, tile=a), obs(3, 102, ts=7, tile=b)], gather=[2, 3])
    for uid in (2, 3):
        assert [s.rule for s in out.slashes if s.uid == uid] == ["copy"]
        assert out.final_scores[uid] == pytest.approx(2.0)
        assert g.peers[uid].bma == pytest.approx(0.25)


# ------------------------------------------------------------------------------ sync, inactive


def test_sync_not_computed_without_step_ema_then_computed() -> None:
    """(fix) no EMA yet: no sync score, the last stands; then x from the EMA; slash x > 2."""
    g = seeded({2: {**STRONG, "sync_x": 0.5, "sync": 0.4}, 3: STRONG}, step=None)
    _, out = run(g, 110, [obs(2, 110), obs(3, 110, sample=None)], gather=[2, 3])
    assert out.records[2]["sync"]["computed"] is False and g.peers[2].sync == 0.4
    assert [s.rule for s in out.slashes if s.uid == 3] == ["sync"]  # no sample: slashed anyway
    assert not any(s.rule == "sync" for s in out.slashes if s.uid == 2)
    g.observe_outer_step(MODEL, {"w": [10.02, 11.02], "v": [110.02, 111.02]})
    assert g.step_ema == {"w": pytest.approx([0.02, 0.02]), "v": pytest.approx([0.02, 0.02])}
    far = {"w": [10.1, 11.1], "v": [110.1, 111.1]}  # 0.1 / 0.02 = 5 steps away
    _, out = run(g, 111, [obs(2, 111), obs(3, 111, sample=far)], gather=[2, 3])
    assert out.records[2]["sync"]["x"] == 0.0 and g.peers[2].sync == 1.0
    assert out.records[3]["sync"]["x"] == pytest.approx(5.0) and g.peers[3].sync == 0.0
    assert [s.rule for s in out.slashes if s.uid == 3] == ["sync"]


def test_no_sync_slash_for_a_sample_from_before_the_run() -> None:
    """In the run's first window ``S-1`` precedes the start: no gather peer can have a sample
    and none is slashed for it; from the next window a missing sample is slashed again."""
    g = seeded({2: STRONG, 3: STRONG})
    observed = {u: obs(u, 120, sample=None) for u in (2, 3)}
    plan = g.begin_window(
        120,
        outer_step=0,
        eval_seed=7,
        observations=observed,
        validator_values=MODEL,
        gather=[2, 3],
        reserve=[],
        gathered=[2, 3],
        validators=VALIDATORS,
        sync_sample_due=False,
    )
    out = g.finish_window(plan, {})
    assert not any(s.rule == "sync" for s in out.slashes)
    assert out.records[2]["sync"]["sample_due"] is False
    _, out = run(g, 121, [obs(2, 121, sample=None), obs(3, 121)], gather=[2, 3])
    assert [s.uid for s in out.slashes if s.rule == "sync"] == [2]


def test_inactivity_three_windows_then_reset_and_return_keeps() -> None:
    """Inactive (no gradient in w-2..w): x0.75 (final only) for 3 windows, then reset."""
    g = seeded({2: {**STRONG, "last_upload": 119}, 3: {**STRONG, "last_upload": 119}})
    finals, rules_seen = [], []
    for w in range(120, 127):  # 2 stops uploading after 119: inactive from window 122
        observations = [obs(2, w, verdict="missing", sample=None), obs(3, w)]
        _, out = run(g, w, observations, gather=[])
        finals.append(out.final_scores[2])
        rules_seen.append([s.rule for s in out.slashes if s.uid == 2])
    assert finals == pytest.approx([4.0, 4.0, 3.0, 2.25, 1.6875, 0.0, 0.0])
    assert rules_seen == [[], [], ["inactive"], ["inactive"], ["inactive"], ["inactive_reset"], []]
    assert g.peers[2].rating is None and g.peers[2].bma == 0.0
    assert g.peers[3].final == 4.0  # the active peer is untouched
    # a peer that returns within the 3 windows keeps what it has
    g = seeded({2: {**STRONG, "last_upload": 119}})
    run(g, 122, [obs(2, 122, verdict="missing", sample=None)], gather=[])
    _, out = run(g, 123, [obs(2, 123)], gather=[])
    assert out.final_scores[2] == pytest.approx(3.0) and g.peers[2].inactive_count == 0
    assert out.records[2]["activity"]["rule"] == "returned"


def test_hotkey_change_resets_the_uid() -> None:
    """A new hotkey on a uid is a new peer: state reset (copy levels < 0.6 forgiven)."""
    g = seeded({2: {**STRONG, "gather_history": [True, True, True]}, 3: STRONG})
    _, out = run(g, 130, [obs(2, 130, hotkey="other"), obs(3, 130)], gather=[3])
    p = g.peers[2]
    assert p.hotkey == "other" and p.first_seen == 130 and p.gather_history == []
    assert out.final_scores[2] == 0.0 and out.records[2]["hotkey_event"] == "changed"


# ------------------------------------------------------------------------------ match, weights


def test_lone_match_entry_carries_to_next_window() -> None:
    """A match needs >= 2 entries; fewer carry over to the next window."""
    g = seeded({2: STRONG, 3: STRONG})
    _, out = run(g, 140, [obs(2, 140), obs(3, 140)], gather=[], evals={2: good(2, 140)})
    assert out.records[2]["match"]["carried"] is True and g.peers[2].rating == (40.0, 2.0)
    _, out = run(g, 141, [obs(2, 141), obs(3, 141)], gather=[], evals={3: good(3, 141)})
    assert out.records[2]["match"]["size"] == 2 and g.peers[2].rating != (40.0, 2.0)


def test_match_with_minus_99_and_selection_reproducible() -> None:
    """Same inputs, same eval_seed -> same plan; a -99 entry loses rating."""
    plans = []
    for _ in range(2):
        g = seeded({u: STRONG for u in range(2, 30)})
        plan, out = run(
            g,
            150,
            [obs(u, 150) for u in range(2, 30)],
            gather=[29],
            gathered=[],
            evaluator=good,
            seed=42,
        )
        plans.append(plan.evaluate)
    assert plans[0] == plans[1] and len(plans[0]) == 20
    g = seeded({u: STRONG for u in range(2, 30)})
    other, _ = run(g, 150, [obs(u, 150) for u in range(2, 30)], gather=[29], gathered=[], seed=43)
    assert other.evaluate != plans[0]
    assert out.records[29]["match"]["score"] == -99.0
    assert out.records[29]["match"]["rating_after"][0] < 40.0


def test_weights_every_third_window_and_peer_list_every_second() -> None:
    """Weights when S % 3 == 0; peer list when 2 windows have passed since the last."""
    g = seeded({2: STRONG, 3: STRONG})
    got = {}
    for w in range(160, 166):
        _, out = run(g, w, [obs(2, w), obs(3, w)], gather=[2, 3], evaluator=good)
        got[w] = (out.weights is not None, out.peer_list is not None)
    assert [got[w][0] for w in range(160, 166)] == [False, False, True, False, False, True]
    assert [got[w][1] for w in range(160, 166)] == [True, False, True, False, True, False]
    g = seeded({2: STRONG, 3: STRONG})
    assert g.initial_peer_list([3, 2, 1], {2: 5.0, 3: 1.0}, window=159) == ([2, 3], [])
    _, out = run(g, 160, [obs(2, 160), obs(3, 160)], gather=[2, 3])
    assert out.peer_list is None


def test_weights_only_for_peers_evaluated_in_the_weights_window() -> None:
    """(fix) only peers evaluated within the last 100 windows earn weight."""
    g = seeded({2: {**STRONG, "last_evaluated": 80}, 3: {**STRONG, "last_evaluated": 150}})
    _, out = run(g, 180, [obs(2, 180), obs(3, 180)], gather=[2, 3])
    assert out.weights == {3: 0.5, 1: 0.5}


# ------------------------------------------------------------------------------ scenario


def test_scenario_honest_peers_take_the_weight() -> None:
    """Ten windows: 6 honest peers, a copier, an invalid peer, a missing one (SPEC 7 end to end)."""
    g = Gauntlet(CFG)
    honest = [2, 3, 4, 5, 6, 7]
    copier, invalid, missing = 9, 10, 11
    everyone = [*honest, copier, invalid, missing]
    gather, reserve = g.initial_peer_list(everyone, {u: 1.0 for u in everyone}, window=199)
    assert gather == everyone
    schedule = {200: (gather, reserve)}  # the list posted at S is in force from S + 2
    model = dict(MODEL)
    weights: dict[int, float] | None = None
    for w in range(200, 212):
        gather, reserve = schedule.get(w, (gather, reserve))
        observations = [obs(u, w, ts=1000 + u, sample=model) for u in honest]
        observations.append(obs(copier, w, ts=1100, tile=tiles(2, w), sample=model))
        observations.append(obs(invalid, w, verdict="invalid", sample=model))
        observations.append(obs(missing, w, verdict="missing", sample=None))
        _, out = run(
            g,
            w,
            observations,
            gather=gather,
            reserve=reserve,
            evaluator=good,
            outer_step=20 + w - 200,
            model=model,
        )
        if out.peer_list is not None:
            schedule[w + 2] = out.peer_list
        if out.weights is not None:
            weights = out.weights
        # the validator applies the aggregate: every value moves one step
        new = {k: [x + 0.01 for x in v] for k, v in model.items()}
        g.observe_outer_step(model, new)
        model = new
    assert weights is not None and sum(weights.values()) == pytest.approx(1.0)
    assert all(weights.get(u, 0.0) == 0.0 for u in (copier, invalid, missing))
    honest_share = sum(weights.get(u, 0.0) for u in honest) / (1 - CFG.burn_rate)
    assert honest_share >= 0.95
    assert sum(1 for u in honest if weights.get(u, 0.0) > 0) >= 4
    # flagged in 200..202 while the start-up list was in force (each flag restarts the 20
    # windows); the list posted at 201, in force from 203, leaves it out
    assert g.peers[copier].excluded_until == 222 and g.peers[copier].final == 0.0
    assert copier not in schedule[203][0] + schedule[203][1]
    assert g.peers[invalid].final == 0.0 and g.peers[missing].final == 0.0
    for posted in sorted(schedule)[1:]:  # every list this validator posted
        assert copier not in schedule[posted][0] + schedule[posted][1]
        assert missing not in schedule[posted][0] + schedule[posted][1]  # never active
        assert set(honest) <= set(schedule[posted][0])
