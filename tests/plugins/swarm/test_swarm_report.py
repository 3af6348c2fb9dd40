"""The run report (``covenant report``): a synthetic swarm run directory in, numbers and HTML out.

The fixture writes what ``covenant swarm`` leaves behind (swarm.json, events.jsonl, every peer's
metrics.jsonl, the validator's signed score records and window summaries) for eight windows of
three miners, one of them a copier that is slashed and one killed at window 4 and restarted at
6, plus the damage a live or crashed run leaves: a malformed line, a torn last line, a record
that is not JSON, a window whose summary was never written, a window without records.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from covenant.plugins.swarm.report import (
    REPORT_NAME,
    ReportError,
    collect,
    render_html,
    report,
    write_report,
)

T0 = 1_796_000_000.0
WINDOWS = range(1, 9)  # 1..8; records for 1..7, none yet for 8
RECORD_WINDOWS = range(1, 8)
KILLED = (4, 5)  # miner-2 is down for these windows
WEIGHTS = {
    2: {1: 0.5, 2: 0.3, 3: 0.2, 4: 0.0},
    4: {1: 0.5, 2: 0.35, 3: 0.1, 4: 0.05},
    6: {1: 0.5, 2: 0.3, 3: 0.15, 4: 0.05},
}
PEERS = [
    ("validator", "validator", 0, None, "tp=1"),
    ("miner-1", "miner", 2, None, "tp=1"),
    ("miner-2", "miner", 3, None, "tp=2"),
    ("miner-3", "miner", 4, "copier", "tp=1"),
]


# ------------------------------------------------------------------------------------ fixture


def _jsonl(path: Path, lines: list[dict[str, Any] | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [ln if isinstance(ln, str) else json.dumps(ln) for ln in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")


def _json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def val_loss(w: int) -> float:
    return 9.0 - 0.25 * w


def train_loss(uid: int, w: int) -> float:
    return 8.0 + 0.05 * uid - 0.2 * w


def rating(uid: int, w: int) -> tuple[float, float]:
    mu = {2: 27.0, 3: 26.0, 4: 20.0}[uid] + 0.5 * w
    return mu, 8.0 - 0.3 * w


def stage2_score(uid: int) -> float:
    return {2: 0.012, 3: 0.008, 4: -0.002}[uid]


def final_score(uid: int, w: int) -> float:
    return {2: 0.1, 3: 0.05, 4: 0.0}[uid] * w


def _miner_lines(uid: int, adversary: bool) -> list[dict[str, Any] | str]:
    lines: list[dict[str, Any] | str] = []
    for w in WINDOWS:
        if uid == 3 and w in KILLED:
            continue
        t = T0 + 20.0 * w
        for inner in range(3):
            step = (w - 1) * 3 + inner
            lines.append(
                {"kind": "train", "step": step, "time": t - 3 + inner, "loss": 9.0, "lr": 1e-3}
            )
        line: dict[str, Any] = {
            "kind": "window",
            "step": w,
            "time": t,
            "window": float(w),
            "outer_step": float(w - 1),
            "inner_steps": 3.0,
            "loss": train_loss(uid, w),
            "bytes_up": 52_000.0 if uid == 3 else 50_000.0,
            "bytes_dense": 10_000_000.0,
            "bytes_down": 150_000.0,
            "peers": 3.0,
            "applied": 1.0,
            "encode_s": 0.1,
            "wait_s": 1.0,
            "upload_s": 0.01,
            "gather_s": 0.05,
            "apply_s": 0.1,
            "gathered": "2,3,4",
        }
        if uid == 2:
            line["val_loss"] = val_loss(w) + 0.05
        if uid == 3 and w == 6:  # first window after the restart: nothing to apply yet
            line.update(applied=0.0, skip_reason="no peer list in force")
        if adversary and w == 8:
            line["loss"] = "nan"
        lines.append(line)
    return lines


def _record(w: int, uid: int) -> dict[str, Any]:
    missing = uid == 3 and w in KILLED
    body: dict[str, Any] = {"window": w, "uid": uid}
    if missing:
        body["evaluation"] = {"status": "missing", "rule": "eval_miss"}
        slashes = [
            {
                "uid": 3,
                "rule": "eval_miss",
                "multiplier": 0.75,
                "reason": "upload missing or late at evaluation",
            }
        ]
    else:
        body["evaluation"] = {"status": "ok", "score": stage2_score(uid), "rule": None}
        slashes = []
    if uid == 4 and w >= 3:
        slashes.append(
            {"uid": 4, "rule": "copy", "multiplier": 0.5, "reason": "overlap 0.97 with uid 2"}
        )
    mu, sigma = rating(uid, w)
    body["match"] = {"score": 0.0, "rule": "evaluated", "rating_after": [mu, sigma], "size": 3}
    body["final"] = {"recomputed": True, "value": final_score(uid, w)}
    if slashes:
        body["final"]["slashes"] = slashes
    weights = WEIGHTS.get(w)
    body["weight"] = None if weights is None else weights[uid]
    record = {
        "format": "covenant-score-record/1",
        "window": w,
        "uid": uid,
        "validator": "5Fvalidator",
        "inputs": {"outer_step": w - 1},
        "score": body,
    }
    return {"record": record, "signature": "0x" + "ab" * 64}


def make_run_dir(root: Path) -> Path:
    """A realistic ``covenant swarm`` run directory (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    peers = [
        {
            "name": name,
            "role": role,
            "uid": uid,
            "hotkey": f"5G{name}hotkeyxxxxxxxxxxxxxxxxxx",
            "layout": layout,
            "adversary": adversary,
            "run_dir": f"{name}/swarm",
        }
        for name, role, uid, adversary, layout in PEERS
    ]
    _json(
        root / "swarm.json",
        {
            "format": "covenant-swarm/1",
            "run_id": "swarm",
            "created": T0,
            "windows": 10,
            "blocks_per_window": 20,
            "block_time_s": 1.0,
            "burn_uid": 1,
            "peers": peers,
        },
    )
    _jsonl(
        root / "events.jsonl",
        [
            *[
                {"time": T0 + i, "window": None, "event": "start", "peer": p[0], "detail": ""}
                for i, p in enumerate(PEERS)
            ],
            {
                "time": T0 + 85,
                "window": 4,
                "event": "kill",
                "peer": "miner-2",
                "detail": "churn: kill miner-2 at window 4",
            },
            "this is not json",
            {"time": T0 + 86, "window": 4, "event": 5, "peer": "miner-2"},
            {
                "time": T0 + 125,
                "window": 6,
                "event": "restart",
                "peer": "miner-2",
                "detail": "churn: restart miner-2 at window 6",
            },
        ],
    )
    (root / "chain.sqlite").write_bytes(b"")
    for name in ("validator", "miner-1"):
        _jsonl(root / "logs" / f"{name}.log", ["started"])
    # miners
    m1 = _miner_lines(2, False)
    m1.insert(5, "garbage{")  # damaged mid-file line
    _jsonl(root / "miner-1/swarm/metrics.jsonl", m1)
    _jsonl(root / "miner-2/swarm/metrics.jsonl", _miner_lines(3, False))
    m3 = root / "miner-3/swarm/metrics.jsonl"
    _jsonl(m3, _miner_lines(4, True))
    with m3.open("a", encoding="utf-8") as f:
        f.write('{"kind":"window","step":9,"ti')  # torn last line: the run goes on
    # validator
    vdir = root / "validator/swarm"
    _jsonl(
        vdir / "metrics.jsonl",
        [
            {
                "kind": "validator",
                "step": w,
                "time": T0 + 20.0 * w + 5,
                "window": float(w),
                "outer_step": float(w - 1),
                "applied": 1.0,
                "uploads": 2.0 if w in KILLED else 3.0,
                "miners": 3.0,
                "gathered": 2.0 if w in KILLED else 3.0,
                "evaluated": 3.0,
                "slashes": 0.0,
                "stage1_s": 0.1,
                "eval_s": 1.0,
                "val_loss": val_loss(w),
                "total_s": 2.0,
            }
            for w in WINDOWS
        ],
    )
    for w in RECORD_WINDOWS:
        folder = vdir / "records" / str(w)
        for uid in (2, 3, 4):
            _json(folder / f"{uid}.json", _record(w, uid))
        if w == 7:
            continue  # the validator died before writing the summary: records only
        slashes = [
            s
            for uid in (2, 3, 4)
            for s in _record(w, uid)["record"]["score"]["final"].get("slashes", [])
        ]
        summary: dict[str, Any] = {
            "window": w,
            "summary": {"scores": {str(u): stage2_score(u) for u in (2, 4)}},
            "final_scores": {str(u): final_score(u, w) for u in (2, 3, 4)},
            "slashes": [{**s, "touches_bma": True, "zero_below": False} for s in slashes],
        }
        if w in WEIGHTS:
            summary["weights"] = {str(u): v for u, v in WEIGHTS[w].items()}
            ok = w != 4
            summary["weights_set"] = {"ok": ok, "reason": "" if ok else "rate limited"}
        _json(folder / "window.json", summary)
    (vdir / "records/3/9.json").write_text("{not json", encoding="utf-8")
    return root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run_dir(tmp_path / "run")


# ------------------------------------------------------------------------------------ collect


def test_collect_reads_peers_losses_and_bytes(run_dir: Path) -> None:
    data = collect(run_dir)
    assert [(p.name, p.role, p.uid, p.adversary) for p in data.peers] == [
        (name, role, uid, adv) for name, role, uid, adv, _ in PEERS
    ]
    assert not data.peers_inferred
    assert data.run_id == "swarm" and data.windows_planned == 10 and data.burn_uid == 1
    assert data.windows == list(WINDOWS)
    assert data.global_loss == {w: val_loss(w) for w in WINDOWS}
    loss = data.miner_series("loss")
    assert loss["miner-1"] == {w: pytest.approx(train_loss(2, w)) for w in WINDOWS}
    assert sorted(loss["miner-2"]) == [1, 2, 3, 6, 7, 8]  # killed at 4, back at 6
    assert sorted(loss["miner-3"]) == [1, 2, 3, 4, 5, 6, 7]  # its window-8 loss was NaN
    assert data.miner_series("val_loss") == {
        "miner-1": {w: pytest.approx(val_loss(w) + 0.05) for w in WINDOWS}
    }
    assert data.miner_series("bytes_up")["miner-2"][6] == 52_000.0
    assert set(data.miner_series("bytes_dense")["miner-3"].values()) == {10_000_000.0}
    m2 = data.miner_windows["miner-2"][6]
    assert m2.applied is False and m2.skip_reason == "no peer list in force"
    assert [p.log for p in data.peers] == ["logs/validator.log", "logs/miner-1.log", None, None]


def test_collect_reads_scores_ratings_weights_and_slashes(run_dir: Path) -> None:
    data = collect(run_dir)
    assert data.records_from == "validator"
    assert data.record_windows == list(RECORD_WINDOWS)
    # stage-2 scores: from the records, none for a missing evaluation
    assert data.scores[2] == {w: stage2_score(2) for w in RECORD_WINDOWS}
    assert sorted(data.scores[3]) == [1, 2, 3, 6, 7]
    # ratings: the OpenSkill ordinal mu - 3 sigma of rating_after
    for uid in (2, 3, 4):
        for w in RECORD_WINDOWS:
            mu, sigma = rating(uid, w)
            assert data.ratings[uid][w] == pytest.approx(mu - 3 * sigma)
    assert data.finals[2] == {w: pytest.approx(final_score(2, w)) for w in RECORD_WINDOWS}
    for w, weights in WEIGHTS.items():
        for uid, value in weights.items():
            assert data.weights[uid][w] == value
    assert sorted(data.weights[1]) == sorted(WEIGHTS)
    assert data.weights_set == {2: True, 4: False, 6: True}
    # window 7 has no window.json: its slash comes from the record
    rows = sorted((s.window, s.uid, s.rule, s.multiplier) for s in data.slashes)
    assert rows == sorted(
        [(w, 4, "copy", 0.5) for w in range(3, 8)] + [(w, 3, "eval_miss", 0.75) for w in KILLED]
    )
    assert data.slash_counts()[4] == {"copy": 5}


def test_collect_counts_what_it_skipped_and_notes_gaps(run_dir: Path) -> None:
    data = collect(run_dir)
    assert dict(data.skipped) == {
        "miner-1 metrics.jsonl": 1,
        "miner-3 metrics.jsonl": 1,
        "events.jsonl": 2,
        "score records": 1,
    }
    assert [(e.event, e.peer, e.window) for e in data.events][-2:] == [
        ("kill", "miner-2", 4),
        ("restart", "miner-2", 6),
    ]
    assert len(data.events) == 6
    notes = " | ".join(data.notes)
    assert "validator logged window(s) 8 but wrote no score records" in notes
    assert "miner-3 (uid 4): training loss not finite in window(s) 8" in notes


def test_summary_numbers(run_dir: Path) -> None:
    s = collect(run_dir).summary()
    assert (s["windows"], s["first_window"], s["last_window"]) == (8, 1, 8)
    assert (s["peers"], s["miners"], s["validators"]) == (4, 3, 1)
    assert s["adversaries"] == ["miner-3"]
    assert s["global_loss_first"] == [1, val_loss(1)]
    assert s["global_loss_last"] == [8, val_loss(8)]
    # weights of window 6 without the burn uid: honest 0.45, copier 0.05 of 0.5
    assert s["weights_last_window"] == 6
    assert s["weight_share_last"]["honest"] == pytest.approx(0.9)
    assert s["weight_share_last"]["adversary"] == pytest.approx(0.1)
    assert s["weight_share_last"]["unknown"] == 0.0
    assert s["weight_share_mean"]["honest"] == pytest.approx((1.0 + 0.9 + 0.9) / 3)
    assert s["slashes"] == 7
    assert s["most_slashed"] == [
        {"uid": 4, "peer": "miner-3", "adversary": "copier", "count": 5, "rules": {"copy": 5}}
    ]
    json.dumps(s, allow_nan=False)  # plain JSON for --json


# ------------------------------------------------------------------------------------ HTML


def _images(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_write_report_is_one_self_contained_page(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / REPORT_NAME
    page = path.read_text(encoding="utf-8")
    images = _images(page)
    assert len(images) == 4  # global loss, training loss, bytes, scores/ratings/weights
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") and len(img) > 5000 for img in images)
    # nothing fetched: no scripts, no remote URLs
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    # the slash table, a row per slash
    assert page.count("<td>copy</td>") == 5
    assert (
        '<tr class="adversary"><td class="num">3</td><td>miner-3 (uid 4)</td><td>copy</td>'
        '<td class="num">0.5</td><td>overlap 0.97 with uid 2</td></tr>'
    ) in page
    assert "<td>miner-2 (uid 3)</td><td>eval_miss</td>" in page
    # the summary, the events and the log links
    assert "Slashes:</b> 7 in all; most: miner-3 (uid 4) [copier]: 5 (copy ×5)" in page
    assert "honest peers 90.0 %, adversaries 10.0 %" in page
    assert "8.7500 at window 1 → 7.0000 at window 8" in page
    assert "<td>kill</td><td>miner-2 (uid 3)</td><td>churn: kill miner-2 at window 4</td>" in page
    assert '<a href="logs/miner-1.log">logs/miner-1.log</a>' in page
    assert "Skipped as malformed:</b> 5" in page
    assert '<span class="bad">failed</span>' in page  # window 4's weights were refused


def test_report_elsewhere_links_logs_relative_to_it(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "r.html"
    assert write_report(run_dir, out) == out
    assert '<a href="../run/logs/validator.log">' in out.read_text(encoding="utf-8")
    assert not (run_dir / REPORT_NAME).exists()


def test_untrusted_text_is_escaped(run_dir: Path) -> None:
    _jsonl(
        run_dir / "events.jsonl",
        [
            {"time": T0, "window": 2, "event": "kill", "peer": "<b>x</b>", "detail": "<script>"},
            {"time": T0, "window": 3, "event": "join", "peer": "$\\frac{$", "detail": "$"},
        ],
    )
    page = render_html(collect(run_dir), run_dir / REPORT_NAME)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page


# ------------------------------------------------------------------------------------ partial data


def test_empty_run_dir_gives_a_report_without_plots(tmp_path: Path) -> None:
    data = collect(tmp_path)
    assert data.peers == [] and data.windows == [] and data.summary()["global_loss_first"] is None
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert _images(page) == []
    assert "No held-out loss logged yet." in page and "No slashes." in page
    assert "no score records yet" in page


def test_missing_run_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such run directory"):
        collect(tmp_path / "nope")


def test_peers_are_inferred_without_swarm_json(tmp_path: Path) -> None:
    """A hand-started experiment: m1/ and validator/ hold run directories, nothing else."""
    root = tmp_path / "r"
    m1 = root / "m1/swarm"
    _jsonl(m1 / "metrics.jsonl", _miner_lines(7, False)[:8])
    (m1 / "storage/swarm/v1/gradient/1/7").mkdir(parents=True)
    (m1 / "storage/swarm/v1/gradient/2/7").mkdir(parents=True)
    _json(m1 / "resolved_config.json", {"config": {"model": {"tp": 2, "pp": 1}}})
    (root / "m2/swarm").mkdir(parents=True)  # started, nothing written yet
    _json(root / "m2/swarm/resolved_config.json", {"config": {"chain": {"hotkey": "//Dave"}}})
    v = root / "validator/swarm"
    (v / "storage/swarm/v1/debug/1/0").mkdir(parents=True)
    cfg = {"gauntlet": {"burn_uid": 0, "rating_z": 2.0}, "run": {"id": "exp"}}
    _json(v / "resolved_config.json", {"config": cfg})
    _jsonl(v / "metrics.jsonl", [{"kind": "validator", "step": 1, "window": 1, "val_loss": 8.5}])
    _json(v / "records/1/7.json", {"record": {"score": {"match": {"rating_after": [20.0, 4.0]}}}})
    (root / "logs").mkdir()
    data = collect(root)
    assert data.peers_inferred
    assert [(p.name, p.role, p.uid, p.layout, p.run_dir) for p in data.peers] == [
        ("m1", "miner", 7, "tp=2, pp=1", "m1/swarm"),
        ("m2", "miner", None, None, "m2/swarm"),
        ("validator", "validator", 0, None, "validator/swarm"),
    ]
    assert data.peers[1].hotkey == "//Dave"
    assert data.burn_uid == 0 and data.run_id == "exp"
    assert data.ratings == {7: {1: 20.0 - 2.0 * 4.0}}  # the validator's rating_z
    assert data.global_loss == {1: 8.5}
    assert sorted(data.miner_series("loss")["m1"]) == [1, 2]
    page = write_report(root).read_text(encoding="utf-8")
    assert "inferred from the subfolders" in page and len(_images(page)) == 4


def test_malformed_files_never_crash(run_dir: Path) -> None:
    (run_dir / "swarm.json").write_text("[1, 2", encoding="utf-8")
    (run_dir / "miner-1/swarm/metrics.jsonl").write_bytes(b"\xff\xfe\x00\n[1]\n{}\n")
    rec = run_dir / "validator/swarm/records/2"
    _json(rec / "window.json", ["not", "a", "summary"])
    bad = {"record": {"score": {"evaluation": "x", "match": {"rating_after": "?"}, "final": []}}}
    _json(rec / "2.json", bad)
    _json(rec / "3.json", {"record": {"score": {"final": {"slashes": [7, {"uid": "x"}]}}}})
    _json(rec / "4.json", {"record": {"score": {"weight": "heavy", "match": None}}})
    _json(run_dir / "validator/swarm/records/5/window.json", {"final_scores": {"x": 1, "3": "y"}})
    data = collect(run_dir)  # swarm.json is unreadable: the peers come from the subfolders
    assert data.peers_inferred
    assert data.skipped["swarm.json"] == 1
    assert data.skipped["miner-1 metrics.jsonl"] == 2  # the undecodable line and the list
    assert data.skipped["score records"] == 2  # 3/9.json and window.json of window 2
    assert 2 not in data.scores.get(2, {}) and 2 not in data.ratings.get(2, {})
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "Skipped as malformed" in page


def test_a_report_while_the_run_goes_on(run_dir: Path) -> None:
    """A window folder the validator is still writing, and a miner that just logged a window."""
    (run_dir / "validator/swarm/records/8").mkdir()
    _jsonl(
        run_dir / "miner-1/swarm/metrics.jsonl",
        [{"kind": "window", "step": 9, "window": 9, "loss": 5.0, "time": T0 + 200}],
    )
    data = collect(run_dir)
    assert data.windows[-1] == 9 and data.record_windows[-1] == 8
    assert any("window 8: records folder is empty" in n for n in data.notes)
    write_report(run_dir)


# ------------------------------------------------------------------------------------ command


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test host."""

    app.command("report")(report)
    return app


def test_command_prints_the_path_or_a_json_summary(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run_dir / REPORT_NAME)
    out = tmp_path / "x.html"
    result = runner.invoke(_app(), ["report", str(run_dir), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["report"] == str(out) and out.is_file()
    assert summary["windows"] == 8 and summary["most_slashed"][0]["peer"] == "miner-3"
    result = runner.invoke(_app(), ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2
