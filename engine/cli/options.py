"""Options and error handling shared by every ``covenant`` command, the plugins' included.

Plugin CLIs (``covenant chain``, ``covenant storage``, ``covenant model-info``...) import these
so that ``--config``, ``--set`` and ``--json`` mean the same everywhere and a user error is
always one red line on stderr with exit status 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

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


def one_line(text: str) -> str:
    """``text`` as one printable line: a multi-line message (pydantic's) joined with ``; ``,
    minus its "For further information visit <url>" lines, and every other control character
    (an ANSI escape sequence in a peer's string, say) shown as its Python escape."""
    lines = [ln.strip() for ln in text.splitlines()]
    kept = "; ".join(
        ln for ln in lines if ln and not ln.startswith("For further information visit")
    )
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in kept)


def fail(exc: CovenantError) -> typer.Exit:
    """Print ``exc`` as one red line (never wrapped); return the Exit to raise.

    The message is printed as plain text, never parsed as console markup or emoji codes, so
    text a user or a peer controls (a key named ``[/]``, a value ``[bold]`` or ``:smile:``, an
    escape sequence) is shown as written and can neither break the line nor restyle the terminal.
    """
    line = Text.assemble(("error:", "bold red"), " " + one_line(str(exc)))
    err.print(line, highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)
