"""The Gauntlet against adversaries (SPEC section 7): every misbehaviour gets the spec's outcome.

A deterministic one-process swarm (``_adversary_sim.py``): the real validator driver
(``GauntletScorer.process_window`` through a real session, model and manual local chain) against
honest miners that train real pseudo-gradients and miners running the ``adversaries`` plugin's
behaviours. Every assertion reads the validator's signed records (``records/{window}/*.json``)
and window summaries, never log text.

* ``test_fast_adversaries_are_caught`` (default, 4 windows): the behaviours the Gauntlet catches
  in their first window: copier, partial copier, noise, late, invalid, forged, replayed; honest
  miners hold >= 95 % of the non-burn weight when weights are first set.
* ``test_every_adversary_in_twelve_windows`` (``slow``): all of them plus the two that take time,
  a stale peer (its sync distance grows by one outer step per window until it is slashed and its
  sync score reaches 0) and a wrong-data peer (the own-versus-random indicator gives it no
  systematic credit, so its BMA stays under the threshold), with the honest share at the end.

The wrong-data peer's indicator is, by construction, a fair coin (it trains on data the
validator does not test it on, so its own and random improvements have the same distribution):
its BMA is a random walk, and whether it stays below 0.10 in a given window depends on the
evaluation draws. The chain's genesis seed is fixed, so the run is reproducible, and the test
asserts the systematic part separately (no own-data advantage, unlike every honest peer).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from _adversary_sim import PeerSpec, Simulation

from covenant.engine.data.prepare import prepare
from covenant.plugins.gauntlet import rules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HONEST = [PeerSpec(f"honest{i}") for i in range(5)]
COPIER = PeerSpec("copier", {"behaviour": "copier"})  # victim: lowest other uid in the list
PARTIAL = PeerSpec("partial", {"behaviour": "partial_copier", "victim": 3})  # honest1, half
NOISE = PeerSpec("noise", {"behaviour": "noise"})
LATE = PeerSpec("late", {"behaviour": "late"})
INVALID = PeerSpec("invalid", {"behaviour": "invalid"})
FORGED = PeerSpec("forged", {"behaviour": "forged"})
REPLAYED = PeerSpec("replayed", {"behaviour": "replayed", "start_window": 2})
WRONG = PeerSpec("wrong", {"behaviour": "wrong_data"})
STALE = PeerSpec("stale", {"behaviour": "stale"})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(out, ["bigtxt"], vocab_size=512, seq_len=64, val_fraction=0.1, max_documents=40)
    return out


def simulate(tmp: Path, data: Path, peers: list[PeerSpec], windows: int) -> Simulation:
    sim = Simulation(tmp, data, peers)
    try:
        sim.run(windows)
    finally:
        sim.close()
    return sim


# --------------------------------------------------------------------------------------------
# what the spec says happens to each of them (shared by both tests)
# --------------------------------------------------------------------------------------------


def check_honest(sim: Simulation) -> None:
    """Honest miners: every upload accepted and evaluated, never flagged or slashed, in sync,
    and credited for their own data (own improvement above random in nearly every window: the
    indicator compares 8 sequences each, so an unlucky draw can flip one)."""
    indicators = []
    for name in sim.names(honest=True):
        gaps = []
        for window, rec in sim.history(name):
            assert rec["observation"]["verdict"] == "ok", (name, window)
            assert rec.get("copy", {}).get("level", 0) == 0, (name, window, rec["copy"])
            assert rec["sync"].get("x") in (None, 0.0), (name, window, rec["sync"])
            ev = rec.get("evaluation")
            assert ev is not None and ev["status"] == "ok", (name, window)
            indicators.append(ev["indicator"])
            gaps.append(ev["own_improvement"] - ev["random_improvement"])
        assert statistics.mean(gaps) > 0, (name, gaps)
        assert sim.slashes(name) == [], (name, sim.slashes(name))
    assert indicators.count(1) >= 0.8 * len(indicators), indicators
    losses = [r.metrics["val_loss"] for r in sim.results]
    assert losses[-1] < losses[0] - 0.3, losses  # the global model trains despite everyone


def check_honest_weight(sim: Simulation) -> None:
    """Honest miners hold >= 95 % of the weight that is not burnt, at the last weights window."""
    window, weights = sim.weights()[-1]
    burn = sim.validator.config.section("gauntlet").burn_uid
    assert weights[burn] == pytest.approx(0.5), weights
    assert sim.honest_share(weights) >= 0.95, (window, weights)
    # ... and the reward plugin set exactly these on chain
    last = sim.chain.weights_history(limit=1)[0]
    assert last.uid == 0 and set(last.weights) == {u for u, w in weights.items() if w > 0}


def check_copier(sim: Simulation, victim: str = "honest0") -> None:
    """Copier: the later of two identical uploads, flagged at the top level (overlap 1), reset
    and excluded for 20 windows: out of evaluation, peer lists and weights. The original, with
    the earlier timestamp, is not flagged."""
    copier, original = sim.uid("copier"), sim.uid(victim)
    flagged = [(w, r) for w, r in sim.history("copier") if r.get("copy", {}).get("rule")]
    assert flagged, "the copier was never flagged"
    first, rec = flagged[0]
    assert first == sim.results[0].window  # caught in its first window
    copy = rec["copy"]
    assert (copy["level"], copy["flag_partner"], copy["flag_overlap"]) == (3, original, 1.0)
    assert copy["rule"] == "copy_exclude"
    mine, theirs = rec["observation"], sim.record(first, victim)["observation"]
    assert mine["upload_ts"] > theirs["upload_ts"]  # the later storage timestamp is flagged
    assert mine["payload_hash"] == theirs["payload_hash"]
    state = rec["state_after"]
    assert state["excluded_until"] == first + 20 and state["exclusion_reason"] == "copy"
    # reset (rating, BMA, final), then last in this window's match with -99
    assert rec["match"]["score"] == -99.0 and rec["match"]["rule"] == "copy_exclude"
    assert rec["match"]["rating_before"] is None and state["rating"][0] < 25.0
    assert (state["bma"], state["final"]) == (0.0, 0.0)
    for window, _ in flagged:  # the pair is compared while both are gathered
        r = sim.record(window, victim)
        assert r["copy"]["level"] == 0 and r["copy"]["max_overlap_with"] == copier, (window, r)
    # excluded: never evaluated, never listed again, never weighted
    for window, r in flagged:  # flagged again while still gathered: 20 windows from the last
        assert r["copy"]["level"] == 3 and r["state_after"]["excluded_until"] == window + 20
    for window, r in sim.history("copier"):
        assert "evaluation" not in r, (window, r)
        assert r["state_after"]["excluded_until"] == flagged[-1][0] + 20 or window <= flagged[-1][0]
    for result in sim.results:
        peers = result.window_record["summary"]["peer_list"]
        if peers is not None and result.window >= first:
            assert copier not in peers[0] + peers[1], (result.window, peers)
    assert all(w.get(copier, 0.0) == 0.0 for _, w in sim.weights())


def check_partial_copier(sim: Simulation) -> None:
    """Partial copier (half of its payload is the victim's): flagged at the 0.5 level
    (overlap in [0.5, 0.6): rating, BMA and final reset) every window it is gathered; the
    victim is not flagged; no weight."""
    victim = next(n for n in sim.names(honest=True) if sim.uid(n) == 3)
    levels = []
    for window, rec in sim.history("partial"):
        copy = rec["copy"]
        if not copy.get("checked"):
            continue
        levels.append(copy["level"])
        assert copy["rule"] == "copy_reset", (window, copy)
        assert copy["flag_partner"] == 3 and 0.5 <= copy["flag_overlap"] < 0.6, (window, copy)
        assert rules.copy_level(copy["flag_overlap"]) == 2
        # reset before this window's match (one BMA step from 0), final 0 after it
        state = rec["state_after"]
        assert state["final"] == 0.0 and abs(state["bma"]) == pytest.approx(0.05), state
        assert sim.record(window, victim)["copy"]["level"] == 0
    assert levels and set(levels) == {2}
    assert all(w.get(sim.uid("partial"), 0.0) == 0.0 for _, w in sim.weights())


def check_noise(sim: Simulation) -> None:
    """Noise: a valid upload that does not improve the loss. Applied alone and clipped to the
    median norm, a random direction moves the loss a little either way (|score| well below the
    honest peers'), so it ranks below every honest peer in every match: its rating falls behind
    theirs and it earns no weight."""
    honest = sim.names(honest=True)
    for window, rec in sim.history("noise"):
        assert rec["observation"]["verdict"] == "ok"
        score = rec["evaluation"]["score"]
        honest_scores = [sim.record(window, n)["evaluation"]["score"] for n in honest]
        assert score < min(honest_scores), (window, score, honest_scores)
        assert abs(score) < 0.5 * statistics.median(honest_scores), (window, score, honest_scores)
        match = rec["match"]
        assert all(sim.record(window, n)["match"]["score"] > match["score"] for n in honest)
    mu, sigma = sim.history("noise")[-1][1]["state_after"]["rating"]
    for name in honest:
        hmu, hsigma = sim.history(name)[-1][1]["state_after"]["rating"]
        assert hmu > mu and rules.ordinal(hmu, hsigma) > rules.ordinal(mu, sigma), name
    assert all(w.get(sim.uid("noise"), 0.0) == 0.0 for _, w in sim.weights())


def check_late(sim: Simulation) -> None:
    """Late uploader: its object exists but is stamped after the interval: "late" in stage 1,
    missing at evaluation (eval-miss slash, -99 in the match) and a gather miss."""
    history = sim.history("late")
    assert history and all(r["observation"]["verdict"] == "late" for _, r in history)
    assert all(r["observation"]["uploaded"] for _, r in history)
    assert all(r["observation"]["reason"].startswith("late: ") for _, r in history)
    misses = [(w, sl) for w, sl in sim.slashes("late") if sl["rule"] == "eval_miss"]
    assert misses, sim.slashes("late")
    window, slash = misses[0]
    assert slash["multiplier"] == 0.75 and slash["reason"] == "upload missing or late at evaluation"
    rec = sim.record(window, "late")
    assert rec["evaluation"]["status"] == "missing" and rec["match"]["score"] == -99.0
    assert any(sl["rule"].startswith("gather") for _, sl in sim.slashes("late"))
    assert all(w.get(sim.uid("late"), 0.0) == 0.0 for _, w in sim.weights())


def check_rejected(sim: Simulation, name: str, reason: str, first: int) -> None:
    """An upload the storage or codec checks refuse: invalid from ``first`` on with the recorded
    reason, slashed as invalid (final 0, -99 in the match), never evaluated, no weight."""
    seen = 0
    for window, rec in sim.history(name):
        if window < first:
            assert rec["observation"]["verdict"] == "ok", (name, window)
            continue
        obs = rec["observation"]
        assert obs["uploaded"] and obs["verdict"] == "invalid", (name, window, obs)
        assert obs["reason"].startswith(f"{reason}: "), (name, window, obs)
        assert "evaluation" not in rec
        slash = [sl for w, sl in sim.slashes(name) if w == window and sl["rule"] == "invalid"]
        assert slash and slash[0]["reason"] == obs["reason"] and slash[0]["multiplier"] == 0.0
        assert rec["match"]["score"] == -99.0 and rec["state_after"]["final"] == 0.0
        seen += 1
    assert seen >= 2, (name, seen)
    assert all(w.get(sim.uid(name), 0.0) == 0.0 for _, w in sim.weights())


def check_stale(sim: Simulation) -> None:
    """Stale peer (never applies an aggregate): its published parameters fall further behind
    every window; once its sync distance x passes 2 it is sync-slashed (x0.75) whenever it is a
    gather peer, and once x reaches 3 its sync score, hence its final score, is 0."""
    xs = [(w, r["sync"].get("x")) for w, r in sim.history("stale") if r["sync"].get("computed")]
    assert xs and xs[-1][1] is not None and xs[-1][1] >= 3.0, xs
    assert xs[0][1] < 2.0, xs  # in sync at first, behind later
    # the sync slash is for gather peers: those whose upload everyone aggregates this window
    slashed = {w for w, sl in sim.slashes("stale") if sl["rule"] == "sync"}
    listed = {
        r.window for r in sim.results if sim.uid("stale") in r.window_record["summary"]["gather"]
    }
    over = {w for w, x in xs if x is not None and x > 2.0}
    assert slashed and slashed == over & listed, (slashed, listed, xs)
    for _, sl in sim.slashes("stale"):
        if sl["rule"] == "sync":
            assert sl["multiplier"] == 0.75 and sl["reason"].startswith("sync x = "), sl
    last = sim.history("stale")[-1][1]
    assert last["sync"]["sync"] == 0.0 and last["state_after"]["final"] == 0.0
    window, weights = sim.weights()[-1]
    assert weights.get(sim.uid("stale"), 0.0) == 0.0, (window, weights)


def check_wrong_data(sim: Simulation) -> None:
    """Wrong-data peer (trains on another pool, receipt of its own): no own-data advantage,
    so the indicator is -1 about as often as +1 while every honest peer's is +1 always; its
    BMA stays below the 0.10 threshold in every weights window, so it earns no weight."""
    history = sim.history("wrong")
    assert all(r["observation"]["verdict"] == "ok" for _, r in history)  # the receipt checks out
    evs = [r["evaluation"] for _, r in history]
    gap = statistics.mean(e["own_improvement"] - e["random_improvement"] for e in evs)
    honest_gap = min(
        statistics.mean(
            r["evaluation"]["own_improvement"] - r["evaluation"]["random_improvement"]
            for _, r in sim.history(name)
        )
        for name in sim.names(honest=True)
    )
    assert gap < 0.25 * honest_gap, (gap, honest_gap)
    assert any(e["indicator"] == -1 for e in evs)
    bmas = {w: r["state_after"]["bma"] for w, r in history}
    for window, weights in sim.weights():
        assert bmas[window] < 0.10, (window, bmas)
        assert weights.get(sim.uid("wrong"), 0.0) == 0.0, (window, weights)


# --------------------------------------------------------------------------------------------


def test_fast_adversaries_are_caught(tmp_path: Path, small_data: Path) -> None:
    peers = [*HONEST[:4], COPIER, PARTIAL, NOISE, LATE, INVALID, FORGED, REPLAYED]
    sim = simulate(tmp_path, small_data, peers, windows=4)
    check_honest(sim)
    check_copier(sim)
    check_partial_copier(sim)
    check_noise(sim)
    check_late(sim)
    check_rejected(sim, "invalid", "payload_checksum", first=0)
    check_rejected(sim, "forged", "hotkey_mismatch", first=0)
    check_rejected(sim, "replayed", "replayed", first=2)
    check_honest_weight(sim)


@pytest.mark.slow
def test_every_adversary_in_twelve_windows(tmp_path: Path, small_data: Path) -> None:
    peers = [*HONEST, COPIER, PARTIAL, WRONG, NOISE, STALE, LATE, INVALID, FORGED, REPLAYED]
    sim = simulate(tmp_path, small_data, peers, windows=12)
    check_honest(sim)
    check_copier(sim)
    check_partial_copier(sim)
    check_noise(sim)
    check_late(sim)
    check_rejected(sim, "invalid", "payload_checksum", first=0)
    check_rejected(sim, "forged", "hotkey_mismatch", first=0)
    check_rejected(sim, "replayed", "replayed", first=2)
    check_stale(sim)
    check_wrong_data(sim)
    check_honest_weight(sim)
