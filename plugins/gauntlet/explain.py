"""``covenant explain --uid N [--window W]``: why a peer got its score, component by component.

Reads the validator's signed score record ``RUN_DIR/records/<window>/<uid>.json`` (the latest
window with a record for the uid by default), checks its signature, and lays out what the
Gauntlet decided in the spec's order (SPEC 7): the stage-1 verdict and its reason, inactivity,
copy detection, the sync score, gather misses, the stage-2 selection and losses, the loss score,
the own-vs-random indicator and the BMA, the negative-evaluation rules, the match (rating before
and after, ordinal), the final score, every slash with its multiplier and reason, the weight and
the next peer list. ``--json`` gives the same rows as JSON. Nothing is recomputed here:
``covenant replay`` does that.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from covenant.engine.cli.options import ConfigOpt, JsonOpt
from covenant.engine.errors import CovenantError
from covenant.plugins.gauntlet.replay import read_signed_record, record_file

__all__ = ["Component", "Explanation", "explain", "explain_command"]


@dataclass(frozen=True)
class Component:
    """One row: ``value`` as recorded (JSON), ``shown`` for people, ``detail``: why / the rule."""

    component: str
    item: str
    value: Any
    shown: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "item": self.item,
            "value": self.value,
            "detail": self.detail,
        }


@dataclass
class Explanation:
    window: int
    uid: int
    validator: str
    path: str
    rows: list[Component]
    final_score: float | None
    weight: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "uid": self.uid,
            "validator": self.validator,
            "record": self.path,
            "signature": "valid",
            "final_score": self.final_score,
            "weight": self.weight,
            "components": [r.to_json() for r in self.rows],
        }


def _g(x: Any, digits: int = 6) -> str:
    """A number for people: ``digits`` significant digits; ``-`` for none."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else str(x)
    return str(x)


def _pair(r: Any) -> str:
    if not isinstance(r, list) or len(r) != 2:
        return "new (25, 8.333)"
    return f"({_g(r[0])}, {_g(r[1])})"


def _ordinal(r: Any, z: float) -> float | None:
    if not isinstance(r, list) or len(r) != 2:
        return None
    return float(r[0]) - z * float(r[1])


def latest_window(run_dir: Path, uid: int) -> int:
    folder = Path(run_dir) / "records"
    windows = (
        sorted(
            int(p.name)
            for p in folder.iterdir()
            if p.name.isdigit() and (p / f"{int(uid)}.json").is_file()
        )
        if folder.is_dir()
        else []
    )
    if not windows:
        raise CovenantError(f"no score record for uid {uid} under {folder}")
    return windows[-1]


