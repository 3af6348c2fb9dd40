"""Shared fixtures for the data tests: one small corpus prepared once per session.

A slice of big.txt (120 documents of <= 2000 characters), vocab 512, T = 64, and small shards so
that several train shards exist. Tests that damage files work on a copy (``data_copy``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from data_testutil import SMALL

from covenant.engine.data.prepare import prepare
from covenant.engine.data.shards import Manifest


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("small-data")
    kw = dict(SMALL)
    manifest = prepare(
        out,
        kw.pop("sources"),
        kw.pop("vocab_size"),
        kw.pop("seq_len"),
        kw.pop("val_fraction"),
        **kw,
    )
    return out, manifest


@pytest.fixture
def data_copy(small_data: tuple[Path, Manifest], tmp_path: Path) -> Path:
    """A private copy of the small corpus that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(small_data[0], dst)
    return dst
