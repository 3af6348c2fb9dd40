"""The DiLoCo outer step: dense pseudo-gradients, averaged over the peer list, outer Nesterov SGD.

One window, on every rank of the peer (Douillard et al. 2023, "DiLoCo"; docs/outer.md)::

    begin:   theta_start <- this rank's shards (optionally kept on the host)
    publish: delta = theta_start - theta;  theta <- theta_start
             one copy of every slice -> rank 0 -> dense/1 payload (fp32 or bf16; the same bytes
             as a TP=1 peer's) -> wait for the window's end -> signed upload with the data receipt
    finish:  the peer list in force -> fetch the listed peers' uploads -> validate -> the chosen
             payloads reach every rank -> each rank averages only its own slices: g
             -> all ranks agree (all finite, nothing failed) -> m <- mu*m + g;
             theta <- theta_start - lr * (g + mu*m)   (Nesterov; plain: lr * m)
             -> reload the optimizer's copy -> sync sample debug/{w}/{uid}
    no aggregate (no peer list, nothing usable, a failure on any rank): theta stays
    theta_start and the momentum is left as it was; the reason is logged and returned.

The momentum buffer is state (:meth:`DiLoCoOuterStep.state_dict`), kept per rank for the
slices the rank owns. Only global rank 0 does I/O; peer bytes travel to the other ranks raw and
every rank parses them through the same checked decoder (:mod:`.codec`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from covenant.engine import peer
from covenant.engine.protocols import (
    ModelRuntime,
    ParamShard,
    Upload,
    WindowContext,
)
from covenant.engine.window import OuterConfig, alpha_at
from covenant.plugins.diloco.codec import DenseCodec, DenseWriter
from covenant.plugins.diloco.config import DiLoCoConfig

if TYPE_CHECKING:
    from covenant.engine.services import Services

log = logging.getLogger(__name__)

WIRE_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}


def nesterov_step(
    start: torch.Tensor,
    update: torch.Tensor,
    momentum: torch.Tensor,
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One outer SGD step with momentum, as ``torch.optim.SGD`` (dampening 0) does it.

    ``m' = mu*m + g``; the step is ``g + mu*m'`` (Nesterov) or ``m'``; returns
    ``(start - lr*step, m')`` in float32. ``update`` is the averaged pseudo-gradient ``g``.
    """
    g = update.to(torch.float32)
    m = momentum.to(torch.float32) * mu + g
    step = g + m * mu if nesterov else m
    return start.to(torch.float32) - step * lr, m


