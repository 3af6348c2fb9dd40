"""``covenant train``: one peer's inner loop without an outer step (same command under torchrun)."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from covenant.engine.cli.options import ConfigOpt, SetOpt

err = Console(stderr=True)


def train(
    config: ConfigOpt = "tiny",
    overrides: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the run's latest checkpoint")
    ] = False,
    steps: Annotated[
        int | None, typer.Option("--steps", help="stop after this global inner step")
    ] = None,
) -> None:
    """Train one peer on its assigned data: evaluate, checkpoint, resume bit-identically.

    Launch with `torchrun --nproc-per-node N -m covenant.engine.cli.main train ...` for TP/PP/DP.
    """
    from covenant.engine.loop import run_training
    from covenant.engine.session import open_session

    session = open_session(config, overrides or ())
    result = run_training(session, resume=resume, steps=steps)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    tps = result.tokens / result.seconds if result.seconds else 0.0
    vals = sorted(result.val_losses.items())
    trend = (
        f"; val loss {vals[0][1]:.3f} (step {vals[0][0]}) -> {vals[-1][1]:.3f} (step {vals[-1][0]})"
        if vals
        else ""
    )
    err.print(
        f"{result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f} s "
        f"({tps:,.0f} tokens/s){trend}; run dir {result.run_dir}"
    )


def register(app: typer.Typer) -> None:
    app.command("train")(train)
