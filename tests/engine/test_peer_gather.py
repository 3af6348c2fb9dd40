"""``peer.gather_checked``: the per-tensor checks of the gathered uploads split across a peer's
ranks, the ranks agreeing on what failed, a reserve standing in, and only needed bytes sent.

The two-rank cases run two real processes (``torch.multiprocessing``, gloo on loopback) with a
small codec whose per-tensor check fails for the tensors a payload names: a failure that only
rank 1 can see (the tensor is in rank 1's share) must reject the upload on both ranks.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import zlib
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import covenant.plugins.sparseloco as sl
from covenant.engine import peer
from covenant.engine.protocols import ParamShard, PayloadRejected, PeerList, Shapes
from covenant.plugins.sparseloco.outer import SparseLoCoCodec
from covenant.plugins.sparseloco.wire import parse_payload

SHAPES: dict[str, tuple[int, ...]] = {"big": (64, 64), "mid": (32, 64), "small": (16, 8)}


class NamedCodec:
    """Payload ``b"ok:" + json list``: the structure is the ``ok:`` prefix; the per-tensor
    check of tensor ``n`` fails iff ``n`` is in the list."""

    name = "named/1"

    def max_payload_bytes(self, shapes: Shapes) -> int:
        return 4096

    def validate(
        self, payload: bytes, shapes: Shapes, names: Collection[str] | None = None
    ) -> None:
        if not payload.startswith(b"ok:"):
            raise PayloadRejected("payload_format", "no ok: prefix")
        bad = set(json.loads(payload[3:]))
        checked = set(shapes) if names is None else set(names)
        if bad & checked:
            raise PayloadRejected("payload_index", f"bad tensor(s) {sorted(bad & checked)}")

    def decode(
        self, payload: bytes, shapes: Shapes, owned: Sequence[ParamShard] | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def norms(self, payload: bytes, shapes: Shapes) -> dict[str, float]:
        raise NotImplementedError

    def aggregate(
        self, payloads: Sequence[bytes], shapes: Shapes, owned: Sequence[ParamShard] | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tile_indices(self, payload: bytes, shapes: Shapes) -> dict[str, Any]:
        return {}


def _payload(*bad: str) -> bytes:
    return b"ok:" + json.dumps(sorted(bad)).encode()


def _plan(uploads: dict[int, bytes], gather: tuple[int, ...], reserve: tuple[int, ...]) -> Any:
    """What ``fetch_listed`` returns on rank 0 for these (structure-checked) uploads."""
    codec = NamedCodec()
    good = {}
    rejected = {}
    for uid, blob in uploads.items():
        try:
            codec.validate(blob, SHAPES, names=())
            good[uid] = blob
        except PayloadRejected as exc:
            rejected[uid] = exc.reason
    uids = sorted(good)
    return {
        "listed": PeerList(first_window=5, posted_window=3, gather=gather, reserve=reserve),
        "candidates": uids,
        "sizes": [len(good[u]) for u in uids],
        "blobs": [good[u] for u in uids],
        "rejected": rejected,
        "gather_s": 0.0,
    }


# the rank 1 share of SHAPES on two ranks: "mid" and "small" (rank 0 takes "big")
CASES: dict[str, tuple[dict[int, bytes], tuple[int, ...], tuple[int, ...]]] = {
    "all_good": ({1: _payload(), 2: _payload(), 3: _payload()}, (1, 2), (3,)),
    "bad_on_rank1": ({1: _payload(), 2: _payload("mid"), 3: _payload()}, (1, 2), (3,)),
    "bad_on_rank0": ({1: _payload("big"), 2: _payload(), 3: _payload()}, (1, 2), (3,)),
    "reserve_bad_too": (
        {1: _payload(), 2: _payload("small"), 3: _payload("big"), 4: _payload()},
        (1, 2),
        (3, 4),
    ),
    "structure": ({1: b"junk", 2: _payload(), 3: _payload()}, (1, 2), (3,)),
    "nothing_usable": ({1: _payload("big"), 2: _payload("mid")}, (1, 2), ()),
}


def _worker(rank: int, port: int, case: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sent: list[int] = []
    real = peer.broadcast_bytes

    def counting(blobs: list[bytes] | None, sizes: list[int]) -> list[bytes]:
        sent.extend(sizes)
        return real(blobs, sizes)

    peer.broadcast_bytes = counting  # type: ignore[assignment]
    uploads, gather, reserve = CASES[case]
    try:
        metrics, payloads = peer.gather_checked(
            None, 5, NamedCodec(), SHAPES, lambda: _plan(uploads, gather, reserve)
        )
        result = {
            "metrics": metrics,
            "payloads": [p.decode() for p in payloads],
            "sent": sent,
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_two(case: str, tmp_path: Path) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(_free_port(), case, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_validation_share_covers_every_tensor_once_and_balances() -> None:
    shapes = {f"t{i}": (i + 1, 100) for i in range(9)}
    for ranks in (1, 2, 3, 8, 12):
        shares = [peer.validation_share(shapes, ranks, r) for r in range(ranks)]
        assert set().union(*shares) == set(shapes)
        assert sum(len(s) for s in shares) == len(shapes)
        loads = [sum(shapes[n][0] * 100 for n in s) for s in shares]
        assert max(loads) - min(loads) <= 900  # greedy: within the largest tensor
    assert peer.validation_share(SHAPES, 2, 0) == {"big"}
    assert peer.validation_share(SHAPES, 2, 1) == {"mid", "small"}


@pytest.mark.parametrize(
    "case, gathered, rejected, reasons, sent",
    [
        ("all_good", "1,2", 0.0, None, [1, 2]),
        ("bad_on_rank1", "1,3", 1.0, "2:payload_index", [1, 2, 3]),
        ("bad_on_rank0", "2,3", 1.0, "1:payload_index", [1, 2, 3]),
        ("reserve_bad_too", "1,4", 1.0, "2:payload_index, 3:payload_index", [1, 2, 3, 4]),
        ("structure", "2,3", 1.0, "1:payload_format", [2, 3]),
        ("nothing_usable", "", 2.0, "1:payload_index, 2:payload_index", [1, 2]),
    ],
)
def test_two_ranks_agree_on_the_checked_uploads(
    tmp_path: Path,
    case: str,
    gathered: str,
    rejected: float,
    reasons: str | None,
    sent: list[int],
) -> None:
    uploads = CASES[case][0]
    ranks = _run_two(case, tmp_path)
    assert ranks[0]["metrics"]["gathered"] == ranks[1]["metrics"]["gathered"] == gathered
    assert ranks[0]["payloads"] == ranks[1]["payloads"]
    chosen = [int(u) for u in gathered.split(",")] if gathered else []
    assert ranks[0]["payloads"] == [uploads[u].decode() for u in chosen]
    for r in ranks:
        m = r["metrics"]
        assert m["rejected"] == rejected and m["peers"] == float(len(chosen))
        assert m.get("rejected_reasons") == reasons
        assert ("skip_reason" in m) == (not chosen)
        # only what was chosen at some point crossed to rank 1: a reserve only when needed
        assert sorted(r["sent"]) == sorted(len(uploads[u]) for u in sent)


def test_one_rank_checks_everything_while_fetching() -> None:
    """A one-process peer: the fetch checked the uploads whole; nothing is checked twice."""
    uploads, gather, reserve = CASES["bad_on_rank1"]
    # as fetch_listed does for one process: the whole check at fetch time
    codec = NamedCodec()
    plan = _plan({u: b for u, b in uploads.items() if u != 2}, gather, reserve)
    plan["rejected"] = {2: "payload_index"}
    metrics, payloads = peer.gather_checked(None, 5, codec, SHAPES, lambda: plan)
    assert metrics["gathered"] == "1,3" and payloads == [uploads[1], uploads[3]]


def test_a_failing_fetch_on_rank0_becomes_a_skip_reason() -> None:
    def boom() -> dict[str, Any]:
        raise OSError("bucket unreachable")

    metrics, payloads = peer.gather_checked(None, 5, NamedCodec(), SHAPES, boom)
    assert payloads == [] and metrics["peers"] == 0.0
    assert metrics["skip_reason"] == "gather failed: bucket unreachable"


def test_sparseloco_validate_checks_only_the_named_tensors() -> None:
    """The real codec: a broken index record in one tensor fails that tensor's check only;
    ``names=()`` checks the structure alone."""
    config = sl.SparseLoCoConfig(k=8)
    g = torch.Generator().manual_seed(3)
    good = sl.encode({n: torch.randn(s, generator=g) for n, s in SHAPES.items()}, config)
    index_at = parse_payload(good, SHAPES, config).entries["mid"].index_offset
    body = bytearray(good[:-4])
    struct.pack_into("<8B", body, index_at, *([0xFF] * 8))  # garbage in its first records
    bad = bytes(body) + struct.pack("<I", zlib.crc32(body))  # a valid checksum again
    codec = SparseLoCoCodec(config)
    codec.validate(bad, SHAPES, names=())
    codec.validate(bad, SHAPES, names={"big", "small"})
    for names in ({"mid"}, None):
        with pytest.raises(PayloadRejected) as info:
            codec.validate(bad, SHAPES, names=names)
        assert info.value.reason == "payload_index"
