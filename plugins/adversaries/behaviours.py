"""What each adversary does: the functions behind the ``adversaries`` plugin's hooks.

Three dispatchers map a config and a window to a misbehaviour, one per hook the engine calls
(docs/adversaries.md has the table of behaviours and how the Gauntlet catches each):

* :func:`sample_uid_for` (``covenant_sample_uid``): ``wrong_data`` trains on another uid's pool
  while the data receipt still names its own;
* :func:`payload_for` (``covenant_payload``): ``copier``, ``partial_copier``, ``noise``,
  ``invalid``, ``late``, ``forged``, ``replayed`` replace, delay or bypass the upload;
* :func:`apply_aggregate_for` (``covenant_apply_aggregate``): ``stale`` never applies an
  aggregate.

Each returns ``None`` ("behave honestly") before ``start_window`` and for every behaviour that
does not act through its hook. The building blocks (:func:`splice_payload`,
:func:`noise_payload`, :func:`forge_upload`...) take explicit arguments, so tests and simulations
drive the same code the hooks run.

**A deliberate exception to the house rules.** Plugins meet through hooks and protocols and never
import each other; this one imports the public functions of the ``storage`` plugin
(:func:`~covenant.plugins.storage.exchange.build_signed_object`,
:class:`~covenant.plugins.storage.keys.RunKeys`) and of ``sparseloco`` (``parse_payload``,
``pack_payload``, ``encode``, ``TensorPiece``, the codec's name), because an attacker knows the
formats it attacks: it forges manifests and splices payloads at the byte level. No other plugin
may follow this example.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from covenant.engine.keys import keypair_from_seed
from covenant.engine.protocols import ObjectInfo, Receipt, Upload, WindowContext
from covenant.plugins.adversaries.config import AdversariesConfig
from covenant.plugins.sparseloco import (
    ParsedPayload,
    SparseLoCoConfig,
    TensorPiece,
    encode,
    pack_payload,
    parse_payload,
)
from covenant.plugins.sparseloco.outer import SparseLoCoCodec
from covenant.plugins.sparseloco.tiling import full_block
from covenant.plugins.storage.exchange import build_signed_object
from covenant.plugins.storage.keys import RunKeys

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.services import Services

log = logging.getLogger(__name__)

Shapes = Mapping[str, Sequence[int]]
POLL_S = 0.25  # late: how often the chain clock is read while waiting

__all__ = [
    "apply_aggregate_for",
    "bad_receipt",
    "choose_tensors",
    "copier_payload",
    "corrupt_payload",
    "data_victim",
    "fetch_victim_payload",
    "forge_upload",
    "is_active",
    "noise_payload",
    "partial_copier_payload",
    "payload_for",
    "peer_victim",
    "replay_upload",
    "run_keys",
    "sample_uid_for",
    "splice_payload",
    "tensor_weights",
    "wait_until_late",
]


# --------------------------------------------------------------------------------------------
# Dispatch (one function per hook)
# --------------------------------------------------------------------------------------------


def is_active(cfg: AdversariesConfig, window: int) -> bool:
    """Whether ``cfg``'s behaviour applies in ``window`` (a behaviour, and ``start_window``
    reached)."""
    return cfg.behaviour != "none" and window >= cfg.start_window


def sample_uid_for(cfg: AdversariesConfig, ctx: WindowContext) -> int | None:
    """``covenant_sample_uid``: ``wrong_data`` trains on :func:`data_victim`'s pool."""
    if cfg.behaviour == "wrong_data" and is_active(cfg, ctx.window):
        return data_victim(ctx.uid, cfg.victim)
    return None


def apply_aggregate_for(cfg: AdversariesConfig, ctx: WindowContext) -> bool | None:
    """``covenant_apply_aggregate``: ``stale`` keeps theta_start (False), everyone else applies."""
    if cfg.behaviour == "stale" and is_active(cfg, ctx.window):
        return False
    return None


