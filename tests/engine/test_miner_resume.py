"""Kill-and-resume of a miner loses nothing and never applies a window twice (issue 12).

A real miner (``covenant train`` with ``[outer] name = "sparseloco"``, a subprocess, TP=1,
``tiny-2l`` on a slice of big.txt) runs on a manual-clock local chain that this test drives;
the test is also the lead validator, through the storage plugin's Exchange writers: it
publishes ``start_window`` and the peer lists, and after each window the aggregate record of
what was applied (the miner's own upload, as a validator would record it). The clock moves only
when the miner has trained its H inner steps of the window (read from ``metrics.jsonl``).

1. The miner trains windows S and S+1, and is SIGKILLed after its first inner step of S+2.
   Started again with ``--resume`` it continues from ``window-(S+1)`` and trains S+2 anew.
2. In S+3 the peer list also names a peer that never uploads, so after uploading its payload
   the miner waits for it; it is SIGKILLed right after its upload, before applying S+3. The
   lead records S+3 (the miner's upload) and the chain moves on to S+4. Started again with
   ``--resume`` the miner skips the closed window S+3, catches up by replaying its aggregate
   record, and trains S+4 and S+5.

Then the weights of the last checkpoint are exactly the weights saved before the first kill
with the aggregate records of S+2..S+5 applied once each, in order (recomputed here from the
stored uploads); the peer state lists every window applied once; ``metrics.jsonl`` has one
window line per trained window and the replay in the first window after the second resume.
Slow (three launches of the CLI, each importing megatron): ``-m slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from covenant.engine.data.prepare import prepare
from covenant.engine.keys import load_hotkey
from covenant.engine.protocols import AggregateRecord, PeerList, Upload
from covenant.engine.session import Session, open_session
from covenant.plugins.chain.local import LocalChain
from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.outer import SparseLoCoCodec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2400),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

RUN_ID = "resume"
BPW = 10
H = 3
START = 1
WAIT_S = 900.0  # one CLI start (imports megatron) on a busy machine
PLUGINS = "model,jsonl,wandb,sparseloco,storage,chain"
GHOST_WAIT_S = 120  # storage.per_window_deadline_s: how long the miner waits for the ghost


def _set(key: str, value: Any) -> list[str]:
    return ["--set", f"{key}={json.dumps(value)}"]


@dataclass
class World:
    root: Path
    data: Path
    chain: LocalChain
    lead: Session
    uids: dict[str, int]
    stores: dict[str, Path]
    records: dict[int, AggregateRecord] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    launches: int = 0
    mark: int = 0  # train lines in metrics.jsonl before the latest launch

    @property
    def run_dir(self) -> Path:
        return self.root / "miner" / RUN_ID

    @property
    def exchange(self) -> Any:
        return self.lead.services.exchange

    # -- the miner -------------------------------------------------------------------------

    def start(self, *, resume: bool, max_windows: int) -> None:
        args = [
            *_set("wandb.mode", "disabled"),
            *_set("run.id", RUN_ID),
            *_set("run.root", str(self.root / "miner")),
            *_set("data.dir", str(self.data)),
            *_set("data.vocab_size", 512),
            *_set("data.seq_len", 64),
            *_set("data.max_documents", 40),  # as prepared by the fixture: no re-preparing
            *_set("data.val_fraction", 0.1),
            *_set("model.preset", "tiny-2l"),
            *_set("model.vocab", 512),
            *_set("model.seq_len", 64),
            *_set("model.micro_batch", 2),
            *_set("train.batch_size", 4),
            *_set("train.inner_steps", H),
            *_set("train.lr", 3e-3),
            *_set("train.warmup_steps", 2),
            *_set("train.cosine_steps", 100),
            *_set("train.eval_every", 0),
            *_set("train.log_every", 1),
            *_set("outer.name", "sparseloco"),
            *_set("outer.max_windows", max_windows),
            *_set("outer.record_wait_s", 300.0),
            *_set("chain.db", str(self.chain.path)),
            *_set("chain.clock", "manual"),
            *_set("chain.blocks_per_window", BPW),
            *_set("chain.block_time_s", 0.001),
            *_set("chain.hotkey", "//Bob"),
            *_set("storage.url", self.stores["miner"].as_uri()),
            *_set("storage.local_peers", True),
            *_set("storage.upload_grace_s", 10_000_000),
            *_set("storage.per_window_deadline_s", GHOST_WAIT_S),
            *_set("storage.retries", 1),
        ]
        cmd = [sys.executable, "-m", "covenant.engine.cli.main", "train", "--config", "tiny"]
        cmd += [*args, *(["--resume"] if resume else [])]
        self.launches += 1
        log = (self.root / f"miner-{self.launches}.log").open("wb")
        env = dict(
            os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", COVENANT_PLUGINS=PLUGINS
        )
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=log)

    def tail(self) -> str:
        path = self.root / f"miner-{self.launches}.log"
        return path.read_text(errors="replace")[-6000:] if path.is_file() else ""

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)  # our own child, by its id
        self.proc.wait(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the miner exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.2)

    # -- what the miner wrote --------------------------------------------------------------

    def lines(self, kind: str) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        out = []
        for raw in path.read_text().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a torn last line of a killed process
            if line.get("kind") == kind:
                out.append(line)
        return out

    def latest(self) -> str | None:
        pointer = self.run_dir / "checkpoints" / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    def upload_path(self, window: int) -> Path:
        return self.stores["miner"] / self.exchange.keys.gradient(window, self.uids["miner"])

    # -- the lead and the clock ------------------------------------------------------------

    def to_block(self, block: int) -> None:
        now = self.chain.block()
        if block > now:
            self.chain.advance(block - now)

    def end_window(self, window: int) -> None:
        """The window ends on the chain (the miner has trained its H steps)."""
        self.to_block((window + 1) * BPW + 1)

    def record(self, window: int) -> None:
        """What a validator does after the interval: record the miner's upload as applied."""
        got = list(
            self.exchange.fetch_gradients(
                window,
                [self.uids["miner"]],
                max_bytes=1 << 30,
                codec=SparseLoCoCodec.name,
                wait=False,
            )
        )
        assert len(got) == 1 and isinstance(got[0], Upload), got
        outer_step = sum(1 for r in self.records.values() if r.window < window and not r.empty)
        record = AggregateRecord(window, outer_step, ((got[0].uid, got[0].sha256),))
        self.exchange.put_aggregate_record(record)
        self.records[window] = record

    def train_window(self, window: int) -> None:
        """Drive one whole window of a running miner: H steps, its end, upload, record,
        checkpoint."""
        self.wait_for(f"H steps of window {window}", lambda: self._trained(window) >= H)
        self.end_window(window)
        self.wait_for(f"the upload of window {window}", self.upload_path(window).is_file)
        self.record(window)
        self.wait_for(f"checkpoint of window {window}", lambda: self.latest() == _ckpt(window))

    def _trained(self, window: int) -> int:
        """Train lines of ``window`` (its global steps), logged since the latest launch."""
        first = sum(1 for r in self.records.values() if r.window < window and not r.empty) * H
        return sum(1 for x in self.lines("train")[self.mark :] if first <= x["step"] < first + H)

    def launch(self, *, resume: bool, max_windows: int) -> None:
        self.mark = len(self.lines("train"))
        self.start(resume=resume, max_windows=max_windows)


