"""The ``covenant`` command line: the only place in the engine that writes to the console.

Engine commands live here (``plugins``, ``config``, ``data``, ``train``, ``bench``); plugins add
their own groups through ``covenant_register_commands`` (``chain``, ``model-info``, ``export``...).
Every user error (a :class:`~covenant.engine.errors.CovenantError`) becomes one red line on
stderr and exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from covenant.engine.cli.options import ConfigOpt, JsonOpt, SetOpt, fail
from covenant.engine.errors import CovenantError, PluginError

out = Console()
err = Console(stderr=True)

# Command names the engine keeps for itself or for its built-in plugins; a third-party plugin
# that registers one of these is refused, so future releases can fill them without clashes.
RESERVED = frozenset(
    {
        "plugins",
        "config",
        "train",
        "data",
        "swarm",
        "validate",
        "model-info",
        "bench",
        "replay",
        "explain",
        "chain",
        "report",
        "doctor",
        "export",
        "version",
        "storage",
    }
)
BUILTIN_PROVIDERS = {
    "chain": "chain",
    "model-info": "model",
    "export": "model",
    "storage": "storage",
    "swarm": "swarm",
    "report": "swarm",
    "replay": "gauntlet",
    "explain": "gauntlet",
}

app = typer.Typer(
    name="covenant",
    help="covenant: permissionless, globally distributed LLM pre-training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _session(config: str | None, overrides: list[str] | None) -> Any:
    from covenant.engine.session import open_session

    return open_session(config, overrides or ())


@app.command("plugins")
def plugins_cmd(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="also list installed but disabled plugins")
    ] = False,
) -> None:
    """List loaded plugins: name, distribution, version and the hooks each implements."""
    session = _session(config, overrides)
    infos = session.host.plugin_infos(include_disabled=show_all)
    if as_json:
        out.print_json(json.dumps([i.to_dict() for i in infos]))
        return
    table = Table(title="covenant plugins", show_lines=False)
    for col in ("name", "distribution", "version", "enabled", "hooks"):
        table.add_column(col, overflow="fold")
    for i in infos:
        hooks = ", ".join(h.removeprefix("covenant_") for h in i.hooks) or "-"
        table.add_row(i.name, i.distribution, i.version, "yes" if i.enabled else "no", hooks)
    out.print(table)


@config_app.command("show")
def config_show(
    config: ConfigOpt = None, overrides: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Print the fully resolved config (defaults < file < environment < --set)."""
    session = _session(config, overrides)
    resolved = {
        "source": session.config.source,
        "versions": session.host.versions(),
        "config": session.config.to_dict(),
    }
    if as_json:
        out.print_json(json.dumps(resolved, default=str))
        return
    out.print(f"[bold]config[/] {resolved['source'] or '(defaults)'}")
    for name, values in resolved["config"].items():
        out.print(f"\n[bold cyan]{escape('[' + name + ']')}[/]")
        for key, value in values.items():
            out.print(f"  {key} = {json.dumps(value, default=str)}")


@app.command("bench")
def bench_cmd(
    name: Annotated[str, typer.Argument(help="benchmark name (see --list)")] = "",
    as_json: JsonOpt = False,
    list_: Annotated[bool, typer.Option("--list", help="list available benchmarks")] = False,
    options: Annotated[
        list[str] | None, typer.Option("--opt", help="key=value passed to the benchmark")
    ] = None,
) -> None:
    """Run a registered benchmark (plugins add them through covenant_register_benchmarks)."""
    from covenant.engine.config import parse_value

    session = _session(None, None)
    benches = session.host.registry("covenant_register_benchmarks")
    if list_ or not name:
        for bench in sorted(benches):
            out.print(bench)
        return
    if name not in benches:
        raise CovenantError(
            f"unknown benchmark '{name}' (available: {', '.join(sorted(benches)) or 'none'})"
        )
    kwargs = {}
    for item in options or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CovenantError(f"--opt {item!r}: expected key=value")
        kwargs[key.strip().replace("-", "_")] = parse_value(raw.strip())
    result = benches[name](**kwargs)
    if as_json:
        out.print_json(json.dumps(result, default=str))
    else:
        out.print(result)


def _mount_optional_apps() -> None:
    """Engine sub-apps that live in their own modules (imported lazily to keep start-up fast)."""
    try:
        from covenant.engine.cli.data import app as data_app
    except ImportError:  # pragma: no cover - only while the data module is being written
        return
    app.add_typer(data_app, name="data")