class DiLoCoOuterStep:
    """The DiLoCo outer step of a miner (see the module docstring); an ``OuterStep``."""

    name = "diloco"

    def __init__(self, config: DiLoCoConfig, outer: OuterConfig, services: Services | None) -> None:
        self.config = config
        self.outer = outer
        self.services = services  # used on global rank 0 only
        self.codec = DenseCodec(config)
        self.momentum: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        self._shards: dict[str, ParamShard] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    # -- set-up -------------------------------------------------------------------------------

    def alpha(self, outer_step: int) -> float:
        """``[diloco] lr`` times the ``[outer]`` alpha schedule (1.0 unless configured)."""
        return self.config.lr * alpha_at(outer_step, self.outer)

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

    def _momentum(self, name: str, like: torch.Tensor, shard: ParamShard) -> torch.Tensor:
        m = self.momentum.get(name)
        if m is None:
            m = torch.zeros(shard.local_shape, dtype=torch.float32, device=like.device)
        elif m.device != like.device:
            m = m.to(like.device)
        self.momentum[name] = m
        return m

    # -- the window ---------------------------------------------------------------------------

    def begin(self, ctx: WindowContext, model: ModelRuntime) -> None:
        shards = self._layout(model)
        device = torch.device("cpu") if self.outer.snapshot_on_cpu else None
        self.start = {}
        for name, param in model.local_parameters().items():
            self.start[name] = param.detach().to(device or param.device, torch.float32, copy=True)
            self._momentum(name, param, shards[name])

    def end(self, ctx: WindowContext, model: ModelRuntime) -> dict[str, Any]:
        """:meth:`publish` then :meth:`finish` (a lockstep driver calls the halves itself)."""
        metrics = self.publish(ctx, model)
        metrics.update(self.finish(ctx, model))
        return metrics

    def publish(self, ctx: WindowContext, model: ModelRuntime) -> dict[str, Any]:
        """Pseudo-gradient, theta <- theta_start, and (rank 0) the upload once the window has
        ended. Collective."""
        t0 = time.perf_counter()
        shards = self._layout(model)
        shapes = self.shapes(model)
        wire = WIRE_TORCH[self.config.wire_dtype]
        mine: list[tuple[str, tuple[int, ...], torch.Tensor]] = []
        with torch.no_grad():
            for n, p in model.local_parameters().items():
                start = self.start[n].to(p.device)
                if peer.contributes(model, shards[n]):
                    delta = start - p.detach().to(torch.float32)
                    mine.append((n, tuple(shards[n].offsets), delta.to("cpu", wire)))
                p.copy_(start.to(p.dtype))
        encode_s = time.perf_counter() - t0
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
        """Gather the listed peers' uploads (rank 0), average this rank's slices, take the outer
        step on every rank or none, publish the sync sample. Collective."""
        shards = self._layout(model)
        shapes = self.shapes(model)
        params = model.local_parameters()
        lr = self.alpha(ctx.outer_step)
        plan, payloads = peer.gather_checked(
            self.services, ctx.window, self.codec, shapes, lambda: self._gather(ctx.window, shapes)
        )
        metrics: dict[str, Any] = dict(plan)
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
            self._step(model, params, shards, update, lr, from_start=True)
        else:
            metrics["skip_reason"] = reason
        metrics["applied"] = 1.0 if update else 0.0
        metrics["alpha"] = lr
        metrics["apply_s"] = time.perf_counter() - t1
        peer.put_sync_sample(self.services, ctx.window, peer.sync_values(model, params, shards))
        self.start = {}
        return metrics

    def rule(
        self, name: str, base: torch.Tensor, update: torch.Tensor, lr: float, shard: ParamShard
    ) -> torch.Tensor:
        """The outer optimizer: new weights of ``name`` (this rank's slice) from ``base``
        (theta_start, or the current weights in :meth:`apply`) and the averaged pseudo-gradient
        ``update``; float32, on ``base``'s device.

        Called only when the step commits (on every rank), so a rule may move its own state
        here. The default is SGD with (Nesterov) momentum; a subclass overrides this to bring
        its own outer optimizer over the same exchange and codec (docs/outer.md).
        """
        new, m = nesterov_step(
            base,
            update,
            self._momentum(name, base, shard),
            lr,
            self.config.momentum,
            self.config.nesterov,
        )
        self.momentum[name] = m
        return new

    def _step(
        self,
        model: ModelRuntime,
        params: Mapping[str, torch.Tensor],
        shards: Mapping[str, ParamShard],
        update: Mapping[str, torch.Tensor],
        lr: float,
        *,
        from_start: bool,
    ) -> None:
        """theta <- rule(theta_start or theta, update) on every owned tensor, then reload."""
        with torch.no_grad():
            for n, p in params.items():
                if n not in update:
                    continue
                base = self.start[n].to(p.device) if from_start else p.detach().float()
                new = self.rule(n, base, update[n].to(p.device), lr, shards[n])
                p.copy_(new.to(p.dtype))
        model.reload_params()

    def _upload(
        self, ctx: WindowContext, everyone: list[Any] | None, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, Any]:
        """Rank 0: write the payload, wait for the window's end, upload (signed, with receipt)."""
        assert self.services is not None and everyone is not None
        services = self.services
        writer = DenseWriter(shapes, self.config.wire_dtype)
        for part in everyone:
            for name, offsets, piece in part:
                writer.write(name, offsets, piece)
        payload = writer.finish()
        out: dict[str, Any] = {
            "bytes_up": float(len(payload)),
            "bytes_dense": float(4 * sum(math.prod(s) for s in shapes.values())),
        }
        out.update(peer.upload_at_window_end(services, ctx, payload, self.codec.name))
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
        """Average ``uploads`` (rank 0's list; ascending uid) and take the outer step from the
        current weights, moving the momentum as a miner does. Collective; all ranks or none."""
        shards = self._layout(model)
        shapes = self.shapes(model)
        lr = self.alpha(ctx.outer_step)
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
            self._step(model, model.local_parameters(), shards, update, lr, from_start=False)
        out: dict[str, Any] = {"applied": 1.0 if ok else 0.0, "peers": float(len(payloads))}
        if not ok:
            out["skip_reason"] = reason
        return out

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"format": 1, "momentum": {n: m.detach().cpu() for n, m in self.momentum.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != 1:
            raise ValueError(f"unknown diloco state format {state.get('format')!r}")
        self.momentum = {n: t.to(torch.float32) for n, t in state["momentum"].items()}


__all__ = ["DiLoCoOuterStep", "nesterov_step"]
