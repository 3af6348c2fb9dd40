"""Convergence study of the outer steps: DDP, DiLoCo and SparseLoCo variants, R peers in lockstep.

Every method trains the same model from the same initial weights on the same real corpus
(big.txt through :func:`covenant.engine.data.prepare.prepare_from_config`) for the same number
of tokens: R peers x ``--steps`` inner steps x ``--batch`` sequences. The peers run in ONE
process, in lockstep, through the real outer-step code and services:

* a fresh local chain per run (SQLite in a temporary folder, ``clock = "manual"``), every
  participant registered with a dev hotkey (``//Alice`` is the lead validator, staked with a
  permit; ``//Bob``, ``//Charlie``... ``//Peer5``... are the peers) and a ``v1|memory://...``
  commitment;
* one :class:`~covenant.engine.services.Services` per participant (its own config: hotkey,
  ``[storage] url = memory://<run>-peer-i``, ``local_peers = true``), so uploads are signed,
  fetched through the Exchange from the peers' commitments and verified;
* the lead validator (this script) publishes ``start_window`` and one peer list naming every
  peer with the Exchange's writers;
* the outer step comes from ``covenant_outer_step(config, name, services)`` of the installed
  plugins (``sparseloco``, ``diloco``, ``ddp``).

One window: every peer ``begin`` -> H inner steps each -> the chain is advanced past the
window's last block -> every peer ``publish`` (signed upload) -> every peer ``finish``
(gather the listed uploads, aggregate, apply) -> own uploads older than the window are deleted
(retention) -> evaluation on peer 0 (all peers hold identical weights after an outer step; the
study records the largest difference it sees).

The chain's manual clock runs 1 ms blocks, far behind the wall clock, and the upload grace is
set to 10^7 s: an upload made after its window's last block is always inside its interval
(the storage timestamp is wall time), so the timing checks run but never reject.

Models: each peer is its own :class:`~covenant.models.runtime.MegatronRuntime` (several
runtimes share megatron's global parallel state in one single-rank process; this works on CPU:
interleaved steps of two runtimes give the same bits as separate runs). They are built once
and reset to the saved initial model and optimizer state before every run.

DDP has no outer step: with R lockstep replicas holding identical weights and optimizer states,
averaging their gradients every inner step is exactly one model trained on the union of their
batches (:meth:`covenant.plugins.ddp.outer.DDPOuterStep.train_step`); its data are the R peers'
pools of windows of ``min(H)`` steps. Its bytes are those a ring all-reduce of the fp32
gradient would send each inner step (nothing crosses a network here).

Output: JSON (stdout or ``--out``) and, when matplotlib is importable, a PNG of validation loss
against tokens and of final loss against bytes (``--plot``).

    OMP_NUM_THREADS=1 .venv/bin/python tools/study_outer.py --out runs/study_outer.json
    OMP_NUM_THREADS=1 .venv/bin/python tools/study_outer.py --full --out runs/study_outer_full.json

The default is a quick look (30 inner steps of 2 sequences per peer, 1-2 windows: about 10
minutes on one thread); ``--full`` (180 steps of 4, 6-12 windows) takes ~2 hours of one thread,
or run method subsets as separate processes (``--methods``) and combine them with ``--merge``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# What is compared
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One compared method: an outer step and the overrides of its config section."""

    label: str
    outer: str  # "ddp", "diloco" or "sparseloco"
    options: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    m.label: m
    for m in (
        Method("ddp", "ddp"),
        Method("diloco", "diloco"),
        Method("sparseloco-k64", "sparseloco", {"k": 64}),
        Method("sparseloco-k128", "sparseloco", {"k": 128}),
        Method("sparseloco-no-ef", "sparseloco", {"k": 64, "beta": 0.0}),
        Method("sparseloco-random-k", "sparseloco", {"k": 64, "selection": "random"}),
    )
}

PEER_URIS = ("//Bob", "//Charlie", "//Dave", "//Eve", "//Ferdie")
LEAD_URI = "//Alice"
MAX_PEERS = 64


