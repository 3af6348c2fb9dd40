"""Hotkeys: dev URIs, generated key files, mnemonics and seeds, and every way a spec can be wrong."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from covenant.engine.keys import (
    MAX_KEY_FILE_BYTES,
    HotkeyError,
    generate_hotkey,
    keypair_from_seed,
    load_hotkey,
    verify_signature,
)

ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # the well-known //Alice address


def test_dev_uri() -> None:
    alice = load_hotkey("//Alice")
    assert alice.ss58_address == ALICE
    assert load_hotkey("//Alice//hot").ss58_address != ALICE
    assert load_hotkey(alice) is alice  # a Keypair passes through


def test_generate_writes_a_private_file_and_loads_back(tmp_path: Path) -> None:
    key = generate_hotkey(tmp_path / "keys", "miner-0")
    path = tmp_path / "keys" / "miner-0.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["ss58_address"] == key.ss58_address and data["secret_seed"].startswith("0x")
    loaded = load_hotkey(str(path))
    assert loaded.ss58_address == key.ss58_address
    message = b"manifest"
    assert verify_signature(key.ss58_address, message, loaded.sign(message))
    assert generate_hotkey(tmp_path / "keys", "miner-1").ss58_address != key.ss58_address


def test_generate_never_overwrites(tmp_path: Path) -> None:
    first = generate_hotkey(tmp_path, "v")
    with pytest.raises(HotkeyError, match="already exists"):
        generate_hotkey(tmp_path, "v")
    assert load_hotkey(tmp_path / "v.json").ss58_address == first.ss58_address


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 65])
def test_generate_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(HotkeyError, match="invalid key name"):
        generate_hotkey(tmp_path, name)


def test_mnemonic_and_seed_files(tmp_path: Path) -> None:
    from bittensor.sp_core import Keypair

    words = Keypair.generate_mnemonic(12)
    (tmp_path / "m.txt").write_text(words + "\n")
    assert (
        load_hotkey(str(tmp_path / "m.txt")).ss58_address
        == Keypair.create_from_mnemonic(words).ss58_address
    )
    seed = bytes(range(32))
    (tmp_path / "s.txt").write_text("0x" + seed.hex())
    assert load_hotkey(str(tmp_path / "s.txt")).ss58_address == keypair_from_seed(seed).ss58_address


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "malformed key file JSON"),
        ('{"x": ' + "[" * 5000 + "]" * 5000 + "}", "nested deeper"),  # was a RecursionError
        ('{"secret_seed": 1' + "0" * 5000 + "}", "longer than 64 digits"),  # was a ValueError
        ('{"secret_seed": "0x1234"}', "no valid 'secret_seed'"),
        ("[1, 2]", "not a key file"),
        ("just some words here", "not a key file"),
        (" ".join(["abandon"] * 12), "not a valid BIP-39 mnemonic"),
    ],
)
def test_malformed_key_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(HotkeyError, match=match):
        load_hotkey(str(path))


def test_binary_key_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.key"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(HotkeyError, match="not UTF-8 text"):
        load_hotkey(str(path))


def test_damaged_key_file_address_mismatch(tmp_path: Path) -> None:
    generate_hotkey(tmp_path, "k")
    path = tmp_path / "k.json"
    data = json.loads(path.read_text())
    data["ss58_address"] = ALICE
    path.write_text(json.dumps(data))
    with pytest.raises(HotkeyError, match="does not match"):
        load_hotkey(str(path))


def test_oversized_and_missing_files(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"0" * (MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(HotkeyError, match="too large"):
        load_hotkey(str(big))
    with pytest.raises(HotkeyError, match="no such key file"):
        load_hotkey(str(tmp_path / "absent.json"))
    with pytest.raises(HotkeyError, match="not a regular file"):
        load_hotkey(str(tmp_path))


@pytest.mark.parametrize("spec", ["", "   ", None, 42])
def test_empty_or_wrong_type_spec(spec: object) -> None:
    with pytest.raises(HotkeyError, match="non-empty string"):
        load_hotkey(spec)


def test_bad_dev_uri_and_missing_wallet(tmp_path: Path) -> None:
    with pytest.raises(HotkeyError, match="invalid dev URI"):
        load_hotkey("//")
    with pytest.raises(HotkeyError, match="wallet:NAME/HOTKEY"):
        load_hotkey("wallet:onlyname")
    with pytest.raises(HotkeyError, match="cannot read the wallet hotkey"):
        load_hotkey(f"wallet:cold/hot@{tmp_path}")


def test_readable_by_others_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    generate_hotkey(tmp_path, "k")
    path = tmp_path / "k.json"
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING):
        load_hotkey(str(path))
    assert "readable by other users" in caplog.text
    assert "secret" not in caplog.text.lower().replace("secret_seed", "")


def test_verify_signature_never_raises_on_garbage() -> None:
    alice = load_hotkey("//Alice")
    sig = alice.sign(b"m")
    assert verify_signature(ALICE, b"m", sig)
    assert not verify_signature(ALICE, b"other", sig)
    assert not verify_signature(ALICE, b"m", b"short")
    assert not verify_signature("not-an-address", b"m", sig)