def payload_for(
    cfg: AdversariesConfig,
    ctx: WindowContext,
    payload: bytes,
    services: Services,
    *,
    shapes: Shapes | None = None,
    sparseloco: SparseLoCoConfig | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes | None:
    """``covenant_payload``: the bytes to upload instead of ``payload`` (``b""``: the plugin
    uploaded itself), or ``None`` to upload ``payload`` as it is.

    ``shapes`` (every tensor's global shape) is needed by ``partial_copier`` and ``noise``;
    ``sparseloco`` defaults to the session's ``[sparseloco]`` section.
    """
    if not is_active(cfg, ctx.window):
        return None
    behaviour = cfg.behaviour
    if behaviour == "copier":
        copied = copier_payload(ctx, payload, services, victim=cfg.victim)
        time.sleep(cfg.copy_delay_s)
        return copied
    if behaviour in ("partial_copier", "noise"):
        codec_cfg = sparseloco or _sparseloco_config(services.config)
        if not shapes:
            log.warning(
                "window %d: %s needs the model's shapes; honest upload", ctx.window, behaviour
            )
            return None
        if behaviour == "noise":
            seed = _seed("noise", ctx.uid, ctx.window)
            return noise_payload(shapes, seed=seed, scale=cfg.noise_scale, config=codec_cfg)
        spliced = partial_copier_payload(
            ctx, payload, services, shapes, cfg.fraction, victim=cfg.victim, config=codec_cfg
        )
        time.sleep(cfg.copy_delay_s)
        return spliced
    if behaviour == "invalid":
        if cfg.invalid == "payload":
            return corrupt_payload(payload)
        ctx.extras["receipt"] = bad_receipt(ctx.extras.get("receipt"))
        return payload
    if behaviour == "late":
        wait_until_late(ctx, services, late_by_s=cfg.late_by_s, sleep=sleep)
        return payload
    if behaviour == "forged":
        forge_upload(ctx, payload, services)
        return b""
    if behaviour == "replayed":
        info = replay_upload(ctx, services, lookback=cfg.replay_lookback)
        return b"" if info is not None else None
    return None  # wrong_data and stale upload their own payload


# --------------------------------------------------------------------------------------------
# Victims
# --------------------------------------------------------------------------------------------


def peer_victim(uid: int, peers: Sequence[int], victim: int | None = None) -> int | None:
    """The uid to copy: ``victim`` if given, else the lowest other uid in ``peers``."""
    if victim is not None and victim != uid:
        return victim
    others = sorted(u for u in peers if u != uid)
    return others[0] if others else None


def data_victim(uid: int, victim: int | None = None) -> int:
    """Whose pool a wrong-data peer trains on: ``victim``, else the lowest uid other than its
    own. Needs no I/O, so every rank of the peer answers alike (``covenant_sample_uid``)."""
    if victim is not None and victim != uid:
        return victim
    return 0 if uid != 0 else 1


def _victim_for(ctx: WindowContext, services: Services, victim: int | None) -> int | None:
    if victim is not None and victim != ctx.uid:
        return victim
    peers = services.exchange.peer_list(ctx.window)
    return peer_victim(ctx.uid, peers.uids if peers is not None else (), None)


def fetch_victim_payload(
    services: Services, window: int, victim: int, max_bytes: int
) -> bytes | None:
    """The victim's verified payload of ``window``, waiting for it until the upload interval
    closes (``fetch_gradients(..., wait=True)``); ``None`` if it never arrives or is rejected."""
    for outcome in services.exchange.fetch_gradients(
        window, [victim], max_bytes=max_bytes, wait=True
    ):
        if isinstance(outcome, Upload):
            return bytes(outcome.payload)
        log.warning(
            "window %d: cannot copy uid %d (%s: %s)", window, victim, outcome.reason, outcome.detail
        )
    return None


# --------------------------------------------------------------------------------------------
# Copiers
# --------------------------------------------------------------------------------------------


def copier_payload(
    ctx: WindowContext, payload: bytes, services: Services, *, victim: int | None = None
) -> bytes:
    """The victim's payload bytes of this window (re-signed by our own upload); our own payload
    if there is nothing to copy. Same model, same codec: the victim's payload has exactly our
    payload's size, which is the download cap."""
    target = _victim_for(ctx, services, victim)
    if target is None:
        log.warning("window %d: copier has no victim; honest upload", ctx.window)
        return payload
    stolen = fetch_victim_payload(services, ctx.window, target, max_bytes=len(payload))
    return stolen if stolen is not None else payload


def partial_copier_payload(
    ctx: WindowContext,
    payload: bytes,
    services: Services,
    shapes: Shapes,
    fraction: float,
    *,
    victim: int | None = None,
    config: SparseLoCoConfig | None = None,
) -> bytes:
    """Our payload with ``fraction`` of it (see :func:`choose_tensors`) replaced by the
    victim's tensors of this window; our own payload if there is nothing to copy."""
    target = _victim_for(ctx, services, victim)
    if target is None:
        log.warning("window %d: partial copier has no victim; honest upload", ctx.window)
        return payload
    stolen = fetch_victim_payload(services, ctx.window, target, max_bytes=len(payload))
    if stolen is None:
        return payload
    return splice_payload(payload, stolen, shapes, fraction, config)


def tensor_weights(parsed: ParsedPayload) -> dict[str, int]:
    """Per tensor, its weight in copy detection's overlap: tiles x k (SPEC 7)."""
    return {name: e.geometry.num_tiles * e.k for name, e in parsed.entries.items()}


def choose_tensors(weights: Mapping[str, int], fraction: float) -> list[str]:
    """Whole tensors whose weights add up to at most ``fraction`` of the total, as close as a
    greedy pass gets (largest first, ties by name); deterministic."""
    total = sum(weights.values())
    budget = fraction * total
    chosen: list[str] = []
    acc = 0
    for name in sorted(weights, key=lambda n: (-weights[n], n)):
        if acc + weights[name] <= budget + 1e-9:
            chosen.append(name)
            acc += weights[name]
    return sorted(chosen)


def splice_payload(
    own: bytes,
    stolen: bytes,
    shapes: Shapes,
    fraction: float,
    config: SparseLoCoConfig | None = None,
) -> bytes:
    """``own`` with the tensors :func:`choose_tensors` picks taken from ``stolen`` (indices,
    codes and quantiser table unchanged): a valid payload whose index overlap with ``stolen``
    is at least the chosen share. Both payloads must be valid for ``shapes``."""
    mine = parse_payload(own, shapes, config)
    theirs = parse_payload(stolen, shapes, config)
    chosen = set(choose_tensors(tensor_weights(mine), fraction))
    pieces = [_piece(theirs if name in chosen else mine, name) for name in sorted(mine.entries)]
    return pack_payload(pieces, config)


def _piece(parsed: ParsedPayload, name: str) -> TensorPiece:
    """One parsed tensor back as a full :class:`TensorPiece` (the codes are recovered from the
    decoded values: each is exactly one of the table's four levels)."""
    entry = parsed.entries[name]
    geometry = entry.geometry
    indices = parsed.indices(name)
    values = parsed.values(name)
    block = full_block(geometry)
    if parsed.quantizer == "none":
        return TensorPiece(
            name, geometry, entry.k, block, indices, None, values, entry.table, parsed.quantizer
        )
    table = torch.tensor(list(entry.table), dtype=torch.float32)
    levels = table[1:] + table[0]  # as the decoder computes them
    codes = (values.unsqueeze(-1) - levels).abs().argmin(dim=-1).to(torch.uint8)
    return TensorPiece(
        name, geometry, entry.k, block, indices, codes, None, entry.table, parsed.quantizer
    )


# --------------------------------------------------------------------------------------------
# Noise, invalid, late
# --------------------------------------------------------------------------------------------


def noise_payload(
    shapes: Shapes, *, seed: int, scale: float, config: SparseLoCoConfig | None = None
) -> bytes:
    """A valid payload encoding random normal tensors (std ``scale``) of the model's shapes."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(tuple(int(s) for s in shape), generator=gen) * scale
        for name, shape in sorted(shapes.items())
    }
    return encode(tensors, config)


def corrupt_payload(payload: bytes) -> bytes:
    """``payload`` with its middle byte flipped: the codec's checksum fails first."""
    if not payload:
        return b"\xff"
    data = bytearray(payload)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def bad_receipt(receipt: Receipt | None) -> Receipt:
    """A data receipt that names no pool (the count kept, so only the hash gives it away)."""
    digest = hashlib.blake2b(b"covenant/adversaries/no-such-pool", digest_size=16).hexdigest()
    return Receipt(hash=digest, count=receipt.count if receipt is not None else 0)


def wait_until_late(
    ctx: WindowContext,
    services: Services,
    *,
    late_by_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = POLL_S,
) -> float:
    """Wait until the chain's time is ``late_by_s`` past the close of the window's upload
    interval; return that chain time."""
    chain = services.chain
    _, hi = services.exchange.upload_interval(ctx.window)
    target = hi + late_by_s
    while True:
        now = float(chain.block_timestamp(int(chain.block())))
        if now >= target:
            return now
        sleep(min(poll_s, max(0.01, target - now)))


# --------------------------------------------------------------------------------------------
# Forged and replayed objects (the plugin writes them itself)
# --------------------------------------------------------------------------------------------


def run_keys(config: Config) -> RunKeys:
    """The run's storage keys (``[run] id`` and ``protocol_version``)."""
    run = config.section("run")
    return RunKeys(run.id, run.protocol_version)


def forge_upload(
    ctx: WindowContext,
    payload: bytes,
    services: Services,
    *,
    keypair: Any = None,
    codec: str = SparseLoCoCodec.name,
) -> ObjectInfo:
    """Write this window's gradient object with a manifest signed by ``keypair`` (default: a
    fresh random key), not by the uid's hotkey; everything else is as an honest upload's."""
    keys = run_keys(services.config)
    key = keys.gradient(ctx.window, ctx.uid)
    fields: dict[str, Any] = {
        "run": keys.run,
        "version": keys.version,
        "window": ctx.window,
        "uid": ctx.uid,
        "codec": codec,
        "sizes": {"payload": len(payload)},
    }
    receipt = ctx.extras.get("receipt")
    if isinstance(receipt, Receipt):
        fields["receipt"] = {"hash": receipt.hash, "count": receipt.count}
    signer = keypair if keypair is not None else keypair_from_seed(secrets.token_bytes(32))
    _, blob = build_signed_object(key, payload, fields, signer)
    return services.transport.put(key, blob)


def replay_upload(
    ctx: WindowContext, services: Services, *, lookback: int = 16
) -> ObjectInfo | None:
    """Copy our own newest gradient object of the last ``lookback`` windows, byte for byte,
    under this window's key; ``None`` if there is none."""
    keys = run_keys(services.config)
    transport = services.transport
    for window in range(ctx.window - 1, max(-1, ctx.window - 1 - lookback), -1):
        old = keys.gradient(window, ctx.uid)
        info = transport.head(old)
        if info is None:
            continue
        blob = transport.get(old, info.size)
        log.info("window %d: replaying own upload of window %d", ctx.window, window)
        return transport.put(keys.gradient(ctx.window, ctx.uid), blob)
    log.warning("window %d: nothing to replay in %d windows; honest upload", ctx.window, lookback)
    return None


# --------------------------------------------------------------------------------------------


def _sparseloco_config(config: Config) -> SparseLoCoConfig:
    if config.has("sparseloco"):
        return config.typed("sparseloco", SparseLoCoConfig)
    return SparseLoCoConfig()


def _seed(tag: str, uid: int, window: int) -> int:
    digest = hashlib.blake2b(f"{tag}/{uid}/{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
