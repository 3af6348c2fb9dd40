"""The ``swarm`` plugin: the ``[swarm]`` section and the ``covenant swarm`` / ``covenant report``
commands (see :mod:`covenant.plugins.swarm.supervisor`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from covenant.engine.cli.options import ConfigOpt, JsonOpt, SetOpt
from covenant.engine.hookspecs import Register, hookimpl

COVENANT_ROLES = ("supervisor",)


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    from covenant.plugins.swarm.supervisor import SwarmSection

    register("swarm", SwarmSection)


def swarm(
    config: ConfigOpt = "swarm-cpu",
    overrides: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="continue the run in the run directory (every peer resumes)"),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a local swarm: miners and a validator as separate processes, on real text.

    Keys, registrations, stake and commitments are made on the local chain; every child logs to
    RUN_DIR/logs/. Ctrl-C stops every process cleanly. At the end the report is written.
    """
    import json

    from rich.console import Console

    from covenant.engine.session import open_session
    from covenant.plugins.swarm.report import write_report
    from covenant.plugins.swarm.run import run_swarm
    from covenant.plugins.swarm.supervisor import Swarm

    err = Console(stderr=True)
    session = open_session(config, overrides or ())
    plan = Swarm.plan(session, list(overrides or ()))
    summary = run_swarm(plan, session, resume=resume, console=err, write_report=write_report)
    if as_json:
        typer.echo(json.dumps(summary))
    where = summary.get("report")
    err.print(
        ("stopped" if summary.get("interrupted") else "finished")
        + f"; run directory {summary['run_dir']}"
        + (f"; report {where}" if where else "")
    )


def report(
    run_dir: Annotated[Path, typer.Argument(help="a swarm run directory")],
    out: Annotated[Path | None, typer.Option("--out", help="where to write the HTML")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML report of a swarm run (plots and slash table)."""
    from covenant.plugins.swarm.report import report as report_command

    report_command(run_dir, out, as_json)


@hookimpl
def covenant_register_commands(register: Register) -> None:
    register("swarm", swarm)
    register("report", report)
