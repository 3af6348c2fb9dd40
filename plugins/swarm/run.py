"""Running a :class:`~covenant.plugins.swarm.supervisor.Swarm`: start, churn, watch, stop, report.

The live view reads only what the peers write anyway (each one's ``metrics.jsonl``, the
validator's score records) and the chain; the supervisor never talks to a peer.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from covenant.plugins.swarm.supervisor import Peer, Swarm, SwarmError

log = logging.getLogger(__name__)
POLL_S = 1.0


class Watch:
    """The latest numbers of every peer, read incrementally from the files they write."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.offsets: dict[Path, int] = {}
        self.windows: dict[str, dict[str, Any]] = {}  # peer -> last window line
        self.validator: dict[str, Any] = {}  # last validator line
        self.records: dict[int, dict[str, Any]] = {}  # uid -> last score record
        self.weights: dict[str, float] = {}
        self.processed = -1

    def _lines(self, path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        out = []
        with path.open("rb") as f:
            f.seek(self.offsets.get(path, 0))
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offsets[path] = self.offsets.get(path, 0) + end
        for raw in data[:end].splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                out.append(line)
        return out

    def poll(self) -> None:
        sw = self.swarm
        for peer in sw.peers.values():
            for line in self._lines(sw.peer_run_dir(peer) / "metrics.jsonl"):
                if line.get("kind") == "window":
                    self.windows[peer.name] = line
                elif line.get("kind") == "validator":
                    self.validator = line
                    self.processed = max(self.processed, int(line.get("window", -1)))
        if self.processed >= 0:
            folder = sw.peer_run_dir(sw.peers["validator"]) / "records" / str(self.processed)
            for path in folder.glob("*.json"):
                try:
                    body = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if path.stem == "window":
                    self.weights = dict(body.get("weights") or self.weights)
                elif path.stem.isdigit():
                    self.records[int(path.stem)] = body.get("record", {}).get("score", {})

    def table(self, chain_window: int | None) -> Table:
        sw = self.swarm
        start = sw.start_window
        title = "covenant swarm"
        if chain_window is not None:
            rel = f" (run window {chain_window - start})" if start is not None else ""
            title += f" · chain window {chain_window}{rel}"
        val = self.validator.get("val_loss")
        if isinstance(val, float):
            title += f" · global held-out loss {val:.4f}"
        table = Table(title=title, title_justify="left")
        for col in (
            "peer",
            "uid",
            "state",
            "train loss",
            "up KB",
            "x dense",
            "sync",
            "score",
            "rating",
            "weight",
        ):
            table.add_column(col, justify="left" if col in ("peer", "state") else "right")
        for peer in sw.peers.values():
            if peer.role != "miner":
                continue
            w = self.windows.get(peer.name, {})
            rec = self.records.get(peer.uid, {}) if peer.uid is not None else {}
            match = rec.get("match") or {}
            rating = match.get("rating_after")
            sync = (rec.get("sync") or {}).get("sync")
            score = (rec.get("evaluation") or {}).get("score")
            weight = self.weights.get(str(peer.uid))
            up, dense = w.get("bytes_up"), w.get("bytes_dense")
            tag = f"{peer.name}" + (" [tp=2]" if peer.tp > 1 else "")
            tag += f" ({peer.adversary})" if peer.adversary else ""
            table.add_row(
                tag,
                "-" if peer.uid is None else str(peer.uid),
                _state(peer),
                _num(w.get("loss"), ".3f"),
                _num(up / 1024 if isinstance(up, float) else None, ".0f"),
                _num(
                    dense / up
                    if isinstance(up, float) and up and isinstance(dense, float)
                    else None,
                    ".0f",
                ),
                _num(sync, ".2f"),
                _num(score, ".4f"),
                _num(rating[0] - 3 * rating[1] if rating else None, ".2f"),
                _num(weight, ".3f"),
            )
        return table


class _NoLive:
    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *_: object) -> None:
        return None


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, int | float) else "-"


def _state(peer: Peer) -> str:
    if peer.proc is None:
        return "not started"
    rc = peer.proc.poll()
    if rc is None:
        return "running"
    return "stopped" if rc in (0, 130, -15) else f"exited {rc}"


