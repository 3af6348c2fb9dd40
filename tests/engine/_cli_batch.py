"""Run many ``covenant`` command lines in one process (a fresh app for each), as JSON results.

Starting the CLI costs seconds (plugins, torch); the bad-input sweep of
``test_cli_untrusted_input.py`` runs dozens of command lines, so it runs them here, each
through :func:`covenant.engine.cli.main.main` exactly as the console script does, and reports
exit status, stdout and stderr per command line. Usage: ``python _cli_batch.py cases.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import traceback

import covenant.engine.cli.main as cli
import covenant.engine.cli.options as options


def run(argv: list[str]) -> dict[str, object]:
    global cli
    cli = importlib.reload(cli)  # a fresh typer app: plugin commands mount once per app
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        cli.out.file, cli.err.file, options.err.file = out, err, err
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what the console script would print as a traceback
            traceback.print_exc(file=err)
            code = 1
    return {"argv": argv, "rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    print(json.dumps([run(argv) for argv in cases]))
