"""A small in-process validator run: the real ``run_validator`` against honest miners.

Used by ``test_gauntlet_replay.py`` (replay, explain, restart) and ``tools/bench_validator.py``.

What is real: :func:`covenant.engine.validate.run_validator` with the validator's session
(``model``, ``sparseloco``, ``gauntlet``, ``reward``, ``storage``, ``chain``), its per-window
checkpoints, signed score records and weights; the local SQLite chain (manual clock); every
miner's own ``file://`` bucket, hotkey, commitment and
:class:`~covenant.plugins.storage.run_exchange.StorageExchange` (signed uploads with data
receipts, sync samples); the SparseLoCo codec with error feedback on a real inner loop.

What is simulated: the miners train on the validator's own model runtime (each miner's weights
and AdamW state swapped in and out, the validator's restored afterwards) and an honest miner's
outer step is taken to give exactly the validator's weights (both apply the same uploads to the
same weights). The world moves only inside the validator's ``sleep``: the first call while the
validator waits for window ``S`` lets every miner train and upload for ``S`` (storage timestamps
set inside ``S``'s upload interval), publish its sync sample ``debug/{S-1}``, and moves the chain
just past the interval. ``stop_after`` / ``kill_in_window`` raise ``KeyboardInterrupt`` (a killed
validator) between two windows or while a window's records are being published.

Deterministic: the chain's genesis time and seed are fixed (so every ``eval_seed`` is), the
model is seeded, sampling is a function of (uid, window) and every loop runs in uid order.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from covenant.engine.data.assignment import receipt as pool_receipt
from covenant.engine.data.assignment import sample_pool, step_ids
from covenant.engine.data.prepare import prepare
from covenant.engine.hookspecs import hookimpl
from covenant.engine.keys import load_hotkey
from covenant.engine.protocols import Receipt
from covenant.engine.session import Session, open_session
from covenant.engine.validate import ValidatorResult, run_validator
from covenant.plugins.chain.local import LocalChain
from covenant.plugins.gauntlet.validator import GauntletScorer, sync_values
from covenant.plugins.storage.keys import RunKeys

RUN_ID = "replay"
BLOCKS_PER_WINDOW = 10
BLOCK_TIME_S = 12.0
UPLOAD_GRACE_S = 70
GENESIS_TIME = 1_700_000_000.0  # whole seconds: upload intervals start on t(block) exactly
GENESIS_SEED = "5a" * 32
VALIDATOR_URI = "//Alice"
BURN_URI = "//Bob"
VOCAB = 512
SEQ_LEN = 64
VALIDATOR_PLUGINS = ["model", "sparseloco", "gauntlet", "reward", "storage", "chain"]


def prepare_data(out: Path) -> Path:
    """The tiny data dir every test of this world uses (``bigtxt``, 40 documents)."""
    if not (out / "manifest.json").is_file():
        prepare(
            out, ["bigtxt"], vocab_size=VOCAB, seq_len=SEQ_LEN, val_fraction=0.1, max_documents=40
        )
    return out


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


@dataclass
class Miner:
    name: str
    uid: int
    session: Session
    store: Path
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    runtime_state: dict[str, Any] | None = None  # model + AdamW moments between windows


class _Capture:
    """A plugin registered into each validator session: sees the scorer and its model, records
    ``covenant_weights_set``, and kills the validator where the test asks."""

    def __init__(self, world: World) -> None:
        self.world = world

    @hookimpl(hookwrapper=True)
    def covenant_scorer(self, config: Any, services: Any, model: Any) -> Any:
        outcome = yield
        scorer = outcome.get_result()
        assert isinstance(scorer, GauntletScorer)
        self.world.scorer, self.world.model = scorer, model
        if self.world.on_scorer is not None:
            self.world.on_scorer(scorer)

    @hookimpl
    def covenant_peer_scored(self, window: int, uid: int, record: Mapping[str, Any]) -> None:
        if self.world.kill_in_window == window:
            self.world.kill_in_window = None
            raise KeyboardInterrupt(f"killed while publishing window {window}")

    @hookimpl
    def covenant_weights_set(
        self, window: int, weights: Mapping[int, float], ok: bool, reason: str
    ) -> None:
        self.world.weights_set.append((window, dict(weights), ok, reason))

    @hookimpl
    def covenant_log_metrics(self, metrics: Mapping[str, float], step: int, kind: str) -> None:
        if kind == "validator":  # logged after the window's state was saved
            self.world.processed.append(step)


class World:
    """See the module docstring. ``miners`` honest miners get uids 2, 3, ...; the validator is
    uid 0 (the lead: stake and permit) and uid 1 the burn uid (registered, never uploads)."""

    def __init__(
        self,
        tmp: Path,
        data_dir: Path,
        *,
        miners: int = 2,
        inner_steps: int = 2,
        batch_size: int = 4,
        lr: float = 3e-3,
        gauntlet: Mapping[str, Any] | None = None,
        model_preset: str = "tiny-2l",
    ) -> None:
        self.tmp = tmp
        self.data_dir = data_dir
        self.inner_steps = inner_steps
        self.batch_size = batch_size
        self.lr = lr
        self.db = tmp / "chain.sqlite"
        self.keys = RunKeys(RUN_ID, 1)
        self.chain = self._genesis()
        common = [
            _override("run.root", str(tmp / "runs")),
            _override("run.id", RUN_ID),
            _override("outer.name", "sparseloco"),
            _override("chain.name", "local"),
            _override("chain.db", str(self.db)),
            _override("chain.clock", "manual"),
            _override("chain.blocks_per_window", BLOCKS_PER_WINDOW),
            _override("chain.block_time_s", BLOCK_TIME_S),
            _override("chain.commitment_max_bytes", 1024),
            _override("storage.local_peers", True),
            _override("storage.upload_grace_s", UPLOAD_GRACE_S),
            _override("data.dir", str(data_dir)),
            _override("data.vocab_size", VOCAB),
            _override("data.seq_len", SEQ_LEN),
            _override("data.val_fraction", 0.1),
            _override("data.max_documents", 40),
            _override("data.verify_hash", False),
            _override("train.inner_steps", inner_steps),
            _override("train.batch_size", batch_size),
        ]
        validator_store = tmp / "stores" / "validator"
        gauntlet_sets = {
            "burn_uid": 1,
            "copy_min_outer_steps": 0,
            "eval_global_batches": 0,
            **(gauntlet or {}),
        }
        self.validator_overrides = [
            *common,
            _override("plugins.enable", VALIDATOR_PLUGINS),
            _override("chain.hotkey", VALIDATOR_URI),
            _override("storage.url", f"file://{validator_store}"),
            _override("model.preset", model_preset),
            _override("model.vocab", VOCAB),
            _override("model.seq_len", SEQ_LEN),
            _override("model.micro_batch", batch_size),
            *(_override(f"gauntlet.{k}", v) for k, v in gauntlet_sets.items()),
        ]
        vkey = load_hotkey(VALIDATOR_URI)
        assert self.chain.register(vkey) == 0
        assert self.chain.register(load_hotkey(BURN_URI)) == 1
        self.chain.set_stake(vkey.ss58_address, 1e6, validator_permit=True)
        self.chain.commit(vkey, f"v1|file://{validator_store}")
        self.miners: list[Miner] = []
        for i in range(miners):
            name = f"honest-{i}"
            uri = f"//replay-world-{name}"
            store = tmp / "stores" / name
            session = open_session(
                None,
                [
                    *common,
                    _override("plugins.enable", ["sparseloco", "storage", "chain"]),
                    _override("chain.hotkey", uri),
                    _override("storage.url", f"file://{store}"),
                ],
                environ={},
            )
            key = load_hotkey(uri)
            uid = self.chain.register(key)
            assert uid == 2 + i, (name, uid)
            self.chain.commit(key, f"v1|file://{store}")
            self.miners.append(Miner(name, uid, session, store))
        self.capture = _Capture(self)
        self.scorer: GauntletScorer | None = None
        self.model: Any = None
        self.next_window: int | None = None  # the window the miners upload for next
        self.stop_after: int | None = None  # KeyboardInterrupt once this window is saved
        self.kill_in_window: int | None = None  # KeyboardInterrupt while publishing it
        self.weights_set: list[tuple[int, dict[int, float], bool, str]] = []
        self.processed: list[int] = []  # every window a validator run finished, in order
        self.sparseloco: Any = None
        self.on_scorer: Callable[[GauntletScorer], None] | None = None  # e.g. to time its stages

    # -- chain -----------------------------------------------------------------------------------

    def _genesis(self) -> LocalChain:
        """A fresh manual chain with a fixed genesis (time and seed): reproducible block hashes."""
        kwargs: dict[str, Any] = {
            "blocks_per_window": BLOCKS_PER_WINDOW,
            "block_time_s": BLOCK_TIME_S,
            "clock": "manual",
            "commitment_max_bytes": 1024,
        }
        LocalChain(self.db, **kwargs).close()
        with sqlite3.connect(self.db) as conn:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'genesis_time'", (repr(GENESIS_TIME),)
            )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'genesis_seed'", (GENESIS_SEED,))
        return LocalChain(self.db, **kwargs)

    def advance_to(self, block: int) -> None:
        now = self.chain.block()
        if block > now:
            self.chain.advance(block - now)

    # -- the validator -----------------------------------------------------------------------------

    def validator_session(self) -> Session:
        return open_session(
            None,
            self.validator_overrides,
            environ={},
            extra_plugins=[("replay-world", self.capture)],
        )

    @property
    def run_dir(self) -> Path:
        return self.tmp / "runs" / RUN_ID

    def run(
        self,
        windows: int | None,
        *,
        stop_after: int | None = None,
        kill_in_window: int | None = None,
    ) -> ValidatorResult:
        """``run_validator`` on a new session (a new process would do the same)."""
        self.stop_after = stop_after
        self.kill_in_window = kill_in_window
        return run_validator(self.validator_session(), windows=windows, sleep=self.tick)

    # -- the miners ------------------------------------------------------------------------------

    def tick(self, _seconds: float) -> None:
        """The validator waits for a window's upload interval to close: the world moves."""
        scorer, model = self.scorer, self.model
        assert scorer is not None and model is not None
        if self.next_window is None:
            assert scorer.start is not None
            self.next_window = scorer.start
        window = self.next_window
        if self.stop_after is not None and window > self.stop_after:
            raise KeyboardInterrupt(f"killed after window {self.stop_after}")
        if self.sparseloco is None:
            from covenant.plugins.sparseloco import SparseLoCoConfig

            self.sparseloco = scorer.config.typed("sparseloco", SparseLoCoConfig)
        theta = {n: p.detach().clone() for n, p in model.local_parameters().items()}
        state = copy.deepcopy(model.state_dict())
        for miner in self.miners:  # debug/{S-1}: the weights after applying S-1
            miner.session.services.exchange.put_sync_sample(window - 1, sync_values(theta))
        bpw = BLOCKS_PER_WINDOW
        self.advance_to((window + 1) * bpw + 1)
        lo, hi = scorer.services.exchange.upload_interval(window)
        shard = scorer._shard(scorer.outer_step)
        alpha = scorer.outer.alpha(scorer.outer_step)
        for i, miner in enumerate(self.miners):
            payload, receipt = self._train(miner, window, theta, state, shard, alpha)
            miner.session.services.exchange.put_gradient(
                window,
                payload,
                codec=scorer.codec.name,
                receipt=receipt,
                sizes={"payload": len(payload)},
            )
            path = miner.store / self.keys.gradient(window, miner.uid)
            os.utime(path, (lo + 2 + i, lo + 2 + i))
        model.load_state_dict(state)
        self._load(model, theta)
        ticks = -(-UPLOAD_GRACE_S // int(BLOCK_TIME_S)) + 1
        self.advance_to((window + 1) * bpw + ticks)
        assert self.chain.block_timestamp(self.chain.block()) > hi
        self.next_window = window + 1

    @staticmethod
    def _load(model: Any, theta: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in model.local_parameters().items():
                p.copy_(theta[n])
        model.reload_params()

    def _train(
        self,
        miner: Miner,
        window: int,
        theta: Mapping[str, torch.Tensor],
        initial_state: Mapping[str, Any],
        shard: Any,
        alpha: float,
    ) -> tuple[bytes, Receipt]:
        """An honest miner's inner loop on its own pool, error feedback and compression."""
        from covenant.plugins.sparseloco import compress_steps, pack_payload

        model = self.model
        model.load_state_dict(
            miner.runtime_state if miner.runtime_state is not None else initial_state
        )
        self._load(model, theta)
        pool = sample_pool(miner.uid, window, shard.num_samples, self.inner_steps, self.batch_size)
        for i in range(self.inner_steps):
            model.train_step(shard.batch(step_ids(pool, i, self.batch_size)), self.lr)
        end = {n: p.detach().clone() for n, p in model.local_parameters().items()}
        miner.runtime_state = copy.deepcopy(model.state_dict())
        deltas = {k: theta[k] - end[k] for k in end}
        errors = miner.errors or {k: torch.zeros_like(v) for k, v in deltas.items()}
        pieces, miner.errors = compress_steps(errors, deltas, self.sparseloco, outer_lr=alpha)
        r = pool_receipt(pool)
        return pack_payload(pieces, self.sparseloco), Receipt(hash=r.hash, count=r.count)

    # -- reading the run ---------------------------------------------------------------------------

    def record_path(self, window: int, uid: int) -> Path:
        return self.run_dir / "records" / str(window) / f"{uid}.json"

    def records(self, window: int) -> dict[int, dict[str, Any]]:
        """The signed records of ``window`` (``{"record": ..., "signature": ...}``) by uid."""
        folder = self.run_dir / "records" / str(window)
        return {
            int(p.stem): json.loads(p.read_text())
            for p in sorted(folder.glob("*.json"))
            if p.stem.isdigit()
        }

    def windows_recorded(self) -> list[int]:
        folder = self.run_dir / "records"
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def miner_uids(self) -> Sequence[int]:
        return [m.uid for m in self.miners]
