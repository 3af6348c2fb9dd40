"""Signed manifests and the object layout that carries them (SPEC sections 5 and 6).

Every upload is **one object**: a short header, the signed manifest, then the payload::

    b"CVNT" | layout version (1 byte, = 1) | header length n (4 bytes, big-endian)
    | n bytes: {"manifest": {...}, "signature": "0x<128 hex>"} (canonical JSON, n <= 64 KiB)
    | payload

One object rather than a payload plus a ``.manifest.json`` beside it, because then the payload
and its manifest are written by a single atomic PUT, carry a single storage timestamp, and are
read by a single (capped) GET: a reader can never pair a payload with another upload's
manifest. The gradient cap is the payload size implied by the model plus at most the header cap.

The manifest names the run, protocol version, storage key, window, uid, hotkey, codec and the
SHA-256 and size of the exact payload bytes. The signature (sr25519, ``bittensor.sp_core``) is
over a domain tag plus the manifest's canonical JSON (sorted keys, no spaces, ASCII), so a
manifest cannot be replayed for another window, uid, key or run without breaking it.

The header is that same canonical JSON (:func:`covenant.engine.untrusted.canonical_json`), and
:func:`unpack_object` accepts it only in exactly the form :func:`pack_object` writes, byte for
byte: duplicate or reordered keys, spaces, a missing default, ``"format": true`` for ``1`` are all
refused. Otherwise the bytes a reader acts on could differ from the bytes that were signed (the
signature is checked on a re-serialisation of the parsed manifest), and two readers of one object
could disagree about what it says.

:func:`unpack_object` is the one place these bytes are parsed; it bounds every length before
reading and raises :class:`~covenant.plugins.storage.errors.ManifestError` on anything odd.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from covenant.engine.untrusted import UntrustedInputError, canonical_json, loads_canonical_json
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
_HEADER_DEPTH = 3  # {"manifest": {"sizes": {...}, "receipt": {...}}}


class ManifestReceipt(BaseModel):
    """The data receipt of a gradient upload (SPEC section 3): which samples the peer drew.

    ``hash`` is BLAKE2b-128 (hex) of the ascending little-endian uint64 sample ids of the pool,
    ``count`` their number; the validator recomputes both from ``(uid, window)``.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    hash: str = Field(pattern=r"^[0-9a-f]{32}$")
    count: int = Field(ge=0, lt=1 << 40)


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
    receipt: ManifestReceipt | None = Field(
        None, description="gradient uploads: the data receipt of the pool trained on"
    )

    @field_validator("sizes")
    @classmethod
    def _small_sizes(cls, value: dict[str, int]) -> dict[str, int]:
        if len(value) > 32 or any(len(k) > 64 or v < 0 for k, v in value.items()):
            raise ValueError("at most 32 entries, names <= 64 characters, values >= 0")
        return value

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed."""
        return canonical_json(self.model_dump(mode="json"))


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
    """The stored object: prefix, signed-manifest header (canonical JSON), payload."""
    header = canonical_json(signed.model_dump(mode="json"))
    return b"".join((_PREFIX.pack(MAGIC, LAYOUT_VERSION, len(header)), header, payload))


def unpack_object(data: bytes, max_header_bytes: int) -> tuple[SignedManifest, memoryview]:
    """Split a stored object into its signed manifest and a zero-copy view of the payload.

    Raises :class:`ManifestError` if the prefix is wrong, the header is longer than
    ``max_header_bytes`` or than the object, or the header is not a valid signed manifest in
    exactly the canonical form :func:`pack_object` writes.
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
    header = bytes(view[PREFIX_BYTES : PREFIX_BYTES + length])
    try:
        doc = loads_canonical_json(
            header, what="manifest header", max_bytes=max_header_bytes, max_depth=_HEADER_DEPTH
        )
    except UntrustedInputError as exc:
        raise ManifestError(f"manifest is invalid: {exc}") from None
    try:
        signed = SignedManifest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise ManifestError(f"manifest is invalid: {where}: {first['msg']}") from None
    # the model must dump back to exactly these bytes: no omitted default, no 'true' for 1
    if canonical_json(signed.model_dump(mode="json")) != header:
        raise ManifestError("manifest is invalid: header is not the canonical form of its fields")
    return signed, view[PREFIX_BYTES + length :]
