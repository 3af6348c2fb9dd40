"""The interfaces plugins implement, and the small value types that cross them.

Every arrow in the house plan (docs/architecture.md) crosses one of these protocols: the engine
and the other plugins talk to a transport, a chain, a model runtime or an outer step only through
what is declared here, so each provider can be tested alone with in-memory partners and swapped
through its ``firstresult`` hook in :mod:`covenant.engine.hookspecs`.

The protocols are ``typing.Protocol`` classes (structural): a provider does not need to inherit
from them, only to have the members. Values that cross them are frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from covenant.engine.errors import CovenantError

if TYPE_CHECKING:  # torch is heavy; the validator CLI and `covenant config` must not pay for it
    import torch

# --------------------------------------------------------------------------------------------
# Model runtime (provided by covenant.models through ``covenant_build_model``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamShard:
    """Where one parameter of this rank sits in the global (unsharded) model.

    ``name`` is the global, layout-independent name (the same on a TP=8 and a TP=1 peer);
    ``global_shape`` the unsharded shape; ``offsets`` the start of this rank's slice in every
    dimension and ``local_shape`` its extent, so ``global[o0:o0+l0, o1:o1+l1]`` is what this rank
    owns. ``replicated_over_tp`` says whether every TP rank holds the same slice (norms), so
    exactly one of them should contribute it to a peer's upload.
    """

    name: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    local_shape: tuple[int, ...]
    replicated_over_tp: bool = False

    @property
    def is_full(self) -> bool:
        return self.local_shape == self.global_shape


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step of the inner loop reports (identical on every rank)."""

    loss: float
    grad_norm: float
    tokens: int
    skipped: bool = False


@dataclass(frozen=True)
class ParallelInfo:
    """This process's place in its peer's TP x PP x DP grid (global rank 0 logs and uploads)."""

    rank: int = 0
    world_size: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@runtime_checkable
class ModelRuntime(Protocol):
    """A model, its inner optimizer and its parallel layout on this rank.

    Built once per process by the model provider. Every method is collective over the peer's
    ranks (TP x PP x DP): all ranks call it in the same order with their own share of the batch.
    ``parallel`` says where this rank sits; ``seq_len`` and ``micro_batch`` are the shapes the
    runtime was built for.
    """

    parallel: ParallelInfo
    seq_len: int
    micro_batch: int

    def layout(self) -> Sequence[ParamShard]:
        """The owned slice of every parameter on this rank, in a fixed order."""
        ...

    def local_parameters(self) -> Mapping[str, torch.Tensor]:
        """Global name -> this rank's parameter tensor (the live storage, not a copy)."""
        ...

    def train_step(self, tokens: torch.Tensor, lr: float) -> StepResult:
        """One inner step on this DP rank's samples ``tokens`` (int64, shape (b, T)).

        Splits into micro-batches, accumulates gradients, clips the global norm and applies
        the inner optimizer at learning rate ``lr``. Returns the mean loss over the whole
        global batch (all DP ranks), equal on every rank.
        """
        ...

    def eval_loss(self, tokens: torch.Tensor) -> float:
        """Mean loss over ``tokens`` (this DP rank's share), averaged over DP; no grad."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's model and optimizer state, for a local checkpoint."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same preset and layout)."""
        ...

    def save_full_weights(self, path: str) -> None:
        """Collective: write the full weights to the directory ``path`` in a layout-independent
        format (safetensors pieces by global name, plus an index) that any layout (and
        ``covenant export``) can load without executing anything. Each rank writes what it
        owns; nothing is gathered."""
        ...

    def load_full_weights(self, path: str) -> None:
        """Collective: load weights that :meth:`save_full_weights` wrote, under any layout;
        each rank reads only its own slices. A failure on any rank raises on every rank."""
        ...

    def reload_params(self) -> None:
        """Refresh the optimizer's own copy of the weights after an in-place write.

        Under bf16 the inner optimizer keeps fp32 main weights; whoever writes into
        :meth:`local_parameters` (the outer step) must call this, or the next inner step
        silently overwrites the write.
        """
        ...

    def group(self, kind: str) -> Any:
        """The ``torch.distributed`` process group of this rank's ``kind`` (``"tp"``, ``"pp"``,
        ``"dp"``, ``"world"``), for plugins' own collectives; ``None`` when the peer runs as
        one process. Every rank of that group must take part in a collective on it."""
        ...

    def close(self) -> None:
        """Release process groups and buffers (idempotent)."""
        ...


