"""The ``adversaries`` plugin: each behaviour does what it claims, through the real storage.

Small, fast cases on a manual local chain with two or three peers (``file://`` buckets, real
hotkeys, commitments and signed uploads) and a two-tensor model shape; the whole Gauntlet
against every behaviour runs in tests/plugins/gauntlet/test_gauntlet_adversaries.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from covenant.engine.errors import ConfigError
from covenant.engine.protocols import (
    ParamShard,
    PayloadRejected,
    Receipt,
    Upload,
    UploadRejection,
    WindowContext,
)
from covenant.engine.session import Session, open_session
from covenant.engine.validate import check_validator_plugins
from covenant.plugins.adversaries import behaviours, plugin
from covenant.plugins.adversaries.config import BEHAVIOURS, AdversariesConfig
from covenant.plugins.chain.local import LocalChain
from covenant.plugins.gauntlet import rules
from covenant.plugins.sparseloco import (
    SparseLoCoConfig,
    decode,
    encode,
    tile_indices,
    validate_payload,
)
from covenant.plugins.sparseloco.outer import SparseLoCoCodec

SHAPES = {"layer.weight": (128, 192), "norm.weight": (64,), "out.weight": (64, 128)}
BPW, BLOCK_S, GRACE = 10, 12.0, 70
CODEC = SparseLoCoCodec.name


def payload_of(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return encode({n: torch.randn(s, generator=gen) for n, s in SHAPES.items()})


@dataclass
class Peer:
    name: str
    session: Session

    @property
    def services(self) -> Any:
        return self.session.services

    @property
    def uid(self) -> int:
        return int(self.services.uid)


class Swarm:
    """A manual local chain and a few peers with their own buckets (see the module docstring)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.db = tmp / "chain.sqlite"
        self.chain = LocalChain(
            self.db, blocks_per_window=BPW, block_time_s=BLOCK_S, clock="manual",
            commitment_max_bytes=1024,
        )  # fmt: skip
        self.peers: dict[str, Peer] = {}

    def peer(self, name: str, **adversary: Any) -> Peer:
        store = self.tmp / "stores" / name
        sets = {
            "run.root": str(self.tmp / "runs"),
            "run.id": "adv-unit",
            "plugins.enable": ["sparseloco", "storage", "chain", "adversaries"],
            "chain.db": str(self.db),
            "chain.clock": "manual",
            "chain.blocks_per_window": BPW,
            "chain.block_time_s": BLOCK_S,
            "chain.commitment_max_bytes": 1024,
            "chain.hotkey": f"//adversaries-unit-{name}",
            "storage.url": f"file://{store}",
            "storage.local_peers": True,
            "storage.upload_grace_s": GRACE,
            **{f"adversaries.{k}": v for k, v in adversary.items()},
        }
        session = open_session(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()], environ={})
        key = session.services.hotkey
        self.chain.register(key)
        self.chain.commit(key, f"v1|file://{store}")
        self.peers[name] = Peer(name, session)
        return self.peers[name]

    def upload(
        self, peer: Peer, window: int, payload: bytes, receipt: Receipt | None = None
    ) -> None:
        peer.services.exchange.put_gradient(window, payload, codec=CODEC, receipt=receipt)
        self.stamp(peer, window)

    def stamp(self, peer: Peer, window: int) -> None:
        """Put ``peer``'s gradient object of ``window`` inside the window's upload interval."""
        lo, _ = peer.services.exchange.upload_interval(window)
        key = f"adv-unit/v1/gradient/{window}/{peer.uid}"
        path = self.tmp / "stores" / peer.name / key
        os.utime(path, (lo + 1, lo + 1))

    def fetch(self, reader: Peer, window: int, uid: int) -> Upload | UploadRejection:
        (outcome,) = reader.services.exchange.fetch_gradients(
            window, [uid], max_bytes=1 << 20, codec=CODEC, wait=False
        )
        return outcome  # type: ignore[no-any-return]


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    s = Swarm(tmp_path)
    yield s
    s.chain.close()


