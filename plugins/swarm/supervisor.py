"""``covenant swarm``: miners and a validator as separate OS processes on one machine.

The supervisor only launches, watches and reports; the peers coordinate through the chain and
storage alone, exactly as they would on separate machines:

1. checks the plan before anything starts (process count against this machine, churn script,
   the run directory's run id) and prepares the corpus once;
2. generates a hotkey per role (``keys/``), registers them on the local chain (validator uid 0,
   the subnet owner uid 1 = the burn uid, then the miners), stakes the validator and commits
   each peer's read credentials (``v1|file://<its storage>``);
3. writes one config file per peer (the swarm config's shared sections plus the peer's own
   identity, storage and plugin allow-list) and starts the validator, then the miners (one of
   them a two-process TP=2 peer under torchrun); every child's output goes to ``logs/<peer>.log``;
4. drives the churn script (``kill miner 2 at window 4``, ``start miner 5 at window 6``,
   ``stop ...``, ``restart ...``; windows count from the run's start window), shows a live table
   and ends after ``windows`` windows: children are stopped with SIGTERM (they save and shut
   down cleanly), the report is written and its path printed.

A peer started again with an existing run directory resumes from its own last complete window
and catches up through the lead validator's records; a peer started for the first time catches
up from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from covenant.engine.config import parse_overrides
from covenant.engine.errors import ConfigError, CovenantError

log = logging.getLogger(__name__)

FORMAT = "covenant-swarm/1"
MINER_PLUGINS = ["model", "sparseloco", "storage", "chain", "jsonl"]
VALIDATOR_PLUGINS = ["model", "sparseloco", "gauntlet", "reward", "storage", "chain", "jsonl"]
SHARED_SECTIONS = (
    "run",
    "model",
    "optim",
    "data",
    "train",
    "outer",
    "sparseloco",
    "storage",
    "chain",
    "gauntlet",
    "reward",
    "adversaries",
    "jsonl",
)
_CHURN = re.compile(
    r"^(kill|stop|start|restart)\s+(validator|miner\s+(\d+))\s+at\s+window\s+(\d+)$"
)


class SwarmError(CovenantError):
    """The swarm's plan cannot run (bad churn script, too many processes, foreign run dir)."""


class SwarmSection(BaseModel):
    """``[swarm]``: the local swarm's supervisor (see docs/swarm.md)."""

    model_config = ConfigDict(extra="forbid")

    miners: int = Field(4, ge=1, le=64, description="miners started at the beginning")
    windows: int = Field(14, ge=1, description="K: the run ends after the validator's K-th window")
    tp2_miners: list[int] = Field(
        default_factory=lambda: [2], description="miners that run as two-process TP=2 peers"
    )
    adversaries: dict[int, str] = Field(
        default_factory=dict,
        description="miner index -> misbehaviour of the adversaries plugin (copier, noise...)",
    )
    churn: list[str] = Field(
        default_factory=list,
        description="'kill|stop|start|restart miner N|validator at window W' (W from the start)",
    )
    threads_per_process: int = Field(1, ge=1, description="OMP/torch threads of every child")
    max_processes_per_core: float = Field(
        4.0, gt=0, description="refuse plans with more processes than this per CPU core"
    )
    memory_per_process_mb: int = Field(
        700, ge=64, description="refuse plans whose processes need more than the free memory"
    )
    validator_stake: float = Field(100000.0, gt=0, description="stake given to the validator")
    startup_timeout_s: float = Field(
        600.0, gt=0, description="wait this long for the validator to publish start_window"
    )
    live: bool = Field(True, description="a live table on the console (else one line per window)")
    report: bool = Field(True, description="write report.html at the end")

    @field_validator("adversaries")
    @classmethod
    def _known(cls, value: dict[int, str]) -> dict[int, str]:
        allowed = {
            "copier",
            "partial_copier",
            "wrong_data",
            "noise",
            "stale",
            "late",
            "invalid",
            "forged",
            "replayed",
        }
        bad = {k: v for k, v in value.items() if v not in allowed}
        if bad:
            raise ValueError(f"unknown behaviour(s) {bad}; known: {', '.join(sorted(allowed))}")
        return value


@dataclass(frozen=True)
class ChurnEvent:
    action: str  # kill | stop | start | restart
    peer: str  # "validator" or "miner-N"
    window: int  # relative to the run's start window
    text: str


