"""The Gauntlet validator's I/O driver: what the rules consume is measured here (SPEC section 7).

Per window ``S`` (its upload interval has closed), in the spec's order::

    metagraph -> every miner's upload for S (fetch_verified: timing, signature, identity, hash)
      -> stage 1: data receipt, payload checks (codec), tile indices, sync sample debug/{S-1}
      -> the aggregate: the lead's peer list in force at S, its usable uploads
         (lead validator: the signed aggregate record aggregate/{S}, empty ones included)
      -> Gauntlet.begin_window (inactivity, copy detection, sync, gather-miss, the stage-2 draw)
      -> stage 2: per drawn uid, losses on 8 own and 8 random sequences before and after
         applying only its clipped update at eval_lr_factor * alpha; the model restored
         bit-exactly after each (stops when the chain window changes)
      -> Gauntlet.finish_window (negative evaluations, match, final scores, weights, peer list)
      -> signed score records (run directory and storage), weights (reward plugin), peer list
      -> apply the aggregate to the validator's model, step-size EMA, own sync sample
      -> lead validator: a checkpoint every ``checkpoint_interval`` outer steps

Nothing a peer controls can stop the validator: every malformed input is an
:class:`~covenant.engine.protocols.UploadRejection` or a
:class:`~covenant.engine.protocols.PayloadRejected` that becomes a recorded reason and a
penalty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field

from covenant.engine.data.assignment import receipt as data_receipt
from covenant.engine.data.assignment import sample_pool
from covenant.engine.data.config import DataConfig
from covenant.engine.data.prepare import default_data_dir, prepare_from_config
from covenant.engine.data.shards import ShardDataset, load_manifest, open_active_shard
from covenant.engine.fs import atomic_write_bytes
from covenant.engine.protocols import (
    AggregateRecord,
    ModelRuntime,
    PayloadRejected,
    PeerList,
    Upload,
    UploadRejection,
    WindowContext,
    lead_validator,
)
from covenant.engine.untrusted import canonical_json
from covenant.plugins.gauntlet import rules
from covenant.plugins.gauntlet.config import GauntletConfig
from covenant.plugins.gauntlet.scoring import Evaluation, Gauntlet, Observation, WindowOutcome

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.services import Services

log = logging.getLogger(__name__)

RECORD_FORMAT = "covenant-score-record/1"
SIGNING_DOMAIN = b"covenant/score-record/v1\n"
# Storage rejections the peer caused (an invalid upload) vs. ones that mean "no upload".
_ABSENT = {"missing", "no_commitment", "not_registered", "transport_error", "deadline"}
_TIMING = {"late", "early"}


class GauntletSection(GauntletConfig):
    """``[gauntlet]``: the scoring rules (:class:`GauntletConfig`) and the driver's settings."""

    checkpoint_interval: int = Field(
        10, ge=1, description="lead validator: publish a checkpoint every N outer steps (SPEC 9)"
    )
    keep_window_checkpoints: int = Field(
        4, ge=2, description="local checkpoints kept (replay needs the one before a record)"
    )
    eval_global_batches: int = Field(
        4, ge=0, description="held-out batches for the global model's loss every window (0: off)"
    )
    publish_records: bool = Field(True, description="also store signed score records in storage")
    start_delay_windows: int = Field(
        1,
        ge=1,
        description="lead validator of a new run: start_window = the current window + this "
        "(give miners time to start)",
    )


