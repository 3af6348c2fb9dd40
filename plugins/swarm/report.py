"""``covenant report RUN_DIR``: a swarm's run directory as one self-contained HTML page.

:func:`collect` reads what the peers left in the run directory (``swarm.json``,
``events.jsonl``, every peer's ``metrics.jsonl``, the validator's signed score records and
window summaries) into a :class:`ReportData`; :func:`write_report` draws it with matplotlib
(Agg, no display) and writes one HTML file: inline CSS, PNG plots as base64 data URIs, no
script and nothing fetched from the network, so the file can be mailed or archived alone.

Reading is forgiving on purpose: a report is most useful while a run is going wrong. A
missing file is a note, a malformed line or record is skipped and counted, a window without
records is a gap in the plots, and a run directory without ``swarm.json`` (a hand-started
experiment) has its peers inferred from its subfolders. Only a run directory that does not
exist is an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from covenant.engine.cli.options import JsonOpt, fail
from covenant.engine.errors import CovenantError
from covenant.engine.fs import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "REPORT_NAME",
    "Event",
    "MinerWindow",
    "Peer",
    "ReportData",
    "ReportError",
    "SlashRow",
    "ValidatorWindow",
    "collect",
    "render_html",
    "report",
    "write_report",
]

log = logging.getLogger(__name__)

#: File name of the report inside the run directory.
REPORT_NAME = "report.html"
SWARM_FORMAT = "covenant-swarm/1"
#: OpenSkill ordinal ``mu - z * sigma``: the gauntlet's default ``rating_z``.
DEFAULT_RATING_Z = 3.0
#: Events drawn on the training-loss plot (a start is the normal case, not worth a line).
CHURN_EVENTS = ("kill", "restart", "join", "exit", "stop")
#: matplotlib's tab10, so colours are fixed per peer without importing matplotlib to pick them.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
#: What makes a folder a peer's run directory when there is no swarm.json.
_PEER_MARKERS = ("metrics.jsonl", "records", "resolved_config.json")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class ReportError(CovenantError):
    """The run directory cannot be reported on (it does not exist, or the report cannot be
    written)."""


# ---------------------------------------------------------------------------------------------
# The parsed data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One process of the swarm, as ``swarm.json`` lists it (or as inferred from a folder)."""

    name: str
    role: str  # "miner" | "validator"
    uid: int | None = None
    hotkey: str | None = None
    layout: str | None = None
    adversary: str | None = None  # the adversary plugin's behaviour; None = honest
    run_dir: str | None = None  # relative to RUN_DIR
    log: str | None = None  # relative to RUN_DIR, only when the file exists

    @property
    def label(self) -> str:
        return self.name if self.uid is None else f"{self.name} (uid {self.uid})"


@dataclass(frozen=True)
class MinerWindow:
    """A miner's ``kind="window"`` metrics line: what one window did for it."""

    window: int
    time: float | None = None
    loss: float | None = None  # training loss of the last inner step
    val_loss: float | None = None  # held-out loss after its outer step, when it evaluates
    bytes_up: float | None = None
    bytes_dense: float | None = None
    applied: bool | None = None
    skip_reason: str | None = None


@dataclass(frozen=True)
class ValidatorWindow:
    """A validator's ``kind="validator"`` metrics line."""

    window: int
    time: float | None = None
    val_loss: float | None = None  # the global model's held-out loss after the window
    uploads: int | None = None
    gathered: int | None = None
    evaluated: int | None = None
    slashes: int | None = None
    applied: bool | None = None
    total_s: float | None = None


@dataclass(frozen=True)
class SlashRow:
    window: int
    uid: int
    rule: str
    multiplier: float | None
    reason: str


@dataclass(frozen=True)
class Event:
    """One line of ``events.jsonl``: the supervisor starting, killing or restarting a peer."""

    time: float | None
    window: int | None
    event: str
    peer: str | None
    detail: str


