"""Packaging: the wheel holds every package and the built-in data files, under covenant.* only."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {
    "engine": "covenant.engine",
    "plugins": "covenant.plugins",
    "models": "covenant.models",
    "configs": "covenant.configs",
    "src/covenant": "covenant",
}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for folder, name in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - found == set(), "listed packages that do not exist"


def test_wheel_ships_configs_and_presets_under_covenant_only(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    code = f"import sys, setuptools.build_meta as b; print(b.build_wheel({str(tmp_path)!r}))"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = tmp_path / res.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert "covenant/configs/tiny.toml" in names
    assert "covenant/configs/validator.toml" in names
    assert "covenant/models/presets.toml" in names
    assert "covenant/engine/hookspecs.py" in names
    assert "covenant/plugins/sparseloco/wire.py" in names
    tops = {
        n.split("/")[0] for n in names if not n.endswith(".dist-info") and ".dist-info/" not in n
    }
    assert tops == {"covenant"}, tops  # no generic top-level `engine`, `models`...
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[covenant]" in text and "model = covenant.models.plugin" in text