def _tensor_hash(params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every parameter's float32 bytes in name order: the model a score saw."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def sync_values(params: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Flat positions 10 and 11 of every tensor with >= 12 elements (SPEC section 6)."""
    out = {}
    for name, p in sorted(params.items()):
        flat = p.detach().reshape(-1)
        if flat.numel() >= 12:
            out[name] = [float(flat[10]), float(flat[11])]
    return out


class GauntletScorer:
    """The :class:`covenant.engine.protocols.Scorer` of the Gauntlet (see module docstring)."""

    def __init__(self, config: Config, services: Services, model: ModelRuntime) -> None:
        self.config = config
        self.services = services
        self.model = model
        self.cfg: GauntletSection = config.typed("gauntlet", GauntletSection)
        self.gauntlet = Gauntlet(self.cfg)
        outer_name = config.section("outer").name
        self.outer = services.hook.covenant_outer_step(
            config=config, name=outer_name, services=services
        )
        if self.outer is None or self.outer.codec is None:
            from covenant.engine.errors import ConfigError

            raise ConfigError(f"[outer] name = {outer_name!r}: no enabled plugin provides it")
        self.codec = self.outer.codec
        self.train = config.section("train")
        self.data_cfg: DataConfig = config.section("data")
        self.run_dir = Path(config.section("run").dir)
        self.outer_step = 0  # outer_step(next window to process)
        self.start: int | None = None
        self._shapes = {s.name: tuple(s.global_shape) for s in model.layout()}
        self._layout = list(model.layout())
        self._data_dir = (
            Path(self.data_cfg.dir) if self.data_cfg.dir is not None else default_data_dir()
        )
        self._manifest: Any = None
        self._val: list[torch.Tensor] | None = None

    # -- data --------------------------------------------------------------------------------

    def _data(self) -> Any:
        if self._manifest is None:
            prepare_from_config(self.data_cfg)
            self._manifest = load_manifest(self._data_dir)
        return self._manifest

    def _shard(self, outer_step: int) -> ShardDataset:
        return open_active_shard(
            self._data_dir,
            outer_step,
            self.data_cfg.windows_per_shard,
            verify_hash=False,
            manifest=self._data(),
        )

    def _pool(self, uid: int, window: int, n: int) -> np.ndarray:
        return sample_pool(uid, window, n, self.train.inner_steps, self.train.batch_size)

    # -- start-up ----------------------------------------------------------------------------

    def first_window(self, last: int | None) -> int:
        """The first window to process; the lead publishes ``start_window`` and a peer list."""
        services, exchange = self.services, self.services.exchange
        chain = services.chain
        current = int(chain.block()) // chain.blocks_per_window
        if services.is_lead() and exchange.start_window() is None:
            exchange.put_start_window(current + self.cfg.start_delay_windows)
            log.info("lead validator: start_window = %d", current + self.cfg.start_delay_windows)
        start = None
        for _ in range(600):
            start = exchange.start_window()
            if start is not None:
                break
            time.sleep(1.0)
        if start is None:
            from covenant.engine.errors import CovenantError

            raise CovenantError("no start_window from the lead validator after 600 s")
        self.start = start
        if last is None:
            self._post_initial_peer_list(current)
            self.outer_step = self._outer_step_from_records(max(start, current))
            if services.is_lead() and self.outer_step == 0:
                # the run's initial weights: a miner starting fresh loads these, so every peer
                # begins from the same model whatever its own seed or layout
                self._publish_checkpoint(start - 1)
            return max(start, current)
        return last + 1

    def _miners(self) -> tuple[list[Any], set[int]]:
        neurons = self.services.metagraph(fresh=True)
        validators = {
            n.uid
            for n in neurons
            if n.validator_permit or n.stake > self.cfg.validator_stake_threshold
        }
        miners = [n for n in neurons if n.uid not in validators and n.uid != self.cfg.burn_uid]
        return miners, validators

    def _post_initial_peer_list(self, current: int) -> None:
        miners, _ = self._miners()
        commitments = self.services.chain.commitments()
        candidates = [n.uid for n in miners if n.hotkey in commitments]
        gather, reserve = self.gauntlet.initial_peer_list(
            candidates, {n.uid: n.incentive for n in miners}, window=current
        )
        self._post_peer_list(current, gather, reserve)

    def _post_peer_list(self, posted: int, gather: Sequence[int], reserve: Sequence[int]) -> None:
        peers = PeerList(
            first_window=posted + 1,
            posted_window=posted,
            gather=tuple(gather),
            reserve=tuple(reserve),
        )
        try:
            self.services.exchange.put_peer_list(peers)
            log.info(
                "peer list from window %d: gather %s reserve %s",
                posted + 1,
                list(gather),
                list(reserve),
            )
        except Exception as exc:  # a failed post is retried at the next due window
            log.warning("posting the peer list failed: %s", exc)

    def _outer_step_from_records(self, window: int) -> int:
        """``outer_step(window)`` from the lead's records (a validator joining a running run)."""
        assert self.start is not None
        exchange = self.services.exchange
        for w in range(window - 1, max(self.start, window - 256) - 1, -1):
            record = exchange.aggregate_record(w)
            if record is not None:
                return record.next_outer_step
        return 0

    # -- one window ----------------------------------------------------------------------------

    def process_window(self, window: int) -> dict[str, float]:
        t0 = time.perf_counter()
        services, exchange, _chain = self.services, self.services.exchange, self.services.chain
        is_lead = services.is_lead()
        miners, validators = self._miners()
        hotkeys = {n.uid: n.hotkey for n in miners}
        outer_step = self.outer_step
        if not is_lead:  # follow the lead's count where it is published
            record = exchange.aggregate_record(window - 1) if window > 0 else None
            if record is not None:
                outer_step = record.next_outer_step
        shard = self._shard(outer_step)
        n_samples = shard.num_samples
        cap = self.codec.max_payload_bytes(self._shapes)
        # ---- stage 1 ---------------------------------------------------------------------
        uploads: dict[int, Upload] = {}
        observations: dict[int, Observation] = {}
        reasons: dict[int, str] = {}
        for outcome in exchange.fetch_gradients(
            window, sorted(hotkeys), max_bytes=cap, codec=self.codec.name, wait=False
        ):
            obs, upload = self._stage1(window, outcome, hotkeys, n_samples)
            observations[obs.uid] = obs
            reasons[obs.uid] = obs.reason
            if upload is not None:
                uploads[obs.uid] = upload
        t_stage1 = time.perf_counter()
        samples = self._sync_samples(window - 1, sorted(hotkeys))
        observations = {
            uid: _with_sample(obs, samples.get(uid)) for uid, obs in observations.items()
        }
        peers = exchange.peer_list(window)
        gather = list(peers.gather) if peers else []
        reserve = list(peers.reserve) if peers else []
        gathered = peers.select(set(uploads)) if peers else []
        record = AggregateRecord(
            window=window,
            outer_step=outer_step,
            uploads=tuple((u, uploads[u].sha256) for u in gathered),
        )
        if is_lead:
            try:
                exchange.put_aggregate_record(record)
            except Exception as exc:
                log.error("window %d: writing the aggregate record failed: %s", window, exc)
        params = self.model.local_parameters()
        validator_values = sync_values(params)
        model_hash = _tensor_hash(params)
        eval_seed, seed_block = self._eval_seed(window)
        plan = self.gauntlet.begin_window(
            window,
            outer_step=outer_step,
            eval_seed=eval_seed,
            observations=observations,
            validator_values=validator_values,
            gather=gather,
            reserve=reserve,
            gathered=gathered,
            validators=validators,
            sync_sample_due=self.start is None or window - 1 >= self.start,
        )
        # ---- stage 2 ---------------------------------------------------------------------
        t_eval0 = time.perf_counter()
        alpha = self.outer.alpha(outer_step)
        evaluations, inputs = self._evaluate(
            window, plan.evaluate, observations, uploads, gathered, eval_seed, shard, alpha
        )
        t_eval = time.perf_counter()
        outcome = self.gauntlet.finish_window(plan, evaluations)
        self._publish(window, outcome, inputs, model_hash, eval_seed, seed_block, outer_step)
        # ---- apply the aggregate ---------------------------------------------------------
        ctx = WindowContext(window, outer_step, -1, self.train.inner_steps)
        before = sync_values(params)
        applied = 0.0
        if gathered:
            out = self.outer.apply(ctx, self.model, [uploads[u] for u in gathered])
            applied = float(out.get("applied", 0.0))
        after = sync_values(self.model.local_parameters())
        if applied:
            self.gauntlet.observe_outer_step(before, after)
            self.outer_step = outer_step + 1
        else:
            self.outer_step = outer_step
        try:
            exchange.put_sync_sample(window, after)
        except Exception as exc:
            log.warning("window %d: own sync sample upload failed: %s", window, exc)
        metrics: dict[str, float] = {
            "window": float(window),
            "outer_step": float(outer_step),
            "applied": applied,
            "uploads": float(len(uploads)),
            "miners": float(len(hotkeys)),
            "gathered": float(len(gathered)),
            "evaluated": float(sum(1 for e in evaluations.values() if e.status == "ok")),
            "slashes": float(len(outcome.slashes)),
            "stage1_s": t_stage1 - t0,
            "eval_s": t_eval - t_eval0,
        }
        if self.cfg.eval_global_batches:
            metrics["val_loss"] = self._global_loss()
        if is_lead and applied and self.outer_step % self.cfg.checkpoint_interval == 0:
            self._publish_checkpoint(window)
        metrics["total_s"] = time.perf_counter() - t0
        log.info(
            "window %d: %d uploads, %d gathered, %d evaluated, %d slashes%s (%.1f s)",
            window,
            len(uploads),
            len(gathered),
            int(metrics["evaluated"]),
            len(outcome.slashes),
            f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else "",
            metrics["total_s"],
        )
        return metrics

    # -- stage 1 details -----------------------------------------------------------------------

    def _stage1(
        self, window: int, outcome: Any, hotkeys: Mapping[int, str], n_samples: int
    ) -> tuple[Observation, Upload | None]:
        uid = outcome.uid
        hk = hotkeys.get(uid, "")
        if isinstance(outcome, UploadRejection):
            if outcome.reason in _ABSENT:
                return Observation(uid, hk, False, "missing", outcome.reason), None
            verdict = outcome.reason if outcome.reason in _TIMING else "invalid"
            reason = f"{outcome.reason}: {outcome.detail}"
            return Observation(uid, hk, True, verdict, reason), None
        ts = math.floor(outcome.modified)
        pool = self._pool(uid, window, n_samples)
        mine = data_receipt(pool)
        if outcome.receipt is None or (outcome.receipt.hash, outcome.receipt.count) != (
            mine.hash,
            mine.count,
        ):
            reason = "bad_receipt: the data receipt does not match the assigned pool"
            return Observation(
                uid, hk, True, "invalid", reason, ts, payload_hash=outcome.sha256
            ), None
        try:
            self.codec.validate(outcome.payload, self._shapes)
            indices = self.codec.tile_indices(outcome.payload, self._shapes)
        except PayloadRejected as exc:
            reason = f"{exc.reason}: {exc.detail}"
            return Observation(
                uid, hk, True, "invalid", reason, ts, payload_hash=outcome.sha256
            ), None
        obs = Observation(
            uid, hk, True, "ok", "", ts, tile_indices=indices, payload_hash=outcome.sha256
        )
        return obs, outcome

    def _sync_samples(self, window: int, uids: Sequence[int]) -> dict[int, dict[str, list[float]]]:
        out: dict[int, dict[str, list[float]]] = {}
        if window < 0:
            return out
        for uid in uids:
            sample = self.services.exchange.fetch_sync_sample(window, uid)
            if not isinstance(sample, UploadRejection):
                out[uid] = {k: [float(v[0]), float(v[1])] for k, v in sample.values.items()}
        return out

    def _eval_seed(self, window: int) -> tuple[int, int]:
        """``eval_seed``: the hash of the first block after the upload interval closed."""
        chain = self.services.chain
        _, hi = self.services.exchange.upload_interval(window)
        block = (window + 1) * chain.blocks_per_window
        current = int(chain.block())
        while block < current and chain.block_timestamp(block) <= hi:
            block += 1
        return int(chain.block_hash(block), 16), block

    # -- stage 2 -------------------------------------------------------------------------------

    def _evaluate(
        self,
        window: int,
        evaluate: Sequence[int],
        observations: Mapping[int, Observation],
        uploads: Mapping[int, Upload],
        gathered: Sequence[int],
        eval_seed: int,
        shard: ShardDataset,
        alpha: float,
        *,
        stop_on_window_change: bool = True,
    ) -> tuple[dict[int, Evaluation], dict[int, dict[str, Any]]]:
        """Stage 2 of ``evaluate`` (``covenant replay`` calls it with
        ``stop_on_window_change=False``: a replay runs long after the chain moved on)."""
        cfg = self.cfg
        chain = self.services.chain
        model = self.model
        params = model.local_parameters()
        snapshot = {n: p.detach().clone() for n, p in params.items()}
        evaluations: dict[int, Evaluation] = {}
        inputs: dict[int, dict[str, Any]] = {}
        rand_ids = rules.random_eval_ids(eval_seed, shard.num_samples, cfg.eval_random_samples)
        rand_batch = shard.batch(np.sort(rand_ids))
        rand_before = model.eval_loss(rand_batch)
        medians = self._median_norms([uploads[u] for u in gathered if u in uploads])
        for uid in evaluate:
            if stop_on_window_change and int(chain.block()) // chain.blocks_per_window > window + 1:
                evaluations[uid] = Evaluation(uid, "skipped")
                continue
            obs = observations.get(uid)
            if obs is None or obs.verdict != "ok" or uid not in uploads:
                status = "invalid" if obs is not None and obs.verdict == "invalid" else "missing"
                evaluations[uid] = Evaluation(uid, status)
                continue
            pool = self._pool(uid, window, shard.num_samples)
            own_ids = rules.own_eval_ids(eval_seed, uid, pool, cfg.eval_own_samples)
            own_batch = shard.batch(np.sort(own_ids))
            own_before = model.eval_loss(own_batch)
            try:
                update = self.codec.decode(uploads[uid].payload, self._shapes, owned=self._layout)
            except PayloadRejected as exc:
                evaluations[uid] = Evaluation(uid, "invalid")
                inputs[uid] = {"decode_error": f"{exc.reason}: {exc.detail}"}
                continue
            own_norms = self.codec.norms(uploads[uid].payload, self._shapes)
            step = cfg.eval_lr_factor * alpha
            factors = {}
            with torch.no_grad():
                for name, p in params.items():
                    if name in update:
                        norm = own_norms.get(name, 0.0)
                        m = medians.get(name, norm)
                        factors[name] = min(1.0, m / (norm + cfg.eval_clip_eps))
                        p.sub_((step * factors[name] * update[name]).to(p.dtype))
            model.reload_params()
            own_after = model.eval_loss(own_batch)
            rand_after = model.eval_loss(rand_batch)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(snapshot[name])
            model.reload_params()
            evaluations[uid] = Evaluation(uid, "ok", own_before, own_after, rand_before, rand_after)
            inputs[uid] = {
                "own_sample_ids": [int(x) for x in own_ids],
                "random_sample_ids": [int(x) for x in rand_ids],
                "eval_step": step,
                "clip_min": min(factors.values(), default=1.0),
            }
        for name, p in params.items():  # bit-exact restore, checked
            if not torch.equal(p.detach(), snapshot[name]):
                raise RuntimeError(f"model not restored after evaluation: {name}")
        return evaluations, inputs

    def _median_norms(self, uploads: Sequence[Upload]) -> dict[str, float]:
        norms: dict[str, list[float]] = {}
        for u in uploads:
            try:
                for name, v in self.codec.norms(u.payload, self._shapes).items():
                    norms.setdefault(name, []).append(v)
            except PayloadRejected:
                continue
        return {name: sorted(vs)[(len(vs) - 1) // 2] for name, vs in norms.items()}

    def _global_loss(self) -> float:
        if self._val is None:
            val = ShardDataset(self._data_dir, "val", 0, verify_hash=False, manifest=self._data())
            b = self.train.batch_size
            n = min(self.cfg.eval_global_batches, val.num_samples // b)
            self._val = [val.batch(np.arange(i * b, (i + 1) * b)) for i in range(n)]
        if not self._val:
            return math.nan
        return float(np.mean([self.model.eval_loss(b) for b in self._val]))

    # -- publishing ----------------------------------------------------------------------------

    def _publish(
        self,
        window: int,
        outcome: WindowOutcome,
        inputs: Mapping[int, Mapping[str, Any]],
        model_hash: str,
        eval_seed: int,
        seed_block: int,
        outer_step: int,
    ) -> None:
        services = self.services
        hook = services.hook
        hotkey = services.hotkey
        config_hash = hashlib.sha256(canonical_json(self.config.to_dict())).hexdigest()
        versions = _versions(self.run_dir)
        folder = self.run_dir / "records" / str(window)
        folder.mkdir(parents=True, exist_ok=True)
        for uid, body in sorted(outcome.records.items()):
            record = {
                "format": RECORD_FORMAT,
                "window": window,
                "uid": uid,
                "validator": hotkey.ss58_address,
                "inputs": {
                    "model_hash": model_hash,
                    "eval_seed": str(eval_seed),
                    "eval_seed_block": seed_block,
                    "outer_step": outer_step,
                    "config_hash": config_hash,
                    "versions": versions,
                    **inputs.get(uid, {}),
                },
                "score": _jsonable(body),
            }
            text = canonical_json(record)
            signature = "0x" + bytes(hotkey.sign(SIGNING_DOMAIN + text)).hex()
            signed = {"record": record, "signature": signature}
            atomic_write_bytes(folder / f"{uid}.json", canonical_json(signed))
            if self.cfg.publish_records:
                try:
                    services.exchange.put_score_record(window, uid, record)
                except Exception as exc:
                    log.warning(
                        "window %d uid %d: storing the score record failed: %s", window, uid, exc
                    )
            hook.covenant_peer_scored(window=window, uid=uid, record=record)
        summary = {"window": window, "summary": _jsonable(outcome.summary)}
        summary["final_scores"] = {str(k): v for k, v in sorted(outcome.final_scores.items())}
        summary["slashes"] = [s.to_json() for s in outcome.slashes]
        if outcome.weights is not None:
            weights = dict(outcome.weights)
            summary["weights"] = {str(k): v for k, v in sorted(weights.items())}
            result = hook.covenant_submit_weights(
                window=window, weights=weights, services=services, config=self.config
            )
            ok = bool(result is not None and result.ok)
            why = "no reward plugin is enabled" if result is None else result.reason
            summary["weights_set"] = {"ok": ok, "reason": why}
            hook.covenant_weights_set(window=window, weights=weights, ok=ok, reason=why)
        atomic_write_bytes(folder / "window.json", canonical_json(summary))
        if outcome.peer_list is not None:
            current = int(services.chain.block()) // services.chain.blocks_per_window
            if outcome.peer_list[0]:
                self._post_peer_list(current, *outcome.peer_list)
            else:  # an empty list would stop every miner's outer step: keep the one in force
                log.info("window %d: no active peer to list; the peer list in force stays", window)

    def _publish_checkpoint(self, window: int) -> None:
        """SPEC 9: the full weights after applying ``window`` (layout-independent safetensors
        pieces and their index), ``outer_step(window + 1)``, content hashes and a manifest signed
        by this hotkey; ``checkpoint/latest`` points at it. A failure is logged, not fatal."""
        folder = self.run_dir / "published" / f"window-{window:08d}"
        t0 = time.perf_counter()
        try:
            if folder.exists():
                shutil.rmtree(folder)
            self.model.save_full_weights(str(folder))
            shape = getattr(self.model, "shape", None)
            model_info = shape.to_dict() if shape is not None else {}
            self.services.exchange.put_checkpoint(window, self.outer_step, str(folder), model_info)
        except Exception as exc:
            log.error("window %d: publishing the checkpoint failed: %s", window, exc)
            return
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info(
            "checkpoint published: window %d, outer step %d (%.1f s)",
            window,
            self.outer_step,
            time.perf_counter() - t0,
        )

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "gauntlet": json.loads(json.dumps(self.gauntlet.state_dict())),
            "outer_step": self.outer_step,
            "start": self.start,
            "outer": self.outer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != 1:
            raise ValueError(f"unknown validator state format {state.get('format')!r}")
        self.gauntlet = Gauntlet(self.cfg, state["gauntlet"])
        self.outer_step = int(state["outer_step"])
        self.start = state.get("start")
        self.outer.load_state_dict(state["outer"])


def _with_sample(obs: Observation, sample: Mapping[str, Sequence[float]] | None) -> Observation:
    from dataclasses import replace

    return replace(obs, sync_sample=sample)


def _jsonable(value: Any) -> Any:
    """Plain JSON (non-finite floats become None, tuples lists) for canonical records."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return _jsonable(float(value))
    return value


def _versions(run_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((run_dir / "resolved_config.json").read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in data.get("versions", {}).items()}
    except (OSError, ValueError):
        return {}


def lead_of(neurons: Sequence[Any]) -> Any:
    return lead_validator(neurons)


__all__ = ["GauntletScorer", "GauntletSection", "sync_values"]
