"""A TP=2 peer (torchrun, 2 processes, gloo) and a TP=1 peer against the same chain and storage.

Both run ``outer_tp_worker.py`` (real sessions, ``tiny-2l`` built by the model plugin, the
``sparseloco`` plugin's outer step) over windows 1-3, with the same layout-independent change
of the weights in every window, and the lead's peer list naming both. They are launched at the
same time; each one's gather waits for the other's upload. Checked from what they stored:

* identical payload bytes: the two signed uploads of a window have the same sha256 in their
  manifests and the same payload (the TP=2 peer's tiles are encoded on two ranks);
* identical updates: the full weights both save after window 1 are bit-identical, and equal
  ``theta_start - aggregate(both uploads)`` computed here on full tensors;
* commit-or-none: in window 2 rank 1 of the TP=2 peer fails to decode while aggregating; no rank
  applies (both keep theta_start, bit for bit), both report ``applied = 0`` with the reason,
  both zero their error buffers, and both apply window 3.

Slow (three processes import megatron): ``-m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from covenant.engine.keys import load_hotkey
from covenant.engine.protocols import PeerList, Upload
from covenant.engine.session import open_session
from covenant.plugins.chain.local import LocalChain
from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.outer import SparseLoCoCodec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # the module's launch counts towards its first test
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

WORKER = Path(__file__).with_name("outer_tp_worker.py")
BPW = 10
WINDOWS = [1, 2, 3]
FAIL_WINDOW = 2
LAUNCH_TIMEOUT_S = 900
RUN_ID = "tp"


def _common(root: Path, chain: Path, name: str, uri: str, store: Path) -> list[str]:
    return [
        f'run.id="{RUN_ID}"',
        f'run.root="{root / name}"',
        f'chain.db="{chain}"',
        'chain.clock="manual"',
        f"chain.blocks_per_window={BPW}",
        "chain.block_time_s=0.001",
        f'chain.hotkey="{uri}"',
        f'storage.url="{store.as_uri()}"',
        "storage.local_peers=true",
        # the manual chain's time stays far behind the wall clock: every upload made after its
        # window's end lies inside its interval, and a gather waits for the other peer
        "storage.upload_grace_s=10000000",
        "storage.per_window_deadline_s=900",
        "storage.retries=1",
        'outer.name="sparseloco"',
    ]


def _model(tp: int) -> list[str]:
    return [
        'model.preset="tiny-2l"',
        "model.vocab=512",
        "model.seq_len=64",
        "model.micro_batch=2",
        f"model.tp={tp}",
    ]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp-swarm")
    chain_path = root / "chain.sqlite"
    chain = LocalChain(chain_path, blocks_per_window=BPW, block_time_s=0.001, clock="manual")
    members = {"lead": "//Alice", "tp1": "//Bob", "tp2": "//Charlie"}
    stores, uids = {}, {}
    for name, uri in members.items():
        key = load_hotkey(uri)
        uids[name] = chain.register(key)
        stores[name] = (root / name / "storage").resolve()
        stores[name].mkdir(parents=True)
        chain.commit(key, f"v1|{stores[name].as_uri()}")
    chain.set_stake(load_hotkey("//Alice").ss58_address, 1000.0, validator_permit=True)
    chain.advance((WINDOWS[-1] + 1) * BPW + 1)  # every window has ended: nobody waits for it
    lead = open_session(
        None,
        _common(root, chain_path, "lead", members["lead"], stores["lead"]),
        environ={"COVENANT_PLUGINS": "storage,chain,sparseloco"},
    )
    lead.services.exchange.put_peer_list(
        PeerList(WINDOWS[0], WINDOWS[0] - 1, (uids["tp1"], uids["tp2"]))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    procs = {}
    for name, tp in (("tp1", 1), ("tp2", 2)):
        out = root / name / "out"
        out.mkdir(parents=True)
        job = {
            "overrides": _common(root, chain_path, name, members[name], stores[name]) + _model(tp),
            "out": str(out),
            "windows": WINDOWS,
            **({"fail_window": FAIL_WINDOW, "fail_rank": 1} if tp == 2 else {}),
        }
        job_path = root / name / "job.json"
        job_path.write_text(json.dumps(job))
        cmd = [sys.executable, str(WORKER), str(job_path)]
        if tp > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={tp}",
                str(WORKER),
                str(job_path),
            ]
        procs[name] = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    logs = {}
    for name, proc in procs.items():
        try:
            logs[name], _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            logs[name], _ = proc.communicate()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[name][-6000:]}"
    return {"root": root, "lead": lead, "uids": uids, "chain": chain}


def _weights(swarm: dict[str, Any], name: str, what: str) -> dict[str, torch.Tensor]:
    from covenant.models.weights import open_full_weights

    return open_full_weights(swarm["root"] / name / "out" / what).to_dict()  # type: ignore[no-any-return]


def _record(swarm: dict[str, Any], name: str, rank: int, window: int) -> dict[str, Any]:
    path = swarm["root"] / name / "out" / f"rank{rank}-w{window}.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _uploads(swarm: dict[str, Any], window: int) -> dict[str, Upload]:
    uids = swarm["uids"]
    got = swarm["lead"].services.exchange.fetch_gradients(
        window,
        [uids["tp1"], uids["tp2"]],
        max_bytes=1 << 30,
        codec=SparseLoCoCodec.name,
        wait=False,
    )
    by_uid = {o.uid: o for o in got}
    out = {name: by_uid[uids[name]] for name in ("tp1", "tp2")}
    assert all(isinstance(u, Upload) for u in out.values()), out
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def _applied(start: dict[str, torch.Tensor], uploads: dict[str, Upload]) -> dict[str, torch.Tensor]:
    """``theta_start - aggregate(uploads, ascending uid)`` on full tensors (alpha 1)."""
    shapes = {n: tuple(t.shape) for n, t in start.items()}
    ordered = sorted(uploads.values(), key=lambda u: u.uid)
    update = SparseLoCoCodec(SparseLoCoConfig()).aggregate([u.payload for u in ordered], shapes)
    return {n: (t.float() - 1.0 * update[n]).to(t.dtype) for n, t in start.items()}


def test_tp2_and_tp1_upload_identical_bytes_and_apply_identical_updates(
    swarm: dict[str, Any],
) -> None:
    init1, init2 = _weights(swarm, "tp1", "init"), _weights(swarm, "tp2", "init")
    assert _equal(init1, init2), "both peers must start from the same weights"
    for window in (1, 2):
        ups = _uploads(swarm, window)
        assert ups["tp1"].sha256 == ups["tp2"].sha256, window  # the signed manifests agree
        assert ups["tp1"].payload == ups["tp2"].payload, window
    for name in ("tp1", "tp2"):
        for rank in range(1 if name == "tp1" else 2):
            metrics = _record(swarm, name, rank, 1)["metrics"]
            assert metrics["applied"] == 1.0 and metrics["peers"] == 2.0, (name, rank, metrics)
    w1 = _weights(swarm, "tp1", "w1")
    assert _equal(w1, _weights(swarm, "tp2", "w1"))
    assert not _equal(w1, init1)
    assert _equal(w1, _applied(init1, _uploads(swarm, 1)))


def test_a_decode_failure_on_one_rank_applies_nothing_on_any_rank(swarm: dict[str, Any]) -> None:
    w1 = _weights(swarm, "tp2", "w1")
    w2 = _weights(swarm, "tp2", "w2")
    assert _equal(w2, w1), "a rank applied although another failed (theta_start not kept)"
    on_rank = {r: _record(swarm, "tp2", r, FAIL_WINDOW) for r in (0, 1)}
    assert on_rank[0]["metrics"]["applied"] == 0.0 and on_rank[1]["metrics"]["applied"] == 0.0
    assert on_rank[0]["metrics"]["skip_reason"] == "a rank failed to aggregate"
    assert on_rank[1]["metrics"]["skip_reason"].startswith("aggregate failed on rank 1")
    assert "injected" in on_rank[1]["metrics"]["skip_reason"]
    assert on_rank[0]["error_abs_sum"] == 0.0 and on_rank[1]["error_abs_sum"] == 0.0
    # the TP=1 peer aggregated the same uploads and applied them
    tp1_w2 = _weights(swarm, "tp1", "w2")
    assert _record(swarm, "tp1", 0, FAIL_WINDOW)["metrics"]["applied"] == 1.0
    assert _equal(tp1_w2, _applied(_weights(swarm, "tp1", "w1"), _uploads(swarm, FAIL_WINDOW)))
    # both ranks go on: window 3 applies on both, on top of the kept weights
    for r in (0, 1):
        assert _record(swarm, "tp2", r, 3)["metrics"]["applied"] == 1.0
    w3 = _weights(swarm, "tp2", "w3")
    assert _equal(w3, _applied(w2, _uploads(swarm, 3)))