def peer_uri(i: int) -> str:
    """Dev hotkey of peer ``i``: the well-known names first, then ``//Peer<i>``."""
    return PEER_URIS[i] if i < len(PEER_URIS) else f"//Peer{i}"


BLOCKS_PER_WINDOW = 10
BLOCK_TIME_S = 0.001
UPLOAD_GRACE_S = 10_000_000
PLUGINS = ["chain", "storage", "sparseloco", "diloco", "ddp"]


@dataclass
class StudySettings:
    """Everything a study run depends on (recorded in the JSON)."""

    preset: str = "tiny"
    peers: int = 4
    batch: int = 2  # sequences per peer per inner step (--full: 4)
    micro_batch: int = 2
    steps: int = 30  # inner steps per peer: a multiple of every H
    hs: tuple[int, ...] = (15, 30)
    methods: tuple[str, ...] = tuple(METHODS)
    lr: float = 3e-3
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    eval_samples: int = 32  # --full: 64
    eval_batch: int = 16
    seed: int = 1234
    threads: int = 1
    data_dir: str | None = None
    vocab: int = 8192
    seq_len: int = 128
    max_documents: int | None = None
    val_fraction: float = 0.02

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        if not 1 <= self.peers <= MAX_PEERS:
            raise SystemExit(f"--peers must be 1..{MAX_PEERS}")
        bad = [h for h in self.hs if h < 1 or self.steps % h]
        if bad:
            raise SystemExit(f"--steps {self.steps} must be a multiple of every H (not of {bad})")
        if self.batch % self.micro_batch:
            raise SystemExit("--batch must be a multiple of --micro-batch")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The swarm: chain, services, outer steps
# --------------------------------------------------------------------------------------------


@dataclass
class Participant:
    """One process's identity in the swarm: its config, services and (peers) outer step."""

    uri: str
    url: str
    config: Any
    services: Any
    uid: int = -1
    outer: Any = None
    model: Any = None


class Swarm:
    """A lead validator and R peers on a fresh local chain (see the module docstring)."""

    def __init__(
        self, host: Any, root: Path, method: Method, peers: int, run_id: str = "study"
    ) -> None:
        from covenant.engine.config import build_config
        from covenant.engine.protocols import PeerList
        from covenant.engine.services import Services

        self.tag = uuid.uuid4().hex[:8]
        self.run_id = run_id
        self.method = method
        base: dict[str, Any] = {
            "run": {"id": run_id, "root": str(root)},
            "chain": {
                "name": "local",
                "clock": "manual",
                "db": str(root / "chain.sqlite"),
                "blocks_per_window": BLOCKS_PER_WINDOW,
                "block_time_s": BLOCK_TIME_S,
            },
            "storage": {
                "local_peers": True,
                "upload_grace_s": UPLOAD_GRACE_S,
                "per_window_deadline_s": 60.0,
                "retries": 1,
            },
            "outer": {"name": method.outer},
        }
        if method.outer != "ddp":
            base[method.outer] = dict(method.options)

        def participant(uri: str, store: str) -> Participant:
            tree = copy.deepcopy(base)
            tree["chain"]["hotkey"] = uri
            tree["storage"]["url"] = f"memory://{self.tag}-{store}"
            cfg = build_config(host.config_schema(), tree, environ={})
            return Participant(uri, tree["storage"]["url"], cfg, Services(cfg, host.hook))

        self.lead = participant(LEAD_URI, "lead")
        self.peers = [participant(peer_uri(i), f"peer-{i}") for i in range(peers)]
        chain = self.chain = self.lead.services.chain
        for p in (self.lead, *self.peers):
            p.uid = chain.register(p.services.hotkey)
            chain.commit(p.services.hotkey, f"v1|{p.url}")
        chain.set_stake(self.lead.services.hotkey.ss58_address, 1000.0, validator_permit=True)
        self.start = 1
        self.advance_to(self.start * BLOCKS_PER_WINDOW)
        exchange = self.lead.services.exchange
        exchange.put_start_window(self.start)
        exchange.put_peer_list(
            PeerList(
                first_window=self.start,
                posted_window=self.start - 1,
                gather=tuple(p.uid for p in self.peers),
            )
        )
        for p in self.peers:
            p.outer = host.hook.covenant_outer_step(
                config=p.config, name=method.outer, services=p.services
            )
            if p.outer is None:
                raise SystemExit(f"no installed plugin provides the outer step {method.outer!r}")

    def advance_to(self, block: int) -> None:
        now = int(self.chain.block())
        if block > now:
            self.chain.advance(block - now)

    def retain(self, window: int) -> None:
        """Each peer deletes its own uploads older than ``window`` (SPEC 6 retention)."""
        from covenant.plugins.storage.keys import RunKeys
        from covenant.plugins.storage.retention import delete_expired

        for p in self.peers:
            delete_expired(
                p.services.transport,
                RunKeys(self.run_id, 1),
                uid=p.uid,
                current_window=window,
                retention_windows=1,
                kinds=("gradient", "debug"),
            )

    def close(self) -> None:
        """Empty the run's memory stores and close the chain connections."""
        from covenant.plugins.storage.keys import RunKeys

        for p in (self.lead, *self.peers):
            transport = p.services.transport
            for info in transport.list(RunKeys(self.run_id, 1).prefix):
                transport.delete(info.key)
            chain = p.services.__dict__.get("chain")
            if chain is not None and hasattr(chain, "close"):
                chain.close()


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


