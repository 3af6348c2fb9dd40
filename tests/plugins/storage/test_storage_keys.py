"""Key layout and key validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from covenant.plugins.storage.errors import StorageKeyError
from covenant.plugins.storage.keys import RunKeys, validate_key


def test_every_kind_lives_under_run_and_version() -> None:
    k = RunKeys("run-1", 2)
    built = [
        k.gradient(7, 3),
        k.debug(7, 3),
        k.peers(7),
        k.aggregate(7),
        k.checkpoint(7, "model.safetensors"),
        k.checkpoint_latest(),
        k.start_window(),
    ]
    assert built[0] == "run-1/v2/gradient/7/3"
    assert built[1] == "run-1/v2/debug/7/3"
    assert built[2] == "run-1/v2/peers/7"
    assert built[3] == "run-1/v2/aggregate/7"
    assert built[4] == "run-1/v2/checkpoint/7/model.safetensors"
    for key in built:
        assert key.startswith("run-1/v2/")
        assert validate_key(key) == key
        assert k.owns(key)
    assert not RunKeys("run-1", 3).owns(built[0])


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/abs/key",
        "a/../b",
        "..",
        "a/./b",
        "a\\b",
        "a//b",
        "a/",
        ".hidden/x",
        "a/.tmp",
        "a b",
        "a/\x00",
        "ü/x",
        "x" * 1025,
    ],
)
def test_bad_keys_are_refused(bad: str) -> None:
    with pytest.raises(StorageKeyError):
        validate_key(bad)


def test_prefixes_allow_root_and_trailing_slash() -> None:
    assert validate_key("", allow_prefix=True) == ""
    assert validate_key("run/v1/", allow_prefix=True) == "run/v1/"
    with pytest.raises(StorageKeyError):
        validate_key("../", allow_prefix=True)


@pytest.mark.parametrize("run", ["", "../x", "a/b", "-x", "x" * 65])
def test_bad_run_ids_are_refused(run: str) -> None:
    with pytest.raises(StorageKeyError):
        RunKeys(run, 1)


def test_bad_numbers_are_refused() -> None:
    k = RunKeys("r", 1)
    with pytest.raises(StorageKeyError):
        k.gradient(-1, 0)
    with pytest.raises(StorageKeyError):
        k.gradient(True, 0)
    with pytest.raises(StorageKeyError):
        RunKeys("r", 0)
    with pytest.raises(StorageKeyError):
        k.checkpoint(1, "../escape")


def test_parse_windowed_round_trips() -> None:
    k = RunKeys("r", 1)
    assert k.parse_windowed("gradient", k.gradient(12, 4)) == (12, 4)
    assert k.parse_windowed("aggregate", k.aggregate(9)) == (9, None)
    assert k.parse_windowed("gradient", k.debug(12, 4)) is None
    assert k.parse_windowed("gradient", "r/v1/gradient/12/4/extra") is None
    assert k.parse_windowed("gradient", "r/v1/gradient/x/4") is None


@given(st.text(max_size=40))
def test_validated_keys_never_escape(text: str) -> None:
    try:
        key = validate_key(text)
    except StorageKeyError:
        return
    parts = key.split("/")
    assert not key.startswith("/")
    assert ".." not in parts and "." not in parts and "" not in parts
    assert "\\" not in key
