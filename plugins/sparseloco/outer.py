"""The SparseLoCo outer step of a miner, and the codec the validator checks payloads with.

One window, on every rank of the peer (SPEC section 4; docs/sparseloco.md "The outer step")::

    begin:  theta_start <- this rank's shards (optionally kept on the host)
    end:    delta = theta_start - theta;  e <- beta*e + delta;  piece = top-k + 2-bit(e);
            e <- e - decode(piece);  theta <- theta_start
            pieces -> rank 0 -> payload (same bytes as a TP=1 peer's) -> wait for the window's end
            -> signed upload with the data receipt -> the peer list in force -> fetch the listed
            peers' uploads (iter_fetch, inside the upload interval) -> verify, validate
            -> the chosen payloads reach every rank -> each rank aggregates only its own slices
            -> all ranks agree (all finite, nothing failed) -> theta <- theta_start - alpha*update
            -> reload the optimizer's copy -> sync sample debug/{w}/{uid}
    no aggregate (no peer list, nothing usable, or a failure on any rank): nothing is applied,
    the error buffer is zeroed, and the reason is logged and returned in the window's metrics.

Only global rank 0 does I/O (services: chain, hotkey, storage); the other ranks receive its
decisions and the chosen payload bytes through collectives. The payload bytes received from
peers are untrusted: rank 0 checks their structure, every rank checks its share of their
tensors before anything is aggregated (``peer.gather_checked``), and every rank still decodes
them through the same checked parser.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from covenant.engine import peer
from covenant.engine.protocols import (
    ModelRuntime,
    ParamShard,
    PayloadRejected,
    Shapes,
    Upload,
    WindowContext,
)
from covenant.engine.window import OuterConfig, alpha_at
from covenant.plugins.sparseloco.aggregation import aggregate_payloads, exact_norm
from covenant.plugins.sparseloco.codec import TensorPiece, compress_steps, merge
from covenant.plugins.sparseloco.config import SparseLoCoConfig
from covenant.plugins.sparseloco.errors import AggregationError, PayloadError
from covenant.plugins.sparseloco.wire import (
    ParsedPayload,
    expected_payload_size,
    pack_payload,
    parse_payload,
)

if TYPE_CHECKING:
    from covenant.engine.services import Services

log = logging.getLogger(__name__)


def _reason(exc: PayloadError) -> str:
    """A short tag for a codec error (what the validator records)."""
    name = type(exc).__name__.removeprefix("Payload").removesuffix("Error").lower()
    return f"payload_{name}" if name else "payload_invalid"


def boxes_of(owned: Sequence[ParamShard]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    return {s.name: (tuple(s.offsets), tuple(s.local_shape)) for s in owned}


class SparseLoCoCodec:
    """The :class:`covenant.engine.protocols.Codec` of SparseLoCo payloads (wire format v1)."""

    name = "sparseloco/1"

    def __init__(
        self, config: SparseLoCoConfig | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self.config = config or SparseLoCoConfig()
        # where validate and aggregate decode: a miner's outer step sets its parameters'
        # device (a GPU decodes ~100x faster than one CPU thread; docs/BENCHMARKS.md)
        self.device = torch.device(device)

    def _parse(self, payload: bytes, shapes: Shapes) -> ParsedPayload:
        try:
            return parse_payload(payload, shapes, self.config)
        except PayloadError as exc:
            raise PayloadRejected(_reason(exc), str(exc)) from None

    def max_payload_bytes(self, shapes: Shapes) -> int:
        return expected_payload_size(shapes, self.config)

    def validate(
        self, payload: bytes, shapes: Shapes, names: Collection[str] | None = None
    ) -> None:
        parsed = self._parse(payload, shapes)
        try:
            parsed.validate(names, self.device)
        except PayloadError as exc:
            raise PayloadRejected(_reason(exc), str(exc)) from None

    def decode(
        self, payload: bytes, shapes: Shapes, owned: Sequence[ParamShard] | None = None
    ) -> dict[str, torch.Tensor]:
        parsed = self._parse(payload, shapes)
        boxes = boxes_of(owned) if owned is not None else None
        out: dict[str, torch.Tensor] = {}
        try:
            for name in parsed.entries:
                if boxes is not None and name not in boxes:
                    continue
                dense = parsed.dense(name)
                if boxes is not None:
                    (o, n) = boxes[name]
                    dense = dense[tuple(slice(a, a + b) for a, b in zip(o, n, strict=True))]
                out[name] = dense
        except PayloadError as exc:
            raise PayloadRejected(_reason(exc), str(exc)) from None
        return out

    def norms(self, payload: bytes, shapes: Shapes) -> dict[str, float]:
        parsed = self._parse(payload, shapes)
        try:
            return {name: exact_norm(parsed.values(name)) for name in parsed.entries}
        except PayloadError as exc:
            raise PayloadRejected(_reason(exc), str(exc)) from None

    def aggregate(
        self,
        payloads: Sequence[bytes],
        shapes: Shapes,
        owned: Sequence[ParamShard] | None = None,
    ) -> dict[str, torch.Tensor]:
        boxes = boxes_of(owned) if owned is not None else None
        try:
            return aggregate_payloads(payloads, shapes, self.config, self.device, owned=boxes)
        except PayloadError as exc:
            raise PayloadRejected(_reason(exc), str(exc)) from None
        except AggregationError as exc:
            raise PayloadRejected("nonfinite_aggregate", str(exc)) from None

    def tile_indices(self, payload: bytes, shapes: Shapes) -> dict[str, Any]:
        parsed = self._parse(payload, shapes)
        try:
            return {name: parsed.indices(name).numpy() for name in parsed.entries}
        except PayloadError as exc:
            raise PayloadRejected(_reason(exc), str(exc)) from None


# --------------------------------------------------------------------------------------------
# The outer step
# --------------------------------------------------------------------------------------------


class SparseLoCoOuterStep:
    """The miner's SparseLoCo outer step (see the module docstring); an ``OuterStep``."""

    name = "sparseloco"

    def __init__(
        self,
        config: SparseLoCoConfig,
        outer: OuterConfig,
        services: Services | None,
    ) -> None:
        self.config = config
        self.outer = outer
        self.services = services  # used on global rank 0 only
        self.codec = SparseLoCoCodec(config)
        self.errors: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        self._shards: dict[str, ParamShard] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    # -- set-up -------------------------------------------------------------------------------

    def alpha(self, outer_step: int) -> float:
        return alpha_at(outer_step, self.outer)

    def shapes(self, model: ModelRuntime) -> dict[str, tuple[int, ...]]:
        """Global name -> global shape of every tensor of the peer (collective once)."""
        if self._shapes is None:
            self._shards = {s.name: s for s in model.layout()}
            mine = sorted((s.name, tuple(s.global_shape)) for s in self._shards.values())
            everyone = peer.gather_to_rank0(mine)
            merged = dict(x for part in everyone for x in part) if everyone is not None else {}
            self._shapes = dict(sorted(peer.broadcast_obj(merged).items()))
        return self._shapes

    def _layout(self, model: ModelRuntime) -> dict[str, ParamShard]:
        self.shapes(model)
        assert self._shards is not None
        return self._shards

    def _contributes(self, model: ModelRuntime, shard: ParamShard) -> bool:
        """Whether this rank's copy of ``shard`` goes into the peer's upload (one copy each)."""
        return peer.contributes(model, shard)

    # -- the window ---------------------------------------------------------------------------

    def begin(self, ctx: WindowContext, model: ModelRuntime) -> None:
        shards = self._layout(model)
        device = torch.device("cpu") if self.outer.snapshot_on_cpu else None
        self.start = {}
        for name, param in model.local_parameters().items():
            self.start[name] = param.detach().to(device or param.device, torch.float32, copy=True)
            if name not in self.errors:
                self.errors[name] = torch.zeros(
                    shards[name].local_shape, dtype=torch.float32, device=param.device
                )

    def end(self, ctx: WindowContext, model: ModelRuntime) -> dict[str, Any]:
        """:meth:`publish` then :meth:`finish` (a driver running peers in lockstep in one
        process calls the two halves itself, all peers' publishes before any finish)."""
        metrics = self.publish(ctx, model)
        metrics.update(self.finish(ctx, model))
        return metrics

    def publish(self, ctx: WindowContext, model: ModelRuntime) -> dict[str, Any]:
        """Compress this window's pseudo-gradient, reset theta to theta_start and (rank 0)
        upload the payload once the window has ended. Collective."""
        t0 = time.perf_counter()
        shards = self._layout(model)
        shapes = self.shapes(model)
        params = model.local_parameters()
        alpha = self.alpha(ctx.outer_step)
        # 1. pseudo-gradient, error feedback, top-k + 2-bit, residual (every rank, own shards)
        with torch.no_grad():
            deltas = {
                n: self.start[n].to(p.device) - p.detach().to(torch.float32)
                for n, p in params.items()
            }
            errors = {n: self.errors[n].to(p.device) for n, p in params.items()}
            pieces, self.errors = compress_steps(
                errors,
                deltas,
                self.config,
                outer_lr=alpha,
                shapes={n: shards[n].global_shape for n in params},
                offsets={n: shards[n].offsets for n in params},
                reduce=_tp_reduce(model),
            )
            del deltas, errors
            # 2. theta <- theta_start (the aggregate, if any, is applied on top of it)
            for n, p in params.items():
                p.copy_(self.start[n].to(p.device, p.dtype))
        encode_s = time.perf_counter() - t0
        # 3. one copy of every tile reaches rank 0, which uploads
        mine = [_to_cpu(pieces[n]) for n in sorted(pieces) if self._contributes(model, shards[n])]
        everyone = peer.gather_to_rank0(mine)
        out: dict[str, Any] = {}
        if peer.rank() == 0:
            try:
                out = self._upload(ctx, everyone, shapes)
            except Exception as exc:  # rank 0's I/O failed: every rank must still move on
                log.warning("window %d: upload failed: %s", ctx.window, exc, exc_info=True)
                out = {"uploaded": 0.0, "upload_error": str(exc)}
        out = peer.broadcast_obj(out)
        out["encode_s"] = encode_s
        return out

    def finish(self, ctx: WindowContext, model: ModelRuntime) -> dict[str, Any]:
        """Gather the listed peers' uploads (rank 0), aggregate this rank's slices, apply on
        every rank or none, publish the sync sample. Collective."""
        shards = self._layout(model)
        shapes = self.shapes(model)
        params = model.local_parameters()
        alpha = self.alpha(ctx.outer_step)
        for p in params.values():  # decode where the weights live
            self.codec.device = p.device
            break
        plan, payloads = peer.gather_checked(
            self.services, ctx.window, self.codec, shapes, lambda: self._gather(ctx.window, shapes)
        )
        metrics: dict[str, Any] = dict(plan)
        # 4. every rank aggregates its own slices; the apply commits on all ranks or on none
        t1 = time.perf_counter()
        update, reason = peer.aggregate_agreed(
            self.services,
            ctx,
            self.codec,
            payloads,
            shapes,
            list(shards.values()),
            plan.get("skip_reason", ""),
        )
        if update:
            with torch.no_grad():
                for n, p in params.items():
                    if n in update:
                        new = self.start[n].to(p.device) - alpha * update[n].to(p.device)
                        p.copy_(new.to(p.dtype))
            model.reload_params()
        else:
            for e in self.errors.values():
                e.zero_()
            metrics["skip_reason"] = reason
        metrics["applied"] = 1.0 if update else 0.0
        metrics["alpha"] = alpha
        metrics["apply_s"] = time.perf_counter() - t1
        # 5. the sync sample after applying this window
        peer.put_sync_sample(self.services, ctx.window, self._sync_values(model, params, shards))
        self.start = {}
        return metrics

    def _upload(
        self, ctx: WindowContext, everyone: list[Any] | None, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, Any]:
        """Rank 0: pack the payload, then upload it at the window's end (signed, with receipt)."""
        assert self.services is not None and everyone is not None
        payload = pack_payload(merge([p for part in everyone for p in part]), self.config)
        out: dict[str, Any] = {
            "bytes_up": float(len(payload)),
            "bytes_dense": float(4 * sum(math.prod(s) for s in shapes.values())),
        }
        out.update(peer.upload_at_window_end(self.services, ctx, payload, self.codec.name))
        return out

    def _gather(self, window: int, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Rank 0: the listed peers' verified uploads, structure-checked (``peer.fetch_listed``;
        a one-process peer checks them whole here)."""
        assert self.services is not None
        whole = None if peer.world() == 1 else ()
        return peer.fetch_listed(self.services, window, self.codec, shapes, names=whole)

    # -- applying given uploads (validator, catch-up) ----------------------------------------

    def apply(
        self, ctx: WindowContext, model: ModelRuntime, uploads: Sequence[Upload]
    ) -> dict[str, Any]:
        """Aggregate ``uploads`` (rank 0's list; ascending uid) and apply them to the current
        weights: ``theta <- theta - alpha * update``. Collective; all ranks or none."""
        shards = self._layout(model)
        shapes = self.shapes(model)
        alpha = self.alpha(ctx.outer_step)
        payloads = peer.share_uploads(uploads)
        # no plugin is asked here: the validator and a joiner apply what the swarm applied
        update, reason = peer.aggregate_agreed(
            None,
            ctx,
            self.codec,
            payloads,
            shapes,
            list(shards.values()),
            "" if payloads else "no uploads",
        )
        ok = bool(update)
        if ok:
            with torch.no_grad():
                for n, p in model.local_parameters().items():
                    if n in update:
                        p.copy_((p.detach().float() - alpha * update[n].to(p.device)).to(p.dtype))
            model.reload_params()
        out: dict[str, Any] = {"applied": 1.0 if ok else 0.0, "peers": float(len(payloads))}
        if not ok:
            out["skip_reason"] = reason
        return out

    # -- sync sample ----------------------------------------------------------------------------

    def _sync_values(
        self,
        model: ModelRuntime,
        params: Mapping[str, torch.Tensor],
        shards: Mapping[str, ParamShard],
    ) -> dict[str, dict[int, float]]:
        return peer.sync_values(model, params, shards)

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"format": 1, "errors": {n: e.detach().cpu() for n, e in self.errors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != 1:
            raise ValueError(f"unknown sparseloco state format {state.get('format')!r}")
        self.errors = {n: t.to(torch.float32) for n, t in state["errors"].items()}


def sync_positions(shard: ParamShard) -> dict[int, tuple[int, ...]]:
    """The local indices of the global flat sync positions this shard owns."""
    out = {}
    for pos in peer.SYNC_POSITIONS:
        local = peer.local_index(shard, pos)
        if local is not None:
            out[pos] = local
    return out


def _to_cpu(piece: TensorPiece) -> TensorPiece:
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().cpu()

    return TensorPiece(
        piece.name,
        piece.geometry,
        piece.k,
        piece.block,
        cpu(piece.indices),  # type: ignore[arg-type]
        cpu(piece.codes),
        cpu(piece.values),
        piece.table,
        piece.quantizer,
    )


def _tp_reduce(model: ModelRuntime) -> Any:
    """Sum an int64 vector over this rank's TP group (the codec's three statistics rounds)."""
    if model.parallel.tp == 1:
        return None
    group = model.group("tp")

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t

    return reduce


__all__ = ["SparseLoCoCodec", "SparseLoCoOuterStep", "sync_positions"]