def run_swarm(
    swarm: Swarm,
    session: Any,
    *,
    resume: bool = False,
    console: Console | None = None,
    write_report: Callable[[Path], Path] | None = None,
) -> dict[str, Any]:
    """Run the swarm until its last window (or Ctrl-C); returns a summary."""
    from covenant.engine.data.config import DataConfig
    from covenant.engine.data.prepare import default_data_dir, prepare_from_config
    from covenant.engine.session import open_session

    out = console or Console(stderr=True)
    moved = swarm.prepare_dir(resume=resume)
    if moved is not None:
        out.print(f"an earlier run of {swarm.run_id!r} was moved to {moved}")
    data_cfg: DataConfig = session.config.section("data")
    out.print("preparing the corpus (once; cached afterwards)")
    prepare_from_config(data_cfg)
    data_dir = Path(data_cfg.dir if data_cfg.dir is not None else default_data_dir()).resolve()
    chain = session.hook.covenant_chain(config=session.config)
    if chain is None:
        raise SwarmError("the swarm needs the chain plugin (enable 'chain')")
    swarm.setup_chain(chain, swarm.cfg.miners)
    observer = open_session(
        swarm.config_path,
        [
            *swarm.overrides,
            f'chain.hotkey="{swarm.dir / "keys" / "owner.json"}"',
            f'chain.db="{swarm.dir / "chain.sqlite"}"',
            f'storage.url="{(swarm.dir / "owner" / "storage").resolve().as_uri()}"',
            "storage.local_peers=true",
        ],
    )
    exchange = observer.services.exchange
    swarm.write_meta(chain)
    stopping = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stopping["flag"] = True

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    watch = Watch(swarm)
    summary: dict[str, Any] = {"run_dir": str(swarm.dir)}
    try:
        # Every process starts at once (they wait for the run's start window themselves):
        # start-up is mostly imports, and on a small machine it is the longest wait.
        swarm.start(swarm.peers["validator"], data_dir, chain)
        for i in range(1, swarm.cfg.miners + 1):
            swarm.start(swarm.peers[f"miner-{i}"], data_dir, chain)
        out.print(
            f"validator and {swarm.cfg.miners} miners starting (logs in {swarm.dir / 'logs'})"
        )
        swarm.start_window = _wait_start(swarm, exchange, stopping)
        swarm.write_meta(chain)
        out.print(f"run windows {swarm.start_window}..{swarm.start_window + swarm.cfg.windows - 1}")
        pending = list(swarm.events)
        last = swarm.start_window + swarm.cfg.windows - 1
        live_on = swarm.cfg.live and out.is_terminal
        with (
            Live(watch.table(None), console=out, refresh_per_second=1, transient=False)
            if live_on
            else _NoLive() as live
        ):
            while not stopping["flag"]:
                current = int(chain.block()) // chain.blocks_per_window
                rel = current - swarm.start_window
                while pending and pending[0].window <= rel:
                    event = pending.pop(0)
                    _apply(swarm, event, data_dir, chain, current)
                    swarm.write_meta(chain)
                for peer in swarm.peers.values():
                    if (
                        peer.proc is not None
                        and peer.proc.poll() is not None
                        and not getattr(peer, "_reported", False)
                    ):
                        swarm.event(
                            "exit", peer.name, f"exit status {peer.proc.returncode}", current
                        )
                        peer._reported = True  # type: ignore[attr-defined]
                before = watch.processed
                watch.poll()
                if swarm.cfg.live and out.is_terminal:
                    live.update(watch.table(current))
                elif watch.processed > before:
                    # not a terminal (a log file): one full-width table per processed window
                    out.print(watch.table(current), width=max(out.width, 132))
                if watch.processed >= last:
                    break
                if (
                    swarm.peers["validator"].proc is not None
                    and swarm.peers["validator"].proc.poll() is not None
                    and not any(
                        e.peer == "validator" and e.action in ("start", "restart") for e in pending
                    )
                ):
                    raise SwarmError(
                        f"the validator exited (see {swarm.dir / 'logs' / 'validator.log'})"
                    )
                time.sleep(POLL_S)
        summary["interrupted"] = stopping["flag"]
    finally:
        for name, rc in swarm.stop_all(60.0).items():
            swarm.event("stop", name, f"end of run (exit status {rc})")
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    summary["windows_processed"] = watch.processed
    if write_report is not None and swarm.cfg.report:
        try:
            summary["report"] = str(write_report(swarm.dir))
        except Exception as exc:  # the run is done; a report failure must not hide it
            log.error("writing the report failed: %s", exc, exc_info=True)
    return summary


def _wait_start(swarm: Swarm, exchange: Any, stopping: dict[str, bool]) -> int:
    waited = 0.0
    while waited < swarm.cfg.startup_timeout_s and not stopping["flag"]:
        start = exchange.start_window()
        if start is not None:
            return int(start)
        proc = swarm.peers["validator"].proc
        if proc is not None and proc.poll() is not None:
            raise SwarmError(
                f"the validator exited during start-up (see {swarm.dir / 'logs' / 'validator.log'})"
            )
        time.sleep(POLL_S)
        waited += POLL_S
    raise SwarmError("the validator did not publish a start window in time")


def _apply(swarm: Swarm, event: Any, data_dir: Path, chain: Any, window: int) -> None:
    peer = swarm.peers[event.peer]
    if event.action == "kill":
        rc = swarm.signal(peer, signal.SIGKILL, 10.0)
        swarm.event("kill", peer.name, f"{event.text} (exit status {rc})", window)
    elif event.action == "stop":
        rc = swarm.signal(peer, signal.SIGTERM, 60.0)
        swarm.event("stop", peer.name, f"{event.text} (exit status {rc})", window)
    elif event.action == "restart":
        swarm.signal(peer, signal.SIGKILL, 10.0)
        swarm.event("kill", peer.name, event.text, window)
        swarm.start(peer, data_dir, chain)
    else:
        swarm.start(peer, data_dir, chain)
        if peer.started == 1:
            swarm.event("join", peer.name, event.text, window)


__all__ = ["Watch", "run_swarm"]