class Study:
    """Builds the data, the plugin host and the models once; runs every (method, H)."""

    def __init__(self, settings: StudySettings, log: Callable[[str], None] = _log) -> None:
        import numpy as np
        import torch

        from covenant.engine.data.config import DataConfig
        from covenant.engine.data.prepare import default_data_dir, prepare_from_config
        from covenant.engine.data.shards import ShardDataset
        from covenant.engine.plugins import PluginHost
        from covenant.models.config import ModelConfig, OptimConfig
        from covenant.models.runtime import build_runtime

        settings.check()
        self.s = settings
        self.log = log
        torch.set_num_threads(settings.threads)
        self.data_cfg = DataConfig(
            dir=Path(settings.data_dir) if settings.data_dir else None,
            vocab_size=settings.vocab,
            seq_len=settings.seq_len,
            max_documents=settings.max_documents,
            val_fraction=settings.val_fraction,
            verify_hash=False,
        )
        t0 = time.perf_counter()
        self.manifest = prepare_from_config(self.data_cfg)
        self.data_dir = self.data_cfg.dir or default_data_dir()
        log(f"data ready in {time.perf_counter() - t0:.1f} s ({self.data_dir})")
        self.host = PluginHost()
        self.host.load(PLUGINS, environ={})
        self.host.check()
        self.model_cfg = ModelConfig(
            preset=settings.preset,
            vocab=settings.vocab,
            seq_len=settings.seq_len,
            micro_batch=settings.micro_batch,
            seed=settings.seed,
        )
        t0 = time.perf_counter()
        needs_peers = any(METHODS[m].outer != "ddp" for m in settings.methods)
        count = settings.peers if needs_peers else 0
        count += 1 if "ddp" in settings.methods else 0
        self.models = [build_runtime(self.model_cfg, OptimConfig()) for _ in range(count)]
        self.initial = copy.deepcopy(self.models[0].state_dict())
        log(f"{count} runtimes built in {time.perf_counter() - t0:.1f} s")
        self.numel = sum(p.numel() for p in self.models[0].local_parameters().values())
        val = ShardDataset(self.data_dir, "val", 0, verify_hash=False, manifest=self.manifest)
        n = min(settings.eval_samples, val.num_samples) // settings.eval_batch
        if n == 0:
            raise SystemExit(f"{val.num_samples} validation samples: fewer than one eval batch")
        self.val_batches = [
            val.batch(np.arange(i * settings.eval_batch, (i + 1) * settings.eval_batch))
            for i in range(n)
        ]
        self.initial_val_loss = self._eval(self.models[0])

    # -- helpers ---------------------------------------------------------------------------

    def _eval(self, model: Any) -> float:
        from covenant.engine.loop import evaluate

        return float(evaluate(model, self.val_batches)["val_loss"])

    def _train_cfg(self, h: int) -> Any:
        from covenant.engine.schedule import TrainConfig

        warmup = max(1, round(self.s.steps * self.s.warmup_frac))
        return TrainConfig(
            steps=self.s.steps,
            inner_steps=h,
            batch_size=self.s.batch,
            lr=self.s.lr,
            warmup_steps=warmup,
            cosine_steps=max(1, self.s.steps - warmup),
            min_lr_ratio=self.s.min_lr_ratio,
        )

    def _reset(self, models: Sequence[Any]) -> None:
        import torch

        for m in models:
            m.load_state_dict(copy.deepcopy(self.initial))
        torch.manual_seed(self.s.seed)

    # -- one run ----------------------------------------------------------------------------

    def run(self, method: Method, h: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="covenant-study-") as tmp:
            swarm = Swarm(self.host, Path(tmp), method, self.s.peers)
            try:
                run = self._run_ddp if method.outer == "ddp" else self._run_loco
                out = run(swarm, h)
            finally:
                swarm.close()
        out.update(method=method.label, outer=method.outer, options=method.options)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out

    def _run_loco(self, swarm: Swarm, h: int) -> dict[str, Any]:
        import torch

        from covenant.engine.loop import DataFeed
        from covenant.engine.protocols import WindowContext
        from covenant.engine.schedule import learning_rate

        train = self._train_cfg(h)
        models = self.models[: self.s.peers]
        self._reset(models)
        for p, m in zip(swarm.peers, models, strict=True):
            p.model = m
        feed = DataFeed(self.data_dir, self.manifest, self.data_cfg, train, models[0])
        windows, tokens, outer_step = [], 0, 0
        curve = [[0, self.initial_val_loss]]
        for j in range(self.s.steps // h):
            w = swarm.start + j
            t_window = time.perf_counter()
            ctxs = []
            for p in swarm.peers:
                ctx = WindowContext(w, outer_step, p.uid, h)
                ctx.extras["receipt"] = feed.receipt(ctx)
                p.outer.begin(ctx, p.model)
                ctxs.append(ctx)
            losses = []
            t_inner = time.perf_counter()
            for p, ctx in zip(swarm.peers, ctxs, strict=True):
                for i in range(h):
                    lr = learning_rate(outer_step * h + i, train)
                    result = p.model.train_step(feed.batch(ctx, i), lr)
                    tokens += result.tokens
                losses.append(result.loss)
            inner_s = time.perf_counter() - t_inner
            swarm.advance_to((w + 1) * BLOCKS_PER_WINDOW)  # the window has ended on the chain
            t_outer = time.perf_counter()
            published = [
                p.outer.publish(ctx, p.model) for p, ctx in zip(swarm.peers, ctxs, strict=True)
            ]
            finished = [
                p.outer.finish(ctx, p.model) for p, ctx in zip(swarm.peers, ctxs, strict=True)
            ]
            outer_s = time.perf_counter() - t_outer
            swarm.retain(w)
            applied = [bool(f.get("applied")) for f in finished]
            if all(applied):
                outer_step += 1
            elif any(applied):
                raise SystemExit(f"window {w}: peers disagree on applying ({applied})")
            first = models[0].local_parameters()
            divergence = 0.0
            for m in models[1:]:
                for n, q in m.local_parameters().items():
                    divergence = max(divergence, float((q - first[n]).abs().max()))
            val_loss = self._eval(models[0])
            curve.append([tokens, val_loss])
            record: dict[str, Any] = {
                "window": w,
                "applied": float(all(applied)),
                "train_loss": float(sum(losses) / len(losses)),
                "val_loss": val_loss,
                "tokens": tokens,
                "bytes_up": float(sum(x.get("bytes_up", 0.0) for x in published) / len(published)),
                "uploaded": float(sum(x.get("uploaded", 0.0) for x in published)),
                "peers_gathered": float(finished[0].get("peers", 0.0)),
                "max_peer_divergence": divergence,
                "inner_s": round(inner_s, 2),
                "outer_s": round(outer_s, 2),
            }
            skips = sorted({f["skip_reason"] for f in finished if "skip_reason" in f})
            if skips:
                record["skip_reasons"] = skips
            windows.append(record)
            self.log(
                f"  window {j + 1}/{self.s.steps // h}: train {record['train_loss']:.3f} "
                f"val {val_loss:.3f} bytes/peer {record['bytes_up']:.0f} "
                f"({time.perf_counter() - t_window:.0f} s, outer {outer_s:.1f} s)"
            )
            del first
        torch.manual_seed(self.s.seed)
        bytes_up = sum(r["bytes_up"] for r in windows) / max(1, len(windows))
        return {
            "H": h,
            "windows": len(windows),
            "applied_windows": sum(int(r["applied"]) for r in windows),
            "tokens": tokens,
            "final_val_loss": curve[-1][1],
            "curve": curve,
            "bytes_per_peer_per_window": bytes_up,
            "dense_fp32_bytes": 4.0 * self.numel,
            "ratio_vs_dense_fp32": (4.0 * self.numel / bytes_up) if bytes_up else None,
            "max_peer_divergence": max(r["max_peer_divergence"] for r in windows),
            "window_log": windows,
        }

    def _run_ddp(self, swarm: Swarm, h: int) -> dict[str, Any]:
        from covenant.engine.loop import DataFeed
        from covenant.engine.protocols import WindowContext
        from covenant.engine.schedule import learning_rate
        from covenant.plugins.ddp.outer import allreduce_bytes

        train = self._train_cfg(h)
        model = self.models[-1]
        self._reset([model])
        ddp = swarm.peers[0].outer
        feed = DataFeed(self.data_dir, self.manifest, self.data_cfg, train, model)
        tokens, windows = 0, []
        curve = [[0, self.initial_val_loss]]
        per_step = allreduce_bytes(self.numel, self.s.peers)
        for j in range(self.s.steps // h):
            w = swarm.start + j
            ctxs = [WindowContext(w, j, p.uid, h) for p in swarm.peers]
            # peer-major, so each peer's pool is drawn once per window
            batches = [[feed.batch(ctx, i) for i in range(h)] for ctx in ctxs]
            t_inner = time.perf_counter()
            for i in range(h):
                result = ddp.train_step(
                    model, [b[i] for b in batches], learning_rate(j * h + i, train)
                )
                tokens += result.tokens
            val_loss = self._eval(model)
            curve.append([tokens, val_loss])
            windows.append(
                {
                    "window": w,
                    "train_loss": result.loss,
                    "val_loss": val_loss,
                    "tokens": tokens,
                    "inner_s": round(time.perf_counter() - t_inner, 2),
                }
            )
            self.log(
                f"  steps {(j + 1) * h}/{self.s.steps}: train {result.loss:.3f} val {val_loss:.3f}"
            )
        per_window = {str(x): per_step * x for x in sorted(set(self.s.hs))}
        return {
            "H": None,
            "data_window": h,
            "windows": len(windows),
            "tokens": tokens,
            "final_val_loss": curve[-1][1],
            "curve": curve,
            "bytes_per_peer_per_inner_step": per_step,
            "bytes_per_peer_per_window": per_window,
            "dense_fp32_bytes": 4.0 * self.numel,
            "ratio_vs_dense_fp32": {k: 4.0 * self.numel / v for k, v in per_window.items()},
            "window_log": windows,
        }

    def close(self) -> None:
        if self.models:
            self.models[0].close()  # megatron's global groups: one teardown for all runtimes


# --------------------------------------------------------------------------------------------
# Summary, claims, plot
# --------------------------------------------------------------------------------------------


def table(runs: Sequence[dict[str, Any]], hs: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (method, H): final validation loss, bytes per peer per window, ratio."""
    rows = []
    for r in runs:
        if r["outer"] == "ddp":
            for h in hs:
                rows.append(
                    {
                        "method": r["method"],
                        "H": h,
                        "note": f"gradients all-reduced every inner step; bytes of {h} steps",
                        "final_val_loss": r["final_val_loss"],
                        "bytes_per_peer_per_window": r["bytes_per_peer_per_window"][str(h)],
                        "ratio_vs_dense_fp32": r["ratio_vs_dense_fp32"][str(h)],
                    }
                )
        else:
            rows.append(
                {
                    "method": r["method"],
                    "H": r["H"],
                    "final_val_loss": r["final_val_loss"],
                    "bytes_per_peer_per_window": r["bytes_per_peer_per_window"],
                    "ratio_vs_dense_fp32": r["ratio_vs_dense_fp32"],
                }
            )
    return rows


def claims(runs: Sequence[dict[str, Any]], hs: Sequence[int]) -> dict[str, Any]:
    """The papers' claims, checked on this run (True/False, with the numbers)."""
    by = {(r["method"], r["H"]): r for r in runs}
    out: dict[str, Any] = {}
    for h in hs:
        dil = by.get(("diloco", h))
        for label in ("sparseloco-k64", "sparseloco-k128"):
            sl = by.get((label, h))
            if dil is None or sl is None:
                continue
            out[f"{label}_at_or_below_diloco_H{h}"] = {
                "holds": sl["final_val_loss"] <= dil["final_val_loss"],
                "loss_difference": sl["final_val_loss"] - dil["final_val_loss"],
            }
            ratio = dil["bytes_per_peer_per_window"] / sl["bytes_per_peer_per_window"]
            out[f"{label}_100x_fewer_bytes_than_diloco_H{h}"] = {
                "holds": ratio >= 100.0,
                "ratio": ratio,
            }
        base = by.get(("sparseloco-k64", h))
        for label in ("sparseloco-no-ef", "sparseloco-random-k"):
            other = by.get((label, h))
            if base is None or other is None:
                continue
            gap = other["final_val_loss"] - base["final_val_loss"]
            out[f"{label}_worse_than_sparseloco-k64_H{h}"] = {
                "holds": gap > 0.0,
                "loss_difference": gap,
            }
    return out


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Validation loss against tokens per H, and final loss against bytes; ``None`` if no
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    hs = result["settings"]["hs"]
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(hs) + 1, figsize=(6 * (len(hs) + 1), 4.5))
    for ax, h in zip(axes, hs, strict=False):
        for r in runs:
            if r["outer"] == "ddp" or r["H"] == h:
                xs, ys = zip(*r["curve"], strict=True)
                style = "k--" if r["outer"] == "ddp" else "-"
                ax.plot(xs, ys, style, marker=".", label=r["method"])
        ax.set_title(f"H = {h}")
        ax.set_xlabel("tokens (all peers)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    for row in result["table"]:
        ax.scatter(row["bytes_per_peer_per_window"], row["final_val_loss"])
        ax.annotate(
            f"{row['method']} H{row['H']}"[:28],
            (row["bytes_per_peer_per_window"], row["final_val_loss"]),
            fontsize=6,
        )
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per peer per window")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    fig.suptitle(
        f"{result['settings']['preset']}: {result['settings']['peers']} peers, "
        f"{result['tokens_per_method']:,} tokens per method"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_study(settings: StudySettings, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run every (method, H) of ``settings``; return the JSON-ready result."""
    import torch

    begun = time.perf_counter()
    study = Study(settings, log)
    runs = []
    try:
        for label in settings.methods:
            method = METHODS[label]
            for h in [min(settings.hs)] if method.outer == "ddp" else settings.hs:
                log(f"{label} H={h if method.outer != 'ddp' else '-'}")
                runs.append(study.run(method, h))
                log(
                    f"  -> final val loss {runs[-1]['final_val_loss']:.4f} "
                    f"({runs[-1]['seconds']:.0f} s)"
                )
    finally:
        study.close()
    tokens = settings.peers * settings.steps * settings.batch * (settings.seq_len - 1)
    return {
        "settings": asdict(settings),
        "params": study.numel,
        "dense_fp32_bytes": 4 * study.numel,
        "tokens_per_method": tokens,
        "initial_val_loss": study.initial_val_loss,
        "table": table(runs, settings.hs),
        "claims": claims(runs, settings.hs),
        "runs": runs,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": settings.threads,
            "cpus": os.cpu_count(),
        },
        "seconds": round(time.perf_counter() - begun, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument(
        "--full", action="store_true", help="the long run: 180 inner steps of 4 sequences per peer"
    )
    ap.add_argument("--steps", type=int, help="inner steps per peer (default 30; --full 180)")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--batch", type=int, help="sequences per peer per step (2; --full 4)")
    ap.add_argument("--micro-batch", type=int, help="default: --batch")
    ap.add_argument("--hs", default="15,30", help="communication intervals H, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak inner learning rate")
    ap.add_argument("--eval-samples", type=int, help="validation sequences (32; --full 64)")
    ap.add_argument("--eval-batch", type=int, default=16, help="sequences per evaluation batch")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--data-dir", default=None, help="prepared data (default: .cache/data)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-documents", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here (else stdout)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="combine results of the same settings run as separate processes (method subsets)",
    )
    args = ap.parse_args(argv)
    if args.merge:
        result = merge([json.loads(path.read_text()) for path in args.merge])
        return _write(result, args)

    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    batch = args.batch or (4 if args.full else 2)
    settings = StudySettings(
        preset=args.preset,
        peers=args.peers,
        batch=batch,
        micro_batch=args.micro_batch or batch,
        steps=args.steps or (180 if args.full else 30),
        hs=tuple(int(x) for x in args.hs.split(",") if x),
        methods=tuple(x for x in args.methods.split(",") if x),
        lr=args.lr,
        eval_samples=args.eval_samples or (64 if args.full else 32),
        eval_batch=args.eval_batch,
        seed=args.seed,
        threads=args.threads,
        data_dir=args.data_dir,
        vocab=args.vocab,
        seq_len=args.seq_len,
        max_documents=args.max_documents,
        val_fraction=args.val_fraction,
    )
    return _write(run_study(settings), args)


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several processes' results of the same settings (other methods)."""
    first = results[0]
    keys = ("preset", "peers", "batch", "steps", "hs", "lr", "seed", "eval_samples")
    for other in results[1:]:
        if any(other["settings"][k] != first["settings"][k] for k in keys):
            raise SystemExit("--merge: the results were run with different settings")
        if other["initial_val_loss"] != first["initial_val_loss"]:
            raise SystemExit("--merge: the results start from different models or data")
    runs = [r for res in results for r in res["runs"]]
    hs = first["settings"]["hs"]
    out = dict(first)
    out["settings"] = dict(first["settings"], methods=[r["method"] for r in runs])
    out["runs"] = runs
    out["table"] = table(runs, hs)
    out["claims"] = claims(runs, hs)
    out["seconds"] = sum(res["seconds"] for res in results)
    out["merged_from"] = len(results)
    return out


def _write(result: dict[str, Any], args: argparse.Namespace) -> int:
    if not args.no_plot:
        path = args.plot or (
            args.out.with_suffix(".png") if args.out else Path("runs/study_outer.png")
        )
        result["plot"] = plot(result, path) or "matplotlib is not installed: no plot"
    text = json.dumps(result, indent=1, default=_jsonable)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        _log(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