@dataclass
class ReportData:
    """Everything :func:`collect` read from a run directory, ready to plot or assert on.

    Per-uid series are ``{uid: {window: value}}`` from the first validator that has records;
    per-peer series are keyed by peer name.
    """

    run_dir: Path
    run_id: str | None = None
    created: float | None = None
    windows_planned: int | None = None
    burn_uid: int | None = None
    rating_z: float = DEFAULT_RATING_Z
    peers: list[Peer] = field(default_factory=list)
    peers_inferred: bool = False
    records_from: str | None = None  # name of the validator whose records were read
    miner_windows: dict[str, dict[int, MinerWindow]] = field(default_factory=dict)
    validator_windows: dict[str, dict[int, ValidatorWindow]] = field(default_factory=dict)
    scores: dict[int, dict[int, float]] = field(default_factory=dict)
    ratings: dict[int, dict[int, float]] = field(default_factory=dict)
    finals: dict[int, dict[int, float]] = field(default_factory=dict)
    weights: dict[int, dict[int, float]] = field(default_factory=dict)
    weights_set: dict[int, bool] = field(default_factory=dict)  # window -> chain accepted
    record_windows: list[int] = field(default_factory=list)
    slashes: list[SlashRow] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # source -> malformed items
    notes: list[str] = field(default_factory=list)

    # -- lookups -----------------------------------------------------------------------------

    def peer_by_uid(self, uid: int) -> Peer | None:
        for peer in self.peers:
            if peer.uid == uid:
                return peer
        return None

    def peer_by_name(self, name: str | None) -> Peer | None:
        for peer in self.peers:
            if peer.name == name:
                return peer
        return None

    def uid_label(self, uid: int) -> str:
        peer = self.peer_by_uid(uid)
        name = "" if peer is None else peer.name
        if uid == self.burn_uid:
            name = f"burn + {name}" if name and peer and peer.role == "miner" else "burn"
        return f"{name} (uid {uid})" if name else f"uid {uid}"

    @property
    def windows(self) -> list[int]:
        """Every window any source mentions, in order."""
        seen: set[int] = set(self.record_windows)
        for miner in self.miner_windows.values():
            seen.update(miner)
        for validator in self.validator_windows.values():
            seen.update(validator)
        return sorted(seen)

    @property
    def global_loss(self) -> dict[int, float]:
        """The first validator's held-out loss of the global model per window."""
        for per in self.validator_windows.values():
            series = {w: v.val_loss for w, v in per.items() if v.val_loss is not None}
            if series:
                return dict(sorted(series.items()))
        return {}

    def miner_series(self, attr: str) -> dict[str, dict[int, float]]:
        """``{peer name: {window: value}}`` of one :class:`MinerWindow` field, non-empty only."""
        out: dict[str, dict[int, float]] = {}
        for name, per in self.miner_windows.items():
            values = ((w, getattr(m, attr)) for w, m in sorted(per.items()))
            series = {w: float(v) for w, v in values if v is not None}
            if series:
                out[name] = series
        return out

    def weight_share(self, window: int | None = None) -> dict[str, float] | None:
        """Shares of the non-burn weight: honest peers, adversaries and unknown uids.

        ``window=None`` averages every window with weights (each window counts once); otherwise
        the weights set at ``window``. None when no weight was set or all of it was burned.
        """
        wins = sorted({w for per in self.weights.values() for w in per})
        if window is not None:
            wins = [w for w in wins if w == window]
        shares: list[dict[str, float]] = []
        for w in wins:
            held = {"honest": 0.0, "adversary": 0.0, "unknown": 0.0}
            for uid, per in self.weights.items():
                value = per.get(w)
                if value is None or uid == self.burn_uid:
                    continue
                peer = self.peer_by_uid(uid)
                kind = "unknown" if peer is None else "adversary" if peer.adversary else "honest"
                held[kind] += value
            total = sum(held.values())
            if total > 0:
                shares.append({k: v / total for k, v in held.items()})
        if not shares:
            return None
        return {k: sum(s[k] for s in shares) / len(shares) for k in shares[0]}

    def slash_counts(self) -> dict[int, Counter[str]]:
        """Per uid, how often each rule slashed it."""
        out: dict[int, Counter[str]] = {}
        for row in self.slashes:
            out.setdefault(row.uid, Counter())[row.rule] += 1
        return out

    def summary(self) -> dict[str, Any]:
        """The numbers at the top of the report (and ``covenant report --json``)."""
        windows = self.windows
        loss = self.global_loss
        weight_windows = sorted({w for per in self.weights.values() for w in per})
        last_weights = weight_windows[-1] if weight_windows else None
        counts = self.slash_counts()
        most: list[dict[str, Any]] = []
        if counts:
            top = max(sum(c.values()) for c in counts.values())
            for uid in sorted(counts):
                if sum(counts[uid].values()) == top:
                    peer = self.peer_by_uid(uid)
                    most.append(
                        {
                            "uid": uid,
                            "peer": None if peer is None else peer.name,
                            "adversary": None if peer is None else peer.adversary,
                            "count": top,
                            "rules": dict(sorted(counts[uid].items())),
                        }
                    )
        loss_items = list(loss.items())
        return {
            "run_dir": str(self.run_dir),
            "run_id": self.run_id,
            "windows": len(windows),
            "first_window": windows[0] if windows else None,
            "last_window": windows[-1] if windows else None,
            "windows_planned": self.windows_planned,
            "peers": len(self.peers),
            "miners": sum(1 for p in self.peers if p.role == "miner"),
            "validators": sum(1 for p in self.peers if p.role == "validator"),
            "adversaries": sorted(p.name for p in self.peers if p.adversary),
            "peers_inferred": self.peers_inferred,
            "global_loss_first": None if not loss_items else list(loss_items[0]),
            "global_loss_last": None if not loss_items else list(loss_items[-1]),
            "burn_uid": self.burn_uid,
            "weights_last_window": last_weights,
            "weight_share_last": None if last_weights is None else self.weight_share(last_weights),
            "weight_share_mean": self.weight_share(),
            "slashes": len(self.slashes),
            "most_slashed": most,
            "events": len(self.events),
            "skipped": dict(sorted(self.skipped.items())),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    """A finite float, or None (missing, malformed, NaN, infinite: all gaps in a plot)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        value = _NONFINITE.get(value, value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _flag(value: Any) -> bool | None:
    number = _float(value)
    return None if number is None else number != 0.0


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _load_json(path: Path, source: str, data: ReportData) -> Any:
    """``path`` parsed, or None (missing: silent; unreadable or malformed: counted)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        data.skipped[source] += 1
        log.info("report: skipped %s: %s", path, exc)
        return None


def _read_jsonl(path: Path, source: str, data: ReportData) -> list[dict[str, Any]] | None:
    """Every JSON object line of ``path``; None when the file does not exist.

    A line that is not a JSON object (a torn last line of a running peer included) is skipped
    and counted under ``source``.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        data.skipped[source] += 1
        data.notes.append(f"{source}: cannot be read ({exc})")
        return None
    out: list[dict[str, Any]] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict):
            out.append(obj)
        else:
            data.skipped[source] += 1
    return out


def _resolved_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "resolved_config.json").read_bytes()).get("config", {})
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _section(cfg: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = cfg.get(name)
    return value if isinstance(value, Mapping) else {}


def _storage_uid(folder: Path) -> int | None:
    """The uid a peer stored its own objects under (``storage/<run>/v1/<kind>/<window>/<uid>``).

    Miners upload ``gradient``, every peer (the validator too) a ``debug`` sync sample.
    """
    counts: Counter[int] = Counter()
    for kind in ("gradient", "debug"):
        for item in folder.glob(f"storage/*/*/{kind}/*/*"):
            uid = _int(item.name)
            if uid is not None:
                counts[uid] += 1
        if counts:
            return counts.most_common(1)[0][0]
    return None


def _log_path(root: Path, name: str) -> str | None:
    rel = f"logs/{name}.log"
    return rel if (root / rel).is_file() else None


def _swarm_peers(root: Path, spec: Mapping[str, Any], data: ReportData) -> list[Peer]:
    peers: list[Peer] = []
    raw = spec.get("peers")
    for item in raw if isinstance(raw, list) else []:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            data.skipped["swarm.json"] += 1
            continue
        role = item.get("role")
        peers.append(
            Peer(
                name=name,
                role=role if role in ("miner", "validator") else "miner",
                uid=_int(item.get("uid")),
                hotkey=None if item.get("hotkey") is None else str(item["hotkey"]),
                layout=None if item.get("layout") is None else str(item["layout"]),
                adversary=None if not item.get("adversary") else str(item["adversary"]),
                run_dir=None if item.get("run_dir") is None else str(item["run_dir"]),
                log=_log_path(root, name),
            )
        )
    return peers


def _infer_peers(root: Path) -> list[Peer]:
    """Peers of a run directory without ``swarm.json``: every subfolder (or its child) that
    holds a ``metrics.jsonl``, ``records/`` or ``resolved_config.json`` (a peer that has only
    just started); uid, hotkey and layout from what it stored."""
    peers: list[Peer] = []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return peers
    for child in children:
        if child.name.startswith(".") or child.name == "logs":
            continue
        try:
            candidates = [child, *sorted(p for p in child.iterdir() if p.is_dir())]
        except OSError:
            continue
        found = [c for c in candidates if any((c / m).exists() for m in _PEER_MARKERS)]
        if not found:
            continue

        def mtime(folder: Path) -> float:
            try:
                return (folder / "metrics.jsonl").stat().st_mtime
            except OSError:
                return 0.0

        folder = max(found, key=mtime)
        try:
            is_validator = (folder / "records").is_dir() or (
                b'"kind":"validator"' in (folder / "metrics.jsonl").read_bytes()
            )
        except OSError:
            is_validator = False
        cfg = _resolved_config(folder)
        model = _section(cfg, "model")
        hotkey = _section(cfg, "chain").get("hotkey")
        layout = None
        if model:
            layout = ", ".join(f"{k}={model[k]}" for k in ("tp", "pp") if k in model) or None
        peers.append(
            Peer(
                name=child.name,
                role="validator" if is_validator else "miner",
                uid=_storage_uid(folder),
                hotkey=hotkey if isinstance(hotkey, str) else None,
                layout=layout,
                run_dir=folder.relative_to(root).as_posix(),
                log=_log_path(root, child.name),
            )
        )
    return peers


def _read_metrics(root: Path, peer: Peer, data: ReportData) -> None:
    if peer.run_dir is None:
        return
    source = f"{peer.name} metrics.jsonl"
    lines = _read_jsonl(root / peer.run_dir / "metrics.jsonl", source, data)
    if lines is None:
        data.notes.append(f"{peer.name}: no metrics.jsonl in {peer.run_dir}")
        return
    miner: dict[int, MinerWindow] = {}
    validator: dict[int, ValidatorWindow] = {}
    diverged: list[int] = []
    for line in lines:
        kind = line.get("kind")
        if kind not in ("window", "validator"):
            continue
        window = _int(line.get("window", line.get("step")))
        if window is None:
            data.skipped[source] += 1
            continue
        if kind == "window":
            loss = line.get("loss")
            if loss is not None and _float(loss) is None:
                diverged.append(window)
            reason = line.get("skip_reason")
            miner[window] = MinerWindow(  # a repeated window (a restart): the last line wins
                window=window,
                time=_float(line.get("time")),
                loss=_float(loss),
                val_loss=_float(line.get("val_loss")),
                bytes_up=_float(line.get("bytes_up")),
                bytes_dense=_float(line.get("bytes_dense")),
                applied=_flag(line.get("applied")),
                skip_reason=None if reason in (None, "") else str(reason),
            )
        else:
            validator[window] = ValidatorWindow(
                window=window,
                time=_float(line.get("time")),
                val_loss=_float(line.get("val_loss")),
                uploads=_int(line.get("uploads")),
                gathered=_int(line.get("gathered")),
                evaluated=_int(line.get("evaluated")),
                slashes=_int(line.get("slashes")),
                applied=_flag(line.get("applied")),
                total_s=_float(line.get("total_s")),
            )
    if miner:
        data.miner_windows[peer.name] = dict(sorted(miner.items()))
    if validator:
        data.validator_windows[peer.name] = dict(sorted(validator.items()))
    if diverged:
        shown = ", ".join(str(w) for w in sorted(set(diverged)))
        data.notes.append(f"{peer.label}: training loss not finite in window(s) {shown}")


def _slash_row(window: int, item: Any, uid: int | None = None) -> SlashRow | None:
    if not isinstance(item, dict):
        return None
    uid = _int(item.get("uid")) if uid is None else uid
    if uid is None:
        return None
    return SlashRow(
        window=window,
        uid=uid,
        rule=_text(item.get("rule")) or "?",
        multiplier=_float(item.get("multiplier")),
        reason=_text(item.get("reason")),
    )


def _uid_map(value: Any) -> dict[int, float]:
    out: dict[int, float] = {}
    if isinstance(value, dict):
        for key, raw in value.items():
            uid, number = _int(key), _float(raw)
            if uid is not None and number is not None:
                out[uid] = number
    return out


def _read_records(root: Path, peer: Peer, data: ReportData) -> bool:
    """One validator's ``records/<window>/``; False when it has none."""
    if peer.run_dir is None:
        return False
    base = root / peer.run_dir / "records"
    try:
        folders = [(_int(p.name), p) for p in base.iterdir() if p.is_dir()]
    except OSError:
        return False
    windows = sorted((w, p) for w, p in folders if w is not None)
    if not windows:
        return False
    data.records_from = peer.name
    z = data.rating_z

    def put(series: dict[int, dict[int, float]], uid: int, window: int, value: Any) -> None:
        number = _float(value)
        if number is not None:
            series.setdefault(uid, {})[window] = number

    for window, folder in windows:
        data.record_windows.append(window)
        summary = _load_json(folder / "window.json", "score records", data)
        if summary is not None and not isinstance(summary, dict):
            data.skipped["score records"] += 1
            summary = None
        record_slashes: list[SlashRow] = []
        stage2: dict[int, float] = {}
        try:
            files = sorted(folder.glob("*.json"))
        except OSError:
            files = []
        for path in files:
            uid = _int(path.stem)
            if uid is None:
                continue  # window.json
            signed = _load_json(path, "score records", data)
            record = signed.get("record") if isinstance(signed, dict) else None
            body = record.get("score") if isinstance(record, dict) else None
            if not isinstance(body, dict):
                if signed is not None:
                    data.skipped["score records"] += 1
                continue
            evaluation = body.get("evaluation")
            if isinstance(evaluation, dict) and _float(evaluation.get("score")) is not None:
                stage2[uid] = float(evaluation["score"])
            match = body.get("match")
            rating = match.get("rating_after") if isinstance(match, dict) else None
            if isinstance(rating, list) and len(rating) == 2:
                mu, sigma = _float(rating[0]), _float(rating[1])
                if mu is not None and sigma is not None:
                    put(data.ratings, uid, window, mu - z * sigma)
            final = body.get("final")
            if isinstance(final, dict):
                put(data.finals, uid, window, final.get("value"))
                for item in final.get("slashes") or []:
                    row = _slash_row(window, item, uid)
                    if row is not None:
                        record_slashes.append(row)
            put(data.weights, uid, window, body.get("weight"))
        # window.json is the validator's own summary: it wins where both exist
        if summary is not None:
            stage2 = {**_uid_map(_section(summary, "summary").get("scores")), **stage2}
            for uid, value in _uid_map(summary.get("final_scores")).items():
                put(data.finals, uid, window, value)
            weights = _uid_map(summary.get("weights"))
            for uid, value in weights.items():
                put(data.weights, uid, window, value)
            ws = summary.get("weights_set")
            if isinstance(ws, dict) and "ok" in ws:
                data.weights_set[window] = bool(ws["ok"])
            raw = summary.get("slashes")
            if isinstance(raw, list):
                record_slashes = [r for r in (_slash_row(window, i) for i in raw) if r is not None]
        for uid, value in stage2.items():
            put(data.scores, uid, window, value)
        data.slashes.extend(record_slashes)
        if summary is None and not files:
            data.notes.append(f"window {window}: records folder is empty")
    scored = set(data.record_windows)
    unscored = sorted(set(data.validator_windows.get(peer.name, {})) - scored)
    if unscored:
        shown = ", ".join(str(w) for w in unscored)
        data.notes.append(f"{peer.name} logged window(s) {shown} but wrote no score records")
    return True


def _read_events(root: Path, data: ReportData) -> None:
    lines = _read_jsonl(root / "events.jsonl", "events.jsonl", data)
    if lines is None:
        return
    for line in lines:
        event = line.get("event")
        if not isinstance(event, str) or not event:
            data.skipped["events.jsonl"] += 1
            continue
        peer = line.get("peer")
        data.events.append(
            Event(
                time=_float(line.get("time")),
                window=_int(line.get("window")),
                event=event,
                peer=None if peer is None else str(peer),
                detail=_text(line.get("detail")),
            )
        )
    data.events.sort(key=lambda e: math.inf if e.time is None else e.time)


def collect(run_dir: Path | str) -> ReportData:
    """Read a run directory (see the module docstring); raises :class:`ReportError` only when
    ``run_dir`` is not a directory."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: no such run directory")
    data = ReportData(run_dir=root)
    spec = _load_json(root / "swarm.json", "swarm.json", data)
    if isinstance(spec, dict):
        if spec.get("format") != SWARM_FORMAT:
            data.notes.append(
                f"swarm.json: format {spec.get('format')!r}, expected {SWARM_FORMAT!r}; read anyway"
            )
        data.run_id = None if spec.get("run_id") is None else str(spec["run_id"])
        data.created = _float(spec.get("created"))
        data.windows_planned = _int(spec.get("windows"))
        data.burn_uid = _int(spec.get("burn_uid"))
        data.peers = _swarm_peers(root, spec, data)
    elif spec is not None:
        data.skipped["swarm.json"] += 1
    if not data.peers:
        data.peers = _infer_peers(root)
        data.peers_inferred = True
        why = "missing" if spec is None else "without usable peers"
        data.notes.append(f"swarm.json {why}: peers inferred from the subfolders")
    validators = [p for p in data.peers if p.role == "validator"]
    for peer in validators:
        cfg = _section(_resolved_config(root / (peer.run_dir or peer.name)), "gauntlet")
        if data.burn_uid is None and _int(cfg.get("burn_uid")) is not None:
            data.burn_uid = _int(cfg.get("burn_uid"))
        if _float(cfg.get("rating_z")) is not None:
            data.rating_z = float(cfg["rating_z"])
            break
    for peer in data.peers if data.run_id is None else ():
        run_id = _section(_resolved_config(root / (peer.run_dir or peer.name)), "run").get("id")
        if run_id is not None:
            data.run_id = str(run_id)
            break
    for peer in data.peers:
        _read_metrics(root, peer, data)
    for peer in sorted(validators, key=lambda p: (p.uid is None, p.uid or 0)):
        if _read_records(root, peer, data):
            break
    else:
        data.notes.append("no score records yet: scores, ratings and weights are empty")
    _read_events(root, data)
    known = {p.name for p in data.peers}
    unknown = sorted({e.peer for e in data.events if e.peer and e.peer not in known})
    if unknown:
        data.notes.append(f"events.jsonl names peers swarm.json does not list: {unknown}")
    burn = data.peer_by_uid(data.burn_uid) if data.burn_uid is not None else None
    if burn is not None and burn.role == "miner":
        data.notes.append(f"the burn uid {data.burn_uid} is also {burn.name}'s uid")
    return data


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(text: str) -> str:
    """``text`` for a matplotlib label: a ``$`` in a peer's name would start math mode (and an
    unbalanced one raise), so it is escaped."""
    return text.replace("$", r"\$")


def _xy(series: Mapping[int, float], gaps: bool = True) -> tuple[list[int], list[float]]:
    """Sorted points; with ``gaps`` a NaN at each hole, so a line breaks where a peer was away
    (weights are set every few windows only: their line is not broken)."""
    xs: list[int] = []
    ys: list[float] = []
    for w in sorted(series):
        if gaps and xs and w > xs[-1] + 1:
            xs.append(xs[-1] + 1)
            ys.append(math.nan)
        xs.append(w)
        ys.append(series[w])
    return xs, ys


def _integer_windows(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("window")
    ax.grid(True, alpha=0.3)


class _Style:
    """A fixed colour per peer (by its place in swarm.json) and per unknown uid."""

    def __init__(self, data: ReportData) -> None:
        self.data = data
        self._by_name = {p.name: PALETTE[i % len(PALETTE)] for i, p in enumerate(data.peers)}

    def name(self, name: str) -> str:
        if name not in self._by_name:
            self._by_name[name] = PALETTE[len(self._by_name) % len(PALETTE)]
        return self._by_name[name]

    def uid(self, uid: int) -> tuple[str, str]:
        """(colour, line style): adversaries dashed, the burn uid grey and dotted."""
        if uid == self.data.burn_uid:
            return "#555555", ":"
        peer = self.data.peer_by_uid(uid)
        if peer is None:
            return self.name(f"uid {uid}"), "-"
        return self.name(peer.name), "--" if peer.adversary else "-"

    def peer_label(self, name: str) -> str:
        peer = self.data.peer_by_name(name)
        if peer is None:
            return _plain(name)
        return _plain(f"{peer.label}, {peer.adversary}" if peer.adversary else peer.label)


def _plot_global_loss(data: ReportData, style: _Style) -> str | None:
    miners = data.miner_series("val_loss")
    validators = {
        name: {w: v.val_loss for w, v in per.items() if v.val_loss is not None}
        for name, per in data.validator_windows.items()
    }
    validators = {k: v for k, v in validators.items() if v}
    if not miners and not validators:
        return None
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    for i, (name, series) in enumerate(validators.items()):
        xs, ys = _xy(series)
        label = f"global model ({style.peer_label(name)})"
        colour = "black" if i == 0 else style.name(name)
        ax.plot(xs, ys, color=colour, lw=2.4, marker="o", ms=4, label=label, zorder=3)
    for name, series in miners.items():
        xs, ys = _xy(series)
        ax.plot(xs, ys, color=style.name(name), lw=0.9, alpha=0.8, label=style.peer_label(name))
    ax.set_ylabel("held-out loss")
    ax.set_title("Held-out loss after each window's outer step (lower is better)")
    _integer_windows(ax)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _plot_train_loss(data: ReportData, style: _Style) -> str | None:
    series = data.miner_series("loss")
    if not series:
        return None
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    for name, points in series.items():
        xs, ys = _xy(points)
        ax.plot(
            xs, ys, color=style.name(name), marker="o", ms=3, lw=1.4, label=style.peer_label(name)
        )
    for event in data.events:
        if event.event in CHURN_EVENTS and event.window is not None and event.peer is not None:
            colour = style.name(event.peer)
            ax.axvline(event.window, color=colour, ls=":", lw=1.0)
            ax.annotate(
                _plain(f"{event.event} {event.peer}"),
                (event.window, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color=colour,
            )
    ax.set_ylabel("training loss (last inner step)")
    ax.set_title("Each peer's training loss per window; dotted lines mark churn events")
    _integer_windows(ax)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _plot_bytes(data: ReportData, style: _Style) -> str | None:
    up = data.miner_series("bytes_up")
    dense = data.miner_series("bytes_dense")
    if not up:
        return None
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    total_up = total_dense = 0.0
    for name, points in up.items():
        own = dense.get(name, {})
        both = [w for w in points if w in own and points[w] > 0]
        s_up = sum(points[w] for w in both)
        s_dense = sum(own[w] for w in both)
        total_up += s_up
        total_dense += s_dense
        label = style.peer_label(name)
        if s_up > 0:
            label += f": {s_dense / s_up:,.0f}× smaller"
        xs, ys = _xy(points)
        ax.plot(xs, ys, color=style.name(name), marker="o", ms=3, lw=1.4, label=label)
    sizes = {v for points in dense.values() for v in points.values()}
    if len(sizes) == 1:
        size = sizes.pop()
        ax.axhline(size, color="black", ls="--", lw=1.2, label=f"dense fp32 ({size / 1e6:,.1f} MB)")
    else:
        for name, points in dense.items():
            xs, ys = _xy(points)
            ax.plot(
                xs,
                ys,
                color=style.name(name),
                ls="--",
                lw=0.9,
                label=_plain(f"dense fp32 ({name})"),
            )
    if total_up > 0:
        ax.text(
            0.01,
            0.5,
            f"compression: {total_dense / total_up:,.0f}× fewer bytes than a dense fp32 exchange",
            transform=ax.transAxes,
            fontsize=9,
            va="center",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85},
        )
    ax.set_yscale("log")
    ax.set_ylabel("bytes uploaded per window")
    ax.set_title("Bytes each peer uploaded per window against a dense fp32 pseudo-gradient")
    _integer_windows(ax)
    ax.legend(fontsize=8, loc="center right")
    return _png(fig)


def _plot_scores(data: ReportData, style: _Style) -> str | None:
    panels: Sequence[tuple[str, dict[int, dict[int, float]], str]] = (
        ("stage-2 loss score (random-batch improvement)", data.scores, "score"),
        (f"rating: OpenSkill ordinal μ − {data.rating_z:g}σ", data.ratings, "ordinal"),
        ("final score (after slashes)", data.finals, "final score"),
        ("weight set on chain", data.weights, "weight"),
    )
    if not any(series for _, series, _ in panels):
        return None
    fig = _figure(10.0, 7.4)
    axes = fig.subplots(2, 2, sharex=True)
    labels: dict[str, Any] = {}
    for i, (ax, (title, series, ylabel)) in enumerate(zip(axes.flat, panels, strict=True)):
        weights = series is data.weights
        for uid in sorted(series):
            colour, ls = style.uid(uid)
            xs, ys = _xy(series[uid], gaps=not weights)
            marker = "s" if weights else "o"
            (line,) = ax.plot(xs, ys, color=colour, ls=ls, marker=marker, ms=3, lw=1.3)
            peer = data.peer_by_uid(uid)
            label = _plain(data.uid_label(uid))
            if peer is not None and peer.adversary and uid != data.burn_uid:
                label += _plain(f", {peer.adversary}")
            labels.setdefault(label, line)
        if series is data.scores:
            ax.axhline(0.0, color="black", lw=0.8)
        if series is data.finals:  # where a slash cut the final score
            hits = sorted(
                {(s.window, s.uid) for s in data.slashes if s.window in series.get(s.uid, {})}
            )
            if hits:
                xs = [w for w, _ in hits]
                ys = [series[uid][w] for w, uid in hits]
                (mark,) = ax.plot(xs, ys, ls="none", marker="x", ms=8, color="black", zorder=4)
                labels.setdefault("slashed", mark)
        if not series:
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", color="grey")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        _integer_windows(ax)
        if i < 2:
            ax.set_xlabel("")
    fig.legend(
        list(labels.values()), list(labels.keys()), loc="outside lower center", ncols=4, fontsize=8
    )
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1060px; color: #1b1b1b; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.9em; }
.summary { background: #f6f8fa; border: 1px solid #dde3ea; border-radius: 6px;
           padding: 0.6em 1.2em; }
.summary li { margin: 0.25em 0; }
table { border-collapse: collapse; font-size: 0.88em; width: 100%; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f0f2f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.adversary td { background: #fff4f2; }
img { max-width: 100%; border: 1px solid #eee; }
.caption { color: #555; font-size: 0.9em; margin: 0.3em 0 0.8em; }
.empty { color: #888; font-style: italic; }
.bad { color: #b42318; }
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pct(value: float) -> str:
    return f"{100.0 * value:.1f} %"


def _utc(stamp: float | None) -> str:
    if stamp is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp)) + " UTC"


class _Num(str):
    """A table cell (already escaped) that is a number: right-aligned."""


def _table(headers: Sequence[str], rows: Iterable[tuple[Sequence[str], str]]) -> str:
    """``rows``: (already escaped cells, row class); :class:`_Num` cells are right-aligned."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for cells, cls in rows:
        tds = "".join(
            f'<td class="num">{c}</td>' if isinstance(c, _Num) else f"<td>{c}</td>" for c in cells
        )
        body.append(f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>")
    if not body:
        return ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _num_cell(value: float | int | None, digits: int = 4) -> _Num:
    if value is None:
        return _Num("–")
    return _Num(str(value) if isinstance(value, int) else _fmt(value, digits))


def _summary_items(data: ReportData) -> list[str]:
    s = data.summary()
    items: list[str] = []
    windows = f"{s['windows']}"
    if s["windows"]:
        windows += f" (window {s['first_window']} to {s['last_window']})"
    if s["windows_planned"] is not None:
        windows += f" of {s['windows_planned']} planned"
    items.append(f"<b>Windows:</b> {_esc(windows)}")
    peers = f"{_plural(s['miners'], 'miner')}, {_plural(s['validators'], 'validator')}"
    if s["adversaries"]:
        peers += f"; adversaries: {', '.join(s['adversaries'])}"
    if s["peers_inferred"]:
        peers += " (inferred from the subfolders: no swarm.json)"
    items.append(f"<b>Peers:</b> {_esc(peers)}")
    first, last = s["global_loss_first"], s["global_loss_last"]
    if first is None:
        items.append("<b>Global held-out loss:</b> not measured yet")
    else:
        change = ""
        if first[1] and first[0] != last[0]:
            change = f" ({100.0 * (last[1] - first[1]) / first[1]:+.1f} %)"
        items.append(
            f"<b>Global held-out loss:</b> {first[1]:.4f} at window {first[0]} → "
            f"{last[1]:.4f} at window {last[0]}{_esc(change)}"
        )
    share_last, share_mean = s["weight_share_last"], s["weight_share_mean"]
    if share_last is None:
        items.append("<b>Weight:</b> no non-burn weight set yet")
    else:
        text = (
            f"honest peers {_pct(share_last['honest'])}, "
            f"adversaries {_pct(share_last['adversary'])}"
        )
        if share_last["unknown"]:
            text += f", uids not in the swarm {_pct(share_last['unknown'])}"
        text += f" (weights of window {s['weights_last_window']}"
        if share_mean is not None:
            text += (
                f"; mean over every weight-setting window: honest {_pct(share_mean['honest'])}, "
                f"adversaries {_pct(share_mean['adversary'])}"
            )
        burn = "" if s["burn_uid"] is None else f", burn uid {s['burn_uid']} left out"
        items.append(f"<b>Share of the non-burn weight:</b> {_esc(text + burn + ')')}")
    if not s["most_slashed"]:
        items.append(f"<b>Slashes:</b> none{'' if data.record_windows else ' (no records yet)'}")
    else:
        who = "; ".join(
            f"{data.uid_label(m['uid'])}{' [' + m['adversary'] + ']' if m['adversary'] else ''}: "
            f"{m['count']} ({', '.join(f'{r} ×{n}' for r, n in m['rules'].items())})"
            for m in s["most_slashed"]
        )
        items.append(f"<b>Slashes:</b> {s['slashes']} in all; most: {_esc(who)}")
    if s["skipped"]:
        parts = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items())
        total = sum(s["skipped"].values())
        items.append(f'<b class="bad">Skipped as malformed:</b> {total} ({_esc(parts)})')
    return items