# --------------------------------------------------------------------------------------------
# Storage (provided by the storage plugin through ``covenant_transport``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """Metadata of a stored object, from a HEAD (never from the body)."""

    key: str
    size: int
    modified: float  # storage timestamp, seconds since the epoch (whole seconds on S3)
    etag: str | None = None


@runtime_checkable
class Transport(Protocol):
    """Object storage rooted at one URL (``file://``, ``memory://``, ``s3://``...).

    Keys are relative, ``/``-separated and never contain ``..``; the transport refuses anything
    that would leave its root.
    """

    url: str

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Atomically store ``data`` under ``key`` (raises on failure, never swallows it)."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Metadata of ``key``, or ``None`` if it does not exist."""
        ...

    def get(self, key: str, max_bytes: int) -> bytes:
        """The body of ``key``; raises before downloading if it is larger than ``max_bytes``."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under ``prefix`` (non-recursive semantics are not guaranteed)."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        ...


# --------------------------------------------------------------------------------------------
# Chain (provided by the chain plugin through ``covenant_chain``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neuron:
    """One registered participant, as the chain lists it."""

    uid: int
    hotkey: str  # ss58 address
    stake: float
    validator_permit: bool
    incentive: float = 0.0  # share of the subnet's emission (0 where the chain does not say)


@dataclass(frozen=True)
class Commitment:
    """A peer's published data (its bucket read credentials), as last committed."""

    hotkey: str
    data: str
    block: int


@dataclass(frozen=True)
class WeightsResult:
    """Outcome of a weight set: ``ok`` False with a ``reason`` is a recorded skip, not a crash."""

    ok: bool
    reason: str = ""
    block: int | None = None


class ChainError(CovenantError):
    """A chain read or write failed in a way the caller should handle (not a bug)."""


class ChainUnavailableError(ChainError):
    """The chain could not be reached (endpoint down, database locked) after every retry."""


class NotRegisteredError(ChainError):
    """The signing hotkey has no uid on the chain (never registered, or replaced)."""


class CommitmentError(ChainError):
    """A commitment is malformed or larger than the chain's limit."""


@runtime_checkable
class Chain(Protocol):
    """The clock, the membership list and the paymaster.

    All times are chain time (block timestamps), never the local wall clock. Reads raise
    :class:`ChainUnavailableError` when the chain cannot be reached after the configured
    retries; ``commit`` raises :class:`NotRegisteredError` / :class:`CommitmentError` for bad
    input; ``set_weights`` never raises for chain-side refusals (it returns ``ok=False``).
    """

    blocks_per_window: int

    def block(self) -> int:
        """The current block number."""
        ...

    def block_timestamp(self, block: int) -> float:
        """Timestamp (seconds since the epoch) of ``block``; may be predicted for future blocks."""
        ...

    def block_hash(self, block: int) -> str:
        """Hex hash of a past block (the validator's ``eval_seed`` source)."""
        ...

    def metagraph(self) -> list[Neuron]:
        """All registered neurons, ascending uid."""
        ...

    def commit(self, hotkey: Any, data: str) -> None:
        """Publish ``data`` signed by ``hotkey`` (a ``bittensor.sp_core.Keypair``)."""
        ...

    def commitments(self) -> dict[str, Commitment]:
        """Latest commitment of every *registered* hotkey that has a well-formed one.

        Malformed or oversized entries (written by someone else) are skipped with a warning,
        never raised: one bad peer must not stop a miner or validator.
        """
        ...

    def set_weights(self, hotkey: Any, weights: Mapping[int, float]) -> WeightsResult:
        """Submit normalised weights by uid, signed by ``hotkey``.

        Unknown uids are dropped (named in ``reason``); an unregistered hotkey, a rate limit,
        invalid values or an unreachable chain give ``ok=False`` with the reason: a recorded
        skip, never an exception.
        """
        ...

    def wait_for_block(self, block: int, timeout_s: float | None = None) -> int:
        """Block until the chain reaches ``block``; return the current block.

        With ``timeout_s``, returns after at most that long even if ``block`` was not reached
        (the returned block is then smaller than ``block``; the caller decides).
        """
        ...