def ctx_of(peer: Peer, window: int, **extras: Any) -> WindowContext:
    return WindowContext(window, 0, peer.uid, 4, extras=dict(extras))


# --------------------------------------------------------------------------------------------
# config and hooks
# --------------------------------------------------------------------------------------------


def test_config_defaults_are_honest_and_bad_values_are_refused() -> None:
    cfg = AdversariesConfig()
    assert cfg.behaviour == "none" and not behaviours.is_active(cfg, 10**6)
    assert set(BEHAVIOURS) >= {"copier", "partial_copier", "wrong_data", "noise", "stale"}
    for bad in ({"behaviour": "sneaky"}, {"fraction": 0.0}, {"late_by_s": 0.5}, {"victim": -1}):
        with pytest.raises(ValidationError):
            AdversariesConfig(**bad)
    active = AdversariesConfig(behaviour="stale", start_window=5)
    assert not behaviours.is_active(active, 4) and behaviours.is_active(active, 5)


def test_hooks_follow_the_configured_behaviour_and_the_validator_refuses_the_plugin(
    swarm: Swarm,
) -> None:
    stale = swarm.peer("stale", behaviour="stale", start_window=3)
    hook = stale.session.hook
    assert plugin.COVENANT_ROLES == ("miner",)
    assert hook.covenant_apply_aggregate(ctx=ctx_of(stale, 2)) is None  # honest before
    assert hook.covenant_apply_aggregate(ctx=ctx_of(stale, 3)) is False
    assert hook.covenant_sample_uid(ctx=ctx_of(stale, 3)) is None
    with pytest.raises(ConfigError, match="'adversaries' is for miner only"):
        check_validator_plugins(stale.session)

    wrong = swarm.peer("wrong", behaviour="wrong_data", victim=7)
    assert wrong.session.hook.covenant_sample_uid(ctx=ctx_of(wrong, 0)) == 7
    assert wrong.session.hook.covenant_apply_aggregate(ctx=ctx_of(wrong, 0)) is None

    # noise through covenant_payload: the shapes come from covenant_model_built
    noisy = swarm.peer("noise", behaviour="noise")
    layout = [ParamShard(n, s, (0,) * len(s), s) for n, s in SHAPES.items()]
    noisy.session.hook.covenant_model_built(model=None, layout=layout)
    got = noisy.session.hook.covenant_payload(
        ctx=ctx_of(noisy, 1), payload=b"mine", services=noisy.services
    )
    validate_payload(got, SHAPES)

    honest = swarm.peer("honest")  # behaviour "none": installed but inert
    h = honest.session.hook
    assert h.covenant_payload(ctx=ctx_of(honest, 1), payload=b"x", services=honest.services) is None
    assert h.covenant_sample_uid(ctx=ctx_of(honest, 1)) is None
    assert h.covenant_apply_aggregate(ctx=ctx_of(honest, 1)) is None


# --------------------------------------------------------------------------------------------
# one test per behaviour
# --------------------------------------------------------------------------------------------


def test_copier_uploads_the_victims_bytes(swarm: Swarm) -> None:
    victim, other = swarm.peer("victim"), swarm.peer("other")
    copier = swarm.peer("copier", behaviour="copier")
    cfg = copier.session.config.typed("adversaries", AdversariesConfig)
    window = 2
    stolen = payload_of(1)
    swarm.upload(victim, window, stolen)
    swarm.upload(other, window, payload_of(2))
    # no peer list published: the victim must be named...
    assert behaviours.peer_victim(copier.uid, [other.uid, victim.uid, copier.uid]) == victim.uid
    named = cfg.model_copy(update={"victim": victim.uid, "copy_delay_s": 0.0})
    own = payload_of(3)
    got = behaviours.payload_for(named, ctx_of(copier, window), own, copier.services)
    assert got == stolen
    # ...and its copy passes every storage check as the copier's own upload
    swarm.upload(copier, window, got)
    seen = swarm.fetch(other, window, copier.uid)
    assert isinstance(seen, Upload) and seen.payload == stolen