def _peers_table(data: ReportData, out: Path) -> str:
    rows = []
    for peer in data.peers:
        per = data.miner_windows.get(peer.name) or data.validator_windows.get(peer.name) or {}
        last = max(per) if per else None
        link = "–"
        if peer.log is not None:
            target = os.path.relpath(data.run_dir / peer.log, out.parent)
            href = quote(Path(target).as_posix())
            link = f'<a href="{_esc(href)}">{_esc(peer.log)}</a>'
        hotkey = peer.hotkey or ""
        short = hotkey if len(hotkey) <= 12 else hotkey[:10] + "…"
        cells = [
            _esc(peer.name),
            _esc(peer.role),
            _num_cell(peer.uid),
            f'<span title="{_esc(hotkey)}">{_esc(short)}</span>',
            _esc(peer.layout or ""),
            _esc(peer.adversary or "honest"),
            _num_cell(len(per)),
            _num_cell(last),
            link,
        ]
        rows.append((cells, "adversary" if peer.adversary else ""))
    headers = ("peer", "role", "uid", "hotkey", "layout", "behaviour", "windows", "last", "log")
    return _table(headers, rows) or '<p class="empty">No peers found.</p>'


def _windows_table(data: ReportData) -> str:
    validator = next(iter(data.validator_windows.values()), {})
    per_window_slashes = Counter(row.window for row in data.slashes)
    rows = []
    for w in data.windows:
        v = validator.get(w)
        miners = [per[w] for per in data.miner_windows.values() if w in per]
        applied = sum(1 for m in miners if m.applied)
        skips = "; ".join(
            f"{name}: {per[w].skip_reason}"
            for name, per in data.miner_windows.items()
            if w in per and per[w].skip_reason
        )
        ws = data.weights_set.get(w)
        cells = [
            _num_cell(w),
            _num_cell(None if v is None else v.val_loss),
            _num_cell(None if v is None else v.uploads),
            _num_cell(None if v is None else v.gathered),
            _num_cell(None if v is None else v.evaluated),
            _num_cell(per_window_slashes.get(w, 0) if w in data.record_windows else None),
            "–" if ws is None else ("set" if ws else '<span class="bad">failed</span>'),
            _esc(f"{applied}/{len(miners)}") if miners else "–",
            _esc(skips),
        ]
        rows.append((cells, ""))
    headers = (
        "window",
        "global loss",
        "uploads",
        "gathered",
        "evaluated",
        "slashes",
        "weights",
        "miners applied",
        "skipped outer steps",
    )
    return _table(headers, rows) or '<p class="empty">No window finished yet.</p>'


