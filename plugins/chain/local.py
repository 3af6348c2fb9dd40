"""The local chain: an embedded SQLite "chain" in the run directory.

Miners and validators of a local swarm (several processes, one machine or one shared folder)
open the same database and see the same blocks, registrations, stakes, commitments and weights.

* **Clock.** The genesis timestamp and a random genesis seed are written once, by whichever
  process creates the database. In ``wall`` mode every process computes
  ``block = floor((now - genesis) / block_time)`` from its own wall clock, so they agree without
  talking; ``t(b) = genesis + b * block_time``. In ``manual`` mode (tests) the block only moves
  when someone calls :meth:`LocalChain.advance`. Block hashes are
  ``blake2b(genesis_seed || block)``: deterministic per chain, unpredictable before genesis,
  which is what the validator's ``eval_seed`` needs.
* **Signed writes.** Registration, commitments and weights are *extrinsics*: an operation, the
  hotkey's ss58 address, a per-hotkey nonce, the block it was signed at and a payload, signed
  with sr25519 over a canonical JSON message bound to this chain's genesis seed. The database
  side verifies it exactly as a real chain would (signature against the ss58 address, nonce,
  mortality) before applying it, so a forged, replayed or stale write is refused.
* **Atomicity.** WAL journal, a busy timeout, and every write in one ``BEGIN IMMEDIATE``
  transaction that either commits whole or rolls back: the database is never half-written, even
  if the process dies mid-write. A lock held past the timeout is retried with backoff, then
  reported as :class:`ChainUnavailableError`.
* **Admin.** Stake and validator permits are set by an unsigned admin call (the swarm launcher
  plays the role of the stakers).
* **Reads are untrusted.** Anyone who can write the shared folder can write any row, and SQLite
  stores any type in any column; every value read back is checked for type and range
  (:mod:`covenant.plugins.chain.validation`) and a malformed one is a :class:`ChainError`
  (a malformed commitment row is skipped, like an invalid commitment), never a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from covenant.engine.errors import ConfigError
from covenant.engine.keys import load_hotkey, verify_signature
from covenant.engine.protocols import (
    ChainError,
    ChainUnavailableError,
    Commitment,
    Neuron,
    NotRegisteredError,
    WeightsResult,
)
from covenant.plugins.chain.config import ChainConfig
from covenant.plugins.chain.validation import (
    MAX_UID,
    check_block,
    check_hotkey,
    check_neuron,
    parse_weight_pairs,
    prepare_weights,
    validate_commitment,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SIGNING_DOMAIN = b"covenant-local-chain/v1\n"
OPS = ("register", "commit", "set_weights")
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS neurons (
    uid INTEGER PRIMARY KEY,
    hotkey TEXT NOT NULL UNIQUE,
    stake REAL NOT NULL DEFAULT 0,
    validator_permit INTEGER NOT NULL DEFAULT 0,
    registered_block INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (hotkey TEXT PRIMARY KEY, nonce INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commitments (
    hotkey TEXT PRIMARY KEY, data TEXT NOT NULL, block INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS weights (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    block INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    hotkey TEXT NOT NULL,
    weights TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS weights_by_uid ON weights (uid, hotkey, block);
CREATE TABLE IF NOT EXISTS extrinsics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    block INTEGER NOT NULL,
    hotkey TEXT NOT NULL,
    op TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    payload TEXT NOT NULL,
    signature TEXT NOT NULL
);
"""


class RateLimitedError(ChainError):
    """A weight set came sooner than the rate limit allows."""


class InvalidExtrinsicError(ChainError):
    """A signed write failed verification (signature, nonce, mortality, payload)."""


@dataclass(frozen=True)
class SignedExtrinsic:
    """A signed write, as it would travel to a chain node."""

    op: str
    hotkey: str
    nonce: int
    block: int
    payload: dict[str, Any]
    signature: bytes = field(repr=False)


@dataclass(frozen=True)
class WeightsRecord:
    """One weight set in the history."""

    block: int
    uid: int
    hotkey: str
    weights: dict[int, float]


def signing_message(
    chain_id: str, op: str, hotkey: str, nonce: int, block: int, payload: Mapping[str, Any]
) -> bytes:
    """The exact bytes a local-chain extrinsic signs (canonical JSON, bound to the chain)."""
    body = {
        "chain": chain_id,
        "op": op,
        "hotkey": hotkey,
        "nonce": nonce,
        "block": block,
        "payload": payload,
    }
    return (
        SIGNING_DOMAIN
        + json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    )


