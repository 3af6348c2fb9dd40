"""One rank of a multi-process model test, launched by :func:`launch` (a tiny torchrun).

Run as a script: ``python dist_worker.py JOB_JSON RANK WORLD``. It joins a gloo group through a
``FileStore`` in the job directory (no ports), then for each layout in the job builds the
runtime with those TP/PP/DP degrees, loads the same full weights (written by one process, read
by each rank for its own slices), and records on rank 0: the loss and gathered gradients of one
forward/backward, then the loss, grad norm and gathered weights after one optimizer step, whose
ranks then save their own pieces of the weights (``saved``). Each rank trains on its DP share (entries ``r, r+D, ...``).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve()


def launch(job: dict[str, Any], world: int, workdir: Path, timeout_s: float = 240.0) -> None:
    """Run ``world`` worker processes for ``job`` and wait; raise with their output on failure."""
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), str(job_path), str(rank), str(world)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(world)
    ]
    logs: list[str] = []
    failed = False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            failed = True
        logs.append(out)
        failed = failed or p.returncode != 0
    if failed:
        tail = "\n".join(f"--- rank {i}\n{log[-3000:]}" for i, log in enumerate(logs))
        raise RuntimeError(f"distributed workers failed:\n{tail}")


def run_layout(
    job: dict[str, Any], tp: int, pp: int, dp: int, dist_opt: bool = False
) -> dict[str, Any] | None:
    from covenant.models.config import ModelConfig, OptimConfig
    from covenant.models.layout import gather_full_state
    from covenant.models.runtime import MegatronRuntime

    cfg = ModelConfig(**job["model"], tp=tp, pp=pp, dp=dp, distributed_optimizer=dist_opt)
    if job.get("fp8_linears"):
        # the native FP8 linears on this CPU (precision fp8 itself needs FP8 tensor cores):
        # the spec is what a GPU run with backend='local', precision='fp8' builds
        import covenant.models.runtime as runtime_mod
        from covenant.models.spec import layer_spec

        def fp8_spec(backend: Any, attention: Any = None, native_fp8: bool = False) -> Any:
            return layer_spec(backend, attention, True)

        runtime_mod.layer_spec = fp8_spec  # type: ignore[assignment]
    rt = MegatronRuntime(cfg, OptimConfig(**job.get("optim", {})))
    from safetensors.torch import load_file

    rt.load_full_weights(job["weights"])  # written by one process: a cross-layout read
    tokens = load_file(job["tokens"])["tokens"]
    share = tokens[rt.coords.dp_rank :: dp]
    fb_loss = rt.forward_backward(share)
    grads = gather_full_state(rt, "grads")
    result = rt.train_step(share, job["lr"])
    params = gather_full_state(rt)
    saved = Path(job["saved"]) / f"tp{tp}_pp{pp}_dp{dp}" / ("distopt" if dist_opt else "plain")
    rt.save_full_weights(str(saved))  # every owning rank writes its own pieces
    if rt.coords.rank != 0:
        return None
    return {
        "saved": str(saved),
        "fb_loss": fb_loss,
        "grads": grads,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "params": params,
    }


def main() -> None:
    job_path, rank, world = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    job = json.loads(job_path.read_text())
    import torch.distributed as dist

    store = dist.FileStore(str(job_path.parent / "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    results: dict[str, Any] = {}
    for tp, pp, dp, dist_opt in job["layouts"]:
        out = run_layout(job, tp, pp, dp, dist_opt)
        if out is not None:
            results[f"tp{tp}_pp{pp}_dp{dp}" + ("_distopt" if dist_opt else "")] = out
    if rank == 0:
        torch.save(results, job_path.parent / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