def _mount_train() -> None:
    from covenant.engine.cli.train import register as register_train
    from covenant.engine.cli.validate import register as register_validate

    register_train(app)
    register_validate(app)


def _allow_list_from_argv(argv: list[str]) -> list[str] | None:
    """The allow-list a ``--config`` / ``--set plugins.enable=`` on the command line implies.

    Plugin commands are mounted before click parses the arguments, so the config's allow-list
    is looked up here: a validator started with ``--config validator`` never imports the
    training-side plugins, not even to list their commands.
    """
    from covenant.engine.config import read_toml, resolve_config_path
    from covenant.engine.session import _early_allow_list

    config, sets = None, []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("--config", "-c") and value is not None:
            config = value
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg in ("--set", "-s") and value is not None:
            sets.append(value)
    data = {}
    if config is not None:
        try:
            data = read_toml(resolve_config_path(config))
        except CovenantError:
            return None  # the command itself reports the bad file
    return _early_allow_list(data, sets, config)


def _mount_plugin_commands(argv: list[str]) -> None:
    """Add every command group that a loaded plugin registers."""
    from covenant.engine.plugins import PluginHost

    host = PluginHost()
    host.load(_allow_list_from_argv(argv))
    taken = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    commands: dict[str, Any] = {}
    for impl in host.pm.hook.covenant_register_commands.get_hookimpls():
        plugin_name = host.pm.get_name(impl.plugin) or "?"

        def register(name: str, thing: Any, _p: str = plugin_name) -> None:
            if name in taken or name in commands:
                raise PluginError(
                    f"plugin '{_p}' registers command '{name}', which is already taken"
                )
            if name in RESERVED and BUILTIN_PROVIDERS.get(name) != _p:
                raise PluginError(f"plugin '{_p}' registers reserved command name '{name}'")
            commands[name] = thing

        impl.function(register=register)
    for name, thing in sorted(commands.items()):
        if isinstance(thing, typer.Typer):
            app.add_typer(thing, name=name)
        else:
            app.command(name)(thing)


def build_app(argv: list[str] | None = None) -> typer.Typer:
    _mount_optional_apps()
    _mount_train()
    _mount_plugin_commands(sys.argv[1:] if argv is None else argv)
    return app


def _configure_logging() -> None:
    import warnings

    from rich.logging import RichHandler

    # megatron warns at import that Apex/Transformer Engine are absent: expected on CPU, and
    # docs/model.md says what TE adds on GPU; the console stays readable for operators.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron(\.|$)")

    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)],
    )
    for noisy in (
        "urllib3",
        "botocore",
        "s3fs",
        "fsspec",
        "asyncio",
        "filelock",
        "werkzeug",
        "megatron",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stop_on_sigterm() -> None:
    """SIGTERM (a supervisor, torchrun, ``kill``) stops like Ctrl-C: the loop's ``finally``
    runs, plugins get ``covenant_shutdown("interrupted")``, and nothing is left half-written."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (embedded use): leave the default
        pass


def _usage_error(exc: Exception) -> None:
    """Show a command-line usage error (a bad flag or value) the way click does, exit 2."""
    show = getattr(exc, "show", None)
    if callable(show):
        show()
    else:  # pragma: no cover - every click/typer usage error has show()
        fail(CovenantError(str(exc)))
    sys.exit(2)


def _bad_call_arguments(exc: TypeError) -> bool:
    """Whether ``exc`` is a benchmark refusing the ``--opt`` names it was called with.

    ``bench`` passes ``--opt key=value`` pairs as keyword arguments; an unknown key makes the
    call itself raise TypeError, so the innermost frame is ``bench_cmd``'s own. A TypeError from
    inside a benchmark (a bug) has deeper frames and keeps its traceback.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is bench_cmd.__code__


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: a user error is one red line and exit 2, never a traceback."""
    _configure_logging()
    _stop_on_sigterm()
    try:
        command = typer.main.get_command(build_app(argv))
        rc = command.main(args=argv, prog_name="covenant", standalone_mode=False)
        # without standalone mode click *returns* a typer.Exit code instead of raising it
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    # typer vendors its own click: its usage errors (a bad --steps value, a missing option)
    # are typer.TyperException, not click.ClickException
    except (click.ClickException, typer.TyperException) as exc:
        _usage_error(exc)
    except (click.exceptions.Abort, typer.Abort):
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except CovenantError as exc:
        sys.exit(fail(exc).exit_code)
    except TypeError as exc:
        if not _bad_call_arguments(exc):
            raise
        sys.exit(fail(CovenantError(f"bench: {exc} (see the benchmark's options)")).exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