class LocalChain:
    """The :class:`covenant.engine.protocols.Chain` over a shared SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        blocks_per_window: int = 10,
        block_time_s: float = 0.5,
        clock: str = "wall",
        commitment_max_bytes: int = 128,
        max_uids: int = 256,
        weights_rate_limit_blocks: int = 1,
        extrinsic_mortality_blocks: int = 64,
        busy_timeout_s: float = 30.0,
        poll_interval_s: float = 0.05,
        retries: int = 3,
        retry_backoff_s: float = 1.0,
        retry_backoff_max_s: float = 30.0,
        time_fn: Callable[[], float] = time.time,
        sleep_fn: Callable[[float], None] = time.sleep,
    ) -> None:
        if clock not in ("wall", "manual"):
            raise ConfigError(f"[chain] clock must be 'wall' or 'manual', got {clock!r}")
        self.path = Path(path)
        self.blocks_per_window = blocks_per_window
        self.block_time_s = block_time_s
        self.clock = clock
        self.commitment_max_bytes = commitment_max_bytes
        self.max_uids = max_uids
        self.weights_rate_limit_blocks = weights_rate_limit_blocks
        self.extrinsic_mortality_blocks = extrinsic_mortality_blocks
        self.busy_timeout_s = busy_timeout_s
        self.poll_interval_s = poll_interval_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self._time = time_fn
        self._sleep = sleep_fn
        self._lock = threading.RLock()
        self._conn_obj: sqlite3.Connection | None = None
        self._conn_pid: int | None = None
        self.genesis_time = 0.0
        self.chain_id = ""
        self._genesis_seed = b""
        self._initialise()

    @classmethod
    def from_config(cls, cfg: ChainConfig, run_dir: Path, **kwargs: Any) -> LocalChain:
        return cls(
            cfg.db_path(run_dir),
            blocks_per_window=cfg.blocks_per_window,
            block_time_s=cfg.block_time_s,
            clock=cfg.clock,
            commitment_max_bytes=cfg.commitment_max_bytes,
            max_uids=cfg.max_uids,
            weights_rate_limit_blocks=cfg.weights_rate_limit_blocks,
            extrinsic_mortality_blocks=cfg.extrinsic_mortality_blocks,
            busy_timeout_s=cfg.busy_timeout_s,
            poll_interval_s=cfg.poll_interval_s,
            retries=cfg.retries,
            retry_backoff_s=cfg.retry_backoff_s,
            retry_backoff_max_s=cfg.retry_backoff_max_s,
            **kwargs,
        )

    # -- database plumbing ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        # One connection per process: a connection inherited through fork must not be reused.
        pid = os.getpid()
        if self._conn_obj is None or self._conn_pid != pid:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,  # explicit BEGIN IMMEDIATE / COMMIT below
                check_same_thread=False,  # guarded by self._lock
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn_obj, self._conn_pid = conn, pid
        return self._conn_obj

    def close(self) -> None:
        with self._lock:
            if self._conn_obj is not None and self._conn_pid == os.getpid():
                self._conn_obj.close()
            self._conn_obj = None

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; on a lock held past the busy timeout, back off and retry, then give up."""
        for attempt in range(self.retries):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                transient = any(s in str(exc) for s in ("locked", "busy", "unable to open"))
                if not transient:
                    raise ChainError(f"local chain {self.path}: {what} failed: {exc}") from exc
                if attempt == self.retries - 1:
                    raise ChainUnavailableError(
                        f"local chain {self.path}: {what} failed after {self.retries} tries: {exc}"
                    ) from exc
                delay = (
                    min(self.retry_backoff_max_s, self.retry_backoff_s * 2**attempt)
                    + random.random() * 0.1
                )
                log.warning(
                    "local chain %s busy (%s); retry %d in %.1fs",
                    self.path,
                    exc,
                    attempt + 1,
                    delay,
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commits whole or rolls back whole."""
        with self._lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._lock:
                return fn(self._conn())

        return self._retrying(what, run)

    def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._transaction() as conn:
                return fn(conn)

        return self._retrying(what, run)

    def _initialise(self) -> None:
        def init(conn: sqlite3.Connection) -> dict[str, str]:
            # executescript() would COMMIT the open transaction first; run statement by statement.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                meta = {
                    "schema_version": str(SCHEMA_VERSION),
                    "genesis_time": repr(self._time()),
                    "genesis_seed": secrets.token_hex(32),
                    "block_time_s": repr(self.block_time_s),
                    "blocks_per_window": str(self.blocks_per_window),
                    "clock": self.clock,
                    "manual_block": "0",
                }
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)", sorted(meta.items())
                )
                log.info("created local chain %s (genesis %s)", self.path, meta["genesis_time"])
            return meta

        meta = self._write("initialise", init)
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ChainError(
                f"local chain {self.path}: schema version {_short(meta.get('schema_version'))} "
                f"is not {SCHEMA_VERSION}; start a new run directory"
            )
        # Every process must run the same clock, or they would disagree on blocks and windows.
        try:
            stored = {
                "block_time_s": float(meta["block_time_s"]),
                "blocks_per_window": int(meta["blocks_per_window"]),
                "clock": meta["clock"],
            }
            genesis_time = float(meta["genesis_time"])
            genesis_seed = bytes.fromhex(meta["genesis_seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ChainError(f"local chain {self.path}: malformed meta table ({exc})") from None
        if not math.isfinite(genesis_time) or len(genesis_seed) != 32:
            raise ChainError(f"local chain {self.path}: malformed genesis in the meta table")
        ours = {
            "block_time_s": self.block_time_s,
            "blocks_per_window": self.blocks_per_window,
            "clock": self.clock,
        }
        for key, value in stored.items():
            if value != ours[key]:
                raise ConfigError(
                    f"[chain] {key} = {ours[key]!r}, but the local chain {self.path} was created with "
                    f"{value!r}; every process of a swarm must use the same value (or a new run dir)"
                )
        self.genesis_time = genesis_time
        self._genesis_seed = genesis_seed
        self.chain_id = hashlib.blake2b(self._genesis_seed, digest_size=16).hexdigest()

    # -- clock ----------------------------------------------------------------------------------

    def _block_in(self, conn: sqlite3.Connection) -> int:
        if self.clock == "manual":
            row = conn.execute("SELECT value FROM meta WHERE key = 'manual_block'").fetchone()
            value = row[0] if row is not None else None
            if not isinstance(value, str) or not value.isdigit() or len(value) > 19:
                raise ChainError(f"local chain {self.path}: malformed manual block {_short(value)}")
            return check_block(int(value), "manual block")
        return max(0, math.floor((self._time() - self.genesis_time) / self.block_time_s))

    def block(self) -> int:
        if self.clock == "wall":
            return max(0, math.floor((self._time() - self.genesis_time) / self.block_time_s))
        return self._read("read the block", self._block_in)

    def block_timestamp(self, block: int) -> float:
        if block < 0:
            raise ValueError(f"block must be >= 0, got {block}")
        return self.genesis_time + block * self.block_time_s

    def block_hash(self, block: int) -> str:
        current = self.block()
        if block < 0 or block > current:
            raise ChainError(f"block {block} has no hash yet (current block {current})")
        digest = hashlib.blake2b(self._genesis_seed + block.to_bytes(8, "big"), digest_size=32)
        return "0x" + digest.hexdigest()

    def advance(self, blocks: int = 1) -> int:
        """Manual clock: move the chain forward ``blocks`` blocks; return the new block."""
        if self.clock != "manual":
            raise ChainError(
                "advance() needs [chain] clock = 'manual' (the wall clock moves by itself)"
            )
        if blocks < 0:
            raise ValueError(f"cannot move the chain backwards ({blocks} blocks)")

        def step(conn: sqlite3.Connection) -> int:
            new = self._block_in(conn) + blocks
            conn.execute("UPDATE meta SET value = ? WHERE key = 'manual_block'", (str(new),))
            return new

        return self._write("advance the clock", step)

    def wait_for_block(self, block: int, timeout_s: float | None = None) -> int:
        deadline = None if timeout_s is None else self._time() + timeout_s
        while True:
            current = self.block()
            if current >= block:
                return current
            now = self._time()
            if deadline is not None and now >= deadline:
                return current
            if self.clock == "wall":
                pause = max(0.001, self.block_timestamp(block) - now + 1e-4)
            else:
                pause = self.poll_interval_s
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - now))
            self._sleep(pause)

    # -- reads ----------------------------------------------------------------------------------

    def metagraph(self) -> list[Neuron]:
        rows = self._read(
            "read the metagraph",
            lambda c: c.execute(
                "SELECT uid, hotkey, stake, validator_permit FROM neurons ORDER BY uid"
            ).fetchall(),
        )
        try:
            return [check_neuron(u, h, s, p) for u, h, s, p in rows]
        except ChainError as exc:
            raise ChainError(f"local chain {self.path}: malformed neurons row: {exc}") from None

    def uid_of(self, hotkey_ss58: str) -> int | None:
        row = self._read(
            "look up a uid",
            lambda c: c.execute(
                "SELECT uid FROM neurons WHERE hotkey = ?", (hotkey_ss58,)
            ).fetchone(),
        )
        if row is None:
            return None
        if isinstance(row[0], bool) or not isinstance(row[0], int) or not 0 <= row[0] <= MAX_UID:
            raise ChainError(f"local chain {self.path}: malformed uid {_short(row[0])}")
        return int(row[0])

    def commitments(self) -> dict[str, Commitment]:
        rows = self._read(
            "read commitments",
            lambda c: c.execute(
                "SELECT c.hotkey, c.data, c.block FROM commitments c "
                "JOIN neurons n ON n.hotkey = c.hotkey ORDER BY n.uid"
            ).fetchall(),
        )
        out: dict[str, Commitment] = {}
        for hotkey, data, block in rows:
            try:
                check_hotkey(hotkey, "commitment hotkey")
                check_block(block, "commitment block")
                validate_commitment(data, self.commitment_max_bytes)
            except ChainError as exc:  # CommitmentError is a ChainError
                log.warning("skipping the commitment of %s: %s", _short(hotkey), exc)
                continue
            out[hotkey] = Commitment(hotkey=hotkey, data=data, block=block)
        return out

    def weights_history(self, limit: int = 100) -> list[WeightsRecord]:
        """The latest ``limit`` weight sets, newest first."""
        rows = self._read(
            "read weights",
            lambda c: c.execute(
                "SELECT block, uid, hotkey, weights FROM weights ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall(),
        )
        try:
            return [
                WeightsRecord(
                    check_block(b),
                    check_neuron(u, h, 0, 0).uid,
                    check_hotkey(h),
                    parse_weight_pairs(w, f"weights of uid {_short(u)}"),
                )
                for b, u, h, w in rows
            ]
        except ChainError as exc:
            raise ChainError(f"local chain {self.path}: malformed weights row: {exc}") from None

    def last_weights_block(self) -> dict[int, int]:
        """uid -> block of its current hotkey's latest weight set."""
        rows = self._read(
            "read weights",
            lambda c: c.execute(
                "SELECT w.uid, MAX(w.block) FROM weights w JOIN neurons n "
                "ON n.uid = w.uid AND n.hotkey = w.hotkey GROUP BY w.uid"
            ).fetchall(),
        )
        try:
            return {check_neuron(u, "-", 0, 0).uid: check_block(b) for u, b in rows}
        except ChainError as exc:
            raise ChainError(f"local chain {self.path}: malformed weights row: {exc}") from None

    # -- admin (unsigned: the swarm launcher plays the stakers) -------------------------------

    def set_stake(
        self, hotkey_ss58: str, stake: float, validator_permit: bool | None = None
    ) -> None:
        if not math.isfinite(stake) or stake < 0:
            raise ChainError(f"stake must be a finite non-negative number, got {stake}")

        def apply(conn: sqlite3.Connection) -> None:
            if (
                conn.execute("SELECT 1 FROM neurons WHERE hotkey = ?", (hotkey_ss58,)).fetchone()
                is None
            ):
                raise NotRegisteredError(
                    f"hotkey {hotkey_ss58} is not registered on the local chain"
                )
            conn.execute(
                "UPDATE neurons SET stake = ? WHERE hotkey = ?", (float(stake), hotkey_ss58)
            )
            if validator_permit is not None:
                conn.execute(
                    "UPDATE neurons SET validator_permit = ? WHERE hotkey = ?",
                    (int(validator_permit), hotkey_ss58),
                )

        self._write("set stake", apply)

    # -- signed writes --------------------------------------------------------------------------

    def sign(self, hotkey: Any, op: str, payload: Mapping[str, Any]) -> SignedExtrinsic:
        """Build and sign an extrinsic at the current block and nonce (does not submit it)."""
        keypair = load_hotkey(hotkey)

        def state(conn: sqlite3.Connection) -> tuple[int, int]:
            return self._block_in(conn), self._nonce(conn, keypair.ss58_address)

        block, nonce = self._read("read the nonce", state)
        return self._signed(keypair, op, nonce, block, payload)

    def _signed(
        self, keypair: Any, op: str, nonce: int, block: int, payload: Mapping[str, Any]
    ) -> SignedExtrinsic:
        message = signing_message(self.chain_id, op, keypair.ss58_address, nonce, block, payload)
        return SignedExtrinsic(
            op, keypair.ss58_address, nonce, block, dict(payload), bytes(keypair.sign(message))
        )

    def submit(self, extrinsic: SignedExtrinsic) -> Any:
        """Verify and apply a signed extrinsic in one transaction; return the op's result."""
        return self._write(f"apply {extrinsic.op}", lambda conn: self._apply(conn, extrinsic))

    def _sign_and_submit(self, hotkey: Any, op: str, payload: Mapping[str, Any]) -> Any:
        keypair = load_hotkey(hotkey)

        def run(conn: sqlite3.Connection) -> Any:
            # Nonce and block read in the same transaction as the apply: no race between
            # processes sharing a hotkey.
            ext = self._signed(
                keypair, op, self._nonce(conn, keypair.ss58_address), self._block_in(conn), payload
            )
            return self._apply(conn, ext)

        return self._write(f"apply {op}", run)

    @staticmethod
    def _nonce(conn: sqlite3.Connection, hotkey: str) -> int:
        row = conn.execute("SELECT nonce FROM nonces WHERE hotkey = ?", (hotkey,)).fetchone()
        return 0 if row is None else check_block(row[0], "nonce")

    def _apply(self, conn: sqlite3.Connection, ext: SignedExtrinsic) -> Any:
        """The node side: check everything about an untrusted extrinsic, then apply it."""
        if ext.op not in OPS:
            raise InvalidExtrinsicError(f"unknown operation {ext.op!r}")
        try:
            message = signing_message(
                self.chain_id, ext.op, ext.hotkey, ext.nonce, ext.block, ext.payload
            )
        except (TypeError, ValueError) as exc:
            raise InvalidExtrinsicError(
                f"{ext.op} from {ext.hotkey}: payload is not canonical JSON ({exc})"
            ) from None
        if not verify_signature(ext.hotkey, message, ext.signature):
            raise InvalidExtrinsicError(f"{ext.op} from {ext.hotkey}: bad signature")
        expected = self._nonce(conn, ext.hotkey)
        if ext.nonce != expected:
            raise InvalidExtrinsicError(
                f"{ext.op} from {ext.hotkey}: nonce {ext.nonce} is stale or from the future (expected {expected})"
            )
        current = self._block_in(conn)
        if ext.block > current or current - ext.block > self.extrinsic_mortality_blocks:
            raise InvalidExtrinsicError(
                f"{ext.op} from {ext.hotkey}: signed at block {ext.block}, outside the "
                f"{self.extrinsic_mortality_blocks}-block era ending at {current}"
            )
        result = getattr(self, f"_op_{ext.op}")(conn, ext, current)
        conn.execute(
            "INSERT INTO nonces (hotkey, nonce) VALUES (?, ?) ON CONFLICT(hotkey) DO UPDATE SET nonce = excluded.nonce",
            (ext.hotkey, expected + 1),
        )
        conn.execute(
            "INSERT INTO extrinsics (block, hotkey, op, nonce, payload, signature) VALUES (?, ?, ?, ?, ?, ?)",
            (
                current,
                ext.hotkey,
                ext.op,
                ext.nonce,
                json.dumps(ext.payload, sort_keys=True),
                ext.signature.hex(),
            ),
        )
        return result

    def _op_register(self, conn: sqlite3.Connection, ext: SignedExtrinsic, block: int) -> int:
        row = conn.execute("SELECT uid FROM neurons WHERE hotkey = ?", (ext.hotkey,)).fetchone()
        if row is not None:
            return int(row[0])
        count = int(conn.execute("SELECT COUNT(*) FROM neurons").fetchone()[0])
        if count < self.max_uids:
            uid = count
            conn.execute(
                "INSERT INTO neurons (uid, hotkey, stake, validator_permit, registered_block) VALUES (?, ?, 0, 0, ?)",
                (uid, ext.hotkey, block),
            )
            log.info("registered %s as uid %d at block %d", ext.hotkey, uid, block)
            return uid
        # Full: like the real chain, the weakest neuron (no permit, least stake, oldest) loses its uid.
        uid, old = conn.execute(
            "SELECT uid, hotkey FROM neurons ORDER BY validator_permit, stake, registered_block, uid LIMIT 1"
        ).fetchone()
        conn.execute(
            "UPDATE neurons SET hotkey = ?, stake = 0, validator_permit = 0, registered_block = ? WHERE uid = ?",
            (ext.hotkey, block, uid),
        )
        log.warning("uid %d re-registered: %s replaces %s at block %d", uid, ext.hotkey, old, block)
        return int(uid)

    def _registered_uid(self, conn: sqlite3.Connection, hotkey: str) -> int:
        row = conn.execute("SELECT uid FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
        if row is None:
            raise NotRegisteredError(f"hotkey {hotkey} is not registered on the local chain")
        return int(row[0])

    def _op_commit(self, conn: sqlite3.Connection, ext: SignedExtrinsic, block: int) -> None:
        self._registered_uid(conn, ext.hotkey)
        if set(ext.payload) != {"data"}:
            raise InvalidExtrinsicError(
                f"commit from {ext.hotkey}: payload must be {{'data': str}}"
            )
        data = validate_commitment(ext.payload["data"], self.commitment_max_bytes)
        conn.execute(
            "INSERT INTO commitments (hotkey, data, block) VALUES (?, ?, ?) "
            "ON CONFLICT(hotkey) DO UPDATE SET data = excluded.data, block = excluded.block",
            (ext.hotkey, data, block),
        )

    def _op_set_weights(self, conn: sqlite3.Connection, ext: SignedExtrinsic, block: int) -> int:
        uid = self._registered_uid(conn, ext.hotkey)
        pairs = ext.payload.get("weights") if set(ext.payload) == {"weights"} else None
        if not isinstance(pairs, list) or not pairs:
            raise InvalidExtrinsicError(
                f"set_weights from {ext.hotkey}: payload must be {{'weights': [[uid, w], ...]}}"
            )
        known = {int(r[0]) for r in conn.execute("SELECT uid FROM neurons").fetchall()}
        seen: set[int] = set()
        for pair in pairs:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not isinstance(pair[0], int)
                or isinstance(pair[0], bool)
                or not isinstance(pair[1], int | float)
                or not math.isfinite(pair[1])
                or pair[1] < 0
            ):
                raise InvalidExtrinsicError(f"set_weights from {ext.hotkey}: bad entry {pair!r}")
            if pair[0] not in known:
                raise InvalidExtrinsicError(f"set_weights from {ext.hotkey}: unknown uid {pair[0]}")
            if pair[0] in seen:
                raise InvalidExtrinsicError(f"set_weights from {ext.hotkey}: uid {pair[0]} twice")
            seen.add(pair[0])
        last = conn.execute(
            "SELECT MAX(block) FROM weights WHERE uid = ? AND hotkey = ?", (uid, ext.hotkey)
        ).fetchone()[0]
        if last is not None and block - int(last) < self.weights_rate_limit_blocks:
            raise RateLimitedError(
                f"weights from uid {uid} were set at block {last}; the rate limit is "
                f"{self.weights_rate_limit_blocks} blocks (now {block})"
            )
        conn.execute(
            "INSERT INTO weights (block, uid, hotkey, weights) VALUES (?, ?, ?, ?)",
            (block, uid, ext.hotkey, json.dumps(pairs)),
        )
        return block

    # -- the protocol's writes --------------------------------------------------------------------

    def register(self, hotkey: Any) -> int:
        """Register ``hotkey`` (signed by it); return its uid (the existing one if registered)."""
        return int(self._sign_and_submit(hotkey, "register", {}))

    def commit(self, hotkey: Any, data: str) -> None:
        validate_commitment(data, self.commitment_max_bytes)
        self._sign_and_submit(hotkey, "commit", {"data": data})

    def set_weights(self, hotkey: Any, weights: Mapping[int, float]) -> WeightsResult:
        try:
            keypair = load_hotkey(hotkey)
            clean, notes = prepare_weights(weights, {n.uid for n in self.metagraph()})
            if not clean:
                return _skip("no weights left to set" + (f" ({'; '.join(notes)})" if notes else ""))
            block = int(
                self._sign_and_submit(
                    keypair, "set_weights", {"weights": [[u, w] for u, w in clean]}
                )
            )
        except ChainError as exc:
            return _skip(str(exc))
        return WeightsResult(ok=True, reason="; ".join(notes), block=block)


def _skip(reason: str) -> WeightsResult:
    log.warning("weights not set: %s", reason)
    return WeightsResult(ok=False, reason=reason)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