def window_of(block: int, blocks_per_window: int) -> int:
    """``window = block // blocks_per_window`` (SPEC section 1)."""
    if blocks_per_window <= 0:
        raise ValueError(f"blocks_per_window must be positive, got {blocks_per_window}")
    return block // blocks_per_window


def window_start_block(window: int, blocks_per_window: int) -> int:
    """First block of ``window``."""
    return window * blocks_per_window


def lead_validator(neurons: Sequence[Neuron]) -> Neuron | None:
    """The highest-stake neuron holding a validator permit (ties: lower uid), or ``None``.

    Its peer lists, aggregate records, ``start_window`` and checkpoints are the ones every miner
    follows (SPEC sections 1 and 7).
    """
    permitted = [n for n in neurons if n.validator_permit]
    if not permitted:
        return None
    return min(permitted, key=lambda n: (-n.stake, n.uid))


# --------------------------------------------------------------------------------------------
# Signed records of a run (provided by the storage plugin through ``covenant_exchange``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """A data receipt: BLAKE2b-128 (hex) of the pool's ascending sample ids, and their count."""

    hash: str
    count: int


@dataclass(frozen=True)
class PeerList:
    """A validator's peer list: whose uploads everyone aggregates, from ``first_window`` on.

    ``gather`` peers are aggregated; ``reserve`` peers stand in, in order, for gather peers whose
    upload is missing or unusable (at most ``len(gather)`` uploads are aggregated).
    """

    first_window: int
    posted_window: int
    gather: tuple[int, ...]
    reserve: tuple[int, ...] = ()
    validator: str = ""  # ss58 of the signer

    @property
    def uids(self) -> tuple[int, ...]:
        return self.gather + self.reserve

    def select(self, usable: Collection[int]) -> list[int]:
        """The uploads to aggregate, ascending uid: every usable gather peer, and for each
        unusable one the next usable reserve peer in list order (the same rule for miners, the
        validator's aggregate record and a joiner's replay)."""
        chosen = [u for u in self.gather if u in usable]
        missing = len(self.gather) - len(chosen)
        for uid in self.reserve:
            if missing <= 0:
                break
            if uid in usable:
                chosen.append(uid)
                missing -= 1
        return sorted(chosen)


@dataclass(frozen=True)
class AggregateRecord:
    """The lead validator's record of window ``window``: which uploads the aggregate holds.

    ``uploads`` is ``(uid, sha256 of the payload)``, ascending uid; ``outer_step`` is
    ``outer_step(window)``, the number of non-empty records in ``[start_window, window)``.
    """

    window: int
    outer_step: int
    uploads: tuple[tuple[int, str], ...]
    validator: str = ""

    @property
    def empty(self) -> bool:
        return not self.uploads

    @property
    def next_outer_step(self) -> int:
        """``outer_step(window + 1)``."""
        return self.outer_step + (0 if self.empty else 1)


@dataclass(frozen=True)
class Upload:
    """A peer's verified upload for ``window``: signature, identity, timing and hash checked."""

    uid: int
    window: int
    hotkey: str
    payload: bytes = field(repr=False)
    sha256: str = ""
    modified: float = 0.0  # storage timestamp (seconds since the epoch)
    codec: str = ""
    receipt: Receipt | None = None


@dataclass(frozen=True)
class UploadRejection:
    """Why a peer's upload for ``window`` was not usable (``reason`` is a short tag to record)."""

    uid: int
    window: int
    reason: str
    detail: str = ""


FetchOutcome = Upload | UploadRejection


@dataclass(frozen=True)
class SyncSample:
    """A peer's published parameter sample after applying ``window`` (SPEC section 6)."""

    uid: int
    window: int
    values: Mapping[str, tuple[float, float]]


