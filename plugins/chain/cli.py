"""``covenant chain ...``: look at the chain, register peers on the local chain, make hotkeys.

``status`` works for both chains; ``register``, ``keygen`` and ``advance`` act on the local chain
(a Bittensor registration burns TAO from a coldkey: use ``btcli subnets register``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from covenant.engine.cli.options import ConfigOpt, JsonOpt, SetOpt, fail
from covenant.engine.errors import CovenantError

out = Console()
err = Console(stderr=True)

app = typer.Typer(help="Chain: blocks, windows, metagraph, registrations.", no_args_is_help=True)


def _session(config: str | None, overrides: list[str] | None) -> Any:
    """The session (this command group exists only where the chain plugin is enabled)."""
    from covenant.engine.session import open_session

    return open_session(config, overrides or ())


def _chain(session: Any) -> Any:
    chain = session.hook.covenant_chain(config=session.config)
    if chain is None:
        raise CovenantError("no chain plugin provides the configured [chain] name")
    return chain


def _local(session: Any, command: str) -> Any:
    from covenant.plugins.chain.local import LocalChain

    chain = _chain(session)
    if not isinstance(chain, LocalChain):
        raise CovenantError(
            f"'covenant chain {command}' acts on the local chain; [chain] name is "
            f"{session.config.section('chain').name!r} (on Bittensor use btcli)"
        )
    return chain


def status_data(chain: Any) -> dict[str, Any]:
    """Everything ``status`` shows, as JSON-ready data (also used by tests)."""
    from covenant.engine.protocols import window_of, window_start_block

    block = chain.block()
    bpw = chain.blocks_per_window
    window = window_of(block, bpw)
    next_start = window_start_block(window + 1, bpw)
    seconds = chain.block_timestamp(next_start) - chain.block_timestamp(block)
    commitments = chain.commitments()
    last = chain.last_weights_block() if hasattr(chain, "last_weights_block") else {}
    neurons = [
        {
            "uid": n.uid,
            "hotkey": n.hotkey,
            "stake": n.stake,
            "validator_permit": n.validator_permit,
            "commitment_block": commitments[n.hotkey].block if n.hotkey in commitments else None,
            "last_weights_block": last.get(n.uid),
        }
        for n in chain.metagraph()
    ]
    return {
        "block": block,
        "block_timestamp": chain.block_timestamp(block),
        "blocks_per_window": bpw,
        "window": window,
        "next_window_block": next_start,
        "seconds_to_next_window": round(max(0.0, seconds), 3),
        "neurons": neurons,
    }


@app.command("status")
def status_cmd(
    config: ConfigOpt = None, overrides: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Block, window, time to the next window, and the metagraph with stakes and last weights."""
    try:
        data = status_data(_chain(_session(config, overrides)))
    except CovenantError as exc:
        raise fail(exc) from None
    if as_json:
        out.print_json(json.dumps(data))
        return
    out.print(
        f"block [bold]{data['block']}[/]  window [bold]{data['window']}[/] "
        f"({data['blocks_per_window']} blocks)  next window at block {data['next_window_block']} "
        f"in ~{data['seconds_to_next_window']:.1f}s"
    )
    table = Table(title=f"metagraph ({len(data['neurons'])} neurons)")
    for column in ("uid", "hotkey", "stake", "permit", "commitment", "last weights"):
        table.add_column(column, overflow="fold")
    for n in data["neurons"]:
        table.add_row(
            str(n["uid"]),
            n["hotkey"],
            f"{n['stake']:.4g}",
            "yes" if n["validator_permit"] else "-",
            "-" if n["commitment_block"] is None else f"block {n['commitment_block']}",
            "-" if n["last_weights_block"] is None else f"block {n['last_weights_block']}",
        )
    out.print(table)


@app.command("register")
def register_cmd(
    hotkey: Annotated[
        str,
        typer.Option("--hotkey", help="hotkey spec: //Alice, wallet:NAME/HOTKEY, or a key file"),
    ],
    stake: Annotated[
        float | None, typer.Option("--stake", help="stake to give it (local admin)")
    ] = None,
    validator: Annotated[
        bool, typer.Option("--validator", help="grant a validator permit")
    ] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a hotkey on the local chain (signed by it); prints its uid."""
    from covenant.engine.keys import load_hotkey

    try:
        chain = _local(_session(config, overrides), "register")
        keypair = load_hotkey(hotkey)
        uid = chain.register(keypair)
        if stake is not None or validator:
            chain.set_stake(
                keypair.ss58_address, stake if stake is not None else 0.0, validator or None
            )
    except CovenantError as exc:
        raise fail(exc) from None
    if as_json:
        out.print_json(json.dumps({"uid": uid, "hotkey": keypair.ss58_address}))
    else:
        out.print(f"uid [bold]{uid}[/] {keypair.ss58_address}")


@app.command("commit")
def commit_cmd(
    data: Annotated[
        str,
        typer.Argument(help="the commitment: e.g. the output of `covenant storage commitment`"),
    ],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Publish this hotkey's commitment (its bucket's read credentials), signed by [chain] hotkey.

    Works on both chains: on Bittensor it is the raw Commitments.set_commitment call.
    """
    from covenant.engine.keys import load_hotkey

    try:
        session = _session(config, overrides)
        spec = session.config.section("chain").hotkey
        if spec is None:
            raise CovenantError("set [chain] hotkey (the key that signs the commitment)")
        _chain(session).commit(load_hotkey(spec), data)
    except CovenantError as exc:
        raise fail(exc) from None
    out.print(f"committed {len(data.encode())} bytes")


@app.command("keygen")
def keygen_cmd(
    name: Annotated[str, typer.Argument(help="key name (file NAME.json)")],
    directory: Annotated[
        Path | None, typer.Option("--dir", help="folder (default <run dir>/keys)")
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Generate a new sr25519 hotkey file (mode 0600) for the local swarm."""
    from covenant.engine.keys import generate_hotkey

    try:
        folder = (
            directory if directory is not None else _session(config, overrides).run_dir / "keys"
        )
        keypair = generate_hotkey(folder, name)
    except CovenantError as exc:
        raise fail(exc) from None
    out.print(f"{keypair.ss58_address} -> {folder / (name + '.json')}")


@app.command("advance")
def advance_cmd(
    blocks: Annotated[int, typer.Argument(help="blocks to advance")] = 1,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Move a local chain with the manual clock forward."""
    try:
        block = _local(_session(config, overrides), "advance").advance(blocks)
    except CovenantError as exc:
        raise fail(exc) from None
    out.print(f"block {block}")