def parse_churn(lines: list[str], miners: int) -> list[ChurnEvent]:
    """Parse the churn script; names must be the validator or ``miner N`` with N >= 1."""
    events: list[ChurnEvent] = []
    for line in lines:
        m = _CHURN.match(line.strip().lower())
        if m is None:
            raise SwarmError(
                f"churn: cannot read {line!r} (expected e.g. 'kill miner 2 at window 4', "
                "'start miner 5 at window 6', 'restart validator at window 8')"
            )
        action, who, index, window = m.groups()
        if who != "validator":
            n = int(index)
            if n < 1:
                raise SwarmError(f"churn: {line!r}: miners are numbered from 1")
            if (
                n > miners
                and action != "start"
                and not any(e.peer == f"miner-{n}" and e.action == "start" for e in events)
            ):
                raise SwarmError(
                    f"churn: {line!r} names miner {n}, which is neither started at the "
                    f"beginning (miners = {miners}) nor by an earlier 'start miner {n}' line"
                )
            who = f"miner-{n}"
        events.append(ChurnEvent(action, who, int(window), line.strip()))
    return sorted(events, key=lambda e: e.window)


@dataclass
class Peer:
    name: str
    role: str
    index: int
    tp: int = 1
    adversary: str | None = None
    uid: int | None = None
    hotkey: str = ""
    proc: subprocess.Popen[bytes] | None = None
    started: int = 0
    log_file: Any = None

    @property
    def processes(self) -> int:
        return self.tp


