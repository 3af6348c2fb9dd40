"""The Gauntlet's per-window state machine (SPEC.md section 7), built from :mod:`.rules`.

The I/O driver measures and this module decides. Per window ``S`` the driver calls:

1. :meth:`Gauntlet.begin_window` with what stage 1 measured for every uid (:class:`Observation`),
   the validator's own sync sample, the peer list in force at ``S`` and the uids that went into
   the aggregate. It runs, in the spec's order, inactivity, copy detection, sync and gather-miss
   rules, and draws the stage-2 uids (:attr:`WindowPlan.evaluate`, in evaluation order).
2. :meth:`Gauntlet.finish_window` with the stage-2 losses (:class:`Evaluation`). It runs the
   evaluation bookkeeping, the negative-evaluation rules, the match, the final scores, the
   weights (when ``S % windows_per_weights == 0``) and the next peer list (when due), and
   returns a :class:`WindowOutcome` with a JSON record per uid of every input and intermediate
   number, which the driver signs and stores.

``begin_window`` does not change the state: it works on a copy held by the plan, and
``finish_window`` commits the whole window at once, so a validator that dies mid-window replays
the window from the same state. :meth:`Gauntlet.observe_outer_step` (the step-size EMA of the
validator's own outer steps) is independent of windows and may be called at any time.

Deterministic: the same config, state and inputs give the same outcome, bit for bit (every draw
comes from ``eval_seed``; iteration is in uid order). :meth:`Gauntlet.state_dict` is plain JSON
(``json.dumps(..., allow_nan=False)`` works; an infinite sync ``x`` is stored as ``null``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from covenant.plugins.gauntlet import rules
from covenant.plugins.gauntlet.config import GauntletConfig

__all__ = [
    "EVALUATION_STATUSES",
    "STATE_FORMAT",
    "VERDICTS",
    "Evaluation",
    "Gauntlet",
    "Observation",
    "PeerState",
    "Slash",
    "WindowOutcome",
    "WindowPlan",
]

#: Version of :meth:`Gauntlet.state_dict`'s layout.
STATE_FORMAT = 1
VERDICTS = ("ok", "missing", "late", "early", "invalid")
EVALUATION_STATUSES = ("ok", "missing", "invalid", "skipped")


@dataclass(frozen=True)
class Observation:
    """What the driver measured for one uid in window ``S`` (stage 1)."""

    uid: int
    hotkey: str
    uploaded: bool  # a gradient object for S exists (even late/invalid)
    verdict: str  # "ok" | "missing" | "late" | "early" | "invalid"
    reason: str = ""  # recorded reason of a non-ok verdict (e.g. "bad_signature: ...")
    upload_ts: int | None = None  # storage timestamp, whole seconds
    tile_indices: Mapping[str, np.ndarray] | None = None  # valid uploads only (copy detection)
    sync_sample: Mapping[str, Sequence[float]] | None = None  # debug/{S-1}; None = unreadable
    payload_hash: str | None = None


@dataclass(frozen=True)
class Evaluation:
    """Stage-2 result for one selected uid.

    ``status``: "ok" (losses measured), "missing" (upload missing or late at evaluation),
    "invalid" (failed to decode or apply) or "skipped" (not reached before the chain window
    changed: no effect, not counted as attempted).
    """

    uid: int
    status: str
    own_before: float | None = None
    own_after: float | None = None
    rand_before: float | None = None
    rand_after: float | None = None


@dataclass(frozen=True)
class Slash:
    """One slashing decision of the window.

    ``multiplier`` applies to the final score while it is > 0 (and to the BMA when
    ``touches_bma``); ``reset`` marks a reset of rating, BMA and final score (multiplier 0);
    ``zero_below``: a final left below ``config.zero_below`` becomes 0.
    """

    uid: int
    rule: str
    multiplier: float
    reason: str
    touches_bma: bool = True
    zero_below: bool = False
    reset: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "rule": self.rule,
            "multiplier": self.multiplier,
            "reason": self.reason,
            "touches_bma": self.touches_bma,
            "zero_below": self.zero_below,
            "reset": self.reset,
        }


@dataclass
class PeerState:
    """Everything the validator remembers about one uid (reset when its hotkey changes)."""

    hotkey: str
    first_seen: int  # window the validator first saw this hotkey on the uid
    rating: tuple[float, float] | None = None  # OpenSkill (mu, sigma); None = never rated
    bma: float = 0.0
    final: float = 0.0
    last_upload: int | None = None  # last window with a gradient object
    last_attempted: int | None = None  # last stage-2 attempt (ok, missing or invalid)
    last_evaluated: int | None = None  # last stage-2 evaluation with a score
    evaluated: list[int] = field(default_factory=list)  # windows with a score (weights window)
    gather_consecutive: int = 0  # consecutive gather misses
    gather_history: list[bool] = field(default_factory=list)  # last gather windows, True = miss
    inactive_count: int = 0  # windows inactive so far (0 = active)
    excluded_until: int | None = None  # excluded while window < excluded_until
    exclusion_reason: str = ""  # "copy" | "gather_miss"
    neg_history: list[bool] = field(default_factory=list)  # counted evaluations, True = negative
    held_out: bool = False  # out of peer lists until a positive evaluation
    sync_x: float | None = None  # last computed x (math.inf: nothing comparable)
    sync: float | None = None  # last computed sync score; None = never computed
    sync_window: int | None = None

    def copy(self) -> PeerState:
        return PeerState(
            **{
                **self.__dict__,
                "evaluated": list(self.evaluated),
                "gather_history": list(self.gather_history),
                "neg_history": list(self.neg_history),
            }
        )

    def excluded(self, window: int) -> bool:
        return self.excluded_until is not None and window < self.excluded_until

    def active(self, window: int, span: int) -> bool:
        return self.last_upload is not None and self.last_upload >= window - (span - 1)

    def reset_scores(self) -> None:
        """Reset rating, BMA and final score (copy levels >= 0.5, long inactivity, exclusion)."""
        self.rating = None
        self.bma = 0.0
        self.final = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "hotkey": self.hotkey,
            "first_seen": self.first_seen,
            "rating": None if self.rating is None else [self.rating[0], self.rating[1]],
            "bma": self.bma,
            "final": self.final,
            "last_upload": self.last_upload,
            "last_attempted": self.last_attempted,
            "last_evaluated": self.last_evaluated,
            "evaluated": list(self.evaluated),
            "gather_consecutive": self.gather_consecutive,
            "gather_history": list(self.gather_history),
            "inactive_count": self.inactive_count,
            "excluded_until": self.excluded_until,
            "exclusion_reason": self.exclusion_reason,
            "neg_history": list(self.neg_history),
            "held_out": self.held_out,
            "sync_x": _num(self.sync_x),
            "sync": self.sync,
            "sync_window": self.sync_window,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PeerState:
        rating = data["rating"]
        sync = data["sync"]
        x = data["sync_x"]
        return cls(
            hotkey=str(data["hotkey"]),
            first_seen=int(data["first_seen"]),
            rating=None if rating is None else (float(rating[0]), float(rating[1])),
            bma=float(data["bma"]),
            final=float(data["final"]),
            last_upload=_opt_int(data["last_upload"]),
            last_attempted=_opt_int(data["last_attempted"]),
            last_evaluated=_opt_int(data["last_evaluated"]),
            evaluated=[int(w) for w in data["evaluated"]],
            gather_consecutive=int(data["gather_consecutive"]),
            gather_history=[bool(m) for m in data["gather_history"]],
            inactive_count=int(data["inactive_count"]),
            excluded_until=_opt_int(data["excluded_until"]),
            exclusion_reason=str(data["exclusion_reason"]),
            neg_history=[bool(n) for n in data["neg_history"]],
            held_out=bool(data["held_out"]),
            # a computed sync with x = null was infinite; no computed sync has both null
            sync_x=(math.inf if sync is not None else None) if x is None else float(x),
            sync=None if sync is None else float(sync),
            sync_window=_opt_int(data["sync_window"]),
        )


@dataclass(frozen=True)
class WindowPlan:
    """What :meth:`Gauntlet.begin_window` decided; hand it back to ``finish_window``."""

    window: int
    outer_step: int
    eval_seed: int
    evaluate: list[int]  # stage-2 uids, in evaluation order
    candidates: list[int]  # every uid the draw could pick
    selection_bin: int | None  # the ordinal bin drawn from (None: not binned)
    gather: list[int]
    reserve: list[int]
    gathered: list[int]
    validators: list[int]
    slashes: list[Slash]  # stage-1 decisions, applied by finish_window after the match
    sync_computed: bool
    _work: dict[int, PeerState] = field(repr=False, compare=False)
    _entries: dict[int, tuple[float, str]] = field(repr=False, compare=False)  # stage-1 -99s
    _carried: dict[int, tuple[float, str]] = field(repr=False, compare=False)
    _records: dict[int, dict[str, Any]] = field(repr=False, compare=False)
    _summary: dict[str, Any] = field(repr=False, compare=False)
    _revision: int = field(repr=False, compare=False, default=0)


@dataclass(frozen=True)
class WindowOutcome:
    """Everything :meth:`Gauntlet.finish_window` decided for window ``S``."""

    window: int
    records: dict[int, dict[str, Any]]  # per uid: inputs, intermediates, rules (JSON)
    final_scores: dict[int, float]  # every known uid after the window
    weights: dict[int, float] | None  # set on chain this window (burn uid included)
    peer_list: tuple[list[int], list[int]] | None  # (gather, reserve) to post this window
    slashes: list[Slash]
    scores: dict[int, float]  # this window's stage-2 loss scores
    summary: dict[str, Any]  # window-level inputs and numbers (JSON)


def _num(x: float | None) -> float | None:
    """A float for JSON: non-finite values become None (documented per field)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _rating_json(r: tuple[float, float] | None) -> list[float] | None:
    return None if r is None else [r[0], r[1]]


