"""``covenant replay`` / ``covenant explain`` and the validator's restart, on a real validator run.

One module-wide run: the real ``run_validator`` for a few windows on the tiny preset, a manual
local chain, ``file://`` stores and two honest miners uploading real SparseLoCo payloads
(``_validator_world.py``). Then: a replay of a signed record recomputes every number exactly;
a record changed after signing is refused (exit 2); one changed and re-signed with the
validator's key differs (exit 1); explain lays out every component; a validator killed between
windows and inside one resumes where it stopped, never finishes a window twice and ends with the
state of the uninterrupted run; ``covenant validate`` refuses a miner-only plugin.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _validator_world import VALIDATOR_URI, World, prepare_data

from covenant.engine.errors import ConfigError
from covenant.engine.keys import load_hotkey
from covenant.engine.untrusted import canonical_json

WINDOWS = 5
VALIDATOR_TOML_PLUGINS = [  # configs/validator.toml
    "model",
    "sparseloco",
    "gauntlet",
    "reward",
    "storage",
    "chain",
    "console",
    "jsonl",
    "wandb",
]
KEEP = 3  # [gauntlet] keep_window_checkpoints: windows 3, 4 and 5 stay


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_data(tmp_path_factory.mktemp("replay-data") / "data")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> World:
    w = World(
        tmp_path_factory.mktemp("replay-run"), data_dir, gauntlet={"keep_window_checkpoints": KEEP}
    )
    result = w.run(WINDOWS)
    assert result.windows == list(range(1, WINDOWS + 1))
    assert all(m["evaluated"] == 2.0 and m["gathered"] == 2.0 for m in result.metrics)
    return w


def cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """``covenant ARGV`` in this process, as the console script runs it: (status, out, err)."""
    import covenant.engine.cli.main as main_module
    import covenant.engine.cli.options as options

    main = importlib.reload(main_module)  # a fresh app: plugin commands mount once per app
    monkeypatch.setenv("COLUMNS", "220")
    out, err = io.StringIO(), io.StringIO()
    # the consoles' own setting (None: whatever sys.stderr is at print time), not the stream
    # they resolve to now, or later tests' CliRunner would no longer see their output
    saved = (main_module.out._file, main_module.err._file, options.err._file)
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main.out.file, main.err.file, options.err.file = out, err, err
        try:
            main.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            main.out._file, main.err._file, options.err._file = saved
    return code, out.getvalue(), " ".join(err.getvalue().split())


def _copy_window(world: World, window: int, dest: Path) -> Path:
    """The window's record folder copied under ``dest/records/<window>`` (to tamper with)."""
    folder = dest / "records" / str(window)
    shutil.copytree(world.run_dir / "records" / str(window), folder)
    return folder


def _resign(record: dict[str, Any]) -> dict[str, Any]:
    from covenant.plugins.gauntlet.validator import SIGNING_DOMAIN

    key = load_hotkey(VALIDATOR_URI)
    return {
        "record": record,
        "signature": "0x" + bytes(key.sign(SIGNING_DOMAIN + canonical_json(record))).hex(),
    }


# ------------------------------------------------------------------------------------------------
# replay
# ------------------------------------------------------------------------------------------------