def test_partial_copier_splices_whole_tensors_up_to_the_fraction() -> None:
    # copy detection's weights (tiles x k): 6 x 64, 1 x 64, 2 x 64
    weights = {"layer.weight": 384, "norm.weight": 64, "out.weight": 128}
    assert behaviours.choose_tensors(weights, 1.0) == sorted(weights)
    assert behaviours.choose_tensors(weights, 0.7) == ["layer.weight"]
    assert behaviours.choose_tensors(weights, 0.5) == ["norm.weight", "out.weight"]
    assert behaviours.choose_tensors(weights, 0.2) == ["norm.weight"]

    own, stolen = payload_of(10), payload_of(11)
    assert behaviours.splice_payload(own, stolen, SHAPES, 1.0) == stolen  # exact round trip
    spliced = behaviours.splice_payload(own, stolen, SHAPES, 0.5)
    validate_payload(spliced, SHAPES)
    got, mine, theirs = (decode(p, SHAPES) for p in (spliced, own, stolen))
    for name in SHAPES:
        want = theirs if name in ("norm.weight", "out.weight") else mine
        assert torch.equal(got[name], want[name]), name
    idx = {k: v.numpy() for k, v in tile_indices(spliced, SHAPES).items()}
    copied = {k: v.numpy() for k, v in tile_indices(stolen, SHAPES).items()}
    assert 192 / 576 <= rules.index_overlap(idx, copied) < 1.0


def test_partial_copier_fetches_its_victim(swarm: Swarm) -> None:
    victim = swarm.peer("victim")
    partial = swarm.peer("partial", behaviour="partial_copier", fraction=0.4)
    cfg = partial.session.config.typed("adversaries", AdversariesConfig)
    cfg = cfg.model_copy(update={"victim": victim.uid, "copy_delay_s": 0.0})
    stolen, own = payload_of(20), payload_of(21)
    swarm.upload(victim, 1, stolen)
    got = behaviours.payload_for(cfg, ctx_of(partial, 1), own, partial.services, shapes=SHAPES)
    assert got == behaviours.splice_payload(own, stolen, SHAPES, 0.4)
    # without shapes it cannot splice and uploads honestly
    assert behaviours.payload_for(cfg, ctx_of(partial, 1), own, partial.services) is None


def test_wrong_data_trains_on_another_pool_without_io() -> None:
    cfg = AdversariesConfig(behaviour="wrong_data", start_window=2)
    ctx = WindowContext(2, 0, 5, 4)
    assert behaviours.sample_uid_for(cfg, ctx) == 0  # lowest uid other than its own
    assert behaviours.sample_uid_for(cfg, WindowContext(2, 0, 0, 4)) == 1
    assert behaviours.sample_uid_for(cfg.model_copy(update={"victim": 9}), ctx) == 9
    assert behaviours.sample_uid_for(cfg, WindowContext(1, 0, 5, 4)) is None
    assert behaviours.sample_uid_for(AdversariesConfig(behaviour="noise"), ctx) is None


def test_noise_is_a_valid_payload_of_random_values() -> None:
    a = behaviours.noise_payload(SHAPES, seed=1, scale=0.01)
    b = behaviours.noise_payload(SHAPES, seed=1, scale=0.01)
    c = behaviours.noise_payload(SHAPES, seed=2, scale=0.01)
    assert a == b and a != c
    validate_payload(a, SHAPES)
    codec = SparseLoCoCodec(SparseLoCoConfig())
    norms = codec.norms(a, SHAPES)
    assert set(norms) == set(SHAPES) and all(0 < v < 10 for v in norms.values())