@dataclass
class Swarm:
    """One swarm run (see the module docstring)."""

    config_path: Path
    data: dict[str, Any]
    cfg: SwarmSection
    run_id: str
    dir: Path
    python: str = sys.executable
    overrides: list[str] = field(default_factory=list)  # the user's --set, for every session
    peers: dict[str, Peer] = field(default_factory=dict)
    events: list[ChurnEvent] = field(default_factory=list)
    start_window: int | None = None
    created: float = field(default_factory=time.time)  # when this swarm started, kept

    # ------------------------------------------------------------------ planning

    @classmethod
    def plan(cls, session: Any, overrides: list[str]) -> Swarm:
        """Check everything that can be checked before a process starts."""
        from covenant.engine.config import read_toml, resolve_config_path

        cfg: SwarmSection = session.config.typed("swarm", SwarmSection)
        source = session.config.source
        if source is None:
            raise ConfigError("covenant swarm needs --config (e.g. --config swarm-cpu)")
        path = resolve_config_path(source)
        data = read_toml(path)
        for keys, value, _origin in parse_overrides(overrides):  # --set reaches the peers too
            node = data
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value
        run = session.config.section("run")
        swarm = cls(path, data, cfg, run.id, Path(run.dir).resolve(), overrides=list(overrides))
        swarm.events = parse_churn(cfg.churn, cfg.miners)
        total_miners = max(
            [cfg.miners]
            + [int(e.peer.split("-")[1]) for e in swarm.events if e.peer != "validator"]
        )
        swarm.peers["validator"] = Peer("validator", "validator", 0)
        for i in range(1, total_miners + 1):
            swarm.peers[f"miner-{i}"] = Peer(
                f"miner-{i}",
                "miner",
                i,
                tp=2 if i in cfg.tp2_miners else 1,
                adversary=cfg.adversaries.get(i),
            )
        unknown = [
            i for i in [*cfg.tp2_miners, *cfg.adversaries] if f"miner-{i}" not in swarm.peers
        ]
        if unknown:
            raise SwarmError(f"[swarm] names miners {unknown} that the swarm never starts")
        swarm._check_capacity()
        return swarm

    def _check_capacity(self) -> None:
        procs = sum(p.processes for p in self.peers.values()) + 1  # + the supervisor
        cores = os.cpu_count() or 1
        if procs > self.cfg.max_processes_per_core * cores:
            raise SwarmError(
                f"the swarm needs {procs} processes, more than this machine's {cores} cores can "
                f"hold at {self.cfg.max_processes_per_core:g} per core "
                "([swarm] miners, tp2_miners, churn)"
            )
        need_mb = procs * self.cfg.memory_per_process_mb
        free_mb = _available_mb()
        if free_mb is not None and need_mb > free_mb:
            raise SwarmError(
                f"the swarm needs about {need_mb} MB for {procs} processes; {free_mb} MB are free"
            )

    # ------------------------------------------------------------------ the run directory

    def prepare_dir(self, *, resume: bool) -> Path | None:
        """Check the run directory; a finished run of the same id is moved aside (never deleted).

        Returns where an older run was moved, if one was."""
        meta = self.dir / "swarm.json"
        if not self.dir.exists():
            if resume:
                raise SwarmError(f"--resume: {self.dir} does not exist")
            self.dir.mkdir(parents=True)
            return None
        if not meta.is_file():
            if any(self.dir.iterdir()):
                raise SwarmError(
                    f"{self.dir} exists and is not a swarm run directory (no swarm.json); "
                    "choose another [run] id or root"
                )
            return None
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SwarmError(f"{meta}: unreadable ({exc}); nothing was changed") from None
        if old.get("run_id") != self.run_id:
            raise SwarmError(
                f"{self.dir} holds run {old.get('run_id')!r}, not {self.run_id!r}; nothing was "
                "changed (choose another [run] root or id)"
            )
        if resume:
            created = old.get("created")
            if isinstance(created, int | float) and math.isfinite(created):
                self.created = float(created)  # a resumed swarm keeps its start time
            return None
        moved = self.dir.with_name(f"{self.dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        self.dir.rename(moved)
        self.dir.mkdir(parents=True)
        return moved

    def peer_dir(self, peer: Peer) -> Path:
        return self.dir / peer.name

    def peer_run_dir(self, peer: Peer) -> Path:
        return self.peer_dir(peer) / self.run_id

    def storage_dir(self, peer: Peer) -> Path:
        return self.peer_run_dir(peer) / "storage"

    # ------------------------------------------------------------------ identities and chain

    def setup_chain(self, chain: Any, initial: int) -> None:
        """Keys for every role, registrations of those that start now (the validator, the
        owner, the first ``initial`` miners), stake and commitments. Peers that join later
        register when they start."""
        from covenant.engine.keys import generate_hotkey, load_hotkey

        keys = self.dir / "keys"
        for name in ["validator", "owner", *[p for p in self.peers if p != "validator"]]:
            if not (keys / f"{name}.json").exists():
                generate_hotkey(keys, name)
        if self.peers["validator"].uid is None:
            self._register(chain, "validator")
        owner = load_hotkey(keys / "owner.json")
        owner_uid = chain.register(owner)
        validator = self.peers["validator"]
        chain.set_stake(validator.hotkey, self.cfg.validator_stake, validator_permit=True)
        for i in range(1, initial + 1):
            if self.peers[f"miner-{i}"].uid is None:
                self._register(chain, f"miner-{i}")
        log.info("validator uid %s, owner (burn) uid %d", validator.uid, owner_uid)

    def _register(self, chain: Any, name: str) -> None:
        from covenant.engine.keys import load_hotkey

        peer = self.peers[name]
        key = load_hotkey(self.dir / "keys" / f"{name}.json")
        peer.hotkey = key.ss58_address
        peer.uid = int(chain.register(key))
        store = self.storage_dir(peer)
        store.mkdir(parents=True, exist_ok=True)
        chain.commit(key, f"v1|{store.resolve().as_uri()}")

    # ------------------------------------------------------------------ configs and processes

    def peer_config(self, peer: Peer, data_dir: Path) -> Path:
        """Write ``<peer>/config.toml``: the shared sections plus the peer's own settings."""
        tree: dict[str, Any] = {
            k: dict(v) for k, v in self.data.items() if k in SHARED_SECTIONS and isinstance(v, dict)
        }
        plugins = list(VALIDATOR_PLUGINS if peer.role == "validator" else MINER_PLUGINS)
        if peer.adversary:
            plugins.append("adversaries")
            tree.setdefault("adversaries", {})["behaviour"] = peer.adversary
        # a section whose plugin the peer does not load would be an error in its config
        owned_by = {"gauntlet": "gauntlet", "reward": "reward", "adversaries": "adversaries"}
        for section, plugin in owned_by.items():
            if plugin not in plugins:
                tree.pop(section, None)
        tree["plugins"] = {"enable": plugins}
        tree.setdefault("run", {}).update({"id": self.run_id, "root": str(self.peer_dir(peer))})
        tree.setdefault("data", {})["dir"] = str(data_dir)
        tree.setdefault("chain", {}).update(
            {
                "name": "local",
                "db": str(self.dir / "chain.sqlite"),
                "hotkey": str(self.dir / "keys" / f"{peer.name}.json"),
            }
        )
        tree.setdefault("storage", {}).update(
            {"url": self.storage_dir(peer).resolve().as_uri(), "local_peers": True}
        )
        if peer.role == "miner":
            tree.setdefault("model", {})["tp"] = peer.tp
        path = self.peer_dir(peer) / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(tree), encoding="utf-8")
        return path

    def command(self, peer: Peer, config: Path, resume: bool) -> list[str]:
        cli = ["-m", "covenant.engine.cli.main"]
        if peer.role == "validator":
            return [self.python, *cli, "validate", "--config", str(config)]
        args = ["train", "--config", str(config), *(["--resume"] if resume else [])]
        if peer.tp > 1:
            return [
                self.python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(peer.tp),
                *cli,
                *args,
            ]
        return [self.python, *cli, *args]

    def start(self, peer: Peer, data_dir: Path, chain: Any) -> None:
        if peer.proc is not None and peer.proc.poll() is None:
            return
        if peer.uid is None:
            self._register(chain, peer.name)
        config = self.peer_config(peer, data_dir)
        resume = (self.peer_run_dir(peer) / "checkpoints" / "latest").is_file()
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        peer.log_file = (logs / f"{peer.name}.log").open("ab")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.cfg.threads_per_process),
            "MKL_NUM_THREADS": str(self.cfg.threads_per_process),
            "PYTHONUNBUFFERED": "1",
            "WANDB_SILENT": "true",
            "COLUMNS": "120",
        }
        env.pop("COVENANT_PLUGINS", None)
        peer.proc = subprocess.Popen(
            self.command(peer, config, resume),
            stdout=peer.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: signals reach torchrun's workers
        )
        peer.started += 1
        self.event(
            "start" if peer.started == 1 else "restart", peer.name, "resumed" if resume else ""
        )

    def signal(self, peer: Peer, sig: int, wait_s: float) -> int | None:
        proc = peer.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if peer.log_file is not None:
            peer.log_file.close()
        return proc.returncode

    def stop_all(self, wait_s: float) -> dict[str, int | None]:
        """SIGTERM to every running peer at once (they shut down in parallel), then wait up to
        ``wait_s`` in all; a peer still running then is killed. Returns the exit statuses."""
        peers = list(self.running())
        for peer in peers:
            assert peer.proc is not None
            try:
                os.killpg(peer.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        codes: dict[str, int | None] = {}
        for peer in peers:
            codes[peer.name] = self.signal(peer, 0, max(0.0, deadline - time.monotonic()))
        return codes

    def event(self, event: str, peer: str, detail: str = "", window: int | None = None) -> None:
        line = {
            "time": time.time(),
            "window": window,
            "event": event,
            "peer": peer,
            "detail": detail,
        }
        with (self.dir / "events.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def write_meta(self, chain: Any) -> None:
        peers = []
        for p in self.peers.values():
            peers.append(
                {
                    "name": p.name,
                    "role": p.role,
                    "uid": p.uid,
                    "hotkey": p.hotkey,
                    "layout": f"tp={p.tp}",
                    "adversary": p.adversary,
                    "run_dir": str(self.peer_run_dir(p).relative_to(self.dir)),
                }
            )
        meta = {
            "format": FORMAT,
            "run_id": self.run_id,
            "created": self.created,  # the start, not this rewrite (a late join rewrites)
            "config": str(self.config_path),
            "windows": self.cfg.windows,
            "start_window": self.start_window,
            "blocks_per_window": chain.blocks_per_window,
            "block_time_s": getattr(chain, "block_time_s", None),
            "burn_uid": self.data.get("gauntlet", {}).get("burn_uid", 1),
            "churn": [e.text for e in self.events],
            "peers": peers,
        }
        tmp = self.dir / ".swarm.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.replace(tmp, self.dir / "swarm.json")

    def running(self) -> Iterator[Peer]:
        for p in self.peers.values():
            if p.proc is not None and p.proc.poll() is None:
                yield p


def to_toml(tree: Mapping[str, Any]) -> str:
    """A minimal TOML writer for config trees of scalars, lists and one level of sub-tables."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"cannot write a non-finite number ({v}) to a peer config")
            return json.dumps(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ConfigError(f"cannot write {type(v).__name__} to a peer config")

    for section, body in tree.items():
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        lines.append(f"[{section}]")
        for k, v in body.items():
            if not isinstance(v, dict):
                lines.append(f"{json.dumps(str(k))} = {value(v)}")
        for sub, sbody in subs.items():
            lines.append(f"[{section}.{json.dumps(str(sub))}]")
            for k, v in sbody.items():
                lines.append(f"{json.dumps(str(k))} = {value(v)}")
        lines.append("")
    return "\n".join(lines)


def _available_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["ChurnEvent", "Swarm", "SwarmError", "SwarmSection", "parse_churn", "to_toml"]
