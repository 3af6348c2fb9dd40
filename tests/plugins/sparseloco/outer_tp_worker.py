"""One peer of ``test_sparseloco_outer_torchrun.py``: real windows of the SparseLoCo outer step.

Run as ``python outer_tp_worker.py JOB_JSON`` (a TP=1 peer) or under
``python -m torch.distributed.run --standalone --nproc-per-node 2 outer_tp_worker.py JOB_JSON``
(a TP=2 peer on gloo). The job names the session overrides (hotkey, chain, storage, model),
the windows and an optional injected failure. Each process opens a real session (``model``,
``storage``, ``chain``, ``sparseloco`` plugins), builds the peer's model with
``covenant_build_model`` and the outer step with ``covenant_outer_step``, then per window:

    begin (theta_start) -> a deterministic, layout-independent change of the weights (the same
    global tensors on any layout, so a TP=1 and a TP=2 peer hold the same pseudo-gradient)
    -> publish (encode, upload signed) -> finish (gather the peer list's uploads, aggregate own
    slices, apply on all ranks or none) -> save_full_weights(out/w{window})

and writes ``out/rank{r}-w{window}.json`` (the window's metrics on that rank and the sum of
its error buffers). The failure (``fail_window``, ``fail_rank``) makes that rank's codec fail to
decode while aggregating that window, as a corrupted payload on one rank would.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Any

import torch


def perturb(model: Any, window: int) -> None:
    """theta <- theta - 1e-3 * N(0, 1) drawn per global tensor, sliced to this rank's box."""
    shards = {s.name: s for s in model.layout()}
    with torch.no_grad():
        for name, p in model.local_parameters().items():
            s = shards[name]
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * window)
            full = torch.randn(s.global_shape, generator=g) * 1e-3
            box = tuple(slice(o, o + n) for o, n in zip(s.offsets, s.local_shape, strict=True))
            p.sub_(full[box].to(p.device, p.dtype))


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    from covenant.engine.protocols import PayloadRejected, WindowContext
    from covenant.engine.session import open_session
    from covenant.engine.window import agree

    session = open_session(
        None, job["overrides"], environ={"COVENANT_PLUGINS": "model,storage,chain,sparseloco"}
    )
    cfg = session.config
    model = session.hook.covenant_build_model(config=cfg)
    outer = session.hook.covenant_outer_step(
        config=cfg, name="sparseloco", services=session.services
    )
    rank = model.parallel.rank
    out = Path(job["out"])
    model.save_full_weights(str(out / "init"))
    uid = agree(lambda: session.services.uid)
    outer_step = 0
    for window in job["windows"]:
        ctx = WindowContext(window, outer_step, uid, 1)
        outer.begin(ctx, model)
        perturb(model, window)
        ctx.steps_done = 1
        metrics = outer.publish(ctx, model)
        if window == job.get("fail_window") and rank == job.get("fail_rank"):

            def broken(*args: Any, **kwargs: Any) -> Any:
                raise PayloadRejected("payload_index", "injected: indices out of range")

            outer.codec.aggregate = broken  # this rank only, this window only
        metrics.update(outer.finish(ctx, model))
        outer.codec.__dict__.pop("aggregate", None)
        model.save_full_weights(str(out / f"w{window}"))
        errors = float(sum(float(e.abs().sum()) for e in outer.errors.values()))
        record = {"rank": rank, "window": window, "metrics": metrics, "error_abs_sum": errors}
        (out / f"rank{rank}-w{window}.json").write_text(json.dumps(record, sort_keys=True))
        if metrics.get("applied"):
            outer_step += 1
    model.close()


if __name__ == "__main__":
    main()
