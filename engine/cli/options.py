"""Options and error handling shared by every ``covenant`` command, the plugins' included.

Plugin CLIs (``covenant chain``, ``covenant storage``, ``covenant model-info``...) import these
so that ``--config``, ``--set`` and ``--json`` mean the same everywhere and a user error is
always one red line on stderr with exit status 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from covenant.engine.errors import CovenantError

err = Console(stderr=True)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="TOML file, or a built-in name such as 'tiny'")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="override: section.key=value (repeatable; beats env and file)"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]


def fail(exc: CovenantError) -> typer.Exit:
    """Print ``exc`` as one red line (never wrapped, markup escaped); return the Exit to raise."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)