class Gauntlet:
    """The validator's scoring state across windows (see the module docstring)."""

    def __init__(self, config: GauntletConfig, state: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self._peers: dict[int, PeerState] = {}
        self._step_ema: dict[str, list[float]] | None = None
        self._last_window: int | None = None
        self._peer_list_window: int | None = None
        self._pending: dict[int, tuple[float, str]] = {}  # match entries carried over
        self._last_weights: dict[int, float] | None = None
        self._last_weights_window: int | None = None
        self._revision = 0
        if state is not None:
            self._load(state)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The complete state as plain JSON (string keys for uids)."""
        return {
            "format": STATE_FORMAT,
            "revision": self._revision,
            "last_window": self._last_window,
            "peer_list_window": self._peer_list_window,
            "step_ema": None
            if self._step_ema is None
            else {k: list(v) for k, v in sorted(self._step_ema.items())},
            "pending_match": {
                str(uid): {"score": score, "rule": rule}
                for uid, (score, rule) in sorted(self._pending.items())
            },
            "last_weights": None
            if self._last_weights is None
            else {str(uid): w for uid, w in sorted(self._last_weights.items())},
            "last_weights_window": self._last_weights_window,
            "peers": {str(uid): peer.to_json() for uid, peer in sorted(self._peers.items())},
        }

    def _load(self, state: Mapping[str, Any]) -> None:
        fmt = state.get("format")
        if fmt != STATE_FORMAT:
            raise ValueError(f"unsupported gauntlet state format {fmt!r} (expected {STATE_FORMAT})")
        self._revision = int(state["revision"])
        self._last_window = _opt_int(state["last_window"])
        self._peer_list_window = _opt_int(state["peer_list_window"])
        ema = state["step_ema"]
        self._step_ema = (
            None if ema is None else {str(k): [float(x) for x in v] for k, v in ema.items()}
        )
        self._pending = {
            int(uid): (float(e["score"]), str(e["rule"]))
            for uid, e in state["pending_match"].items()
        }
        weights = state["last_weights"]
        self._last_weights = (
            None if weights is None else {int(uid): float(w) for uid, w in weights.items()}
        )
        self._last_weights_window = _opt_int(state["last_weights_window"])
        self._peers = {int(uid): PeerState.from_json(p) for uid, p in state["peers"].items()}

    @property
    def peers(self) -> Mapping[int, PeerState]:
        """Read-only view of the per-uid state (do not modify the values)."""
        return self._peers

    @property
    def step_ema(self) -> Mapping[str, list[float]] | None:
        return self._step_ema

    # ------------------------------------------------------------------ step EMA

    def observe_outer_step(self, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
        """Update the step-size EMA after the validator applied an aggregate (SPEC 7 sync).

        ``before``/``after``: the validator's tensors (or their two sampled values) around its
        own outer step, as :func:`rules.update_step_ema` takes them.
        """
        cfg = self.config
        self._step_ema = rules.update_step_ema(
            self._step_ema,
            before,
            after,
            cfg.sync_ema_alpha,
            positions=cfg.sync_positions,
            floor=cfg.sync_step_floor,
        )

    # ------------------------------------------------------------------ peer lists

    def initial_peer_list(
        self,
        candidates: Sequence[int],
        incentive: Mapping[int, float],
        *,
        window: int | None = None,
    ) -> tuple[list[int], list[int]]:
        """The start-up ``(gather, reserve)`` list, ranked by chain incentive (SPEC 7).

        Leaves out the burn uid and peers this validator excludes or holds out. With ``window``
        the posting is remembered, so the next list is due ``peer_list_every`` windows later;
        without it ``finish_window`` posts at its first call.
        """
        cfg = self.config
        at = window if window is not None else (self._last_window or 0) + 1
        keep = []
        for uid in candidates:
            peer = self._peers.get(uid)
            if uid == cfg.burn_uid:
                continue
            if peer is not None and (peer.excluded(at) or peer.held_out):
                continue
            keep.append(uid)
        out = rules.initial_peer_list(
            keep, incentive, gather_peers=cfg.gather_peers, reserve_peers=cfg.reserve_peers
        )
        if window is not None:
            self._peer_list_window = window
        return out

    # ------------------------------------------------------------------ window, stage 1

    def begin_window(
        self,
        window: int,
        *,
        outer_step: int,
        eval_seed: int,
        observations: Mapping[int, Observation],
        validator_values: Mapping[str, Any],
        gather: Sequence[int],
        reserve: Sequence[int],
        gathered: Sequence[int],
        validators: Collection[int],
        sync_sample_due: bool = True,
    ) -> WindowPlan:
        """Stage-1 rules of window ``S`` and the stage-2 draw (SPEC 7 order).

        Uids absent from ``observations`` count as having no gradient object for ``S``; pass an
        observation for every uid of the metagraph (validators may be left out).
        ``sync_sample_due=False`` when ``S-1`` precedes the run's start window (no sample can
        exist, so a missing one is not slashed; :func:`rules.sync_slashed`).
        """
        cfg = self.config
        if self._last_window is not None and window <= self._last_window:
            raise ValueError(f"window {window} is not after the last finished {self._last_window}")
        seed = rules.check_eval_seed(eval_seed)
        for uid, obs in observations.items():
            if obs.uid != uid:
                raise ValueError(f"observation under uid {uid} is for uid {obs.uid}")
            if obs.verdict not in VERDICTS:
                raise ValueError(f"uid {uid}: unknown verdict {obs.verdict!r}")
        span = cfg.active_windows
        validator_set = {int(u) for u in validators}
        gather_list = list(dict.fromkeys(int(u) for u in gather))
        reserve_list = [u for u in dict.fromkeys(int(u) for u in reserve) if u not in gather_list]
        gathered_set = {int(u) for u in gathered}

        work = {uid: peer.copy() for uid, peer in self._peers.items()}
        records: dict[int, dict[str, Any]] = {}
        slashes: list[Slash] = []
        entries: dict[int, tuple[float, str]] = {}

        def rec(uid: int) -> dict[str, Any]:
            if uid not in records:
                before = self._peers.get(uid)
                records[uid] = {
                    "window": window,
                    "uid": uid,
                    "state_before": None if before is None else before.to_json(),
                }
            return records[uid]

        def enter(uid: int, score: float, rule: str) -> None:
            old = entries.get(uid)
            if old is None or score < old[0]:  # the worst entry of the window stands
                entries[uid] = (score, rule)

        # --- hotkeys: a new hotkey on a uid is a new peer ------------------------------------
        for uid in sorted(observations):
            obs = observations[uid]
            r = rec(uid)
            r["observation"] = {
                "hotkey": obs.hotkey,
                "uploaded": obs.uploaded,
                "verdict": obs.verdict,
                "reason": obs.reason,
                "upload_ts": obs.upload_ts,
                "payload_hash": obs.payload_hash,
                "sync_sample": _sample_json(obs.sync_sample),
                "has_tile_indices": obs.tile_indices is not None,
            }
            peer = work.get(uid)
            if peer is None:
                work[uid] = PeerState(hotkey=obs.hotkey, first_seen=window)
                r["hotkey_event"] = "new"
            elif peer.hotkey != obs.hotkey:
                # SPEC 7: a hotkey change forgives copy levels < 0.6, so only a running copy
                # exclusion (level >= 0.6) survives the reset.
                fresh = PeerState(hotkey=obs.hotkey, first_seen=window)
                if peer.exclusion_reason == "copy" and peer.excluded(window):
                    fresh.excluded_until = peer.excluded_until
                    fresh.exclusion_reason = "copy"
                work[uid] = fresh
                r["hotkey_event"] = "changed"
                r["previous_hotkey"] = peer.hotkey
            else:
                r["hotkey_event"] = None
            if obs.uploaded:
                work[uid].last_upload = window
        carried = {uid: e for uid, e in self._pending.items() if uid in work}
        for uid in list(carried):
            if records.get(uid, {}).get("hotkey_event") == "changed":
                del carried[uid]
        excluded_before = {uid for uid, p in work.items() if p.excluded(window)}

        # --- 1. inactivity --------------------------------------------------------------------
        for uid in sorted(work):
            peer = work[uid]
            if peer.last_upload is None:
                continue  # never uploaded: nothing to be inactive from
            active = peer.active(window, span)
            rule = None
            if active:
                if peer.inactive_count:
                    rule = "returned"  # keeps what it has
                peer.inactive_count = 0
            else:
                peer.inactive_count += 1
                reason = f"no gradient object in windows {window - span + 1}..{window}"
                if peer.inactive_count <= cfg.inactive_windows:
                    rule = "inactive"
                    slashes.append(
                        Slash(uid, rule, cfg.inactive_multiplier, reason, touches_bma=False)
                    )
                elif peer.inactive_count == cfg.inactive_windows + 1:
                    rule = "inactive_reset"
                    peer.reset_scores()
                    slashes.append(Slash(uid, rule, 0.0, reason, reset=True))
            if rule is not None or uid in records:
                rec(uid)["activity"] = {
                    "last_upload": peer.last_upload,
                    "active": active,
                    "inactive_count": peer.inactive_count,
                    "rule": rule,
                }

        # --- 2. copy detection ----------------------------------------------------------------
        copy_checked = outer_step >= cfg.copy_min_outer_steps
        uploads = {
            uid: observations[uid].tile_indices
            for uid in sorted(gathered_set)
            if uid in observations and observations[uid].tile_indices is not None
        }
        overlaps: dict[tuple[int, int], float] = {}
        flags: dict[int, rules.CopyFlag] = {}
        if copy_checked and len(uploads) >= 2:
            overlaps = rules.pairwise_overlaps(
                {u: t for u, t in uploads.items() if t is not None}, workers=cfg.copy_workers
            )
            stamps = {uid: observations[uid].upload_ts for uid in uploads}
            flags = rules.copy_flags(overlaps, stamps, cfg.copy_levels)
        best: dict[int, tuple[float, int]] = {}
        for (i, j), ov in overlaps.items():
            for a, b in ((i, j), (j, i)):
                if a not in best or ov > best[a][0]:
                    best[a] = (ov, b)
        for uid in sorted(uploads):
            flag = flags.get(uid)
            rule = None
            if flag is not None and uid in work:
                peer = work[uid]
                reason = (
                    f"index overlap {flag.overlap:.4f} with uid {flag.partner} "
                    f"(level {flag.level}, later or equal storage timestamp)"
                )
                if flag.level == 1:
                    rule = "copy"
                    slashes.append(Slash(uid, rule, cfg.copy_slash_multiplier, reason))
                elif flag.level == 2:
                    rule = "copy_reset"
                    peer.reset_scores()
                    slashes.append(Slash(uid, rule, 0.0, reason, reset=True))
                else:
                    rule = "copy_exclude"
                    peer.reset_scores()
                    peer.excluded_until = window + cfg.copy_exclude_windows
                    peer.exclusion_reason = "copy"
                    slashes.append(Slash(uid, rule, 0.0, reason, reset=True))
                    enter(uid, cfg.match_missing_score, rule)
            top = best.get(uid)
            rec(uid)["copy"] = {
                "checked": copy_checked,
                "max_overlap": None if top is None else top[0],
                "max_overlap_with": None if top is None else top[1],
                "level": 0 if flag is None else flag.level,
                "flag_overlap": None if flag is None else flag.overlap,
                "flag_partner": None if flag is None else flag.partner,
                "rule": rule,
            }

        # --- 3. sync --------------------------------------------------------------------------
        step = self._step_ema
        sync_computed = bool(step)
        mine = {
            name: pair
            for name, pair in (
                (n, rules.sample_values(v, cfg.sync_positions)) for n, v in validator_values.items()
            )
            if pair is not None
        }
        for uid in sorted(observations):
            obs = observations[uid]
            peer = work[uid]
            entry: dict[str, Any] = {
                "computed": sync_computed,
                "has_sample": obs.sync_sample is not None,
            }
            if sync_computed and step is not None:
                res = rules.sync_score(
                    {n: list(p) for n, p in mine.items()},
                    obs.sync_sample,
                    step,
                    positions=cfg.sync_positions,
                    step_floor=cfg.sync_step_floor,
                    x_cap=cfg.sync_x_cap,
                    power=cfg.sync_power,
                )
                peer.sync_x, peer.sync, peer.sync_window = res.x, res.sync, window
                entry.update(
                    x=_num(res.x),
                    x_infinite=math.isinf(res.x),
                    sync=res.sync,
                    tensors=res.tensors,
                    ratios=res.ratios,
                )
            else:
                entry.update(x=_num(peer.sync_x), sync=peer.sync, stands_from=peer.sync_window)
            rec(uid)["sync"] = entry
        for uid in gather_list:
            if uid not in work:
                continue
            obs_g = observations.get(uid)
            has_sample = obs_g is not None and obs_g.sync_sample is not None
            x = work[uid].sync_x if sync_computed else None
            slashed = rules.sync_slashed(
                x, has_sample, threshold=cfg.sync_slash_x, sample_due=sync_sample_due
            )
            if slashed:
                reason = (
                    "no sync sample" if not has_sample else f"sync x = {x:.4g} > {cfg.sync_slash_x}"
                )
                slashes.append(Slash(uid, "sync", cfg.sync_slash_multiplier, reason))
            rec(uid).setdefault("sync", {"computed": sync_computed, "has_sample": has_sample})
            rec(uid)["sync"]["rule"] = "sync" if slashed else None
            rec(uid)["sync"]["sample_due"] = sync_sample_due

        # --- 4. gather miss -------------------------------------------------------------------
        delivered = sum(1 for uid in gather_list if uid in gathered_set)
        ratio = delivered / len(gather_list) if gather_list else 1.0
        for uid in sorted(set(gather_list) | set(reserve_list) | gathered_set):
            listed = "gather" if uid in gather_list else "reserve" if uid in reserve_list else None
            rec(uid)["gather"] = {"listed": listed, "gathered": uid in gathered_set}
        for uid in gather_list:
            peer_g = work.get(uid)
            if peer_g is None or uid in excluded_before:
                continue  # unknown uid, or already serving an exclusion: nothing to decide
            miss = uid not in gathered_set
            peer_g.gather_history = [*peer_g.gather_history, miss][-cfg.gather_miss_history :]
            g = rec(uid)["gather"]
            g["miss"] = miss
            rule = None
            if not miss:
                peer_g.gather_consecutive = 0
            else:
                peer_g.gather_consecutive += 1
                enter(uid, cfg.match_missing_score, "gather_miss")
                misses = sum(peer_g.gather_history)
                if rules.gather_miss_excluded(
                    peer_g.gather_history, limit=cfg.gather_miss_limit, span=cfg.gather_miss_history
                ):
                    rule = "gather_exclude"
                    reason = f"{misses} gather misses in the last {cfg.gather_miss_history}"
                    peer_g.reset_scores()
                    peer_g.excluded_until = window + cfg.gather_exclude_windows
                    peer_g.exclusion_reason = "gather_miss"
                    # a served exclusion starts afresh, else the first miss after it re-excludes
                    peer_g.gather_history = []
                    peer_g.gather_consecutive = 0
                    slashes.append(Slash(uid, rule, 0.0, reason, reset=True))
                else:
                    m = rules.gather_miss_multiplier(
                        peer_g.gather_consecutive,
                        ratio,
                        multipliers=cfg.gather_miss_multipliers,
                        min_ratio=cfg.gather_min_ratio,
                    )
                    rule = "gather_ratio" if ratio < cfg.gather_min_ratio else "gather_miss"
                    reason = (
                        f"gathered/listed {ratio:.3f} < {cfg.gather_min_ratio}"
                        if rule == "gather_ratio"
                        else f"consecutive gather miss {peer_g.gather_consecutive}"
                    )
                    slashes.append(Slash(uid, rule, m, reason, zero_below=True))
            g.update(
                consecutive=peer_g.gather_consecutive,
                history=list(peer_g.gather_history),
                ratio=ratio,
                rule=rule,
            )

        # --- stage-1 invalid ------------------------------------------------------------------
        for uid in sorted(observations):
            obs = observations[uid]
            if obs.verdict != "invalid":
                continue
            work[uid].last_attempted = window  # an invalid upload counts as attempted
            reason = obs.reason or "invalid upload"
            slashes.append(Slash(uid, "invalid", 0.0, reason, touches_bma=False))
            enter(uid, cfg.match_missing_score, "invalid")

        # --- 5. selection for stage 2 ---------------------------------------------------------
        candidates = [
            uid
            for uid in sorted(work)
            if work[uid].active(window, span)
            and not work[uid].excluded(window)
            and uid not in validator_set
            and uid != cfg.burn_uid
            and not (uid in observations and observations[uid].verdict == "invalid")
        ]
        sel_weights = {
            uid: rules.selection_weight(window, work[uid].last_attempted, work[uid].first_seen)
            for uid in candidates
        }
        ordinals = {uid: _ordinal(work[uid], cfg) for uid in candidates}
        selection = rules.select_for_evaluation(
            candidates,
            sel_weights,
            ordinals,
            eval_seed,
            count=cfg.uids_per_window,
            bins=cfg.selection_bins,
            bin_min_candidates=cfg.selection_bin_min_candidates,
        )
        order = {uid: i for i, uid in enumerate(selection.uids)}
        for uid in candidates:
            rec(uid)["selection"] = {
                "candidate": True,
                "weight": sel_weights[uid],
                "ordinal": ordinals[uid],
                "in_pool": uid in selection.weights,
                "selected": uid in order,
                "order": order.get(uid),
            }

        summary = {
            "window": window,
            "outer_step": outer_step,
            "eval_seed": str(seed),  # a 256-bit block hash does not fit a JSON number
            "gather": gather_list,
            "reserve": reserve_list,
            "gathered": sorted(gathered_set),
            "gathered_ratio": ratio,
            "validators": sorted(validator_set),
            "copy_checked": copy_checked,
            "overlaps": [[i, j, ov] for (i, j), ov in sorted(overlaps.items())],
            "sync_computed": sync_computed,
            "validator_sample": {n: [_num(v) for v in p] for n, p in sorted(mine.items())},
            "step_ema": None if step is None else {n: list(v) for n, v in sorted(step.items())},
            "candidates": candidates,
            "selection_bin": selection.bin,
            "selection_pool": selection.pool,
            "evaluate": selection.uids,
            "carried_match": {str(u): [s, r] for u, (s, r) in sorted(carried.items())},
        }
        return WindowPlan(
            window=window,
            outer_step=outer_step,
            eval_seed=seed,
            evaluate=list(selection.uids),
            candidates=candidates,
            selection_bin=selection.bin,
            gather=gather_list,
            reserve=reserve_list,
            gathered=sorted(gathered_set),
            validators=sorted(validator_set),
            slashes=list(slashes),
            sync_computed=sync_computed,
            _work=work,
            _entries=entries,
            _carried=carried,
            _records=records,
            _summary=summary,
            _revision=self._revision,
        )

    # ------------------------------------------------------------------ window, stage 2 on

    def finish_window(
        self, plan: WindowPlan, evaluations: Mapping[int, Evaluation]
    ) -> WindowOutcome:
        """Evaluation bookkeeping, negative-evaluation rules, match, final scores, weights and
        peer list of ``plan.window`` (SPEC 7 order); commits the window's state."""
        cfg = self.config
        window = plan.window
        if plan._revision != self._revision or (
            self._last_window is not None and window <= self._last_window
        ):
            raise ValueError(f"stale plan for window {window}: the state moved on since")
        unknown = set(evaluations) - set(plan.evaluate)
        if unknown:
            raise ValueError(f"evaluations for uids that were not selected: {sorted(unknown)}")
        work = {uid: peer.copy() for uid, peer in plan._work.items()}
        records = copy.deepcopy(plan._records)
        stage1 = plan._entries
        entries = {**plan._carried, **stage1}  # this window's entries replace carried ones
        slashes = list(plan.slashes)

        def rec(uid: int) -> dict[str, Any]:
            if uid not in records:
                before = self._peers.get(uid)
                records[uid] = {
                    "window": window,
                    "uid": uid,
                    "state_before": None if before is None else before.to_json(),
                }
            return records[uid]

        def enter(uid: int, score: float, rule: str) -> None:
            old = stage1.get(uid)
            if old is not None and old[0] <= score:
                entries[uid] = old  # a stage-1 -99 (gather miss, copy, invalid) stands
            else:
                entries[uid] = (score, rule)

        # --- 6. evaluation ------------------------------------------------------------------
        scores: dict[int, float] = {}
        for uid in plan.evaluate:
            ev = evaluations.get(uid, Evaluation(uid=uid, status="skipped"))
            if ev.uid != uid:
                raise ValueError(f"evaluation under uid {uid} is for uid {ev.uid}")
            if ev.status not in EVALUATION_STATUSES:
                raise ValueError(f"uid {uid}: unknown evaluation status {ev.status!r}")
            peer = work[uid]
            e: dict[str, Any] = {
                "status": ev.status,
                "own_before": _num(ev.own_before),
                "own_after": _num(ev.own_after),
                "rand_before": _num(ev.rand_before),
                "rand_after": _num(ev.rand_after),
                "rule": None,
            }
            rec(uid)["evaluation"] = e
            status = ev.status
            losses = _losses(ev) if status == "ok" else None
            if losses is not None:
                ob, oa, rb, ra = losses
                if not (math.isfinite(ob) and math.isfinite(rb)):
                    # the validator's own model gave a non-finite loss: not the peer's doing
                    status, e["rule"] = "skipped", "eval_error"
                elif not (math.isfinite(oa) and math.isfinite(ra)):
                    # applying the peer's update broke the model: as a failure to apply
                    status, e["rule"] = "invalid", "non_finite_loss"
            if status == "skipped":
                continue  # not reached (or not measurable): not attempted, no effect
            peer.last_attempted = window
            if status == "missing":
                e["rule"] = "eval_miss"
                reason = "upload missing or late at evaluation"
                slashes.append(
                    Slash(uid, "eval_miss", cfg.eval_miss_multiplier, reason, zero_below=True)
                )
                enter(uid, cfg.match_missing_score, "eval_miss")
                continue
            if status == "invalid":
                e["rule"] = e["rule"] or "invalid"
                reason = f"evaluation: {e['rule']}"
                slashes.append(Slash(uid, "invalid", 0.0, reason, touches_bma=False))
                enter(uid, cfg.match_missing_score, "invalid")
                continue
            assert losses is not None
            ob, oa, rb, ra = losses
            score = rules.loss_score(rb, ra)
            own_imp = rules.relative_improvement(ob, oa)
            rand_imp = rules.relative_improvement(rb, ra)
            b = rules.eval_indicator(own_imp, rand_imp)
            bma_before = peer.bma
            peer.bma = rules.bma_update(peer.bma, b, cfg.bma_decay)
            peer.last_evaluated = window
            peer.evaluated.append(window)
            scores[uid] = score
            enter(uid, score, "evaluated")
            e.update(
                score=score,
                own_improvement=own_imp,
                random_improvement=rand_imp,
                indicator=b,
                bma_before=bma_before,
                bma_after=peer.bma,
            )

        # --- 7. negative-evaluation rules ---------------------------------------------------
        suspended = rules.fifth_best_negative(scores.values(), cfg.neg_eval_suspend_rank)
        for uid, score in sorted(scores.items()):
            peer = work[uid]
            if score > 0:
                peer.held_out = False  # a positive evaluation ends the hold-out
            if not suspended:
                # Interpretation: a suspended window's evaluations do not enter the history, so
                # a window bad for everyone cannot count against anyone later either.
                peer.neg_history = [*peer.neg_history, score < 0][-cfg.neg_eval_history :]
                _, hold = rules.negative_eval_rules(
                    peer.neg_history,
                    span=cfg.neg_eval_history,
                    limit=cfg.neg_eval_limit,
                    consecutive=cfg.neg_eval_consecutive,
                )
                if hold:
                    peer.held_out = True
        if not suspended:
            for uid in sorted(work):
                peer = work[uid]
                slash, _ = rules.negative_eval_rules(
                    peer.neg_history,
                    span=cfg.neg_eval_history,
                    limit=cfg.neg_eval_limit,
                    consecutive=cfg.neg_eval_consecutive,
                )
                if slash:
                    n = sum(peer.neg_history[-cfg.neg_eval_history :])
                    slashes.append(
                        Slash(
                            uid,
                            "neg_eval",
                            cfg.neg_eval_multiplier,
                            f"{n} negative scores in the last {cfg.neg_eval_history} evaluations",
                            zero_below=True,
                        )
                    )
        for uid in sorted(set(scores) | {sl.uid for sl in slashes if sl.rule == "neg_eval"}):
            rec(uid)["neg_eval"] = {
                "suspended": suspended,
                "history": list(work[uid].neg_history),
                "held_out": work[uid].held_out,
            }

        # --- 8. match -------------------------------------------------------------------------
        entries = {uid: e for uid, e in entries.items() if uid in work}
        participants: dict[int, tuple[float, str]] = {}
        pending: dict[int, tuple[float, str]] = {}
        if len(entries) >= cfg.match_min_entries:
            before = {uid: work[uid].rating for uid in entries}
            rated = rules.rate_match(
                {uid: s for uid, (s, _) in entries.items()},
                before,
                beta=cfg.rating_beta,
                tau=cfg.rating_tau,
                mu=cfg.rating_mu,
                sigma=cfg.rating_sigma,
            )
            for uid, r in rated.items():
                work[uid].rating = r
                rec(uid)["match"] = {
                    "score": entries[uid][0],
                    "rule": entries[uid][1],
                    "rating_before": _rating_json(before[uid]),
                    "rating_after": [r[0], r[1]],
                    "size": len(entries),
                }
            participants = entries
        else:
            pending = entries  # fewer than 2 entries carry over to the next window
            for uid, (s, rule) in entries.items():
                rec(uid)["match"] = {"score": s, "rule": rule, "carried": True}

        # --- 9. final scores: recompute participants, then this window's slashes (fix) -------
        for uid in sorted(participants):
            peer = work[uid]
            sync = peer.sync if peer.sync is not None else 0.0
            peer.final = rules.final_score(
                peer.rating,
                peer.bma,
                sync,
                threshold=cfg.bma_threshold,
                z=cfg.rating_z,
                mu=cfg.rating_mu,
                sigma=cfg.rating_sigma,
            )
            rec(uid)["final"] = {
                "recomputed": True,
                "ordinal": _ordinal(peer, cfg),
                "bma_effective": max(0.0, rules.bma_effective(peer.bma, cfg.bma_threshold)),
                "sync": sync,
                "value_before_slashes": peer.final,
            }
        for sl in slashes:
            target = work.get(sl.uid)
            if target is None:
                continue
            f0, b0 = target.final, target.bma
            if sl.reset:
                target.final = 0.0  # reset this window: rating and BMA were reset at stage 1
            else:
                target.final, target.bma = rules.apply_multiplier(
                    target.final,
                    target.bma,
                    sl.multiplier,
                    touches_bma=sl.touches_bma,
                    zero_below=cfg.zero_below if sl.zero_below else None,
                )
            fin = rec(sl.uid).setdefault("final", {"recomputed": False, "value_before_slashes": f0})
            fin.setdefault("slashes", []).append(
                {
                    **sl.to_json(),
                    "final_before": f0,
                    "final_after": target.final,
                    "bma_before": b0,
                    "bma_after": target.bma,
                }
            )

        # --- 10. weights ----------------------------------------------------------------------
        for peer in work.values():
            peer.evaluated = [w for w in peer.evaluated if window - w < cfg.weights_window]
        weight_pool = {
            uid: peer.final
            for uid, peer in work.items()
            if peer.last_evaluated is not None
            and window - peer.last_evaluated < cfg.weights_window
            and uid not in plan.validators
        }
        weights: dict[int, float] | None = None
        if window % cfg.windows_per_weights == 0:
            weights = self._weights(weight_pool)

        # --- 11. peer list --------------------------------------------------------------------
        peer_list: tuple[list[int], list[int]] | None = None
        due = (
            self._peer_list_window is None or window - self._peer_list_window >= cfg.peer_list_every
        )
        if due:
            eligible = [
                uid
                for uid, peer in work.items()
                if peer.active(window, cfg.active_windows)
                and not peer.excluded(window)
                and not peer.held_out
                and uid not in plan.validators
                and uid != cfg.burn_uid
            ]
            # Interpretation: "top 20 by weight" ranks by the weights the validator would set
            # now (from the current final scores), so a list is never ranked by stale weights.
            ranking = weights if weights is not None else self._weights(weight_pool)
            peer_list = rules.next_peer_list(
                eligible,
                ranking,
                {uid: p.final for uid, p in work.items()},
                gather_peers=cfg.gather_peers,
                reserve_peers=cfg.reserve_peers,
            )

        # --- records and commit ---------------------------------------------------------------
        listed = (
            {}
            if peer_list is None
            else {**{u: "gather" for u in peer_list[0]}, **{u: "reserve" for u in peer_list[1]}}
        )
        context = {
            "eval_seed": plan._summary["eval_seed"],
            "outer_step": plan.outer_step,
            "copy_checked": plan._summary["copy_checked"],
            "sync_computed": plan.sync_computed,
            "gathered_ratio": plan._summary["gathered_ratio"],
            "selection_bin": plan.selection_bin,
            "fifth_best_negative": suspended,
            "match_size": len(participants),
        }
        for uid in sorted(set(records) | set(listed)):
            r = rec(uid)
            r["context"] = dict(context)
            after = work.get(uid)
            r["weight"] = None if weights is None else weights.get(uid, 0.0)
            r["next_peer_list"] = listed.get(uid) if peer_list is not None else None
            r["state_after"] = None if after is None else after.to_json()
            r.setdefault("final", {"recomputed": False})["value"] = (
                None if after is None else after.final
            )
        summary = dict(plan._summary)
        summary.update(
            scores={str(u): s for u, s in sorted(scores.items())},
            fifth_best_negative=suspended,
            match={str(u): [s, rule] for u, (s, rule) in sorted(participants.items())},
            match_carried={str(u): [s, rule] for u, (s, rule) in sorted(pending.items())},
            weights=None if weights is None else {str(u): w for u, w in sorted(weights.items())},
            peer_list=None if peer_list is None else [peer_list[0], peer_list[1]],
            slashes=[sl.to_json() for sl in slashes],
        )
        self._peers = work
        self._pending = pending
        self._last_window = window
        self._revision += 1
        if weights is not None:
            self._last_weights = weights
            self._last_weights_window = window
        if peer_list is not None:
            self._peer_list_window = window
        return WindowOutcome(
            window=window,
            records={uid: records[uid] for uid in sorted(records)},
            final_scores={uid: p.final for uid, p in sorted(work.items())},
            weights=weights,
            peer_list=peer_list,
            slashes=slashes,
            scores=scores,
            summary=summary,
        )

    def _weights(self, pool: Mapping[int, float]) -> dict[int, float]:
        cfg = self.config
        return rules.weights_from_scores(
            pool,
            burn_uid=cfg.burn_uid,
            burn_rate=cfg.burn_rate,
            gather_peers=cfg.gather_peers,
            reserve_peers=cfg.reserve_peers,
            gather_range=cfg.gather_weight_range,
            reserve_decay=cfg.reserve_decay,
            reserve_max_ratio=cfg.reserve_max_ratio,
        )


def _losses(ev: Evaluation) -> tuple[float, float, float, float]:
    """The four losses of an "ok" evaluation (own before/after, random before/after)."""
    vals = (ev.own_before, ev.own_after, ev.rand_before, ev.rand_after)
    out = tuple(float(v) for v in vals if v is not None)
    if len(out) != 4:
        raise ValueError(f"uid {ev.uid}: an 'ok' evaluation needs all four losses")
    return out[0], out[1], out[2], out[3]


def _ordinal(peer: PeerState, cfg: GauntletConfig) -> float:
    """Ordinal of a peer's rating; no rating counts as 0 (SPEC 7 selection bins)."""
    if peer.rating is None:
        return 0.0
    return rules.ordinal(peer.rating[0], peer.rating[1], cfg.rating_z)


def _sample_json(sample: Mapping[str, Sequence[float]] | None) -> dict[str, Any] | None:
    """The peer's published sync sample as JSON (values that are not finite become None)."""
    if sample is None:
        return None
    out: dict[str, Any] = {}
    for name in sorted(sample):
        try:
            vals = [_num(float(v)) for v in sample[name]]
        except (TypeError, ValueError):
            vals = None
        out[str(name)] = vals
    return out