@dataclass(frozen=True)
class CheckpointInfo:
    """A published checkpoint (SPEC section 9): the full weights after applying ``window``.

    ``outer_step`` is ``outer_step(window + 1)``; ``path`` is the local folder the verified
    files were downloaded to (a weights directory any layout loads).
    """

    window: int
    outer_step: int
    path: str
    validator: str = ""


@runtime_checkable
class Exchange(Protocol):
    """Everything a run keeps in object storage, signed and verified (SPEC sections 5, 6, 9).

    Writes go to this process's own bucket, signed with its hotkey; reads of other peers' objects
    go through read transports opened from their chain commitments, and return validated types
    or a :class:`UploadRejection` (never an exception for bad peer data). ``lead`` reads (peer
    lists, aggregate records, ``start_window``, checkpoints) come from the lead validator's
    bucket (:func:`lead_validator`).
    """

    transport: Transport
    upload_grace_s: float  # the upload interval is [t(start of w+1), + this] (whole seconds)

    def upload_interval(self, window: int) -> tuple[int, int]:
        """``window``'s upload interval in whole seconds of chain time, both ends inclusive."""
        ...

    def peer_transport(self, hotkey: str) -> Transport | None:
        """A read transport for ``hotkey``'s bucket (from its commitment), or ``None``."""
        ...

    # -- miner writes
    def put_gradient(
        self,
        window: int,
        payload: bytes,
        *,
        codec: str,
        receipt: Receipt | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> ObjectInfo: ...

    def put_sync_sample(self, window: int, values: Mapping[str, Sequence[float]]) -> ObjectInfo: ...

    # -- verified reads of peers' objects
    def fetch_gradients(
        self,
        window: int,
        uids: Sequence[int],
        *,
        max_bytes: int,
        codec: str | None = None,
        wait: bool = True,
    ) -> Iterator[FetchOutcome]:
        """Fetch and verify ``uids``' uploads for ``window`` (in completion order).

        With ``wait`` a missing upload is polled for until the window's upload interval closes;
        every uid yields exactly one outcome.
        """
        ...

    def fetch_gradient_by_hash(
        self, window: int, uid: int, sha256: str, *, max_bytes: int, codec: str | None = None
    ) -> FetchOutcome:
        """An upload named in an aggregate record, checked against its hash (no timing check)."""
        ...

    def fetch_sync_sample(self, window: int, uid: int) -> SyncSample | UploadRejection: ...

    # -- the lead validator's records
    def start_window(self) -> int | None: ...

    def peer_list(self, window: int) -> PeerList | None:
        """The lead validator's peer list in force at ``window`` (latest ``first_window <= window``)."""
        ...

    def aggregate_record(self, window: int) -> AggregateRecord | None: ...

    # -- validator writes
    def put_start_window(self, window: int) -> ObjectInfo: ...

    def put_peer_list(self, peer_list: PeerList) -> ObjectInfo: ...

    def put_aggregate_record(self, record: AggregateRecord) -> ObjectInfo: ...

    def prune(self, current_window: int) -> int:
        """Retention: delete this process's own old uploads (keeping what joiners replay);
        returns how many objects were deleted."""
        ...

    # -- checkpoints (SPEC section 9)
    def put_checkpoint(
        self, window: int, outer_step: int, folder: str, model: Mapping[str, Any]
    ) -> ObjectInfo:
        """Publish the weights directory ``folder`` (every file, hashed) with a signed
        manifest, and point ``checkpoint/latest`` at it."""
        ...

    def fetch_checkpoint(self, dest: str) -> CheckpointInfo | None:
        """Download the lead validator's latest checkpoint into ``dest`` (resuming: files
        already there with the right hash are kept); every file is checked against the
        signed manifest before it is kept. ``None`` if there is none (or it is unusable)."""
        ...


# --------------------------------------------------------------------------------------------
# Codec and outer step (provided by sparseloco / diloco / ddp through ``covenant_outer_step``)
# --------------------------------------------------------------------------------------------

Shapes = Mapping[str, tuple[int, ...]]


class PayloadRejected(CovenantError, ValueError):
    """A peer's payload failed the codec's checks; ``reason`` is a short tag to record."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@runtime_checkable
class Codec(Protocol):
    """How pseudo-gradients travel: the one place peer payload bytes are decoded.

    ``shapes`` maps every global tensor name to its global shape; ``owned`` (optional) restricts
    dense outputs to this rank's slices (a 72B peer never holds dense full tensors on one rank).
    Every method raises :class:`PayloadRejected` for a bad payload, never anything else.
    """

    name: str  # recorded in manifests, e.g. "sparseloco/1"

    def max_payload_bytes(self, shapes: Shapes) -> int:
        """The largest valid payload for these shapes (the download cap, header excluded)."""
        ...

    def validate(
        self, payload: bytes, shapes: Shapes, names: Collection[str] | None = None
    ) -> None:
        """Check everything about ``payload`` that an apply relies on. ``names`` (optional)
        limits the per-tensor checks to those tensors; the payload's structure (framing,
        checksum, header, sizes) is always checked. ``names=()`` checks the structure only: a
        multi-rank peer checks the structure on rank 0 and splits the rest across its ranks."""
        ...

    def decode(
        self, payload: bytes, shapes: Shapes, owned: Sequence[ParamShard] | None = None
    ) -> dict[str, torch.Tensor]: ...

    def norms(self, payload: bytes, shapes: Shapes) -> dict[str, float]:
        """Per tensor, the L2 norm of the decoded update (for median clipping)."""
        ...

    def aggregate(
        self,
        payloads: Sequence[bytes],
        shapes: Shapes,
        owned: Sequence[ParamShard] | None = None,
    ) -> dict[str, torch.Tensor]: ...

    def tile_indices(self, payload: bytes, shapes: Shapes) -> dict[str, Any]:
        """Per tensor, an int array (tiles, k) of in-tile indices (copy detection); may be empty
        for codecs without tiles."""
        ...


@dataclass
class WindowContext:
    """The window a peer is in, as every rank of the peer agrees on it.

    ``outer_step`` is ``outer_step(window)``: the global inner step of inner step ``i`` is
    ``outer_step * inner_steps + i`` (SPEC sections 1 and 3).
    """

    window: int
    outer_step: int
    uid: int
    inner_steps: int
    steps_done: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class OuterStep(Protocol):
    """Turns the end of an inner loop into a shared update (upload, gather, apply).

    ``begin`` runs at the start of a window, before the first inner step (snapshot the weights);
    ``end`` at the window boundary: it resets the weights to the snapshot, publishes this peer's
    update, gathers the peers' and applies the aggregate, committing on every rank of the peer
    or on none. ``apply`` applies given uploads to ``model`` (the validator and a catching-up
    peer use it on the weights they hold). Every method is collective over the peer's ranks.
    """

    name: str
    codec: Codec | None

    def alpha(self, outer_step: int) -> float:
        """The outer learning rate at ``outer_step``."""
        ...

    def begin(self, ctx: WindowContext, model: ModelRuntime) -> None: ...

    def end(self, ctx: WindowContext, model: ModelRuntime) -> dict[str, float]:
        """Finish the window; return metrics to log (``applied`` 1/0, bytes, peers...)."""
        ...

    def apply(
        self, ctx: WindowContext, model: ModelRuntime, uploads: Sequence[Upload]
    ) -> dict[str, float]:
        """Aggregate ``uploads`` and apply them to ``model``'s current weights (all ranks)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------
# Scorer (provided by the gauntlet through ``covenant_scorer``)
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Scorer(Protocol):
    """The validator's per-window work: check, score, rate, weigh and publish (SPEC section 7)."""

    def first_window(self, last: int | None) -> int:
        """The first window to process: ``last + 1`` after a restart (``last`` is the last one
        saved), else where the run stands (the lead validator publishes ``start_window`` and
        its first peer list here)."""
        ...

    def process_window(self, window: int) -> dict[str, float]:
        """Process window ``window`` (its upload interval has closed); return metrics."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
