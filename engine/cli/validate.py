"""``covenant validate``: run a validator (the Gauntlet by default) on chain time."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from covenant.engine.cli.options import ConfigOpt, SetOpt

err = Console(stderr=True)


def validate(
    config: ConfigOpt = "validator",
    overrides: SetOpt = None,
    windows: Annotated[
        int | None, typer.Option("--windows", help="stop after processing this many windows")
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option("--fresh", help="ignore the saved state in the run directory (start over)"),
    ] = False,
) -> None:
    """Check, score and rate the peers of every window; set weights; publish peer lists.

    Only the validator's plugins should be enabled (configs/validator.toml); a plugin that
    declares itself miner-only is refused. The state is saved after every window and restored
    on restart, so a window is never scored twice.
    """
    from covenant.engine.session import open_session
    from covenant.engine.validate import check_validator_plugins, run_validator

    session = open_session(config, overrides or ())
    check_validator_plugins(session)
    result = run_validator(session, windows=windows, resume=not fresh)
    err.print(f"{len(result.windows)} windows processed; run dir {result.run_dir}")


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
