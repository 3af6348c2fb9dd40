"""Hermetic defaults for every test: no writes to $HOME, no network, no stray plugins.

* ``HOME`` and the wandb/bittensor cache variables point into the test's temporary folder.
* ``COVENANT_PLUGINS`` is set to covenant's own built-in plugins, so a third-party plugin that
  happens to be installed in the environment never leaks into unrelated tests. Tests that want
  discovery of everything delete the variable themselves.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def builtin_plugin_names() -> list[str]:
    names = []
    for ep in metadata.entry_points(group="covenant"):
        if ep.dist is not None and ep.dist.metadata["Name"] == "covenant":
            names.append(ep.name)
    return sorted(set(names))


@pytest.fixture(autouse=True)
def _hermetic(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(home / "bt-cache"))
    monkeypatch.setenv("COVENANT_PLUGINS", ",".join(builtin_plugin_names()))
    for name in list(os.environ):
        if name.startswith("COVENANT__"):
            monkeypatch.delenv(name)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
