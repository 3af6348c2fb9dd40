"""The storage plugin's :class:`~covenant.engine.protocols.Exchange`: a run's objects in storage.

Built once per process (``covenant_exchange``) from ``[storage]``, ``[run]`` and the services
(chain, hotkey). It writes only to this process's own bucket, signed with its hotkey, and reads
other peers' buckets through read transports opened from their chain commitments
(:func:`~covenant.plugins.storage.credentials.read_transport_for`). Everything read is
untrusted: gradients go through :func:`~covenant.plugins.storage.exchange.fetch_verified`
(timing, signature, identity, hash), records additionally through
:func:`~covenant.plugins.storage.records.parse_record`. A bad object is an
:class:`UploadRejection` or ``None`` with a logged reason, never an exception that stops the
caller.

The lead validator (highest stake with a permit) owns ``start_window``, the peer lists, the
aggregate records and the checkpoints that miners follow; this class finds it on the chain.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covenant.engine.fs import atomic_write_bytes
from covenant.engine.protocols import (
    AggregateRecord,
    CheckpointInfo,
    FetchOutcome,
    Neuron,
    ObjectInfo,
    PeerList,
    Receipt,
    SyncSample,
    Transport,
    Upload,
    UploadRejection,
)
from covenant.plugins.storage import records as rec
from covenant.plugins.storage.config import StorageConfig
from covenant.plugins.storage.credentials import read_transport_for
from covenant.plugins.storage.errors import CommitmentError, StorageError
from covenant.plugins.storage.exchange import (
    DEFAULT_HEADER_MAX_BYTES,
    ExpectedUpload,
    FetchJob,
    Rejection,
    RejectReason,
    VerifiedObject,
    fetch_verified,
    iter_fetch,
    upload_interval,
    upload_signed,
)
from covenant.plugins.storage.keys import RunKeys
from covenant.plugins.storage.retention import delete_expired
from covenant.plugins.storage.retry import Deadline
from covenant.plugins.storage.transport import open_transport

if TYPE_CHECKING:
    from covenant.engine.config import Config
    from covenant.engine.services import Services

log = logging.getLogger(__name__)

RECORD_CAP = rec.MAX_RECORD_BYTES + DEFAULT_HEADER_MAX_BYTES
COMMITMENT_TTL_S = 5.0
POLL_S = 0.5
CLOCK_SLACK_S = 2.0
KEEP_CHECKPOINTS = 2  # chain time is read at block resolution; poll a little past the close


class StorageExchange:
    """See the module docstring; implements :class:`covenant.engine.protocols.Exchange`."""

    def __init__(
        self,
        cfg: StorageConfig,
        keys: RunKeys,
        transport: Transport,
        services: Services,
        *,
        sleep: Any = time.sleep,
    ) -> None:
        self.cfg = cfg
        self.keys = keys
        self.transport = transport
        self.services = services
        self.upload_grace_s = float(cfg.upload_grace_s)
        self._sleep = sleep
        self._commitments: tuple[float, dict[str, str]] | None = None
        self._readers: dict[str, tuple[str, Transport]] = {}
        self._aggregates: dict[tuple[str, int], AggregateRecord] = {}
        self._start: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: Config, services: Services) -> StorageExchange:
        cfg = config.typed("storage", StorageConfig)
        run = config.section("run")
        url = cfg.url
        transport = open_transport(url, cfg, run_dir=Path(run.dir))
        return cls(cfg, RunKeys(run.id, run.protocol_version), transport, services)

    # -- identities -------------------------------------------------------------------------

    @property
    def _hotkey(self) -> Any:
        return self.services.hotkey

    def _uid(self) -> int:
        return self.services.uid

    def _chain_now(self) -> float:
        chain = self.services.chain
        return float(chain.block_timestamp(int(chain.block())))

    def upload_interval(self, window: int) -> tuple[int, int]:
        chain = self.services.chain
        t = chain.block_timestamp((window + 1) * chain.blocks_per_window)
        return upload_interval(t, int(self.cfg.upload_grace_s))

    # -- read transports from commitments ---------------------------------------------------

    def _commitment_map(self) -> dict[str, str]:
        now = time.monotonic()
        if self._commitments is None or now - self._commitments[0] > COMMITMENT_TTL_S:
            got = {hk: c.data for hk, c in self.services.chain.commitments().items()}
            self._commitments = (now, got)
        return self._commitments[1]

    def peer_transport(self, hotkey: str) -> Transport | None:
        if hotkey == self._hotkey.ss58_address:
            return self.transport
        data = self._commitment_map().get(hotkey)
        if data is None:
            return None
        cached = self._readers.get(hotkey)
        if cached is not None and cached[0] == data:
            return cached[1]
        try:
            reader = read_transport_for(data, self.cfg, allow_local=self.cfg.local_peers)
        except (CommitmentError, StorageError) as exc:
            log.warning("commitment of %s is unusable: %s", hotkey, exc)
            return None
        self._readers[hotkey] = (data, reader)
        return reader

    # -- miner writes -----------------------------------------------------------------------

    def _put(self, key: str, data: bytes, window: int, codec: str, **extra: Any) -> ObjectInfo:
        fields = {
            "run": self.keys.run,
            "version": self.keys.version,
            "window": window,
            "uid": self._uid(),
            "codec": codec,
            **extra,
        }
        deadline = Deadline(self.cfg.per_window_deadline_s)
        return upload_signed(self.transport, key, data, fields, self._hotkey, deadline=deadline)

    def put_gradient(
        self,
        window: int,
        payload: bytes,
        *,
        codec: str,
        receipt: Receipt | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> ObjectInfo:
        extra: dict[str, Any] = {"sizes": dict(sizes or {})}
        if receipt is not None:
            extra["receipt"] = {"hash": receipt.hash, "count": receipt.count}
        return self._put(self.keys.gradient(window, self._uid()), payload, window, codec, **extra)

    def put_sync_sample(self, window: int, values: Mapping[str, Sequence[float]]) -> ObjectInfo:
        body = rec.encode_record(rec.sync_body(window, self._uid(), values))
        return self._put(self.keys.debug(window, self._uid()), body, window, rec.SYNC)

    # -- verified reads of peers' objects ---------------------------------------------------

    def _expected(
        self,
        window: int,
        uid: int,
        hotkey: str,
        max_bytes: int,
        codec: str | None,
        interval: tuple[int, int] | None,
    ) -> ExpectedUpload:
        return ExpectedUpload(
            run=self.keys.run,
            version=self.keys.version,
            window=window,
            uid=uid,
            hotkey=hotkey,
            max_bytes=max_bytes + self.cfg.manifest_max_bytes,
            interval=interval,
            codec=codec,
            header_max_bytes=self.cfg.manifest_max_bytes,
        )

    def fetch_gradients(
        self,
        window: int,
        uids: Sequence[int],
        *,
        max_bytes: int,
        codec: str | None = None,
        wait: bool = True,
    ) -> Iterator[FetchOutcome]:
        interval = self.upload_interval(window)
        close = interval[1] + CLOCK_SLACK_S
        hotkeys = self.services.hotkeys()
        pending: list[int] = []
        for uid in dict.fromkeys(uids):
            hk = hotkeys.get(uid)
            if hk is None:
                yield UploadRejection(uid, window, "not_registered", f"uid {uid} has no hotkey")
            elif self.peer_transport(hk) is None:
                yield UploadRejection(
                    uid, window, "no_commitment", f"uid {uid}: no usable commitment"
                )
            else:
                pending.append(uid)
        deadline = Deadline(self.cfg.per_window_deadline_s)
        while pending:
            jobs = []
            for uid in pending:
                hk = hotkeys[uid]
                transport = self.peer_transport(hk)
                if transport is None:
                    yield UploadRejection(
                        uid, window, "no_commitment", f"uid {uid}: commitment gone"
                    )
                    continue
                key = self.keys.gradient(window, uid)
                jobs.append(
                    FetchJob(
                        transport, key, self._expected(window, uid, hk, max_bytes, codec, interval)
                    )
                )
            retry: list[int] = []
            results = iter_fetch(
                jobs,
                max_concurrent=self.cfg.max_concurrent_peers,
                max_inflight_bytes=self.cfg.max_inflight_bytes,
                deadline=deadline,
            )
            for uid, result in results:
                if (
                    wait
                    and isinstance(result, Rejection)
                    and result.reason == RejectReason.MISSING
                    and self._chain_now() <= close
                    and not deadline.expired()
                ):
                    retry.append(uid)
                    continue
                yield self._outcome(window, uid, hotkeys[uid], result)
            pending = retry
            if pending:
                self._sleep(POLL_S)

    def _outcome(self, window: int, uid: int, hotkey: str, result: Any) -> FetchOutcome:
        if isinstance(result, VerifiedObject):
            m = result.manifest
            return Upload(
                uid=uid,
                window=window,
                hotkey=hotkey,
                payload=bytes(result.payload),
                sha256=m.sha256,
                modified=result.info.modified,
                codec=m.codec,
                receipt=Receipt(m.receipt.hash, m.receipt.count) if m.receipt else None,
            )
        return UploadRejection(uid, window, str(result.reason), result.detail)

    def fetch_gradient_by_hash(
        self, window: int, uid: int, sha256: str, *, max_bytes: int, codec: str | None = None
    ) -> FetchOutcome:
        hk = self.services.hotkeys().get(uid)
        transport = self.peer_transport(hk) if hk is not None else None
        if hk is None or transport is None:
            return UploadRejection(uid, window, "no_commitment", f"uid {uid}: no readable bucket")
        expected = self._expected(window, uid, hk, max_bytes, codec, None)
        result = fetch_verified(
            transport,
            self.keys.gradient(window, uid),
            expected,
            deadline=Deadline(self.cfg.per_window_deadline_s),
        )
        outcome = self._outcome(window, uid, hk, result)
        if isinstance(outcome, Upload) and outcome.sha256 != sha256:
            return UploadRejection(
                uid, window, "hash_mismatch", f"uid {uid}: upload is not the one the record names"
            )
        return outcome

    def fetch_sync_sample(self, window: int, uid: int) -> SyncSample | UploadRejection:
        hk = self.services.hotkeys().get(uid)
        transport = self.peer_transport(hk) if hk is not None else None
        if hk is None or transport is None:
            return UploadRejection(uid, window, "no_commitment", f"uid {uid}: no readable bucket")
        body = self._read_record(transport, self.keys.debug(window, uid), window, uid, hk, rec.SYNC)
        if isinstance(body, UploadRejection):
            return body
        sample = rec.sync_of(body)
        if sample.window != window or sample.uid != uid:
            return UploadRejection(uid, window, "replayed", "sync sample names another window/uid")
        return sample

    def _read_record(
        self, transport: Transport, key: str, window: int, uid: int, hotkey: str, fmt: str
    ) -> Any:
        """A verified, parsed record body, or an :class:`UploadRejection` (never raises)."""
        expected = ExpectedUpload(
            run=self.keys.run,
            version=self.keys.version,
            window=window,
            uid=uid,
            hotkey=hotkey,
            max_bytes=RECORD_CAP,
            codec=fmt,
            header_max_bytes=self.cfg.manifest_max_bytes,
        )
        result = fetch_verified(
            transport, key, expected, deadline=Deadline(self.cfg.per_window_deadline_s)
        )
        if not isinstance(result, VerifiedObject):
            return UploadRejection(uid, window, str(result.reason), result.detail)
        try:
            return rec.parse_record(result.payload, fmt)
        except rec.RecordError as exc:
            return UploadRejection(uid, window, "bad_record", f"{key}: {exc}")

    # -- the lead validator's records ---------------------------------------------------------

    def _lead(self) -> tuple[Neuron, Transport] | None:
        lead = self.services.lead()
        if lead is None:
            return None
        transport = self.peer_transport(lead.hotkey)
        if transport is None:
            return None
        return lead, transport

    def _lead_record(self, key: str, window: int, fmt: str) -> tuple[Neuron, Any] | None:
        found = self._lead()
        if found is None:
            return None
        lead, transport = found
        body = self._read_record(transport, key, window, lead.uid, lead.hotkey, fmt)
        if isinstance(body, UploadRejection):
            if body.reason != RejectReason.MISSING:
                log.warning("lead validator's %s is unusable: %s", key, body.detail)
            return None
        return lead, body

    def start_window(self) -> int | None:
        found = self._lead()
        if found is None:
            return None
        if found[0].hotkey in self._start:
            return self._start[found[0].hotkey]
        got = self._lead_record(self.keys.start_window(), 0, rec.START)
        if got is None:
            return None
        lead, body = got
        self._start[lead.hotkey] = int(body.start_window)
        return int(body.start_window)

    def peer_list(self, window: int) -> PeerList | None:
        found = self._lead()
        if found is None:
            return None
        _lead, transport = found
        try:
            infos = transport.list(self.keys.kind_prefix("peers"))
        except StorageError as exc:
            log.warning("cannot list the lead validator's peer lists: %s", exc)
            return None
        firsts = sorted(
            {
                parsed[0]
                for info in infos
                if (parsed := self.keys.parse_windowed("peers", info.key)) is not None
                and parsed[0] <= window
            },
            reverse=True,
        )
        for first in firsts[:4]:  # a damaged newest list falls back to the one before
            got = self._lead_record(self.keys.peers(first), first, rec.PEERS)
            if got is not None and got[1].first_window == first:
                return rec.peer_list_of(got[1], got[0].hotkey)
        return None

    def aggregate_record(self, window: int) -> AggregateRecord | None:
        found = self._lead()
        if found is None:
            return None
        cached = self._aggregates.get((found[0].hotkey, window))
        if cached is not None:
            return cached
        got = self._lead_record(self.keys.aggregate(window), window, rec.AGGREGATE)
        if got is None or got[1].window != window:
            return None
        record = rec.aggregate_of(got[1], got[0].hotkey)
        self._aggregates[(got[0].hotkey, window)] = record
        return record

    # -- validator writes ----------------------------------------------------------------------

    def put_start_window(self, window: int) -> ObjectInfo:
        body = rec.encode_record(rec.start_window_body(window))
        return self._put(self.keys.start_window(), body, 0, rec.START)

    def put_peer_list(self, peer_list: PeerList) -> ObjectInfo:
        body = rec.encode_record(rec.peer_list_body(peer_list))
        first = peer_list.first_window
        return self._put(self.keys.peers(first), body, first, rec.PEERS)

    def put_aggregate_record(self, record: AggregateRecord) -> ObjectInfo:
        body = rec.encode_record(rec.aggregate_body(record))
        return self._put(self.keys.aggregate(record.window), body, record.window, rec.AGGREGATE)

    def put_score_record(self, window: int, uid: int, record: Mapping[str, Any]) -> ObjectInfo:
        body = rec.encode_record(
            {"format": rec.SCORE, "window": window, "uid": uid, "record": dict(record)}
        )
        return self._put(self.keys.scores(window, uid), body, window, rec.SCORE)

    # -- retention (SPEC section 6) ---------------------------------------------------------------

    def prune(self, current_window: int) -> int:
        """Delete this peer's own gradient uploads and sync samples older than
        ``retention_windows``, except uploads named in the lead's aggregate records of the last
        ``retention_protect_windows`` windows (a late joiner replays them). Returns the count."""
        uid = self._uid()
        protected: set[str] = set()
        for window in range(
            max(0, current_window - self.cfg.retention_protect_windows), current_window
        ):
            record = self.aggregate_record(window)
            if record is not None and any(u == uid for u, _ in record.uploads):
                protected.add(self.keys.gradient(window, uid))
        deleted = delete_expired(
            self.transport,
            self.keys,
            uid=uid,
            current_window=current_window,
            retention_windows=self.cfg.retention_windows,
            protected=protected,
            kinds=("gradient", "debug"),
        )
        return len(deleted)

    # -- checkpoints (SPEC section 9) ------------------------------------------------------------

    def put_checkpoint(
        self, window: int, outer_step: int, folder: str, model: Mapping[str, Any]
    ) -> ObjectInfo:
        """Upload every file of the weights directory ``folder``, then the signed manifest
        (``checkpoint/{window}/manifest``) and ``checkpoint/latest``; older checkpoints beyond
        the last ``KEEP_CHECKPOINTS`` are deleted."""
        root = Path(folder)
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in root.iterdir() if p.is_file()):
            data = path.read_bytes()
            self.transport.put(self.keys.checkpoint(window, path.name), data)
            files[path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        body = {
            "format": rec.CHECKPOINT,
            "window": window,
            "outer_step": outer_step,
            "model": dict(model),
            "files": files,
        }
        data = rec.encode_record(body)
        self._put(self.keys.checkpoint(window, "manifest"), data, window, rec.CHECKPOINT)
        info = self._put(self.keys.checkpoint_latest(), data, 0, rec.CHECKPOINT)
        self._prune_checkpoints(keep_from=window)
        return info

    def _prune_checkpoints(self, keep_from: int) -> None:
        head = self.keys.kind_prefix("checkpoint")
        try:
            infos = self.transport.list(head)
        except StorageError as exc:
            log.warning("cannot list checkpoints for pruning: %s", exc)
            return
        windows = sorted(
            {
                int(part)
                for info in infos
                if (part := info.key[len(head) :].split("/", 1)[0]).isdigit()
            }
        )
        for old in windows[: max(0, len(windows) - KEEP_CHECKPOINTS)]:
            if old >= keep_from:
                continue
            for info in infos:
                if info.key.startswith(f"{head}{old}/"):
                    self.transport.delete(info.key)

    def fetch_checkpoint(self, dest: str) -> CheckpointInfo | None:
        found = self._lead()
        if found is None:
            return None
        lead, transport = found
        latest = self._read_record(
            transport, self.keys.checkpoint_latest(), 0, lead.uid, lead.hotkey, rec.CHECKPOINT
        )
        if isinstance(latest, UploadRejection):
            if latest.reason != RejectReason.MISSING:
                log.warning("lead validator's checkpoint/latest is unusable: %s", latest.detail)
            return None
        window = int(latest.window)
        body = self._read_record(
            transport,
            self.keys.checkpoint(window, "manifest"),
            window,
            lead.uid,
            lead.hotkey,
            rec.CHECKPOINT,
        )
        if isinstance(body, UploadRejection) or body != latest:
            log.warning("checkpoint %d: its manifest is missing or disagrees with latest", window)
            return None
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():  # files of an older checkpoint must not mix in
            if stale.is_file() and stale.name not in body.files:
                stale.unlink()
        for name, meta in sorted(body.files.items()):
            target = out / name
            if target.is_file() and _sha256_file(target) == meta.sha256:
                continue  # resumed: already downloaded and verified
            try:
                data = transport.get(self.keys.checkpoint(window, name), meta.size)
            except StorageError as exc:
                log.warning("checkpoint %d: %s could not be downloaded: %s", window, name, exc)
                return None
            if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.sha256:
                log.warning("checkpoint %d: %s does not match its signed hash", window, name)
                return None
            atomic_write_bytes(target, data)
        return CheckpointInfo(
            window=window, outer_step=int(body.outer_step), path=str(out), validator=lead.hotkey
        )

    def score_record(self, validator: str, window: int, uid: int) -> dict[str, Any] | None:
        """A validator's published score record (for ``covenant replay``), or ``None``."""
        transport = self.peer_transport(validator)
        vuid = next((n.uid for n in self.services.metagraph() if n.hotkey == validator), None)
        if transport is None or vuid is None:
            return None
        body = self._read_record(
            transport, self.keys.scores(window, uid), window, vuid, validator, rec.SCORE
        )
        if isinstance(body, UploadRejection):
            return None
        return dict(body.record)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["StorageExchange"]