def test_replay_recomputes_every_number_exactly(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = world.record_path(WINDOWS, 2)
    code, out, err = cli(["replay", str(path), "--json"], monkeypatch)
    assert code == 0, err
    report = json.loads(out)
    assert report["status"] == "match" and report["differing"] == []
    names = {row["name"] for row in report["rows"]}
    for expected in (
        "config hash",
        "model hash",
        "eval_seed",
        "payload hash",
        "own sample ids",
        "random sample ids",
        "eval step",
        "clip factor (smallest)",
        "own loss before",
        "own loss after",
        "rand loss before",
        "rand loss after",
        "loss score",
        "own improvement",
        "random improvement",
        "indicator",
        "BMA after evaluation",
        "final score",
    ):
        assert expected in names, expected
    assert any(n.startswith("rating after") for n in names)
    for row in report["rows"]:
        assert row["match"], row
        assert row["diff"] == 0, row  # exactly zero, not merely close
    record = json.loads(path.read_text())["record"]
    losses = {r["name"]: r["recomputed"] for r in report["rows"]}
    assert losses["loss score"] == record["score"]["evaluation"]["score"]
    assert losses["own sample ids"] == record["inputs"]["own_sample_ids"]


def test_replay_by_window_and_uid_and_the_table(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["replay", "--window", str(WINDOWS - 1), "--uid", "3", "--run-dir", str(world.run_dir)]
    code, out, err = cli(args, monkeypatch)
    assert code == 0, err
    assert re.search(r"signature valid; all \d+ recomputed values match the record exactly", out)
    for word in ("quantity", "recorded", "recomputed", "loss score", "rules.loss_score"):
        assert word in out


def test_validator_keeps_the_configured_checkpoints_and_replay_says_which_is_missing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = sorted(p.name for p in (world.run_dir / "checkpoints").glob("window-*"))
    assert kept == [f"window-{w:08d}" for w in range(WINDOWS - KEEP + 1, WINDOWS + 1)]
    window = WINDOWS - KEEP + 1  # its model (window - 1) was pruned
    code, out, err = cli(["replay", str(world.record_path(window, 2))], monkeypatch)
    assert code == 2 and out == ""
    assert f"missing checkpoint {world.run_dir / 'checkpoints' / f'window-{window - 1:08d}'}" in err
    assert f"keep_window_checkpoints = {KEEP}" in err


def test_replay_refuses_unreadable_input(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = cli(["replay", str(tmp_path / "nothing.json")], monkeypatch)
    assert code == 2 and "unreadable record" in err
    junk = tmp_path / "records" / "5" / "2.json"
    junk.parent.mkdir(parents=True)
    junk.write_text('{"record": 1}')
    code, _, err = cli(["replay", str(junk)], monkeypatch)
    assert code == 2 and "not a signed score record" in err
    code, _, err = cli(["replay", "--window", "5"], monkeypatch)
    assert code == 2 and "--window and --uid" in err


def test_a_record_changed_after_signing_is_refused(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy_window(world, WINDOWS, tmp_path)
    signed = json.loads((folder / "2.json").read_text())
    signed["record"]["score"]["evaluation"]["score"] += 1e-12  # one number, signature kept
    (folder / "2.json").write_text(json.dumps(signed))
    code, out, err = cli(
        ["replay", str(folder / "2.json"), "--run-dir", str(world.run_dir)], monkeypatch
    )
    assert code == 2 and out == ""
    assert "bad signature" in err and signed["record"]["validator"] in err


def test_a_resigned_altered_score_differs(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy_window(world, WINDOWS, tmp_path)
    record = json.loads((folder / "2.json").read_text())["record"]
    honest = record["score"]["evaluation"]["score"]
    record["score"]["evaluation"]["score"] = honest * 2 + 0.01
    (folder / "2.json").write_text(json.dumps(_resign(record)))
    code, out, err = cli(
        ["replay", str(folder / "2.json"), "--run-dir", str(world.run_dir), "--json"],
        monkeypatch,
    )
    assert code == 1, err
    report = json.loads(out)
    assert report["status"] == "differs" and report["differing"] == ["loss score"]
    row = next(r for r in report["rows"] if r["name"] == "loss score")
    assert row["recomputed"] == honest and row["diff"] == honest - (honest * 2 + 0.01)


def test_replay_from_a_lone_record_uses_the_aggregate_record(world: World, tmp_path: Path) -> None:
    from covenant.plugins.gauntlet.replay import replay_record

    lone = tmp_path / "lone" / "3.json"
    lone.parent.mkdir()
    shutil.copy(world.record_path(WINDOWS, 3), lone)
    report = replay_record(lone, run_dir=world.run_dir)
    assert report.ok, [r for r in report.rows if not r.match]
    assert any("aggregate record" in n for n in report.notes)
    assert any("rating not recomputed" in n for n in report.notes)
    assert {"loss score", "BMA after evaluation"} <= {r.name for r in report.rows}


# ------------------------------------------------------------------------------------------------
# explain
# ------------------------------------------------------------------------------------------------


def test_explain_prints_every_component(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = cli(["explain", "--uid", "2", "--run-dir", str(world.run_dir)], monkeypatch)
    assert code == 0, err
    assert f"uid 2, window {WINDOWS}" in out and "signature valid" in out
    for component in (
        "stage 1",
        "verdict",
        "inactivity",
        "copy detection",
        "sync score",
        "gather",
        "stage 2",
        "own loss",
        "random loss",
        "loss score",
        "indicator",
        "BMA",
        "negative evaluations",
        "rating (mu, sigma)",
        "ordinal",
        "final score",
        "weight",
        "peer list",
    ):
        assert component in out, component


def test_explain_json_holds_the_recorded_numbers(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = WINDOWS - 1
    args = ["explain", "--uid", "3", "--window", str(window), "--run-dir", str(world.run_dir)]
    code, out, err = cli([*args, "--json"], monkeypatch)
    assert code == 0, err
    ex = json.loads(out)
    record = json.loads(world.record_path(window, 3).read_text())["record"]["score"]
    assert (ex["window"], ex["uid"], ex["signature"]) == (window, 3, "valid")
    assert ex["final_score"] == record["final"]["value"]
    rows = {(c["component"], c["item"]): c["value"] for c in ex["components"]}
    assert rows[("stage 2", "loss score")] == record["evaluation"]["score"]
    assert rows[("stage 1", "verdict")] == "ok"
    assert rows[("sync", "sync score")] == record["sync"]["sync"]
    rating = rows[("match", "rating (mu, sigma)")]
    assert rating == [record["match"]["rating_before"], record["match"]["rating_after"]]


def test_explain_shows_slashes_with_multipliers_and_reasons(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from covenant.plugins.gauntlet.explain import explain

    folder = _copy_window(world, WINDOWS, tmp_path)
    record = json.loads((folder / "2.json").read_text())["record"]
    final = record["score"]["final"]
    slash = {
        "uid": 2,
        "rule": "sync",
        "multiplier": 0.75,
        "reason": "sync x = 2.5 > 2.0",
        "touches_bma": True,
        "zero_below": False,
        "reset": False,
        "final_before": final["value"],
        "final_after": final["value"] * 0.75,
        "bma_before": 0.2,
        "bma_after": 0.15,
    }
    final["slashes"] = [slash]
    final["value"] = slash["final_after"]
    (folder / "2.json").write_text(json.dumps(_resign(record)))
    ex = explain(tmp_path, 2, WINDOWS)
    rows = [r for r in ex.rows if r.component == "slash"]
    assert len(rows) == 1 and rows[0].item == "sync" and rows[0].shown == "x0.75"
    assert "sync x = 2.5 > 2.0" in rows[0].detail
    assert ex.final_score == final["value"]
    (folder / "2.json").write_text(json.dumps({"record": record, "signature": "0x" + "00" * 64}))
    code, _, err = cli(["explain", "--uid", "2", "--run-dir", str(tmp_path)], monkeypatch)
    assert code == 2 and "bad signature" in err
    code, _, err = cli(["explain", "--uid", "9", "--run-dir", str(tmp_path)], monkeypatch)
    assert code == 2 and "no score record for uid 9" in err


# ------------------------------------------------------------------------------------------------
# restart
# ------------------------------------------------------------------------------------------------


def _final_state(run_dir: Path) -> dict[str, Any]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state: dict[str, Any] = torch.load(
        run_dir / "checkpoints" / latest / "rank-00000.pt", weights_only=True
    )
    return state


def test_a_killed_validator_resumes_and_matches_an_uninterrupted_run(
    world: World, data_dir: Path, tmp_path: Path
) -> None:
    w = World(tmp_path, data_dir, gauntlet={"keep_window_checkpoints": KEEP})
    with pytest.raises(KeyboardInterrupt):  # killed after window 2 was saved
        w.run(None, stop_after=2)
    assert w.processed == [1, 2]
    assert (w.run_dir / "checkpoints" / "latest").read_text().strip() == "window-00000002"
    with pytest.raises(KeyboardInterrupt):  # resumes at 3; killed while publishing window 4
        w.run(None, kill_in_window=4)
    assert w.processed == [1, 2, 3]
    assert sorted(w.records(4)) == [2]  # half of window 4's records were written
    assert (w.run_dir / "checkpoints" / "latest").read_text().strip() == "window-00000003"
    result = w.run(WINDOWS - 3)  # window 4 again from the saved state, then 5
    assert result.windows == [4, 5]
    assert w.processed == [1, 2, 3, 4, 5]  # no window finished twice
    assert w.scorer is not None
    with pytest.raises(ValueError, match="not after the last finished"):
        w.scorer.gauntlet.begin_window(
            WINDOWS,
            outer_step=0,
            eval_seed=1,
            observations={},
            validator_values={},
            gather=[],
            reserve=[],
            gathered=[],
            validators=[],
        )
    # the same state as the uninterrupted run: ratings, BMA, counters, EMA, model
    ours, theirs = _final_state(w.run_dir), _final_state(world.run_dir)
    assert ours["scorer"]["gauntlet"] == theirs["scorer"]["gauntlet"]
    ratings = {u: p["rating"] for u, p in ours["scorer"]["gauntlet"]["peers"].items()}
    assert set(ratings) == {"2", "3"} and all(r is not None for r in ratings.values())
    assert ours["model"].keys() == theirs["model"].keys()
    for name, tensor in ours["model"].items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, theirs["model"][name]), name
    for window in range(1, WINDOWS + 1):
        a, b = w.records(window), world.records(window)
        assert sorted(a) == sorted(b) == [2, 3]
        for uid in a:
            assert a[uid]["record"]["score"] == b[uid]["record"]["score"], (window, uid)
            model_hash = a[uid]["record"]["inputs"]["model_hash"]
            assert model_hash == b[uid]["record"]["inputs"]["model_hash"]


# ------------------------------------------------------------------------------------------------
# miner-only plugins
# ------------------------------------------------------------------------------------------------


class _MinerOnly:
    COVENANT_ROLES = ("miner",)


def test_validator_refuses_a_miner_only_plugin(tmp_path: Path) -> None:
    from covenant.engine.session import open_session
    from covenant.engine.validate import check_validator_plugins

    session = open_session(
        None,
        [f'run.root="{tmp_path}"', 'plugins.enable=["gauntlet", "reward", "chain"]'],
        environ={},
        extra_plugins=[("miner-tool", _MinerOnly())],
    )
    with pytest.raises(ConfigError, match="plugin 'miner-tool' is for miner only"):
        check_validator_plugins(session)


def test_covenant_validate_refuses_the_adversaries_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COVENANT_PLUGINS", raising=False)  # the config's allow-list decides
    enable = json.dumps([*VALIDATOR_TOML_PLUGINS, "adversaries"])
    code, _, err = cli(
        [
            "validate",
            "--config",
            "validator",
            "--set",
            f"plugins.enable={enable}",
            "--set",
            f'run.root="{tmp_path}"',
        ],
        monkeypatch,
    )
    assert code == 2, err
    assert "plugin 'adversaries' is for miner only and must not be enabled" in err
    assert not (tmp_path / "local" / "checkpoints").exists()  # refused before anything ran
