"""The SparseLoCo outer step of a miner (issue 12): owned-slice aggregation, the codec wrapper's
typed rejections, and bad input reaching a miner through the real exchange.

* ``aggregate(..., owned=)`` gives a rank exactly the same bits as the same box of the full
  aggregate (median clip included), for 1-D and 2-D tensors, row and column splits.
* :class:`SparseLoCoCodec` turns every :class:`PayloadError` (and a non-finite aggregate) into
  :class:`PayloadRejected` with a reason tag, from every method.
* Miners on a manual-clock network of real sessions (signed ``file://`` uploads, verified
  fetches) meet a bad upload, peer list or aggregate record: it is skipped with its reason
  (``rejected``, ``skip_reason``, the logged ``uid:reason``), the honest peers' aggregate is
  applied bit for bit as if the bad input did not exist, nothing non-finite is applied, and
  nothing raises.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _outer_net import (
    BPW,
    CONFIG,
    GRACE,
    SHAPES,
    Member,
    OuterNet,
    make_net,
)
from _sl_helpers import mutate, reseal, section_offsets

import covenant.plugins.sparseloco as sl
import covenant.plugins.sparseloco.outer as outer_mod
from covenant.engine import peer
from covenant.engine.protocols import (
    AggregateRecord,
    ParamShard,
    PayloadRejected,
    PeerList,
    Upload,
)
from covenant.engine.untrusted import canonical_json
from covenant.engine.window import ChainClock, PeerState
from covenant.plugins.sparseloco.errors import (
    AggregationError,
    PayloadChecksumError,
    PayloadError,
    PayloadFormatError,
    PayloadIndexError,
    PayloadShapeError,
    PayloadSizeError,
    PayloadTableError,
    PayloadVersionError,
)
from covenant.plugins.sparseloco.outer import SparseLoCoCodec
from covenant.plugins.storage import records as rec
from covenant.plugins.storage.exchange import build_signed_object

OUTER_LOG = "covenant.engine.peer"  # where the rank-0 gather of every outer step logs

# ============================================================================================
# (a) aggregate(..., owned=) equals the same box of aggregate(...), bit for bit
# ============================================================================================

AGG_SHAPES: dict[str, tuple[int, ...]] = {"m": (128, 96), "v": (200,), "r": (40, 64)}
Box = tuple[tuple[int, ...], tuple[int, ...]]


def _peers(n: int, config: sl.SparseLoCoConfig) -> list[bytes]:
    """``n`` payloads with very different norms (so the median clip scales some peers)."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        scale = (0.1, 5.0, 1.0, 40.0)[i % 4]
        out.append(
            sl.encode(
                {k: torch.randn(s, generator=g) * scale for k, s in AGG_SHAPES.items()}, config
            )
        )
    return out