def _ckpt(window: int) -> str:
    return f"window-{window:08d}"


@pytest.fixture()
def world(tmp_path: Path) -> World:
    data = tmp_path / "data"
    prepare(data, ["bigtxt"], vocab_size=512, seq_len=64, val_fraction=0.1, max_documents=40)
    chain = LocalChain(
        tmp_path / "chain.sqlite", blocks_per_window=BPW, block_time_s=0.001, clock="manual"
    )
    uids, stores = {}, {}
    for name, uri in (("lead", "//Alice"), ("miner", "//Bob"), ("ghost", "//Dave")):
        key = load_hotkey(uri)
        uids[name] = chain.register(key)
        stores[name] = (tmp_path / name / "storage").resolve()
        stores[name].mkdir(parents=True)
        chain.commit(key, f"v1|{stores[name].as_uri()}")
    chain.set_stake(load_hotkey("//Alice").ss58_address, 1000.0, validator_permit=True)
    lead = open_session(
        None,
        [
            f"run.id={json.dumps(RUN_ID)}",
            f"run.root={json.dumps(str(tmp_path / 'lead'))}",
            f"chain.db={json.dumps(str(chain.path))}",
            'chain.clock="manual"',
            f"chain.blocks_per_window={BPW}",
            "chain.block_time_s=0.001",
            'chain.hotkey="//Alice"',
            f"storage.url={json.dumps(stores['lead'].as_uri())}",
            "storage.local_peers=true",
            "storage.upload_grace_s=10000000",
            "storage.retries=1",
        ],
        environ={"COVENANT_PLUGINS": "storage,chain,sparseloco"},
    )
    w = World(tmp_path, data, chain, lead, uids, stores)
    w.to_block(START * BPW + 1)
    w.exchange.put_start_window(START)
    w.exchange.put_peer_list(PeerList(START, START - 1, (uids["miner"],)))
    return w


