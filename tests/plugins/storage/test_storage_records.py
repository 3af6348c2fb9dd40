"""Signed run records (start_window, peer lists, aggregate records, sync samples, score records,
checkpoints) and the exchange that writes and reads them: formats, untrusted input, the lead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _network import Network, make_network

from covenant.engine.protocols import AggregateRecord, PeerList, Receipt, Upload, UploadRejection
from covenant.engine.untrusted import canonical_json
from covenant.plugins.storage import records as rec

# -- formats ------------------------------------------------------------------------------------


def test_every_format_round_trips() -> None:
    bodies = [
        rec.start_window_body(7),
        rec.peer_list_body(PeerList(first_window=8, posted_window=7, gather=(3, 2), reserve=(5,))),
        rec.aggregate_body(AggregateRecord(window=9, outer_step=4, uploads=((2, "a" * 64),))),
        rec.sync_body(9, 2, {"w": [0.5, -1.25]}),
        {"format": rec.SCORE, "window": 9, "uid": 2, "record": {"final": 0.25, "rule": "x"}},
    ]
    for body in bodies:
        data = rec.encode_record(body)
        assert data == canonical_json(body)
        parsed = rec.parse_record(data, body["format"])
        assert parsed.format == body["format"]
    peers = rec.peer_list_of(rec.parse_record(rec.encode_record(bodies[1]), rec.PEERS), "hk")
    assert peers.gather == (3, 2) and peers.reserve == (5,) and peers.validator == "hk"


@pytest.mark.parametrize(
    ("data", "fmt", "match"),
    [
        (b'{"format": "covenant-start/1","start_window":1}', rec.START, "canonical"),
        (b'{"format":"covenant-start/1","start_window":1,"start_window":2}', rec.START, "uplicate"),
        (b'{"format":"covenant-start/1","start_window":-1}', rec.START, "invalid"),
        (b'{"extra":1,"format":"covenant-start/1","start_window":1}', rec.START, "invalid"),
        (b'{"format":"covenant-peers/1","start_window":1}', rec.START, "not a"),
        (b"[1,2]", rec.START, "not a"),
        (
            b'{"first_window":1,"format":"covenant-peers/1","gather":[2,2],"posted_window":0,'
            b'"reserve":[]}',
            rec.PEERS,
            "twice",
        ),
        (
            b'{"first_window":1,"format":"covenant-peers/1","gather":[70000],"posted_window":0,'
            b'"reserve":[]}',
            rec.PEERS,
            "invalid",
        ),
        (
            b'{"format":"covenant-aggregate/1","outer_step":0,"uploads":[[3,"'
            + b"a" * 64
            + b'"],[2,"'
            + b"b" * 64
            + b'"]],"window":1}',
            rec.AGGREGATE,
            "ascending",
        ),
        (
            b'{"format":"covenant-aggregate/1","outer_step":0,"uploads":[[2,"zz"]],"window":1}',
            rec.AGGREGATE,
            "invalid",
        ),
        (b'{"format":"covenant-sync/1","uid":1,"values":{"w":[NaN,1.0]},"window":1}', rec.SYNC, ""),
        (b"{" * 200, rec.START, ""),
        (b'{"format":"covenant-start/1","start_window":1' + b"9" * 200 + b"}", rec.START, ""),
        (b"\xff\xfe", rec.START, ""),
    ],
)
def test_bad_bodies_are_typed_errors(data: bytes, fmt: str, match: str) -> None:
    with pytest.raises(rec.RecordError, match=match or None):
        rec.parse_record(data, fmt)


def test_sizes_are_bounded_before_parsing() -> None:
    body = rec.peer_list_body(
        PeerList(first_window=1, posted_window=0, gather=tuple(range(rec.MAX_PEERS + 1)))
    )
    with pytest.raises(rec.RecordError):
        rec.encode_record(body)  # never publish what a reader would refuse
    with pytest.raises(rec.RecordError, match="over the cap"):
        rec.parse_record(b" " * (rec.MAX_RECORD_BYTES + 1), rec.START)
    with pytest.raises(rec.RecordError, match="unknown record format"):
        rec.parse_record(b"{}", "covenant-mystery/1")


# -- the exchange -------------------------------------------------------------------------------


@pytest.fixture()
def net(tmp_path: Path) -> Network:
    n = make_network(tmp_path)
    n.join("validator", "//Alice", stake=1000.0)
    n.join("rival", "//Eve", stake=10.0)  # a second validator with less stake
    n.join("miner-a", "//Bob")
    n.join("miner-b", "//Charlie")
    return n


def test_miners_follow_the_lead_validators_records(net: Network) -> None:
    lead, rival, miner = net.exchange("validator"), net.exchange("rival"), net.exchange("miner-a")
    assert miner.start_window() is None and miner.peer_list(5) is None
    rival.put_start_window(99)
    rival.put_peer_list(PeerList(first_window=1, posted_window=0, gather=(9,)))
    assert miner.start_window() is None  # only the highest-stake validator with a permit counts
    lead.put_start_window(2)
    lead.put_peer_list(PeerList(first_window=2, posted_window=1, gather=(2, 3)))
    lead.put_peer_list(PeerList(first_window=6, posted_window=5, gather=(3,), reserve=(2,)))
    record = AggregateRecord(window=3, outer_step=1, uploads=((2, "c" * 64), (3, "d" * 64)))
    lead.put_aggregate_record(record)
    assert miner.start_window() == 2
    assert miner.peer_list(1) is None
    assert miner.peer_list(5).gather == (2, 3)
    later = miner.peer_list(6)
    assert later.gather == (3,) and later.reserve == (2,) and later.select({2}) == [2]
    got = miner.aggregate_record(3)
    assert got.uploads == record.uploads and got.outer_step == 1 and got.next_outer_step == 2
    assert miner.aggregate_record(4) is None


def test_a_tampered_or_forged_record_is_ignored(
    net: Network, caplog: pytest.LogCaptureFixture
) -> None:
    lead, miner = net.exchange("validator"), net.exchange("miner-a")
    lead.put_aggregate_record(AggregateRecord(window=3, outer_step=1, uploads=()))
    path = Path(lead.transport.url.removeprefix("file://")) / lead.keys.aggregate(3)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # one bit of the body: the hash no longer matches
    path.write_bytes(bytes(raw))
    assert miner.aggregate_record(3) is None
    assert "unusable" in caplog.text
    # a record for window 4 written under window 5's key is a replay
    lead.put_aggregate_record(AggregateRecord(window=4, outer_step=1, uploads=()))
    src = Path(lead.transport.url.removeprefix("file://"))
    os.replace(src / lead.keys.aggregate(4), src / lead.keys.aggregate(5))
    assert miner.aggregate_record(5) is None


def _stamp(net: Network, name: str, key: str, t: float) -> None:
    store = Path(net.exchange(name).transport.url.removeprefix("file://"))
    os.utime(store / key, (t, t))


def test_gradient_uploads_are_verified_and_rejected_with_reasons(net: Network) -> None:
    a, b = net.exchange("miner-a"), net.exchange("miner-b")
    validator = net.exchange("validator")
    window = 2
    net.to_window(window + 1, 2)
    lo, hi = a.upload_interval(window)
    receipt = Receipt(hash="0" * 32, count=4)
    a.put_gradient(window, b"payload-a", codec="test/1", receipt=receipt)
    _stamp(net, "miner-a", a.keys.gradient(window, net.uids["miner-a"]), lo + 1)
    b.put_gradient(window, b"payload-b" * 10, codec="test/1")
    _stamp(net, "miner-b", b.keys.gradient(window, net.uids["miner-b"]), hi + 3)  # late
    uids = [net.uids["miner-a"], net.uids["miner-b"], 77]
    out = {
        o.uid: o
        for o in validator.fetch_gradients(window, uids, max_bytes=1000, codec="test/1", wait=False)
    }
    ok = out[net.uids["miner-a"]]
    assert isinstance(ok, Upload) and ok.payload == b"payload-a" and ok.receipt == receipt
    late = out[net.uids["miner-b"]]
    assert isinstance(late, UploadRejection) and late.reason == "late"
    assert out[77].reason == "not_registered"
    # over the cap (the payload cap plus the 64 KiB header allowance): refused from the HEAD
    big = b"x" * 100_000
    a.put_gradient(window - 1, big, codec="test/1")
    lo0, _ = a.upload_interval(window - 1)
    _stamp(net, "miner-a", a.keys.gradient(window - 1, net.uids["miner-a"]), lo0 + 1)
    small = list(validator.fetch_gradients(window - 1, uids[:1], max_bytes=1000, wait=False))
    assert small[0].reason == "too_large"
    # another codec than the one expected
    other = list(
        validator.fetch_gradients(window, uids[:1], max_bytes=1000, codec="x/2", wait=False)
    )
    assert other[0].reason == "bad_manifest"
    # the same object under another window's key is a replay
    store = Path(a.transport.url.removeprefix("file://"))
    dest = store / a.keys.gradient(window + 1, net.uids["miner-a"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes((store / a.keys.gradient(window, net.uids["miner-a"])).read_bytes())
    lo2, _ = a.upload_interval(window + 1)
    os.utime(dest, (lo2 + 1, lo2 + 1))
    net.to_window(window + 2, 2)
    replay = list(validator.fetch_gradients(window + 1, uids[:1], max_bytes=1000, wait=False))
    assert replay[0].reason == "replayed"


def test_sync_samples_and_score_records_round_trip(net: Network) -> None:
    a, validator = net.exchange("miner-a"), net.exchange("validator")
    a.put_sync_sample(4, {"w": [1.0, 2.0], "v": [0.0, -0.5]})
    got = validator.fetch_sync_sample(4, net.uids["miner-a"])
    assert got.values == {"v": (0.0, -0.5), "w": (1.0, 2.0)}
    assert isinstance(validator.fetch_sync_sample(5, net.uids["miner-a"]), UploadRejection)
    validator.put_score_record(4, net.uids["miner-a"], {"final": 0.5})
    hotkey = net.sessions["validator"].services.hotkey.ss58_address
    assert a.score_record(hotkey, 4, net.uids["miner-a"]) == {"final": 0.5}


def test_checkpoints_are_published_verified_and_resumed(net: Network, tmp_path: Path) -> None:
    lead, miner = net.exchange("validator"), net.exchange("miner-a")
    src = tmp_path / "weights"
    src.mkdir()
    (src / "covenant_model.json").write_text(json.dumps({"format": 3}))
    (src / "shard-00000.safetensors").write_bytes(os.urandom(4096))
    lead.put_checkpoint(5, 3, str(src), {"name": "tiny-2l"})
    dest = tmp_path / "got"
    info = miner.fetch_checkpoint(str(dest))
    assert info is not None and (info.window, info.outer_step) == (5, 3)
    for f in src.iterdir():
        assert (dest / f.name).read_bytes() == f.read_bytes()
    # resumed: a file already there with the right hash is kept, a damaged one re-downloaded
    (dest / "shard-00000.safetensors").write_bytes(b"damaged")
    assert miner.fetch_checkpoint(str(dest)) is not None
    assert (dest / "shard-00000.safetensors").read_bytes() == (
        src / "shard-00000.safetensors"
    ).read_bytes()
    # a file altered in the validator's bucket no longer matches the signed manifest
    store = Path(lead.transport.url.removeprefix("file://"))
    (store / lead.keys.checkpoint(5, "shard-00000.safetensors")).write_bytes(b"evil" * 1024)
    assert miner.fetch_checkpoint(str(tmp_path / "again")) is None
    # older checkpoints beyond the newest two are pruned from the validator's bucket
    for w in (6, 7):
        lead.put_checkpoint(w, 3 + w - 5, str(src), {"name": "tiny-2l"})
    windows = {
        i.key.split("/")[3] for i in lead.transport.list(lead.keys.kind_prefix("checkpoint"))
    }
    assert windows == {"6", "7", "latest"}


def test_retention_keeps_what_joiners_replay(tmp_path: Path) -> None:
    net = make_network(tmp_path)
    net.join("validator", "//Alice", stake=1000.0)
    net.join(
        "miner-a",
        "//Bob",
        **{"storage.retention_windows": "3", "storage.retention_protect_windows": "5"},
    )
    lead, miner = net.exchange("validator"), net.exchange("miner-a")
    uid = net.uids["miner-a"]
    for w in range(1, 11):
        miner.put_gradient(w, b"p%d" % w, codec="test/1")
        miner.put_sync_sample(w, {"w": [float(w), 0.0]})
    for w in (2, 6):  # both name the miner's upload; only window 6 is recent enough to protect
        lead.put_aggregate_record(
            AggregateRecord(window=w, outer_step=1, uploads=((uid, "e" * 64),))
        )
    assert miner.prune(10) == 2 * 6 - 1  # windows 1-6 of both kinds, minus gradient 6
    kept = {i.key for i in miner.transport.list(miner.keys.kind_prefix("gradient"))}
    assert kept == {miner.keys.gradient(w, uid) for w in (6, 7, 8, 9, 10)}
    debug = {i.key for i in miner.transport.list(miner.keys.kind_prefix("debug"))}
    assert debug == {miner.keys.debug(w, uid) for w in (7, 8, 9, 10)}
