"""A deterministic one-process swarm: the real Gauntlet validator against honest and adversarial
miners, on CPU, with a manual local chain (used by ``test_gauntlet_adversaries.py``).

What is real: the validator (``open_session("validator", overrides)``: the shipped validator
config and its plugins; the model runtime; ``GauntletScorer.process_window``), the local SQLite
chain, every miner's own ``file://`` bucket, hotkey, commitment and
:class:`~covenant.plugins.storage.run_exchange.StorageExchange` (signed uploads with data
receipts, sync samples), the SparseLoCo codec with error feedback, and the adversaries'
behaviours (the ``adversaries`` plugin's :mod:`~covenant.plugins.adversaries.behaviours`, called
with each miner's own ``[adversaries]`` section and its own services). Only miners that do not
train skip the inner loop (copier, noise, and the uploads nobody applies: late, invalid, forged,
replayed).

What is simulated: each miner's inner loop runs on the validator's model runtime (one runtime,
each miner's weights and AdamW state swapped in and out), and an honest miner's outer step is
taken to produce exactly the validator's weights (both apply the same peer list's usable uploads
to the same weights; the late, invalid, forged and replayed uploads are unusable to both).
Timing is set by hand: the chain only moves when :meth:`Simulation.run` advances it, and every
gradient object's storage timestamp (its file's mtime) is set to a chosen chain time inside the
window's upload interval (after it, for the late miner).

Deterministic: the chain's genesis time and seed are fixed (so every ``eval_seed`` is), the model
is seeded, sampling is a function of (uid, window) and every loop runs in uid order.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from covenant.engine.data.assignment import receipt as pool_receipt
from covenant.engine.data.assignment import sample_pool, step_ids
from covenant.engine.data.shards import ShardDataset, load_manifest, open_active_shard
from covenant.engine.keys import load_hotkey
from covenant.engine.protocols import Receipt, WindowContext
from covenant.engine.session import Session, open_session
from covenant.plugins.adversaries import behaviours
from covenant.plugins.adversaries.config import AdversariesConfig
from covenant.plugins.chain.local import LocalChain
from covenant.plugins.gauntlet.validator import GauntletScorer, sync_values
from covenant.plugins.sparseloco import SparseLoCoConfig, compress_steps, pack_payload
from covenant.plugins.storage.keys import RunKeys

RUN_ID = "adversaries"
BLOCKS_PER_WINDOW = 10
BLOCK_TIME_S = 12.0
UPLOAD_GRACE_S = 70
GENESIS_TIME = 1_700_000_000.0  # whole seconds: upload intervals start on t(block) exactly
GENESIS_SEED = "c3" * 32
VALIDATOR_URI = "//Alice"
BURN_URI = "//Bob"
VOCAB = 512
SEQ_LEN = 64
# behaviours whose own inner loop shapes what the validator evaluates
TRAINING = ("none", "wrong_data", "stale", "partial_copier")


@dataclass(frozen=True)
class PeerSpec:
    """One simulated miner: a name, and the ``[adversaries]`` keys (none: honest)."""

    name: str
    adversary: Mapping[str, Any] = field(default_factory=dict)

    @property
    def honest(self) -> bool:
        return self.adversary.get("behaviour", "none") == "none"


@dataclass
class Miner:
    spec: PeerSpec
    uid: int
    session: Session
    store: Path
    cfg: AdversariesConfig
    theta: dict[str, torch.Tensor] | None = None  # weights at the start of the next window
    runtime_state: dict[str, Any] | None = None  # model + AdamW moments between windows
    errors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def services(self) -> Any:
        return self.session.services


@dataclass
class WindowResult:
    window: int
    metrics: dict[str, float]
    window_record: dict[str, Any]  # the validator's records/{window}/window.json
    records: dict[int, dict[str, Any]]  # the validator's signed score records, by uid


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


class Simulation:
    """See the module docstring. ``peers`` in upload order (a copier after its victim)."""

    def __init__(
        self,
        tmp: Path,
        data_dir: Path,
        peers: Sequence[PeerSpec],
        *,
        inner_steps: int = 4,
        batch_size: int = 4,
        lr: float = 3e-3,
        gauntlet: Mapping[str, Any] | None = None,
        genesis_seed: str = GENESIS_SEED,
    ) -> None:
        self.tmp = tmp
        self.data_dir = data_dir
        self.lr = lr
        self.inner_steps = inner_steps
        self.batch_size = batch_size
        self.db = tmp / "chain.sqlite"
        self.keys = RunKeys(RUN_ID, 1)
        self.chain = self._genesis(genesis_seed)
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
        # the validator: uid 0, lead (stake and permit); uid 1 is the burn uid (never uploads)
        validator_store = tmp / "stores" / "validator"
        gauntlet_overrides = {
            "burn_uid": 1,
            "uids_per_window": 64,
            "copy_min_outer_steps": 0,
            "eval_global_batches": 2,
            **(gauntlet or {}),
        }
        self.validator = open_session(
            "validator",  # the shipped configs/validator.toml: only the validator's plugins
            [
                *common,
                _override("chain.hotkey", VALIDATOR_URI),
                _override("storage.url", f"file://{validator_store}"),
                _override("model.preset", "tiny-2l"),
                _override("model.vocab", VOCAB),
                _override("model.seq_len", SEQ_LEN),
                _override("model.micro_batch", batch_size),
                *(_override(f"gauntlet.{k}", v) for k, v in gauntlet_overrides.items()),
            ],
            environ={},
        )
        vkey = load_hotkey(VALIDATOR_URI)
        assert self.chain.register(vkey) == 0
        assert self.chain.register(load_hotkey(BURN_URI)) == 1
        self.chain.set_stake(vkey.ss58_address, 1e6, validator_permit=True)
        self.chain.commit(vkey, f"v1|file://{validator_store}")
        # the miners: uids 2.. in the given order, each with its own bucket and session
        self.miners: list[Miner] = []
        for i, spec in enumerate(peers):
            uri = f"//adversaries-sim-{spec.name}"
            store = tmp / "stores" / spec.name
            session = open_session(
                None,
                [
                    *common,
                    _override("plugins.enable", ["sparseloco", "storage", "chain", "adversaries"]),
                    _override("chain.hotkey", uri),
                    _override("storage.url", f"file://{store}"),
                    *(_override(f"adversaries.{k}", v) for k, v in spec.adversary.items()),
                ],
                environ={},
            )
            key = load_hotkey(uri)
            uid = self.chain.register(key)
            assert uid == 2 + i, (spec.name, uid)
            self.chain.commit(key, f"v1|file://{store}")
            cfg = session.config.typed("adversaries", AdversariesConfig)
            # upload times are stamped explicitly here: a copier's real-time delay only slows
            cfg = cfg.model_copy(update={"copy_delay_s": 0.0})
            self.miners.append(Miner(spec, uid, session, store, cfg))
        self.by_name = {m.spec.name: m for m in self.miners}
        self.sparseloco = self.validator.config.typed("sparseloco", SparseLoCoConfig)
        # the validator's model and scorer (as `covenant validate` builds them)
        self.model = self.validator.hook.covenant_build_model(config=self.validator.config)
        self.scorer = self.validator.hook.covenant_scorer(
            config=self.validator.config, services=self.validator.services, model=self.model
        )
        assert isinstance(self.scorer, GauntletScorer)
        self.manifest = load_manifest(data_dir)
        self.shapes = {s.name: tuple(s.global_shape) for s in self.model.layout()}
        self.results: list[WindowResult] = []

    # -- chain ---------------------------------------------------------------------------------

    def _genesis(self, seed: str) -> LocalChain:
        """A fresh manual chain with a fixed genesis (time and seed): reproducible block hashes."""
        kwargs = {
            "blocks_per_window": BLOCKS_PER_WINDOW,
            "block_time_s": BLOCK_TIME_S,
            "clock": "manual",
            "commitment_max_bytes": 1024,
        }
        LocalChain(self.db, **kwargs).close()  # type: ignore[arg-type]
        with sqlite3.connect(self.db) as conn:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'genesis_time'", (repr(GENESIS_TIME),)
            )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'genesis_seed'", (seed,))
        return LocalChain(self.db, **kwargs)  # type: ignore[arg-type]

    def advance_to(self, block: int) -> None:
        now = self.chain.block()
        assert block >= now, (block, now)
        self.chain.advance(block - now)

    def interval(self, window: int) -> tuple[int, int]:
        return self.validator.services.exchange.upload_interval(window)

    def stamp(self, miner: Miner, window: int, ts: float) -> None:
        """Set the storage timestamp of ``miner``'s gradient object of ``window`` (if any)."""
        path = miner.store / self.keys.gradient(window, miner.uid)
        if path.exists():
            os.utime(path, (ts, ts))

    # -- miners --------------------------------------------------------------------------------

    def _shard(self, outer_step: int) -> ShardDataset:
        return open_active_shard(
            self.data_dir,
            outer_step,
            self.validator.config.section("data").windows_per_shard,
            verify_hash=False,
            manifest=self.manifest,
        )

    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.local_parameters().items()}

    def _load(self, theta: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.model.local_parameters().items():
                p.copy_(theta[n])
        self.model.reload_params()

    def _train(self, miner: Miner, ctx: WindowContext, shard: ShardDataset) -> dict[str, Any]:
        """The miner's inner loop and compression: (payload, receipt) of this window.

        A miner whose own update never reaches the validator this window (a copier, the noise,
        invalid, late, forged and replayed uploads) skips the inner loop: its payload is the
        encoding of its error buffer alone (the bytes it corrupts, delays or re-signs).
        """
        assert miner.theta is not None
        n = shard.num_samples
        own = sample_pool(miner.uid, ctx.window, n, self.inner_steps, self.batch_size)
        if miner.cfg.behaviour in TRAINING or not behaviours.is_active(miner.cfg, ctx.window):
            if miner.runtime_state is not None:
                self.model.load_state_dict(miner.runtime_state)
            self._load(miner.theta)
            data_uid = behaviours.sample_uid_for(miner.cfg, ctx)
            data_uid = miner.uid if data_uid is None else data_uid
            pool = sample_pool(data_uid, ctx.window, n, self.inner_steps, self.batch_size)
            for i in range(self.inner_steps):
                self.model.train_step(shard.batch(step_ids(pool, i, self.batch_size)), self.lr)
            end = self._weights()
            miner.runtime_state = copy.deepcopy(self.model.state_dict())
        else:
            end = miner.theta
        deltas = {k: miner.theta[k] - end[k] for k in end}
        errors = miner.errors or {k: torch.zeros_like(v) for k, v in deltas.items()}
        alpha = self.scorer.outer.alpha(ctx.outer_step)
        pieces, miner.errors = compress_steps(errors, deltas, self.sparseloco, outer_lr=alpha)
        r = pool_receipt(own)
        return {
            "payload": pack_payload(pieces, self.sparseloco),
            "receipt": Receipt(hash=r.hash, count=r.count),
        }

    def _upload(self, miner: Miner, ctx: WindowContext, payload: bytes) -> None:
        """The adversary hook, then (unless it uploaded itself) the signed upload."""
        replaced = behaviours.payload_for(
            miner.cfg,
            ctx,
            payload,
            miner.services,
            shapes=self.shapes,
            sparseloco=self.sparseloco,
            sleep=lambda _s: self.chain.advance(1),
        )
        if replaced is not None:
            payload = replaced
        if payload:
            miner.services.exchange.put_gradient(
                ctx.window,
                payload,
                codec=self.scorer.codec.name,
                receipt=ctx.extras.get("receipt"),
                sizes={"payload": len(payload)},
            )

    # -- the run -------------------------------------------------------------------------------

    def start(self) -> int:
        """Start-up: the lead posts ``start_window`` and its first peer list; every miner holds
        the initial weights and publishes their sync sample for the window before."""
        first = self.scorer.first_window(None)
        theta = self._weights()
        initial_state = copy.deepcopy(self.model.state_dict())
        for m in self.miners:
            m.theta = {k: v.clone() for k, v in theta.items()}
            m.runtime_state = copy.deepcopy(initial_state)
            m.services.exchange.put_sync_sample(first - 1, sync_values(m.theta))
        return first

    def run_window(self, window: int) -> WindowResult:
        bpw = BLOCKS_PER_WINDOW
        outer_step = self.scorer.outer_step
        shard = self._shard(outer_step)
        validator_theta = self._weights()
        validator_state = copy.deepcopy(self.model.state_dict())
        # 1. the window ends: every miner compresses its inner loop and uploads inside the
        #    interval, in order, one second apart (a copier after its victim)
        self.advance_to((window + 1) * bpw + 1)
        lo, hi = self.interval(window)
        late: list[tuple[Miner, WindowContext, bytes]] = []
        for i, miner in enumerate(self.miners):
            ctx = WindowContext(window, outer_step, miner.uid, self.inner_steps)
            made = self._train(miner, ctx, shard)
            ctx.extras["receipt"] = made["receipt"]
            if miner.cfg.behaviour == "late" and behaviours.is_active(miner.cfg, window):
                late.append((miner, ctx, made["payload"]))
                continue
            self._upload(miner, ctx, made["payload"])
            self.stamp(miner, window, lo + 2 + i)
        self.model.load_state_dict(validator_state)
        self._load(validator_theta)
        # 2. a late miner waits for the interval to close (the chain moves while it sleeps)
        for miner, ctx, payload in late:
            self._upload(miner, ctx, payload)
            now = self.chain.block_timestamp(self.chain.block())
            assert now > hi
            self.stamp(miner, window, now)
        # 3. the validator processes the window once its interval has closed (chain in S+1)
        ticks = -(-UPLOAD_GRACE_S // int(BLOCK_TIME_S)) + 1
        self.advance_to(max(self.chain.block(), (window + 1) * bpw + ticks))
        assert self.chain.block_timestamp(self.chain.block()) > hi
        assert self.chain.block() // bpw == window + 1
        metrics = self.scorer.process_window(window)
        # 4. every miner's outer step: apply (the validator's result) or not (stale), then its
        #    sync sample debug/{window}
        applied = bool(metrics.get("applied"))
        after = self._weights()
        for miner in self.miners:
            ctx = WindowContext(window, outer_step, miner.uid, self.inner_steps)
            declined = behaviours.apply_aggregate_for(miner.cfg, ctx) is False
            if applied and not declined:
                miner.theta = {k: v.clone() for k, v in after.items()}
            else:
                for e in miner.errors.values():  # no aggregate applied: error buffer zeroed
                    e.zero_()
            assert miner.theta is not None
            miner.services.exchange.put_sync_sample(window, sync_values(miner.theta))
        result = WindowResult(window, dict(metrics), *self._records(window))
        self.results.append(result)
        return result

    def run(self, windows: int) -> list[WindowResult]:
        first = self.start()
        for window in range(first, first + windows):
            self.run_window(window)
        return self.results

    def _records(self, window: int) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        folder = self.validator.run_dir / "records" / str(window)
        summary = json.loads((folder / "window.json").read_text())
        records = {}
        for path in folder.glob("*.json"):
            if path.stem.isdigit():
                records[int(path.stem)] = json.loads(path.read_text())["record"]
        return summary, records

    # -- what the validator decided (its records) ------------------------------------------------

    def uid(self, name: str) -> int:
        return self.by_name[name].uid

    def names(self, *, honest: bool) -> list[str]:
        return [m.spec.name for m in self.miners if m.spec.honest == honest]

    def history(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        """``(window, score record body)`` of every processed window that has one for ``name``."""
        uid = self.uid(name)
        return [(r.window, r.records[uid]["score"]) for r in self.results if uid in r.records]

    def record(self, window: int, name: str) -> dict[str, Any]:
        result = next(r for r in self.results if r.window == window)
        return result.records[self.uid(name)]["score"]  # type: ignore[no-any-return]

    def slashes(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        """``(window, slash)`` of every slash the validator applied to ``name``."""
        uid = self.uid(name)
        return [
            (r.window, sl)
            for r in self.results
            for sl in r.window_record.get("slashes", [])
            if sl["uid"] == uid
        ]

    def weights(self) -> list[tuple[int, dict[int, float]]]:
        """``(window, weights by uid)`` of every window that set weights (burn uid included)."""
        return [
            (r.window, {int(k): float(v) for k, v in r.window_record["weights"].items()})
            for r in self.results
            if r.window_record.get("weights") is not None
        ]

    def honest_share(self, weights: Mapping[int, float]) -> float:
        """The honest miners' share of the weight that is not burnt."""
        honest = {self.uid(n) for n in self.names(honest=True)}
        burn = self.validator.config.section("gauntlet").burn_uid
        rest = sum(w for uid, w in weights.items() if uid != burn)
        return sum(w for uid, w in weights.items() if uid in honest) / rest if rest else 0.0

    def close(self) -> None:
        self.model.close()
        for session in (self.validator, *(m.session for m in self.miners)):
            session.services.chain.close()  # type: ignore[attr-defined]
        self.chain.close()