def _slash_table(data: ReportData) -> str:
    rows = []
    for row in sorted(data.slashes, key=lambda r: (r.window, r.uid)):
        peer = data.peer_by_uid(row.uid)
        cells = [
            _num_cell(row.window),
            _esc(data.uid_label(row.uid)),
            _esc(row.rule),
            _num_cell(row.multiplier, 3),
            _esc(row.reason),
        ]
        rows.append((cells, "adversary" if peer is not None and peer.adversary else ""))
    table = _table(("window", "peer", "rule", "multiplier", "reason"), rows)
    return table or '<p class="empty">No slashes.</p>'


def _events_table(data: ReportData) -> str:
    rows = []
    for event in data.events:
        peer = data.peer_by_name(event.peer)
        since = ""
        if event.time is not None and data.created is not None:
            since = f" ({event.time - data.created:+.0f} s)"
        cells = [
            _esc(_utc(event.time) + since),
            _num_cell(event.window),
            _esc(event.event),
            _esc(peer.label if peer is not None else event.peer or ""),
            _esc(event.detail),
        ]
        rows.append((cells, ""))
    table = _table(("time", "window", "event", "peer", "detail"), rows)
    return table or '<p class="empty">No events recorded (no events.jsonl).</p>'


def _figure_block(uri: str | None, alt: str, caption: str, empty: str) -> str:
    if uri is None:
        return f'<p class="empty">{_esc(empty)}</p>'
    return f'<img src="{uri}" alt="{_esc(alt)}"><p class="caption">{_esc(caption)}</p>'


