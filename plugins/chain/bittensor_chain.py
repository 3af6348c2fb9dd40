"""The chain interface over the Bittensor SDK v11 (``bittensor.SyncClient``).

Everything goes through the SDK's public surface, so the same code path runs against finney,
the testnet, a local subtensor node, or (in tests) an in-process substrate double injected
through the SDK's documented ``substrate=`` seam:

* block, timestamps, hashes: ``client.block``, ``client.timestamp(block=)``,
  ``client.block_info(block).hash``;
* metagraph: ``client.subnets.metagraph(netuid, commitments=False)`` (uid, hotkey, total stake in
  the subnet's alpha, validator permit);
* commitments: read ``client.subnets.commitments(netuid)``, write the raw
  ``Commitments.set_commitment`` call signed by the *hotkey*
  (``submit_call(..., signer="hotkey")``): commitments are keyed by the signing hotkey;
* weights: ``client.execute(bt.SetWeights(...), hotkey)``, which preflights registration and the
  rate limit, conforms the weights to the subnet's limits and picks the plain or the
  commit-reveal (timelocked) extrinsic by itself.

Transport failures (endpoint down, connection dropped) are retried with exponential backoff and
jitter, then raised as :class:`ChainUnavailableError` (reads) or returned as a skip (weights).
The SDK is imported lazily: the plugin module must import fast.

What a node answers is untrusted (a hostile or broken RPC endpoint, a chain upgrade): the SDK's
own decoding of a malformed answer raises whatever Python raises (``KeyError``, ``TypeError``,
``ValueError``...), so every read decodes inside :meth:`BittensorChain._decoded`, which turns
those and the SDK's own errors into :class:`ChainError`; and every value is then checked for type
and range (:mod:`covenant.plugins.chain.validation`) before it becomes a ``Neuron``.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from covenant.engine.keys import load_hotkey
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
    check_block,
    check_hotkey,
    check_neuron,
    prepare_weights,
    validate_commitment,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# One Raw field of the Commitments pallet holds at most 128 bytes (``Data::Raw0..Raw128``).
RAW_FIELD_MAX_BYTES = 128
# What decoding a malformed node answer raises, in the SDK or in our conversions.
_MALFORMED = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    ArithmeticError,
    UnicodeError,
)
# Chain error names that mean "this hotkey has no uid here".
_NOT_REGISTERED_NAMES = {"AccountNotAllowedCommit", "HotKeyNotRegisteredInSubNet", "NotRegistered"}


def commitment_info(data: str) -> dict[str, Any]:
    """The ``CommitmentInfo`` argument of ``Commitments.set_commitment`` for ``data``.

    One ``Raw{n}`` field per 128 bytes (the SDK's reader concatenates Raw fields back); the
    production 128-character commitment is exactly one ``Raw128`` field.
    """
    raw = data.encode("utf-8")
    chunks = [raw[i : i + RAW_FIELD_MAX_BYTES] for i in range(0, len(raw), RAW_FIELD_MAX_BYTES)]
    return {"fields": [[{f"Raw{len(chunk)}": chunk} for chunk in chunks]]}


class BittensorChain:
    """The :class:`covenant.engine.protocols.Chain` over Bittensor SDK v11."""

    def __init__(
        self,
        *,
        network: str = "finney",
        netuid: int = 3,
        blocks_per_window: int = 115,
        block_time_s: float = 12.0,
        commitment_max_bytes: int = 128,
        retries: int = 3,
        retry_backoff_s: float = 1.0,
        retry_backoff_max_s: float = 30.0,
        substrate: Any = None,
        token_symbols_cache: Path | None = None,
        sleep_fn: Callable[[float], None] = time.sleep,
    ) -> None:
        self.network = network
        self.netuid = netuid
        self.blocks_per_window = blocks_per_window
        self.fallback_block_time_s = block_time_s
        self.commitment_max_bytes = commitment_max_bytes
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self._substrate = substrate
        self._sleep = sleep_fn
        self._client: Any = None
        self._block_time: float | None = None
        self._lock = threading.Lock()
        if token_symbols_cache is not None:
            # The SDK caches token symbols on connect, by default under ~/.bittensor; keep it in
            # the run directory unless the user chose a place (the env var wins).
            os.environ.setdefault("BTCLI_TOKEN_SYMBOLS_CACHE", str(token_symbols_cache))

    @classmethod
    def from_config(cls, cfg: ChainConfig, run_dir: Path, **kwargs: Any) -> BittensorChain:
        return cls(
            network=cfg.network,
            netuid=cfg.netuid,
            blocks_per_window=cfg.blocks_per_window,
            block_time_s=cfg.block_time_s,
            commitment_max_bytes=cfg.commitment_max_bytes,
            retries=cfg.retries,
            retry_backoff_s=cfg.retry_backoff_s,
            retry_backoff_max_s=cfg.retry_backoff_max_s,
            token_symbols_cache=cfg.token_symbols_path(run_dir),
            **kwargs,
        )

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The SDK client, created on first use (construction does no network I/O)."""
        with self._lock:
            if self._client is None:
                import bittensor as bt

                self._client = bt.SyncClient(self.network, substrate=self._substrate)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one SDK call; retry transport failures with backoff, then raise ours."""
        from bittensor import RpcConnectionError

        for attempt in range(self.retries):
            try:
                return fn()
            except (RpcConnectionError, ConnectionError, TimeoutError, OSError) as exc:
                if attempt == self.retries - 1:
                    raise ChainUnavailableError(
                        f"bittensor {self.network} (netuid {self.netuid}): {what} failed after "
                        f"{self.retries} tries: {type(exc).__name__}: {exc}"
                    ) from exc
                # base * (2^a + U(0, 1)) like the storage retries: the jitter scales with the
                # base, so waits grow strictly from one try to the next (until the cap).
                delay = min(
                    self.retry_backoff_max_s,
                    self.retry_backoff_s * (2**attempt + random.random()),
                )
                log.warning(
                    "bittensor %s: %s failed (%s); retry %d in %.1fs",
                    self.network,
                    what,
                    exc,
                    attempt + 1,
                    delay,
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _decoded(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (an SDK read and our conversion of its answer); a malformed answer, or the
        SDK refusing it, is a :class:`ChainError`. Transport failures still retry in ``_call``."""
        from bittensor import BittensorError, RpcConnectionError

        try:
            return fn()
        except (ChainError, RpcConnectionError):
            raise
        except (*_MALFORMED, BittensorError) as exc:
            raise ChainError(
                f"bittensor {self.network} (netuid {self.netuid}): {what}: malformed answer "
                f"from the node ({type(exc).__name__}: {str(exc)[:120]})"
            ) from None

    def block_time(self) -> float:
        """Seconds per block as the chain reports it (cached), else the configured fallback."""
        if self._block_time is None:
            try:
                self._block_time = float(self._call("read the block time", self.client.block_time))
            except ChainUnavailableError:
                raise
            except Exception as exc:  # an SDK without the read: fall back, do not fail
                log.warning(
                    "cannot read the block time (%s); using %.1fs", exc, self.fallback_block_time_s
                )
                self._block_time = self.fallback_block_time_s
        return self._block_time

    # -- clock ------------------------------------------------------------------------------------

    def block(self) -> int:
        return self._decoded(
            "read the block",
            lambda: check_block(self._call("read the block", lambda: self.client.block)),
        )

    def block_timestamp(self, block: int) -> float:
        current = self.block()
        if block <= current:
            stamp = self._call(
                f"read the timestamp of block {block}", lambda: self.client.timestamp(block=block)
            )
            return self._decoded("read a timestamp", lambda: float(stamp.timestamp()))
        # Future blocks: predicted from the head's timestamp and the chain's block time.
        head = self._call("read the head timestamp", lambda: self.client.timestamp(block=current))
        start = self._decoded("read a timestamp", lambda: float(head.timestamp()))
        return start + (block - current) * self.block_time()

    def block_hash(self, block: int) -> str:
        info = self._call(f"read block {block}", lambda: self.client.block_info(block))
        found = self._decoded(f"read block {block}", lambda: None if info is None else info.hash)
        if not found:
            raise ChainError(
                f"bittensor {self.network}: block {block} is unknown (not produced yet, or pruned)"
            )
        return str(found)

    def wait_for_block(self, block: int, timeout_s: float | None = None) -> int:
        # Polling rather than the SDK's block subscription: survives reconnects and needs
        # nothing beyond block_number from the node (or the double).
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            current = self.block()
            if current >= block:
                return current
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return current
            pause = max(0.05, min((block - current) * self.block_time(), self.block_time()) / 2)
            if deadline is not None:
                pause = min(pause, deadline - now)
            self._sleep(pause)

    # -- reads ------------------------------------------------------------------------------------

    def _metagraph(self) -> Any:
        graph = self._call(
            "read the metagraph",
            lambda: self.client.subnets.metagraph(self.netuid, commitments=False),
        )
        if graph is None:
            raise ChainError(f"bittensor {self.network}: subnet {self.netuid} does not exist")
        return graph

    def metagraph(self) -> list[Neuron]:
        def read() -> list[Neuron]:
            return [
                check_neuron(
                    n.uid,
                    n.hotkey,
                    # alpha units; .tao raises off the root net
                    _number(n.total_stake.rao) / 1e9,
                    n.validator_permit,
                )
                for n in self._metagraph().neurons
            ]

        return self._decoded("read the metagraph", read)

    def last_weights_block(self) -> dict[int, int]:
        """uid -> the block its weights were last updated (``last_update``), for status."""
        return self._decoded(
            "read the metagraph",
            lambda: {
                check_neuron(n.uid, "-", 0, 0).uid: check_block(n.last_update, "last update")
                for n in self._metagraph().neurons
                if n.last_update
            },
        )

    def commitments(self) -> dict[str, Commitment]:
        return self._decoded("read commitments", self._commitments)

    def _commitments(self) -> dict[str, Commitment]:
        found = self._call("read commitments", lambda: self.client.subnets.commitments(self.netuid))
        out: dict[str, Commitment] = {}
        for hotkey, entry in dict(found).items():
            if entry is None or entry.uid is None:
                continue  # deregistered hotkeys keep their entry on chain; not a peer any more
            value = entry.value
            if not entry.is_revealed or value is None:
                log.warning(
                    "skipping the commitment of %s: not readable (%s)", hotkey, entry.status
                )
                continue
            try:
                check_hotkey(hotkey, "commitment hotkey")
                validate_commitment(value, self.commitment_max_bytes)
                block = check_block(entry.block, "commitment block")
            except ChainError as exc:  # CommitmentError is a ChainError
                log.warning("skipping the commitment of %.64r: %s", hotkey, exc)
                continue
            out[hotkey] = Commitment(hotkey=hotkey, data=value, block=block)
        return out

    # -- writes -----------------------------------------------------------------------------------

    def commit(self, hotkey: Any, data: str) -> None:
        import bittensor as bt

        validate_commitment(data, self.commitment_max_bytes)
        keypair = load_hotkey(hotkey)
        call = bt.calls.Commitments.set_commitment(netuid=self.netuid, info=commitment_info(data))
        result = self._call(
            "submit a commitment", lambda: self.client.submit_call(call, keypair, signer="hotkey")
        )
        if not result.success:
            error = result.error
            name = getattr(error, "name", None)
            if name in _NOT_REGISTERED_NAMES:
                raise NotRegisteredError(
                    f"hotkey {keypair.ss58_address} is not registered on netuid {self.netuid}: {result.message}"
                )
            raise ChainError(
                f"commitment by {keypair.ss58_address} refused by the chain: {result.message}"
            )
        log.info("committed %d bytes for %s", len(data.encode()), keypair.ss58_address)

    def set_weights(self, hotkey: Any, weights: Mapping[int, float]) -> WeightsResult:
        import bittensor as bt
        from bittensor import BittensorError

        try:
            keypair = load_hotkey(hotkey)
            known = {n.uid for n in self.metagraph()}
            pairs, notes = prepare_weights(weights, known)
            if not pairs:
                return _skip("no weights left to set" + (f" ({'; '.join(notes)})" if notes else ""))
            intent = bt.SetWeights(netuid=self.netuid, weights=dict(pairs))
            result = self._call("set weights", lambda: self.client.execute(intent, keypair))
        except ChainError as exc:
            return _skip(str(exc))
        except BittensorError as exc:  # preflight refusals: not registered, rate limited, ...
            code = getattr(getattr(exc, "code", None), "value", "error")
            return _skip(f"{code}: {exc}")
        if not result.success:
            return _skip(f"refused by the chain: {result.message}")
        data = dict(result.data or {})
        if "reveal_round" in data:
            notes.append(f"commit-reveal: reveals at drand round {data['reveal_round']}")
        block = _block_of(result)
        return WeightsResult(ok=True, reason="; ".join(notes), block=block)


def _number(value: Any) -> float:
    """An int or float from the node (never a bool or a numeric string), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _block_of(result: Any) -> int | None:
    extrinsic_id = getattr(result, "extrinsic_id", None)
    if isinstance(extrinsic_id, str) and "-" in extrinsic_id:
        head = extrinsic_id.split("-", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def _skip(reason: str) -> WeightsResult:
    log.warning("weights not set: %s", reason)
    return WeightsResult(ok=False, reason=reason)


__all__ = ["RAW_FIELD_MAX_BYTES", "BittensorChain", "commitment_info"]
