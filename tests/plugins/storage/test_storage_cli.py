"""``covenant storage`` commands (through typer's runner, the plugin registered by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from covenant.plugins.storage.cli import app
from covenant.plugins.storage.transport import open_transport

runner = CliRunner()
ACCOUNT = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _only_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    # the `storage` command group exists only where the storage plugin is enabled
    monkeypatch.setenv("COVENANT_PLUGINS", "storage")


def test_ls_and_head(tmp_path: Path) -> None:
    url = (tmp_path / "s").as_uri()
    open_transport(url).put("run/v1/gradient/1/2", b"abc")
    res = runner.invoke(app, ["ls", "run/", "--url", url, "--json"])
    assert res.exit_code == 0, res.output
    assert [o["key"] for o in json.loads(res.stdout)] == ["run/v1/gradient/1/2"]
    res = runner.invoke(app, ["head", "run/v1/gradient/1/2", "--url", url])
    assert res.exit_code == 0 and json.loads(res.stdout)["size"] == 3
    assert runner.invoke(app, ["head", "run/none", "--url", url]).exit_code == 1
    bad = runner.invoke(app, ["head", "../x", "--url", url])
    assert bad.exit_code == 2 and "error" in bad.output


def test_commitment_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVENANT_READ_SECRET", "s" * 64)
    res = runner.invoke(
        app,
        [
            "commitment",
            "--url",
            f"s3://{ACCOUNT}",
            "--key-id",
            "k" * 32,
            "--endpoint",
            f"https://{ACCOUNT}.r2.cloudflarestorage.com",
        ],
    )
    assert res.exit_code == 0, res.output
    text = res.stdout.strip()
    assert text == ACCOUNT + "k" * 32 + "s" * 64
    shown = runner.invoke(app, ["check-commitment", text])
    assert shown.exit_code == 0 and "s" * 64 not in shown.stdout
    assert json.loads(shown.stdout)["r2"] is True
    assert runner.invoke(app, ["check-commitment", "garbage"]).exit_code == 2