def render_html(data: ReportData, out: Path) -> str:
    """The report page for ``data`` (``out``: where it will be written, for relative links)."""
    style = _Style(data)
    title = f"covenant run report: {data.run_id or data.run_dir.name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">run directory {_esc(data.run_dir)} · swarm created '
        f"{_esc(_utc(data.created))} · report written {_esc(_utc(time.time()))}</p>",
        '<div class="summary"><ul>',
        *(f"<li>{item}</li>" for item in _summary_items(data)),
        "</ul></div>",
        "<h2>Peers</h2>",
        _peers_table(data, out),
        "<h2>The global model</h2>",
        _figure_block(
            _plot_global_loss(data, style),
            "held-out loss per window",
            "The thick black line is the validator's loss on held-out text after applying each "
            "window's aggregate: the model everyone trains. Thin lines are the miners' own "
            "held-out loss after their outer step; they should track the black line.",
            "No held-out loss logged yet.",
        ),
        "<h2>Training loss per peer</h2>",
        _figure_block(
            _plot_train_loss(data, style),
            "training loss per peer",
            "Each miner's loss on its own assigned data at the last inner step of a window. A "
            "break in a line is a window the peer did not finish (killed, crashed, not started).",
            "No miner finished a window yet.",
        ),
        "<h2>Communication</h2>",
        _figure_block(
            _plot_bytes(data, style),
            "bytes uploaded per window",
            "Bytes of each compressed upload (top-k tiles, 2-bit codes) on a log scale; the "
            "dashed line is what sending the full pseudo-gradient as fp32 would cost.",
            "No upload sizes logged yet.",
        ),
        "<h2>Scores, ratings, final scores and weights</h2>",
        _figure_block(
            _plot_scores(data, style),
            "scores, ratings, final scores and weights per uid",
            "From the validator's signed score records. Score: how much a peer's update "
            "improved the loss on random data (above 0 helps). Rating: the OpenSkill ordinal "
            "of the per-window match. Final score: rating, evaluation history and sync "
            "combined, after slashes (× marks a window in which the peer was slashed). Weight: "
            "what the validator set on chain (the burn uid dotted). Adversaries are dashed.",
            "No score records yet.",
        ),
        "<h2>Slashes</h2>",
        _slash_table(data),
        "<h2>Windows</h2>",
        _windows_table(data),
        "<h2>Events</h2>",
        _events_table(data),
    ]
    if data.notes:
        parts.append("<h2>Notes</h2><ul>")
        parts.extend(f"<li>{_esc(note)}</li>" for note in data.notes)
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Collect ``run_dir`` and write the HTML report to ``out`` (default ``RUN_DIR/report.html``),
    atomically, so a report rewritten during a run is never seen half written."""
    return _write(collect(run_dir), out)


def _write(data: ReportData, out: Path | None) -> Path:
    target = data.run_dir / REPORT_NAME if out is None else Path(out)
    page = render_html(data, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, page.encode("utf-8"))
    except OSError as exc:
        raise ReportError(f"{target}: cannot write the report: {exc}") from None
    log.info("report: wrote %s (%d windows, %d peers)", target, len(data.windows), len(data.peers))
    return target


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def report(
    run_dir: Annotated[Path, typer.Argument(help="the run directory a swarm (or its peers) wrote")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="report file (default RUN_DIR/report.html)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML report of a run: losses, bytes, scores, weights, slashes."""
    try:
        data = collect(run_dir)
        path = _write(data, out)
        if as_json:
            summary = {"report": str(path), **data.summary()}
            typer.echo(json.dumps(summary, indent=2))
        else:
            typer.echo(str(path))
    except ReportError as exc:
        raise fail(exc) from None