def _last_weight(run_dir: Path, uid: int, window: int) -> tuple[float, int] | None:
    """The weight of ``uid`` in the last weights set at or before ``window`` (window.json)."""
    folder = Path(run_dir) / "records"
    for w in sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit()), reverse=True):
        if w > window:
            continue
        try:
            summary = json.loads((folder / str(w) / "window.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        weights = summary.get("weights") if isinstance(summary, dict) else None
        if isinstance(weights, dict):
            value = weights.get(str(uid), 0.0)
            return (float(value) if isinstance(value, int | float) else 0.0), w
    return None


def explain(run_dir: Path, uid: int, window: int | None = None) -> Explanation:
    """The explanation of ``uid``'s record in ``window`` (default: its latest)."""
    run_dir = Path(run_dir)
    if window is None:
        window = latest_window(run_dir, uid)
    path = record_file(run_dir, window, uid)
    if not path.is_file():
        raise CovenantError(f"no score record for uid {uid} in window {window} ({path})")
    record = read_signed_record(path)
    s: Mapping[str, Any] = record["score"]
    z = 3.0
    rows: list[Component] = []

    def add(component: str, item: str, value: Any, shown: str | None = None, why: str = "") -> None:
        rows.append(Component(component, item, value, _g(value) if shown is None else shown, why))

    obs = s.get("observation") or {}
    if obs:
        add(
            "stage 1",
            "verdict",
            obs.get("verdict"),
            why=obs.get("reason") or "upload present, on time, signed, receipt and payload valid",
        )
        ts = obs.get("upload_ts")
        sha = obs.get("payload_hash")
        add(
            "stage 1",
            "upload",
            sha,
            "none" if not obs.get("uploaded") else f"at t={_g(ts)}",
            f"payload sha256 {sha}" if sha else "",
        )
    else:
        add("stage 1", "verdict", None, "not observed", "uid not in the metagraph's miners")
    if s.get("hotkey_event"):
        add("stage 1", "hotkey", s.get("hotkey_event"), why="a new hotkey starts from scratch")
    act = s.get("activity") or {}
    if act:
        add(
            "inactivity",
            "active",
            act.get("active"),
            why=f"inactive windows {_g(act.get('inactive_count'))}; rule {act.get('rule') or '-'}",
        )
    cp = s.get("copy") or {}
    if cp:
        partner = cp.get("max_overlap_with")
        add(
            "copy detection",
            "level",
            cp.get("level"),
            why=(
                f"max index overlap {_g(cp.get('max_overlap'), 4)} with uid {partner}"
                if partner is not None
                else ("not checked yet" if not cp.get("checked") else "no other upload")
            )
            + (f"; rule {cp['rule']}" if cp.get("rule") else ""),
        )
    sy = s.get("sync") or {}
    if sy:
        if sy.get("computed"):
            how = "computed this window"
            x = "inf" if sy.get("x_infinite") else _g(sy.get("x"), 4)
        else:
            how = (
                f"no step-size EMA yet; stands from window {sy.get('stands_from')}"
                if sy.get("stands_from") is not None
                else "no step-size EMA yet (first windows after a start)"
            )
            x = _g(sy.get("x"), 4)
        add("sync", "x (steps behind)", sy.get("x"), x, f"{how}; sample {_g(sy.get('has_sample'))}")
        add(
            "sync",
            "sync score",
            sy.get("sync"),
            why="max(0, 1 - min(x, 3)/3)^2.5"
            + ("; slashed (x > 2 or no sample)" if sy.get("rule") else ""),
        )
    ga = s.get("gather") or {}
    if ga:
        miss = ga.get("miss")
        add(
            "gather",
            "listed",
            ga.get("listed"),
            why=(
                f"gathered {_g(ga.get('gathered'))}"
                + (
                    f"; miss {_g(miss)}, consecutive {_g(ga.get('consecutive'))}"
                    if miss is not None
                    else ""
                )
                + (
                    f"; gathered/listed {_g(ga.get('ratio'), 3)}"
                    if ga.get("ratio") is not None
                    else ""
                )
                + (f"; rule {ga['rule']}" if ga.get("rule") else "")
            ),
        )
    sel = s.get("selection") or {}
    if sel:
        add(
            "stage 2",
            "selected",
            sel.get("selected"),
            why=f"draw weight {_g(sel.get('weight'))} (1 + windows since last attempt); "
            f"order {_g(sel.get('order'))}",
        )
    ev = s.get("evaluation") or {}
    if ev:
        add("stage 2", "status", ev.get("status"), why=f"rule {ev.get('rule') or '-'}")
        if ev.get("status") == "ok":
            add(
                "stage 2",
                "own loss",
                [ev.get("own_before"), ev.get("own_after")],
                f"{_g(ev.get('own_before'))} -> {_g(ev.get('own_after'))}",
                f"improvement {_g(ev.get('own_improvement'))} (8 own samples)",
            )
            add(
                "stage 2",
                "random loss",
                [ev.get("rand_before"), ev.get("rand_after")],
                f"{_g(ev.get('rand_before'))} -> {_g(ev.get('rand_after'))}",
                f"improvement {_g(ev.get('random_improvement'))} (8 random samples)",
            )
            add(
                "stage 2",
                "loss score",
                ev.get("score"),
                why="(L_rand_before - L_rand_after) / L_rand_before",
            )
            add("stage 2", "indicator", ev.get("indicator"), why="+1 if own improvement > random")
            add(
                "stage 2",
                "BMA",
                [ev.get("bma_before"), ev.get("bma_after")],
                f"{_g(ev.get('bma_before'))} -> {_g(ev.get('bma_after'))}",
                "0.95 BMA + 0.05 b",
            )
    ne = s.get("neg_eval") or {}
    if ne:
        hist = ne.get("history") or []
        add(
            "negative evaluations",
            "history",
            hist,
            f"{sum(1 for h in hist if h)} of {len(hist)} negative",
            f"held out of peer lists {_g(ne.get('held_out'))}"
            + ("; suspended (5th-best score negative)" if ne.get("suspended") else ""),
        )
    m = s.get("match") or {}
    if m:
        add("match", "entry", m.get("score"), why=f"rule {m.get('rule')}")
        if m.get("carried"):
            add("match", "rating", None, "carried", "fewer than 2 entries: carried to next window")
        else:
            rb, ra = m.get("rating_before"), m.get("rating_after")
            add(
                "match",
                "rating (mu, sigma)",
                [rb, ra],
                f"{_pair(rb)} -> {_pair(ra)}",
                f"OpenSkill PlackettLuce, {_g(m.get('size'))} entries",
            )
            ob, oa = _ordinal(rb, z), _ordinal(ra, z)
            add(
                "match",
                "ordinal",
                [ob, oa],
                f"{_g(0.0 if ob is None else ob)} -> {_g(oa)}",
                "mu - 3 sigma",
            )
    fin = s.get("final") or {}
    if fin.get("recomputed"):
        add(
            "final score",
            "before slashes",
            fin.get("value_before_slashes"),
            why=f"ordinal {_g(fin.get('ordinal'))} x max(0, BMA') {_g(fin.get('bma_effective'))}"
            f" x sync {_g(fin.get('sync'))}",
        )
    elif fin:
        add(
            "final score",
            "before slashes",
            fin.get("value_before_slashes"),
            why="not in this window's match: the last final score stands",
        )
    for sl in fin.get("slashes") or []:
        what = "reset" if sl.get("reset") else f"x{_g(sl.get('multiplier'))}"
        add(
            "slash",
            str(sl.get("rule")),
            sl.get("multiplier"),
            what,
            f"{sl.get('reason')}; final {_g(sl.get('final_before'))} -> "
            f"{_g(sl.get('final_after'))}, BMA {_g(sl.get('bma_before'))} -> "
            f"{_g(sl.get('bma_after'))}",
        )
    final_value = fin.get("value")
    add("final score", "value", final_value, why="only a final score > 0 earns weight")
    weight = record["score"].get("weight")
    if weight is not None:
        add("weight", "set this window", weight, why="share of this validator's weights")
    else:
        last = _last_weight(run_dir, uid, window)
        if last is None:
            add("weight", "not set this window", None, why="no weights set yet")
        else:
            weight = last[0]
            add("weight", "last set", weight, why=f"at window {last[1]}")
    add(
        "peer list",
        "next",
        s.get("next_peer_list"),
        why="gather / reserve in the list posted this window (- : not listed or none posted)",
    )
    return Explanation(
        window=window,
        uid=uid,
        validator=str(record["validator"]),
        path=str(path),
        rows=rows,
        final_score=final_value if isinstance(final_value, int | float) else None,
        weight=weight if isinstance(weight, int | float) else None,
    )


def print_explanation(ex: Explanation, console: Console) -> None:
    table = Table(
        title=f"uid {ex.uid}, window {ex.window}: why this score (validator {ex.validator})"
    )
    for col in ("component", "item", "value", "why / rule"):
        table.add_column(col, overflow="fold")
    last = None
    for r in ex.rows:
        table.add_row(
            escape(r.component) if r.component != last else "",
            escape(r.item),
            escape(r.shown),
            escape(r.detail),
        )
        last = r.component
    console.print(table)
    console.print(f"signature valid; record {escape(ex.path)}")


def _default_run_dir(config: str | None) -> Path:
    from covenant.engine.session import open_session

    return open_session(config or "validator").run_dir


def explain_command(
    uid: Annotated[int, typer.Option("--uid", help="the peer's uid")],
    window: Annotated[
        int | None, typer.Option("--window", help="the window (default: the latest record)")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option("--run-dir", help="the validator's run directory (default: the config's)"),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Why a peer got its score: every component of its signed score record, as a table."""
    run_dir = run_dir if run_dir is not None else _default_run_dir(config)
    ex = explain(run_dir, uid, window)
    if as_json:
        typer.echo(json.dumps(ex.to_json(), indent=2))
    else:
        print_explanation(ex, Console())
