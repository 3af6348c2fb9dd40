"""The plugin manager: entry-point discovery, the allow-list, hook checking, bad plugins."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from covenant.engine import hookimpl
from covenant.engine.errors import PluginError
from covenant.engine.plugins import PluginHost
from covenant.engine.session import open_session

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "covenant-example-plugin"


def expose(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Make a distribution visible through entry-point metadata only (no install)."""
    info = site / f"{dist}-0.1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    info.joinpath("entry_points.txt").write_text(f"[covenant]\n{lines}\n")
    for name, source in modules.items():
        site.joinpath(f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    yield path
    for mod in [m for m in sys.modules if m.startswith(("covenant_example_plugin", "thirdparty_"))]:
        del sys.modules[mod]


@pytest.fixture
def example_site(site: Path) -> Path:
    shutil.copytree(EXAMPLE / "covenant_example_plugin", site / "covenant_example_plugin")
    expose(site, "covenant_example_plugin", {"csv-metrics": "covenant_example_plugin"}, {})
    return site


def test_third_party_plugin_is_discovered_and_excluded(example_site: Path) -> None:
    host = PluginHost()
    host.load(None, environ={})
    info = {i.name: i for i in host.plugin_infos()}
    assert info["csv-metrics"].distribution == "covenant_example_plugin"
    assert info["csv-metrics"].version == "0.1.0"
    assert "covenant_log_metrics" in info["csv-metrics"].hooks

    host = PluginHost()
    host.load(None, environ={"COVENANT_PLUGINS": ""})
    assert [i.name for i in host.plugin_infos()] == ["core"]
    disabled = {i.name: i for i in host.plugin_infos(include_disabled=True)}
    assert disabled["csv-metrics"].enabled is False


def test_allow_list_in_config_and_env_precedence(example_site: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\nenable = ["csv-metrics"]\n')
    session = open_session(cfg, environ={})
    assert "csv-metrics" in session.host.infos
    assert session.config.section("csv_metrics").file == "metrics.csv"
    session = open_session(cfg, environ={"COVENANT_PLUGINS": ""})
    assert "csv-metrics" not in session.host.infos


def test_unknown_plugin_in_allow_list() -> None:
    with pytest.raises(PluginError, match="unknown plugin 'nosuch' in the allow-list"):
        PluginHost().load(["nosuch"], environ={})


def test_plugin_that_raises_at_import(site: Path) -> None:
    expose(
        site,
        "thirdparty_boom",
        {"boom": "thirdparty_boom"},
        {"thirdparty_boom": "raise RuntimeError('kaput')\n"},
    )
    with pytest.raises(
        PluginError,
        match=r"plugin 'boom' \(thirdparty_boom\) failed to import: RuntimeError: kaput",
    ):
        PluginHost().load(["boom"], environ={})


def test_misspelled_hook_is_an_error() -> None:
    class Typo:
        @hookimpl
        def covenant_log_metric(self, metrics: dict) -> None:  # missing "s"
            pass

    host = PluginHost()
    host.load([], environ={})
    host.register(Typo(), name="typo")
    with pytest.raises(
        PluginError, match="plugin 'typo' implements unknown hook 'covenant_log_metric'"
    ):
        host.check()


def test_duplicate_config_section_names_both_plugins() -> None:
    from pydantic import BaseModel

    class A:
        @hookimpl
        def covenant_add_config_sections(self, register):  # type: ignore[no-untyped-def]
            register("run", BaseModel)

    host = PluginHost()
    host.load([], environ={})
    host.register(A(), name="a")
    with pytest.raises(PluginError, match=r"\[run\] registered twice: by 'core' and 'a'"):
        host.config_schema()


def test_fixture_records_hooks_of_example_plugin(example_site: Path, covenant_engine) -> None:  # type: ignore[no-untyped-def]
    import covenant_example_plugin as plugin

    run = covenant_engine(plugin, overrides=["csv_metrics.kinds=['train']"])
    assert run.called("covenant_configure")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.hook.covenant_run_started(config=run.config, run_dir=str(run.run_dir), versions={})
    run.hook.covenant_log_metrics(metrics={"loss": 2.5}, step=3, kind="train")
    run.hook.covenant_log_metrics(metrics={"x": 1.0}, step=3, kind="bench")
    run.hook.covenant_shutdown(reason="completed", error=None)
    rows = (run.run_dir / "metrics.csv").read_text().splitlines()
    assert rows == ["kind,step,metric,value", "train,3,loss,2.5"]
    assert [c.name for c in run.recorder.of("covenant_log_metrics")] == ["covenant_log_metrics"] * 2


def _cli(
    args: list[str], env_extra: dict[str, str] | None = None, pythonpath: Path | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "COVENANT_PLUGINS"}
    env.update(env_extra or {})
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-m", "covenant.engine.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_lists_third_party_plugin_and_allow_list_hides_it(example_site: Path) -> None:
    import json

    res = _cli(["plugins", "--json"], pythonpath=example_site)
    assert res.returncode == 0, res.stderr
    names = {p["name"]: p for p in json.loads(res.stdout)}
    assert names["core"]["version"]
    assert names["csv-metrics"]["distribution"] == "covenant_example_plugin"
    res = _cli(["plugins", "--json"], {"COVENANT_PLUGINS": ""}, pythonpath=example_site)
    assert "csv-metrics" not in {p["name"] for p in json.loads(res.stdout)}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["config", "show", "--config", "does-not-exist.toml"],
            "config file not found: does-not-exist.toml",
        ),
        (["config", "show", "--config", "tiny", "--set", "train.steps=-1"], "[train] steps"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: list[str], needle: str) -> None:
    res = _cli(args)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr


def test_cli_malformed_toml_and_unknown_plugin(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    res = _cli(["config", "show", "--config", str(bad)])
    assert res.returncode == 2 and "malformed TOML" in res.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\nenable = ["nosuch"]\n')
    res = _cli(["config", "show", "--config", str(cfg)])
    assert res.returncode == 2 and "unknown plugin 'nosuch'" in res.stderr


def test_cli_plugin_raising_at_import_exits_2(site: Path) -> None:
    expose(
        site,
        "thirdparty_boom2",
        {"boom2": "thirdparty_boom2"},
        {"thirdparty_boom2": "raise ImportError('nope')\n"},
    )
    res = _cli(["plugins"], pythonpath=site)
    assert res.returncode == 2
    assert "plugin 'boom2' (thirdparty_boom2) failed to import" in res.stderr
    assert "Traceback" not in res.stderr
