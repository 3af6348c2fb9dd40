"""Hotkeys: load or generate the sr25519 key every signing component uses.

A *hotkey* signs everything a peer or validator publishes: chain writes (commitments, weights,
local-chain registrations), storage manifests, validator records. It is a
``bittensor.sp_core.Keypair`` (sr25519, ss58 format 42), the same type the Bittensor SDK signs
extrinsics with, so one loaded key serves the local chain, the real chain and the storage layer.

A key *spec* (the ``[chain] hotkey`` config value, ``--hotkey`` on the CLI) is one of:

* a dev URI such as ``//Alice`` or ``//Alice//stash`` (well-known, public: local swarms and tests
  only, never for real stake);
* ``wallet:NAME/HOTKEY`` or ``wallet:NAME/HOTKEY@PATH``: a Bittensor wallet's hotkey file (the
  default wallet folder is ``~/.bittensor/wallets``; it is only read when the spec names it);
* a path to a key file: the JSON written by :func:`generate_hotkey` (``{"secret_seed": "0x.."}``),
  or a text file holding a BIP-39 mnemonic or a ``0x``-prefixed 32-byte seed.

:func:`generate_hotkey` writes a fresh key as JSON with mode 0600 into the folder it is given (a
run directory's ``keys/`` in the local swarm); nothing here writes under ``$HOME`` on its own.
The secret seed is never logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covenant.engine.errors import CovenantError
from covenant.engine.untrusted import UntrustedInputError, loads_json

if TYPE_CHECKING:  # bittensor's compiled core is cheap, but keep import-time work minimal
    from bittensor.sp_core import Keypair

log = logging.getLogger(__name__)

KEY_FILE_VERSION = 1
# A key file holds a seed or a 24-word mnemonic; anything much larger is not a key file.
MAX_KEY_FILE_BYTES = 64 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SEED_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")


class HotkeyError(CovenantError):
    """A hotkey spec or key file is wrong (missing, malformed, unsafe permissions...)."""


def _keypair_cls() -> type[Keypair]:
    # ``bittensor.sp_core.Keypair`` *is* ``bittensor_core.Keypair``; importing the binding
    # directly skips the SDK package's ~2 s import, which every signing process would pay.
    try:
        from bittensor_core import Keypair
    except ImportError:  # pragma: no cover - an SDK that moved its binding
        from bittensor.sp_core import Keypair
    return Keypair


def keypair_from_seed(seed: bytes) -> Keypair:
    """The sr25519 keypair of a 32-byte secret seed."""
    if len(seed) != 32:
        raise HotkeyError(f"a secret seed is 32 bytes, got {len(seed)}")
    return _keypair_cls().create_from_seed(seed)


def generate_hotkey(directory: str | os.PathLike[str], name: str) -> Keypair:
    """Create a new random hotkey and store it as ``directory/name.json`` (mode 0600).

    The file holds the secret seed (hex) and the ss58 address; an existing file is never
    overwritten (a lost key cannot be recovered). Returns the new keypair.
    """
    if not _NAME_RE.match(name):
        raise HotkeyError(
            f"invalid key name {name!r}: use letters, digits, '_', '.', '-' (max 64 characters)"
        )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    seed = secrets.token_bytes(32)
    keypair = keypair_from_seed(seed)
    payload = {
        "version": KEY_FILE_VERSION,
        "crypto": "sr25519",
        "ss58_address": keypair.ss58_address,
        "secret_seed": "0x" + seed.hex(),
    }
    # O_EXCL: refuse to clobber a key; 0600 from the first byte (no chmod-after-write window).
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise HotkeyError(f"{path}: key file already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    log.info("generated hotkey %s in %s", keypair.ss58_address, path)
    return keypair


def load_hotkey(spec: Any) -> Keypair:
    """Load the hotkey described by ``spec`` (see the module docstring for the forms).

    A ``Keypair`` passes through unchanged. Errors say which spec failed and why, never the
    secret itself.
    """
    keypair_cls = _keypair_cls()
    if isinstance(spec, keypair_cls):
        return spec
    if isinstance(spec, os.PathLike):
        return _load_key_file(Path(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise HotkeyError(f"hotkey spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("//"):
        try:
            return keypair_cls.create_from_uri(spec)
        except ValueError as exc:
            raise HotkeyError(f"hotkey {spec!r}: invalid dev URI ({exc})") from None
    if spec.startswith("wallet:"):
        return _load_wallet_hotkey(spec)
    return _load_key_file(Path(spec).expanduser())


def _load_wallet_hotkey(spec: str) -> Keypair:
    body = spec[len("wallet:") :]
    names, _, path = body.partition("@")
    wallet_name, _, hotkey_name = names.partition("/")
    if not wallet_name or not hotkey_name:
        raise HotkeyError(
            f"hotkey {spec!r}: expected wallet:NAME/HOTKEY or wallet:NAME/HOTKEY@PATH"
        )
    from bittensor.wallet import Wallet

    kwargs: dict[str, str] = {"path": path} if path else {}
    try:
        return Wallet(wallet_name, hotkey_name, **kwargs).hotkey
    except Exception as exc:  # the SDK raises its own keyfile errors; report them as ours
        raise HotkeyError(f"hotkey {spec!r}: cannot read the wallet hotkey ({exc})") from None


def _load_key_file(path: Path) -> Keypair:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise HotkeyError(
            f"hotkey {str(path)!r}: no such key file (use //Alice-style dev URIs, "
            "wallet:NAME/HOTKEY or a key file path)"
        ) from None
    if not path.is_file():
        raise HotkeyError(f"hotkey {str(path)!r}: not a regular file")
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise HotkeyError(f"{path}: {info.st_size} bytes is too large for a key file")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Same stance as ssh: a secret others can read is not loaded silently.
        log.warning(
            "key file %s is readable by other users (mode %o); chmod 600 it",
            path,
            info.st_mode & 0o777,
        )
    try:
        text = path.read_text(encoding="utf-8", errors="strict").strip()
    except UnicodeDecodeError:
        raise HotkeyError(f"{path}: not UTF-8 text, so not a key file") from None
    if text.startswith("{"):
        return _from_json(path, text)
    if _SEED_RE.match(text):
        return keypair_from_seed(bytes.fromhex(text[2:]))
    words = text.split()
    if len(words) in (12, 15, 18, 21, 24):
        try:
            return _keypair_cls().create_from_mnemonic(" ".join(words))
        except ValueError:
            raise HotkeyError(f"{path}: not a valid BIP-39 mnemonic") from None
    raise HotkeyError(
        f"{path}: not a key file (expected JSON with secret_seed, a 0x seed or a mnemonic)"
    )


def _from_json(path: Path, text: str) -> Keypair:
    try:
        data = loads_json(text, what=str(path), max_bytes=64 << 10, max_depth=4)
    except UntrustedInputError as exc:
        raise HotkeyError(f"{path}: malformed key file JSON ({exc.problem})") from None
    seed = data.get("secret_seed") if isinstance(data, dict) else None
    if not isinstance(seed, str) or not _SEED_RE.match(seed):
        raise HotkeyError(f"{path}: key file has no valid 'secret_seed' (0x + 64 hex digits)")
    keypair = keypair_from_seed(bytes.fromhex(seed[2:]))
    expected = data.get("ss58_address")
    if expected is not None and expected != keypair.ss58_address:
        raise HotkeyError(
            f"{path}: ss58_address {expected} does not match the secret seed "
            f"({keypair.ss58_address}); the file is damaged"
        )
    return keypair


def verify_signature(ss58_address: str, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``ss58_address``'s sr25519 signature of ``message``.

    Never raises on malformed input (bad address, wrong signature length): that is simply an
    invalid signature, which is what an untrusted peer's bytes must be treated as.
    """
    try:
        return bool(_keypair_cls()(ss58_address=ss58_address).verify(message, signature))
    except (ValueError, TypeError):
        return False


__all__ = [
    "MAX_KEY_FILE_BYTES",
    "HotkeyError",
    "generate_hotkey",
    "keypair_from_seed",
    "load_hotkey",
    "verify_signature",
]
