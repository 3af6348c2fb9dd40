"""Signed manifests and the object layout that carries them (SPEC sections 5 and 6).

Every upload is **one object**: a short header, the signed manifest, then the payload::

    b"CVNT" | layout version (1 byte, = 1) | header length n (4 bytes, big-endian)
    | n bytes: {"manifest": {...}, "signature": "0x<128 hex>"} (UTF-8 JSON, n <= 64 KiB)
    | payload

One object rather than a payload plus a ``.manifest.json`` beside it, because then the payload
and its manifest are written by a single atomic PUT, carry a single storage timestamp, and are
read by a single (capped) GET: a reader can never pair a payload with another upload's
manifest. The gradient cap is the payload size implied by the model plus at most the header cap.

The manifest names the run, protocol version, storage key, window, uid, hotkey, codec and the
SHA-256 and size of the exact payload bytes. The signature (sr25519, ``bittensor.sp_core``) is
over a domain tag plus the manifest's canonical JSON (sorted keys, no spaces, ASCII), so a
manifest cannot be replayed for another window, uid, key or run without breaking it.

:func:`unpack_object` is the one place these bytes are parsed; it bounds every length before
reading and raises :class:`~covenant.plugins.storage.errors.ManifestError` on anything odd.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from covenant.plugins.storage.errors import ManifestError

MAGIC = b"CVNT"
LAYOUT_VERSION = 1
_PREFIX = struct.Struct(">4sBI")  # magic, layout version, header length
PREFIX_BYTES = _PREFIX.size
SIGNING_DOMAIN = b"covenant/manifest/v1\n"
MANIFEST_FORMAT = 1

_SS58 = r"^[1-9A-HJ-NP-Za-km-z]{46,48}$"
_HEX64 = r"^[0-9a-f]{64}$"
_SIG = r"^0x[0-9a-f]{128}$"


class Manifest(BaseModel):
    """What an upload claims about itself; signed by ``hotkey``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: Literal[1] = 1
    run: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(ge=1)
    key: str = Field(min_length=1, max_length=1024)
    window: int = Field(ge=0)
    uid: int = Field(ge=0, lt=1 << 16)
    hotkey: str = Field(pattern=_SS58)
    codec: str = Field(pattern=r"^[A-Za-z0-9_.+/-]{1,64}$")
    sha256: str = Field(pattern=_HEX64)
    size: int = Field(ge=0)
    sizes: dict[str, int] = Field(default_factory=dict, description="codec-specific byte counts")

    @field_validator("sizes")
    @classmethod
    def _small_sizes(cls, value: dict[str, int]) -> dict[str, int]:
        if len(value) > 32 or any(len(k) > 64 or v < 0 for k, v in value.items()):
            raise ValueError("at most 32 entries, names <= 64 characters, values >= 0")
        return value

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")


class SignedManifest(BaseModel):
    """A manifest and its sr25519 signature (``0x`` + 128 hex digits)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    manifest: Manifest
    signature: str = Field(pattern=_SIG)

    def verify(self, ss58_address: str) -> bool:
        """Whether ``signature`` is ``ss58_address``'s signature of this manifest."""
        return verify_signature(self.manifest, self.signature, ss58_address)


def content_hash(data: bytes | memoryview) -> str:
    """SHA-256 hex digest (the content hash recorded in manifests and aggregate records)."""
    return hashlib.sha256(data).hexdigest()


def sign_manifest(manifest: Manifest, keypair: Any) -> SignedManifest:
    """Sign ``manifest`` with a ``bittensor.sp_core.Keypair`` whose address is its hotkey."""
    if getattr(keypair, "ss58_address", None) != manifest.hotkey:
        raise ManifestError(
            f"manifest hotkey {manifest.hotkey} is not the signing key's "
            f"{getattr(keypair, 'ss58_address', None)}"
        )
    signature = keypair.sign(SIGNING_DOMAIN + manifest.canonical_bytes())
    return SignedManifest(manifest=manifest, signature="0x" + bytes(signature).hex())


def verify_signature(manifest: Manifest, signature: str, ss58_address: str) -> bool:
    """Check an sr25519 signature; any malformed input is simply ``False``."""
    try:
        from bittensor.sp_core import Keypair

        sig = bytes.fromhex(signature.removeprefix("0x"))
        return bool(
            Keypair(ss58_address=ss58_address).verify(
                SIGNING_DOMAIN + manifest.canonical_bytes(), sig
            )
        )
    except Exception:  # a bad address or signature is a verdict, never a crash
        return False


def pack_object(signed: SignedManifest, payload: bytes | memoryview) -> bytes:
    """The stored object: prefix, signed-manifest header, payload."""
    header = signed.model_dump_json().encode("utf-8")
    return b"".join((_PREFIX.pack(MAGIC, LAYOUT_VERSION, len(header)), header, payload))


def unpack_object(data: bytes, max_header_bytes: int) -> tuple[SignedManifest, memoryview]:
    """Split a stored object into its signed manifest and a zero-copy view of the payload.

    Raises :class:`ManifestError` if the prefix is wrong, the header is longer than
    ``max_header_bytes`` or than the object, or the header is not a valid signed manifest.
    """
    if len(data) < PREFIX_BYTES:
        raise ManifestError(
            f"object is {len(data)} bytes, shorter than the {PREFIX_BYTES}-byte prefix"
        )
    magic, layout, length = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise ManifestError(f"object does not start with {MAGIC!r} (got {bytes(magic)!r})")
    if layout != LAYOUT_VERSION:
        raise ManifestError(f"object layout version {layout} is not supported ({LAYOUT_VERSION})")
    if length > max_header_bytes:
        raise ManifestError(
            f"manifest header is {length} bytes, over the cap of {max_header_bytes}"
        )
    if PREFIX_BYTES + length > len(data):
        raise ManifestError(f"manifest header claims {length} bytes, object holds fewer")
    view = memoryview(data)
    header = view[PREFIX_BYTES : PREFIX_BYTES + length]
    try:
        signed = SignedManifest.model_validate_json(bytes(header))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise ManifestError(f"manifest is invalid: {where}: {first['msg']}") from None
    return signed, view[PREFIX_BYTES + length :]