def test_stale_declines_every_aggregate_from_its_start_window() -> None:
    cfg = AdversariesConfig(behaviour="stale", start_window=4)
    assert [behaviours.apply_aggregate_for(cfg, WindowContext(w, 0, 3, 4)) for w in (3, 4, 9)] == [
        None,
        False,
        False,
    ]
    other = AdversariesConfig(behaviour="late")
    assert behaviours.apply_aggregate_for(other, WindowContext(9, 0, 3, 4)) is None


def test_late_waits_on_chain_time_past_the_interval(swarm: Swarm) -> None:
    late = swarm.peer("late", behaviour="late")
    cfg = late.session.config.typed("adversaries", AdversariesConfig)
    window = 1
    _, hi = late.services.exchange.upload_interval(window)
    swarm.chain.advance((window + 1) * BPW + 1)  # inside the interval: the window just ended
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        swarm.chain.advance(1)

    own = payload_of(30)
    got = behaviours.payload_for(cfg, ctx_of(late, window), own, late.services, sleep=sleep)
    now = swarm.chain.block_timestamp(swarm.chain.block())
    assert got == own and sleeps and hi + cfg.late_by_s <= now < hi + cfg.late_by_s + BLOCK_S


def test_invalid_payload_fails_the_codec_and_invalid_receipt_names_no_pool(swarm: Swarm) -> None:
    own = payload_of(40)
    bad = behaviours.corrupt_payload(own)
    assert len(bad) == len(own) and bad != own
    with pytest.raises(PayloadRejected) as info:
        SparseLoCoCodec().validate(bad, SHAPES)
    assert info.value.reason == "payload_checksum"

    peer = swarm.peer("invalid", behaviour="invalid", invalid="receipt")
    cfg = peer.session.config.typed("adversaries", AdversariesConfig)
    honest = Receipt(hash="0" * 32, count=16)
    ctx = ctx_of(peer, 1, receipt=honest)
    assert behaviours.payload_for(cfg, ctx, own, peer.services) == own
    forged = ctx.extras["receipt"]
    assert forged.count == 16 and forged.hash != honest.hash
    corrupt = cfg.model_copy(update={"invalid": "payload"})
    assert behaviours.payload_for(corrupt, ctx_of(peer, 1), own, peer.services) == bad


def test_forged_upload_is_rejected_for_its_hotkey(swarm: Swarm) -> None:
    reader = swarm.peer("reader")
    forger = swarm.peer("forged", behaviour="forged")
    cfg = forger.session.config.typed("adversaries", AdversariesConfig)
    receipt = Receipt(hash="ab" * 16, count=16)
    got = behaviours.payload_for(
        cfg, ctx_of(forger, 3, receipt=receipt), payload_of(50), forger.services
    )
    assert got == b""  # it wrote the object itself
    swarm.stamp(forger, 3)
    seen = swarm.fetch(reader, 3, forger.uid)
    assert isinstance(seen, UploadRejection) and seen.reason == "hotkey_mismatch"
    assert seen.detail.endswith(f"hotkey {forger.services.hotkey.ss58_address}")


def test_replayed_upload_is_an_earlier_window_under_this_windows_key(swarm: Swarm) -> None:
    reader = swarm.peer("reader")
    replayer = swarm.peer("replayed", behaviour="replayed", start_window=3)
    cfg = replayer.session.config.typed("adversaries", AdversariesConfig)
    own = payload_of(60)
    # nothing to replay yet: an honest upload
    assert behaviours.payload_for(cfg, ctx_of(replayer, 3), own, replayer.services) is None
    swarm.upload(replayer, 1, own)  # an honest upload two windows back
    assert (
        behaviours.payload_for(cfg, ctx_of(replayer, 3), payload_of(61), replayer.services) == b""
    )
    swarm.stamp(replayer, 3)
    seen = swarm.fetch(reader, 3, replayer.uid)
    assert isinstance(seen, UploadRejection) and seen.reason == "replayed"
    assert "window 1 != 3" in seen.detail
    assert isinstance(swarm.fetch(reader, 1, replayer.uid), Upload)  # the original still stands
