"""``covenant storage ...``: look at a run's objects and make or check commitments.

``ls`` and ``head`` open the configured ``[storage] url`` (or ``--url``); ``commitment`` builds
the on-chain read-credential string for a bucket, ``check-commitment`` parses one and shows
where it points (secrets masked).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from covenant.engine.cli.options import ConfigOpt, JsonOpt, SetOpt, fail
from covenant.engine.errors import CovenantError

out = Console()
err = Console(stderr=True)

app = typer.Typer(help="Storage: list objects, make and check commitments.", no_args_is_help=True)

UrlOpt = Annotated[
    str | None, typer.Option("--url", help="storage URL (default: the storage.url setting)")
]


def _transport(config: str | None, overrides: list[str] | None, url: str | None) -> Any:
    from covenant.engine.session import open_session
    from covenant.plugins.storage import plugin

    session = open_session(config, overrides or ())
    target = url if url is not None else plugin.storage_url(session.config)
    transport = session.hook.covenant_transport(url=target, config=session.config)
    if transport is None:
        raise CovenantError(f"no plugin handles storage url {target!r}")
    return transport


@app.command("ls")
def ls(
    prefix: Annotated[str, typer.Argument(help="folder to list, e.g. run/v1/gradient/")] = "",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the objects below PREFIX (recursive)."""
    try:
        objects = _transport(config, overrides, url).list(prefix)
    except CovenantError as exc:
        raise fail(exc) from None
    if as_json:
        out.print_json(json.dumps([o.__dict__ for o in objects]))
        return
    table = Table("key", "bytes", "modified (s)", "etag")
    for o in objects:
        table.add_row(escape(o.key), str(o.size), f"{o.modified:.0f}", escape(o.etag or ""))
    out.print(table)


@app.command("head")
def head(
    key: Annotated[str, typer.Argument(help="object key")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    url: UrlOpt = None,
) -> None:
    """Show one object's size, storage timestamp and ETag (exit 1 if it is missing)."""
    try:
        info = _transport(config, overrides, url).head(key)
    except CovenantError as exc:
        raise fail(exc) from None
    if info is None:
        err.print(f"[red]missing:[/] {escape(key)}")
        raise typer.Exit(1)
    out.print_json(json.dumps(info.__dict__))


@app.command("commitment")
def commitment(
    url: Annotated[str, typer.Option("--url", help="s3://bucket[/prefix] the readers should use")],
    endpoint: Annotated[str, typer.Option("--endpoint", help="https://host of the S3 endpoint")],
    key_id: Annotated[str, typer.Option("--key-id", help="READ-ONLY key id")],
    secret_env: Annotated[
        str, typer.Option("--secret-env", help="environment variable holding the read secret")
    ] = "COVENANT_READ_SECRET",
) -> None:
    """Print the commitment string for a bucket's read-only credentials."""
    from covenant.plugins.storage.credentials import ReadCredentials, format_commitment

    secret = os.environ.get(secret_env, "")
    try:
        if not secret:
            raise CovenantError(f"set ${secret_env} to the read secret (kept off the command line)")
        text = format_commitment(
            ReadCredentials(url=url, endpoint_url=endpoint, key_id=key_id, secret=secret)
        )
    except CovenantError as exc:
        raise fail(exc) from None
    out.print(text, soft_wrap=True, markup=False, highlight=False)


@app.command("check-commitment")
def check_commitment(
    text: Annotated[str, typer.Argument(help="the commitment string as read from chain")],
) -> None:
    """Parse a commitment and show where it points (the secret is masked)."""
    from covenant.plugins.storage.credentials import parse_commitment

    try:
        creds = parse_commitment(text, allow_local=True)
    except CovenantError as exc:
        raise fail(exc) from None
    shown = {
        "url": creds.url,
        "endpoint_url": creds.endpoint_url,
        "key_id": creds.key_id,
        "secret": "**********" if creds.secret else None,
        "region": creds.region,
        "r2": creds.r2,
    }
    out.print_json(json.dumps(shown))