def _splits(shape: tuple[int, ...]) -> dict[str, list[Box]]:
    """Named partitions of a tensor into boxes (offsets, local shape)."""
    if len(shape) == 1:
        (n,) = shape
        return {
            "halves": [((0,), (n // 2,)), ((n // 2,), (n - n // 2,))],
            "uneven": [((0,), (37,)), ((37,), (113,)), ((150,), (n - 150,))],
            "whole": [((0,), (n,))],
        }
    rows, cols = shape
    r, c = rows // 2 + 3, cols // 2 - 5
    return {
        "rows": [((0, 0), (r, cols)), ((r, 0), (rows - r, cols))],
        "columns": [((0, 0), (rows, c)), ((0, c), (rows, cols - c))],
        "grid": [
            ((0, 0), (r, c)),
            ((0, c), (r, cols - c)),
            ((r, 0), (rows - r, c)),
            ((r, c), (rows - r, cols - c)),
        ],
        "whole": [((0, 0), (rows, cols))],
    }


def _cut(t: torch.Tensor, box: Box) -> torch.Tensor:
    return t[tuple(slice(o, o + n) for o, n in zip(box[0], box[1], strict=True))]


CONFIGS = {
    "clip+mean": sl.SparseLoCoConfig(k=16),
    "no-clip": sl.SparseLoCoConfig(k=16, clip_to_median=False),
    "sum/R": sl.SparseLoCoConfig(k=16, mean_over_selectors=False),
    "fp32-values": sl.SparseLoCoConfig(k=16, quantizer="none"),
}


@pytest.mark.parametrize("n_peers", [1, 2, 3, 4])
@pytest.mark.parametrize("label", list(CONFIGS))
def test_owned_aggregate_is_the_box_of_the_full_aggregate(n_peers: int, label: str) -> None:
    config = CONFIGS[label]
    payloads = _peers(n_peers, config)
    full = sl.aggregate(payloads, AGG_SHAPES, config)
    assert set(full) == set(AGG_SHAPES)
    codec = SparseLoCoCodec(config)
    for name, shape in AGG_SHAPES.items():
        for split, boxes in _splits(shape).items():
            parts = []
            for box in boxes:
                got = sl.aggregate(payloads, AGG_SHAPES, config, owned={name: box})
                assert set(got) == {name}  # only what the rank owns, nothing dense beyond it
                assert got[name].shape == box[1]
                want = _cut(full[name], box)
                assert torch.equal(got[name], want), (label, name, split, box)
                # the same through the codec wrapper with ParamShards (what a rank passes)
                shard = ParamShard(name, shape, box[0], box[1])
                via_codec = codec.aggregate(payloads, AGG_SHAPES, owned=[shard])
                assert torch.equal(via_codec[name], want)
                parts.append(got[name])
            if split in ("halves", "uneven", "rows"):
                assert torch.equal(torch.cat(parts, 0), full[name])
            elif split == "columns":
                assert torch.equal(torch.cat(parts, 1), full[name])


def test_owned_aggregate_of_several_tensors_at_once() -> None:
    """A rank of a TP=2 peer: row slices of one tensor, column slices of another, a whole
    replicated vector, in one call."""
    config = CONFIGS["clip+mean"]
    payloads = _peers(3, config)
    full = sl.aggregate(payloads, AGG_SHAPES, config)
    for rank in range(2):
        owned = [
            ParamShard("m", (128, 96), (64 * rank, 0), (64, 96)),
            ParamShard("r", (40, 64), (0, 32 * rank), (40, 32)),
            ParamShard("v", (200,), (0,), (200,), replicated_over_tp=True),
        ]
        got = SparseLoCoCodec(config).aggregate(payloads, AGG_SHAPES, owned=owned)
        assert set(got) == {"m", "r", "v"}
        for shard in owned:
            assert torch.equal(
                got[shard.name], _cut(full[shard.name], (shard.offsets, shard.local_shape))
            )


def test_the_median_clip_is_exercised() -> None:
    """The golden above covers a clip that changes the result (else it would prove little)."""
    payloads = _peers(3, CONFIGS["clip+mean"])
    clipped = sl.aggregate(payloads, AGG_SHAPES, CONFIGS["clip+mean"])
    plain = sl.aggregate(payloads, AGG_SHAPES, sl.SparseLoCoConfig(k=16, clip_to_median=False))
    assert not torch.equal(clipped["m"], plain["m"])
    assert float(clipped["m"].abs().max()) < float(plain["m"].abs().max())


# ============================================================================================
# (b) the codec wrapper: every PayloadError becomes PayloadRejected with a reason tag
# ============================================================================================

TAGS: dict[type[PayloadError], str] = {
    PayloadError: "payload_invalid",
    PayloadSizeError: "payload_size",
    PayloadFormatError: "payload_format",
    PayloadVersionError: "payload_version",
    PayloadChecksumError: "payload_checksum",
    PayloadShapeError: "payload_shape",
    PayloadIndexError: "payload_index",
    PayloadTableError: "payload_table",
}

_WHOLE = [ParamShard(n, s, (0,) * len(s), s) for n, s in SHAPES.items()]
METHODS: dict[str, Callable[[SparseLoCoCodec, bytes], Any]] = {
    "validate": lambda c, p: c.validate(p, SHAPES),
    "decode": lambda c, p: c.decode(p, SHAPES),
    "decode_owned": lambda c, p: c.decode(p, SHAPES, owned=_WHOLE[:1]),
    "norms": lambda c, p: c.norms(p, SHAPES),
    "aggregate": lambda c, p: c.aggregate([p, p], SHAPES),
    "aggregate_owned": lambda c, p: c.aggregate([p], SHAPES, owned=_WHOLE),
    "tile_indices": lambda c, p: c.tile_indices(p, SHAPES),
}


def test_every_payload_error_class_has_a_tag() -> None:
    """A new PayloadError subclass must be added to TAGS (and so to this test)."""

    def subclasses(cls: type) -> set[type]:
        found: set[type] = {cls}
        children: list[type] = cls.__subclasses__()
        for child in children:
            found |= subclasses(child)
        return found

    assert subclasses(PayloadError) == set(TAGS)


def _good_payload() -> bytes:
    g = torch.Generator().manual_seed(7)
    return sl.encode({n: torch.randn(s, generator=g) for n, s in SHAPES.items()}, CONFIG)


def _nan_table(payload: bytes) -> bytes:
    off, _ = section_offsets(payload)["mlp.weight"]
    body = bytearray(payload[:-4])
    struct.pack_into("<f", body, off, float("nan"))  # the quantiser table's shift
    return reseal(bytes(body))


REAL_BAD: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (lambda p: reseal(p[: len(p) - 44]), "payload_size"),
    "cut_short": (lambda p: p[: len(p) - 40], "payload_checksum"),
    "empty": (lambda p: b"", "payload_size"),
    "crc": (lambda p: p[:100] + bytes([p[100] ^ 0x10]) + p[101:], "payload_checksum"),
    "magic": (lambda p: mutate(p, 0, ord("X")), "payload_format"),
    "version": (lambda p: mutate(p, 4, 9), "payload_version"),
    "other_model": (
        lambda p: sl.encode({"emb.weight": torch.ones(64, 32), "x": torch.ones(8)}, CONFIG),
        "payload_shape",
    ),
    "nan_table": (_nan_table, "payload_table"),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", list(REAL_BAD))
def test_real_bad_payloads_are_rejected_with_their_tag(case: str, method: str) -> None:
    make, tag = REAL_BAD[case]
    bad = make(_good_payload())
    with pytest.raises(PayloadRejected) as info:
        METHODS[method](SparseLoCoCodec(CONFIG), bad)
    assert info.value.reason == tag, info.value
    assert info.value.detail


def test_a_good_payload_passes_every_method() -> None:
    codec, payload = SparseLoCoCodec(CONFIG), _good_payload()
    assert len(payload) <= codec.max_payload_bytes(SHAPES)
    for call in METHODS.values():
        call(codec, payload)


class _Raising:
    """A parsed payload whose every accessor raises ``exc`` (errors found after parsing)."""

    def __init__(self, exc: PayloadError) -> None:
        self.exc = exc
        self.entries = {n: None for n in SHAPES}

    def _raise(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc

    validate = dense = values = indices = sparse = _raise


@pytest.mark.parametrize("where", ["parse", "after_parse"])
@pytest.mark.parametrize("cls", list(TAGS), ids=lambda c: c.__name__)
def test_every_payload_error_becomes_payload_rejected(
    cls: type[PayloadError], where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    exc = cls("synthetic problem", tensor="emb.weight")

    def parse(*args: Any, **kwargs: Any) -> Any:
        if where == "parse":
            raise exc
        return _Raising(exc)

    def aggregate(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(outer_mod, "parse_payload", parse)
    monkeypatch.setattr(outer_mod, "aggregate_payloads", aggregate)
    codec = SparseLoCoCodec(CONFIG)
    for name, call in METHODS.items():
        with pytest.raises(PayloadRejected) as info:
            call(codec, b"anything")
        assert info.value.reason == TAGS[cls], name
        assert "synthetic problem" in info.value.detail, name
        assert not isinstance(info.value, PayloadError)


def test_a_nonfinite_aggregate_becomes_payload_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    def aggregate(*args: Any, **kwargs: Any) -> Any:
        raise AggregationError("aggregated update is not finite", tensor="mlp.weight")

    monkeypatch.setattr(outer_mod, "aggregate_payloads", aggregate)
    with pytest.raises(PayloadRejected) as info:
        SparseLoCoCodec(CONFIG).aggregate([b"x"], SHAPES)
    assert info.value.reason == "nonfinite_aggregate"


# ============================================================================================
# (c) a miner's bad input, through the real exchange
# ============================================================================================


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OuterNet]:
    n = make_net(tmp_path_factory.mktemp("outer-net"))
    n.join("validator", "//Alice", stake=1000.0)
    for name, uri in (("bob", "//Bob"), ("charlie", "//Charlie"), ("dave", "//Dave")):
        n.join(name, uri, miner=True)
    n.join("eve", "//Eve")  # registered, uploads what the tests make her upload
    n.join("ferdie", "//Ferdie")  # registered, signs things that are not his to sign
    n.join("eve-other-run", "//Eve", run_id="other", store_of="eve")
    n.next_window = 2  # type: ignore[attr-defined]
    yield n
    n.chain.close()


def take_window(net: OuterNet) -> int:
    """A fresh window for one test (tests share the network; windows only move forward)."""
    w: int = net.next_window  # type: ignore[attr-defined]
    net.next_window = w + 5  # type: ignore[attr-defined]
    net.to_block(w * BPW)
    return w


def honest(net: OuterNet) -> list[Member]:
    return net.miners()


def eve_payload(window: int) -> bytes:
    g = torch.Generator().manual_seed(50 + window)
    return sl.encode({n: torch.randn(s, generator=g) for n, s in SHAPES.items()}, CONFIG)


def eve_put(net: OuterNet, window: int, payload: bytes, *, stamp_window: int | None = None) -> Path:
    eve = net["eve"]
    eve.exchange.put_gradient(window, payload, codec=SparseLoCoCodec.name)
    path = net.gradient_path(eve, window)
    net.stamp(path, window if stamp_window is None else stamp_window)
    return path


def honest_payloads(net: OuterNet, window: int, uids: list[int]) -> list[bytes]:
    cap = SparseLoCoCodec(CONFIG).max_payload_bytes(SHAPES)
    got = net["validator"].exchange.fetch_gradients(
        window, uids, max_bytes=cap, codec=SparseLoCoCodec.name, wait=False
    )
    uploads = sorted(got, key=lambda u: u.uid)
    assert all(isinstance(u, Upload) for u in uploads), uploads
    return [u.payload for u in uploads]


def run_window(
    net: OuterNet,
    caplog: pytest.LogCaptureFixture,
    tamper: Callable[[OuterNet, int], object],
    *,
    extra_uids: tuple[int, ...] = (),
    post_list: bool = True,
    window: int | None = None,
) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """One window of the three honest miners with ``tamper`` run after their uploads."""
    w = take_window(net) if window is None else window
    miners = honest(net)
    if post_list:
        net.post_peer_list(w, [m.uid for m in miners] + [net["eve"].uid, *extra_uids])
    starts = {m.name: m.model.snapshot() for m in miners}  # type: ignore[union-attr]
    ctxs = net.begin(w)
    published = net.publish(ctxs)
    assert all(p["uploaded"] == 1.0 for p in published.values()), published
    tamper(net, w)
    net.close(w)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=OUTER_LOG):
        finished = net.finish(ctxs)
    return w, starts, finished


def assert_honest_applied(
    net: OuterNet,
    w: int,
    starts: dict[str, dict[str, torch.Tensor]],
    finished: dict[str, dict[str, Any]],
    rejected: int,
    uids: list[int] | None = None,
) -> None:
    """Every honest miner applied exactly theta_start - aggregate(the uploads of ``uids``,
    by default the honest miners')."""
    miners = honest(net)
    uids = sorted(uids if uids is not None else [m.uid for m in miners])
    update = SparseLoCoCodec(CONFIG).aggregate(honest_payloads(net, w, uids), SHAPES)
    for m in miners:
        metrics = finished[m.name]
        assert metrics["applied"] == 1.0, metrics
        assert "skip_reason" not in metrics, metrics
        assert metrics["peers"] == float(len(uids)), metrics
        assert metrics["rejected"] == float(rejected), metrics
        assert metrics["gathered"] == ",".join(map(str, uids)), metrics
        params = m.model.local_parameters()  # type: ignore[union-attr]
        for n, p in params.items():
            assert bool(torch.isfinite(p).all())
            assert torch.equal(p, starts[m.name][n] - 1.0 * update[n]), (m.name, n)


def rejection_reasons(caplog: pytest.LogCaptureFixture) -> set[str]:
    """The ``uid:reason`` pairs the miners recorded as unusable uploads."""
    out: set[str] = set()
    for r in caplog.records:
        if r.name == OUTER_LOG and "unusable uploads" in r.getMessage():
            assert isinstance(r.args, tuple)
            out |= set(str(r.args[1]).split(", "))
    return out


# -- the bad uploads ---------------------------------------------------------------------------


def _payload_with(tensors: dict[str, torch.Tensor]) -> Callable[[OuterNet, int], None]:
    def tamper(net: OuterNet, w: int) -> None:
        eve_put(net, w, sl.encode(tensors, CONFIG))

    return tamper


def _other_window(net: OuterNet, w: int) -> None:
    """Eve's genuine upload of window w-1, copied under window w's key (a replay)."""
    old = eve_put(net, w - 1, eve_payload(w - 1))
    dest = net.gradient_path(net["eve"], w)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(old, dest)
    net.stamp(dest, w)


def _other_run(net: OuterNet, w: int) -> None:
    """Eve's genuine upload of window w in another run, copied under this run's key."""
    other = net["eve-other-run"]
    other.exchange.put_gradient(w, eve_payload(w), codec=SparseLoCoCodec.name)
    src = other.store / other.exchange.keys.gradient(w, other.uid)
    dest = net.gradient_path(net["eve"], w)
    assert src != dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    net.stamp(dest, w)


def _signed_payload(make: Callable[[bytes], bytes]) -> Callable[[OuterNet, int], None]:
    def tamper(net: OuterNet, w: int) -> None:
        eve_put(net, w, make(eve_payload(w)))

    return tamper


def _altered_in_storage(net: OuterNet, w: int) -> None:
    path = eve_put(net, w, eve_payload(w))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    net.stamp(path, w)


def _oversized(net: OuterNet, w: int) -> None:
    cap = SparseLoCoCodec(CONFIG).max_payload_bytes(SHAPES)
    eve_put(net, w, b"\x00" * (cap + 70 * 1024))


def _signed_by_someone_else(net: OuterNet, w: int) -> None:
    eve, ferdie = net["eve"], net["ferdie"]
    key = eve.exchange.keys.gradient(w, eve.uid)
    fields = {
        "run": "net",
        "version": 1,
        "window": w,
        "uid": eve.uid,
        "codec": SparseLoCoCodec.name,
    }
    _, blob = build_signed_object(key, eve_payload(w), fields, ferdie.hotkey)
    path = eve.store / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    net.stamp(path, w)


def _late(net: OuterNet, w: int) -> None:
    path = eve_put(net, w, eve_payload(w))
    _, hi = net.interval(w)
    os.utime(path, (hi + 2, hi + 2))


def _nothing(net: OuterNet, w: int) -> None:
    """Eve is listed but never uploads."""


def _rand(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


BAD_UPLOADS: dict[str, tuple[Callable[[OuterNet, int], None], str]] = {
    "extra_tensor": (_payload_with(_rand({**SHAPES, "evil.weight": (8, 8)})), "payload_shape"),
    "missing_tensor": (
        _payload_with(_rand({k: v for k, v in SHAPES.items() if k != "norm.weight"})),
        "payload_shape",
    ),
    "wrong_shape": (_payload_with(_rand({**SHAPES, "emb.weight": (32, 64)})), "payload_shape"),
    "other_window": (_other_window, "replayed"),
    "other_run": (_other_run, "replayed"),
    "truncated": (_signed_payload(lambda p: reseal(p[: len(p) // 2])), "payload_size"),
    "corrupted": (
        _signed_payload(lambda p: p[:60] + bytes([p[60] ^ 0xFF]) + p[61:]),
        "payload_checksum",
    ),
    "nonfinite_table": (_signed_payload(_nan_table), "payload_table"),
    "altered_in_storage": (_altered_in_storage, "hash_mismatch"),
    "over_the_cap": (_oversized, "too_large"),
    "signed_by_another_hotkey": (_signed_by_someone_else, "hotkey_mismatch"),
    "late": (_late, "late"),
    "missing": (_nothing, "missing"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_is_skipped_with_its_reason(
    net: OuterNet, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    tamper, reason = BAD_UPLOADS[case]
    reloads = {m.name: m.model.reloads for m in honest(net)}  # type: ignore[union-attr]
    w, starts, finished = run_window(net, caplog, tamper)
    assert_honest_applied(net, w, starts, finished, rejected=1)
    assert f"{net['eve'].uid}:{reason}" in rejection_reasons(caplog)
    for m in honest(net):
        assert m.model.reloads == reloads[m.name] + 1  # type: ignore[union-attr]


def test_the_same_bad_upload_is_rejected_by_the_gather_plan(net: OuterNet) -> None:
    """``_gather`` (rank 0's plan) carries the listed peers' checked uploads, ascending uid,
    and the rejected one's reason; ``gather_checked`` chooses and counts."""
    w = take_window(net)
    miners = honest(net)
    net.post_peer_list(w, [m.uid for m in miners] + [net["eve"].uid])
    ctxs = net.begin(w)
    net.publish(ctxs)
    eve_put(net, w, _nan_table(eve_payload(w)))
    net.close(w)
    bob = net["bob"]
    assert bob.outer is not None
    plan = bob.outer._gather(w, SHAPES)
    uids = sorted(m.uid for m in miners)
    assert plan["candidates"] == uids
    assert set(plan["rejected"]) == {net["eve"].uid}
    assert plan["blobs"] == honest_payloads(net, w, uids)
    assert plan["sizes"] == [len(b) for b in plan["blobs"]]
    assert "skip_reason" not in plan
    metrics, payloads = peer.gather_checked(bob.outer.services, w, bob.outer.codec, SHAPES)
    assert metrics["gathered"] == ",".join(map(str, uids))
    assert metrics["rejected"] == 1.0 and metrics["peers"] == 3.0
    assert payloads == honest_payloads(net, w, uids)
    assert "skip_reason" not in metrics
    net.finish(ctxs)  # keep the miners' windows complete


def test_unknown_uids_in_the_peer_list(net: OuterNet, caplog: pytest.LogCaptureFixture) -> None:
    """77 and 4000 have no hotkey on the chain: skipped; Eve's upload is valid this time."""
    w, starts, finished = run_window(
        net, caplog, lambda n, w: eve_put(n, w, eve_payload(w)), extra_uids=(77, 4000)
    )
    assert {"77:not_registered", "4000:not_registered"} <= rejection_reasons(caplog)
    uids = [m.uid for m in honest(net)] + [net["eve"].uid]
    assert_honest_applied(net, w, starts, finished, rejected=2, uids=uids)


def test_a_peer_list_of_unknown_uids_applies_nothing(
    net: OuterNet, caplog: pytest.LogCaptureFixture
) -> None:
    w = take_window(net)
    net.post_peer_list(w, [77, 4000, 65535])
    miners = honest(net)
    for m in miners:  # a non-zero error buffer, to see it zeroed
        assert any(bool(e.abs().sum() > 0) for e in m.outer.errors.values())  # type: ignore[union-attr]
    starts = {m.name: m.model.snapshot() for m in miners}  # type: ignore[union-attr]
    reloads = {m.name: m.model.reloads for m in miners}  # type: ignore[union-attr]
    ctxs = net.begin(w)
    net.publish(ctxs)
    net.close(w)
    with caplog.at_level(logging.INFO, logger=OUTER_LOG):
        finished = net.finish(ctxs)
    for m in miners:
        metrics = finished[m.name]
        assert metrics["applied"] == 0.0
        assert metrics["skip_reason"] == "no usable upload from the peer list"
        assert metrics["rejected"] == 3.0 and metrics["peers"] == 0.0
        for n, p in m.model.local_parameters().items():  # type: ignore[union-attr]
            assert torch.equal(p, starts[m.name][n])  # theta_start, untouched
        assert all(bool((e == 0).all()) for e in m.outer.errors.values())  # type: ignore[union-attr]
        assert m.model.reloads == reloads[m.name]  # type: ignore[union-attr]


def _forge_record(net: OuterNet, key: str, window: int, body: dict[str, Any], fmt: str) -> None:
    """A record signed by Eve (no permit, no stake) written into the lead's bucket."""
    eve, lead = net["eve"], net["validator"]
    data = rec.encode_record(body)
    fields = {"run": "net", "version": 1, "window": window, "uid": eve.uid, "codec": fmt}
    _, blob = build_signed_object(key, data, fields, eve.hotkey)
    path = lead.store / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)


def test_a_peer_list_signed_by_a_non_lead_is_ignored(
    net: OuterNet, caplog: pytest.LogCaptureFixture
) -> None:
    w = take_window(net)
    miners = honest(net)
    lead, eve = net["validator"], net["eve"]
    # the lead's list from w-1 names the honest miners; Eve's list from w names only herself:
    # once forged into the lead's bucket, once in her own
    net.post_peer_list(w - 1, [m.uid for m in miners])
    forged = PeerList(first_window=w, posted_window=w - 1, gather=(eve.uid,))
    _forge_record(net, lead.exchange.keys.peers(w), w, rec.peer_list_body(forged), rec.PEERS)
    eve.exchange.put_peer_list(forged)

    def tamper(n: OuterNet, w: int) -> None:
        eve_put(n, w, eve_payload(w))  # a valid upload: only the forged list would take it

    _, starts, finished = run_window(net, caplog, tamper, post_list=False, window=w)
    assert_honest_applied(net, w, starts, finished, rejected=0)
    assert str(eve.uid) not in finished["bob"]["gathered"].split(",")
    got = net["bob"].exchange.peer_list(w)
    assert (
        got is not None and got.first_window == w - 1 and got.validator == lead.hotkey.ss58_address
    )


def test_an_absurd_peer_list_signed_by_the_lead_is_ignored(
    net: OuterNet, caplog: pytest.LogCaptureFixture
) -> None:
    """A list over the size bound (5000 uids, properly signed by the lead itself, which the
    writer would refuse to publish) is refused by the reader: the list before it is used."""
    w = take_window(net)
    lead, miners = net["validator"], honest(net)
    net.post_peer_list(w - 1, [m.uid for m in miners])
    body = {
        "format": rec.PEERS,
        "first_window": w,
        "posted_window": w - 1,
        "gather": list(range(5000)),
        "reserve": [],
    }
    key = lead.exchange.keys.peers(w)
    fields = {"run": "net", "version": 1, "window": w, "uid": lead.uid, "codec": rec.PEERS}
    _, blob = build_signed_object(key, canonical_json(body), fields, lead.hotkey)
    (lead.store / key).parent.mkdir(parents=True, exist_ok=True)
    (lead.store / key).write_bytes(blob)
    with pytest.raises(rec.RecordError):
        rec.encode_record(body)
    _, starts, finished = run_window(net, caplog, _nothing, post_list=False, window=w)
    assert_honest_applied(net, w, starts, finished, rejected=0)
    assert net["bob"].exchange.peer_list(w).first_window == w - 1


def test_no_valid_peer_list_applies_nothing(
    net: OuterNet, caplog: pytest.LogCaptureFixture
) -> None:
    """Every list in reach is forged: the miner has no list in force and keeps theta_start."""
    w = take_window(net)
    lead, eve = net["validator"], net["eve"]
    for first in range(w - 3, w + 1):
        forged = PeerList(first_window=first, posted_window=first - 1, gather=(eve.uid,))
        _forge_record(
            net, lead.exchange.keys.peers(first), first, rec.peer_list_body(forged), rec.PEERS
        )
    miners = honest(net)
    starts = {m.name: m.model.snapshot() for m in miners}  # type: ignore[union-attr]
    ctxs = net.begin(w)
    net.publish(ctxs)
    eve_put(net, w, eve_payload(w))
    net.close(w)
    finished = net.finish(ctxs)
    for m in miners:
        assert finished[m.name]["applied"] == 0.0
        assert finished[m.name]["skip_reason"] == "no peer list in force"
        for n, p in m.model.local_parameters().items():  # type: ignore[union-attr]
            assert torch.equal(p, starts[m.name][n])
    net.post_peer_list(w + 1, [m.uid for m in miners])  # later tests' lists are the lead's


def test_an_aggregate_record_signed_by_a_non_lead_is_ignored(net: OuterNet) -> None:
    """``outer_step(w)`` comes from the lead's records only: a forged record (in the lead's
    bucket, or a non-lead's own) neither sets it nor is returned as a record."""
    w = take_window(net)
    lead, eve, bob = net["validator"], net["eve"], net["bob"]
    lead.exchange.put_start_window(2)
    lead.exchange.put_aggregate_record(
        AggregateRecord(window=w, outer_step=3, uploads=((2, "a" * 64),))
    )
    forged = AggregateRecord(window=w + 1, outer_step=50, uploads=((eve.uid, "b" * 64),))
    _forge_record(
        net, lead.exchange.keys.aggregate(w + 1), w + 1, rec.aggregate_body(forged), rec.AGGREGATE
    )
    eve.exchange.put_aggregate_record(AggregateRecord(window=w + 2, outer_step=70, uploads=()))
    assert bob.exchange.aggregate_record(w + 1) is None
    assert bob.exchange.aggregate_record(w + 2) is None
    assert bob.exchange.aggregate_record(w).outer_step == 3
    clock = ChainClock(bob.session.services, 1, blocks_per_window=BPW, upload_grace_s=float(GRACE))
    state = PeerState()
    state.finish(w + 1, 4, applied=True)
    # record(w) says outer_step(w + 1) = 4; this peer applied w + 1 itself: 5 (forged: 51)
    assert clock.outer_step(w + 2, state) == 5
    assert clock.outer_step(w + 3, state) == 5


def _unreachable(self: Any, window: int) -> Any:
    raise OSError("bucket unreachable")


def _undecodable(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise PayloadRejected("payload_index", "indices out of range")


def test_a_failure_inside_finish_never_raises(
    net: OuterNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while gathering (rank 0's I/O) or aggregating: every miner skips the
    window with the reason, keeps theta_start and zeroes its error buffer."""
    miners = honest(net)
    for trouble in ("gather", "aggregate"):
        w = take_window(net)
        net.post_peer_list(w, [m.uid for m in miners])
        starts = {m.name: m.model.snapshot() for m in miners}  # type: ignore[union-attr]
        ctxs = net.begin(w)
        net.publish(ctxs)
        net.close(w)
        with monkeypatch.context() as mp:
            if trouble == "gather":
                mp.setattr(type(net["bob"].exchange), "peer_list", _unreachable)
            else:
                mp.setattr(SparseLoCoCodec, "aggregate", _undecodable)
            finished = net.finish(ctxs)
        for m in miners:
            metrics = finished[m.name]
            assert metrics["applied"] == 0.0
            want = "gather failed" if trouble == "gather" else "aggregate failed"
            assert metrics["skip_reason"].startswith(want), metrics
            for n, p in m.model.local_parameters().items():  # type: ignore[union-attr]
                assert torch.equal(p, starts[m.name][n])
            assert all(bool((e == 0).all()) for e in m.outer.errors.values())  # type: ignore[union-attr]


def test_honest_miners_still_agree_and_go_on(
    net: OuterNet, caplog: pytest.LogCaptureFixture
) -> None:
    """After every bad window above the honest miners hold identical weights and apply the
    next window together (Eve listed and silent)."""
    w, starts, finished = run_window(net, caplog, _nothing)
    assert_honest_applied(net, w, starts, finished, rejected=1)
    first = net["bob"].model.local_parameters()  # type: ignore[union-attr]
    for m in honest(net)[1:]:
        for n, p in m.model.local_parameters().items():  # type: ignore[union-attr]
            assert torch.equal(p, first[n])