def _full(path: Path) -> dict[str, torch.Tensor]:
    from covenant.models.weights import open_full_weights

    return open_full_weights(path).to_dict()  # type: ignore[no-any-return]


def test_kill_and_resume_in_the_middle_of_a_window_loses_nothing(world: World) -> None:
    s = START
    try:
        # -- run 1: windows s, s+1; killed after the first inner step of s+2 ------------------
        world.launch(resume=False, max_windows=50)
        world.train_window(s)
        world.train_window(s + 1)
        world.wait_for(f"a step of window {s + 2}", lambda: world._trained(s + 2) >= 1)
        world.kill()
        assert world.latest() == _ckpt(s + 1)
        assert not world.upload_path(s + 2).exists()  # killed inside the inner loop
        base = world.root / "base-weights"  # theta after s+1, before anything below
        shutil.copytree(world.run_dir / "checkpoints" / _ckpt(s + 1) / "weights", base)

        # -- run 2: resumes at s+2 and trains it anew; killed after uploading s+3 -------------
        world.launch(resume=True, max_windows=50)
        world.train_window(s + 2)
        ghost = world.uids["ghost"]
        world.exchange.put_peer_list(PeerList(s + 3, s + 2, (world.uids["miner"], ghost)))
        world.wait_for(f"H steps of window {s + 3}", lambda: world._trained(s + 3) >= H)
        world.end_window(s + 3)
        world.wait_for(f"the upload of window {s + 3}", world.upload_path(s + 3).is_file)
        world.kill()  # the miner is waiting for the ghost's upload: before its apply
        assert world.latest() == _ckpt(s + 2)
        assert not (world.run_dir / "checkpoints" / _ckpt(s + 3)).exists()
        world.record(s + 3)  # the validator applied the miner's upload of s+3
        world.exchange.put_peer_list(PeerList(s + 4, s + 3, (world.uids["miner"],)))
        world.to_block((s + 4) * BPW + 1)  # s+3's interval is over

        # -- run 3: skips s+3, replays its record, trains s+4 and s+5, exits -------------------
        world.launch(resume=True, max_windows=2)
        world.train_window(s + 4)
        world.train_window(s + 5)
        assert world.proc is not None
        assert world.proc.wait(timeout=WAIT_S) == 0, world.tail()
    finally:
        if world.proc is not None and world.proc.poll() is None:
            world.kill()
        world.chain.close()

    # every window applied exactly once, in the peer state of the last checkpoint ...
    last = world.run_dir / "checkpoints" / _ckpt(s + 5)
    state = torch.load(last / "rank-00000.pt", map_location="cpu", weights_only=True)
    peer = state["peer"]
    assert peer["last_window"] == peer["last_applied"] == s + 5
    assert dict((w, a) for w, a in peer["applied"]) == {w: True for w in range(s, s + 6)}
    assert peer["steps"] == H * 5  # s, s+1, s+2, s+4, s+5 trained; s+3 replayed, not trained
    # ... and in metrics.jsonl: one window line per trained window, the replay counted once
    windows = world.lines("window")
    applied = Counter(int(x["step"]) for x in windows if x.get("applied") == 1.0)
    assert applied == Counter([s, s + 1, s + 2, s + 4, s + 5]), windows
    assert all(x.get("applied") == 1.0 for x in windows)
    first_after = next(x for x in windows if x["step"] == s + 4)
    assert first_after["replayed"] == 1.0 and first_after["checkpoint"] == -1.0
    assert first_after["outer_step"] == 4.0
    assert sum(x.get("replayed", 0.0) for x in windows) == 1.0

    # the weights: theta after s+1, then the records of s+2..s+5 applied once each, in order
    theta = _full(base)
    shapes = {n: tuple(t.shape) for n, t in theta.items()}
    codec = SparseLoCoCodec(SparseLoCoConfig())
    for window in range(s + 2, s + 6):
        record = world.records[window]
        ((uid, sha),) = record.uploads
        upload = world.exchange.fetch_gradient_by_hash(window, uid, sha, max_bytes=1 << 30)
        assert isinstance(upload, Upload), upload
        update = codec.aggregate([upload.payload], shapes)
        theta = {n: t - 1.0 * update[n] for n, t in theta.items()}
    final = _full(last / "weights")
    assert set(final) == set(theta)
    for n in theta:
        assert torch.equal(final[n], theta[n]), n
