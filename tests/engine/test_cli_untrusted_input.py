"""Every ``covenant`` command, given bad input, prints one error line and exits 2: no traceback.

Bad files (nesting 3,000 deep, 5,000-digit integers, not UTF-8, console markup in keys and
values), bad flags and bad values, for every command group: ``config``, ``plugins``, ``bench``,
``train``, ``validate``, ``export``, ``model-info``, ``data``, ``chain``, ``storage``. The
command lines run in one subprocess (``_cli_batch.py``) to pay the start-up once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEEP = "[" * 3000 + "1" + "]" * 3000
USAGE = "usage"  # click's own usage errors: "Usage: ...", "Error: ..." (still exit 2)


def _files(root: Path) -> None:
    (root / "deep.toml").write_text(f"a = {DEEP}\n")
    (root / "deepkeys.toml").write_text("[run]\n" + "x." * 3000 + "y = 1\n")
    (root / "bigint.toml").write_text("[train]\nsteps = 1" + "0" * 5000 + "\n")
    (root / "markupkey.toml").write_text('["[/]"]\nx = 1\n')
    (root / "markupvalue.toml").write_text('[run]\nid = "[bold]x[/]"\n')
    (root / "nan.toml").write_text("[train]\nlr = nan\n")
    (root / "binary.toml").write_bytes(b"\xff\xfe\x00")
    for name, index in {
        "w_deep": DEEP.encode(),
        "w_bigint": b'{"format":"covenant-weights","version":3,"shape":{"layers":1'
        + b"0" * 5000
        + b"}}",
        "w_layers": json.dumps(
            {
                "format": "covenant-weights",
                "version": 3,
                "shape": {"name": "x", "layers": 10**8, "hidden": 64, "heads": 1},
                "files": [],
                "pieces": {},
            }
        ).encode(),
    }.items():
        (root / name).mkdir()
        (root / name / "covenant_model.json").write_bytes(index)
    (root / "d_deep").mkdir()
    (root / "d_deep" / "manifest.json").write_text(DEEP)


CASES: list[tuple[list[str], str]] = [
    (["config", "show", "--config", "deep.toml"], "nested deeper than 32 levels"),
    (["config", "show", "--config", "deepkeys.toml"], "nested deeper than 32 levels"),
    (["config", "show", "--config", "bigint.toml"], "integer longer than 64 digits"),
    (["config", "show", "--config", "markupkey.toml"], "unknown section [[/]]"),
    (["config", "show", "--config", "markupvalue.toml"], "(got '[bold]x[/]')"),
    (["config", "show", "--config", "nan.toml"], "nan is not a finite number"),
    (["config", "show", "--config", "binary.toml"], "cannot read config file"),
    (["config", "show", "--set", "train.steps=" + "[" * 500], "nested deeper than 32"),
    (["config", "show", "--set", "train.steps=1" + "0" * 100], "longer than 64 digits"),
    (["config", "show", "--set", "train.[/]=1"], "[train] [/]: unknown key"),
    (["plugins", "--config", "deep.toml"], "nested deeper"),
    (["plugins", "--set", "plugins.enable=" + "[" * 500], "nested deeper"),
    (["bench", "codec", "--opt", "[bold]=1"], "unknown --opt '[bold]'"),
    (["bench", "codec", "--opt", "peers=abc"], "must be of type int"),
    (["bench", "codec", "--opt", "preset=nosuch"], "known"),
    (["train", "--config", "bigint.toml"], "longer than 64 digits"),
    (["train", "--steps", "abc"], USAGE),
    (["validate", "--config", "deep.toml"], "nested deeper"),
    (["export", "w_deep", "out"], "nested deeper than 5 levels"),
    (["export", "w_bigint", "out"], "longer than 64 digits"),
    (["export", "w_layers", "out"], "layers 100000000 is over"),
    (["export", "w_deep", "out", "--max-shard-size", "-1"], USAGE),
    (["model-info", "--preset", "[/]"], "unknown preset '[/]'"),
    (["model-info", "--preset", "tiny", "--tp", "0"], "must be >= 1"),
    (["data", "inspect", "d_deep"], "not a valid manifest"),
    (["chain", "advance", "-1"], USAGE),
    (["chain", "status", "--config", "deep.toml"], "nested deeper"),
    (["storage", "check-commitment", "v1|file://["], "not a URL"),
    (["storage", "check-commitment", "v1|https://[::1|b|k|s"], "not a URL"),
    (["storage", "head", "../x", "--url", "memory://x"], "contains '..'"),
    (["storage", "commitment", "--url", "s3://b"], USAGE),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    root = tmp_path_factory.mktemp("cli")
    _files(root)
    (root / "cases.json").write_text(json.dumps([argv for argv, _ in CASES]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVENANT__")}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_cli_batch.py")), "cases.json"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("index", "needle"), [(i, n) for i, (_, n) in enumerate(CASES)])
def test_bad_input_is_one_line_and_exit_2(
    results: list[dict[str, object]], index: int, needle: str
) -> None:
    got = results[index]
    stderr = str(got["stderr"])
    assert "Traceback" not in stderr, f"{got['argv']}: {stderr[-2000:]}"
    assert got["rc"] == 2, f"{got['argv']}: rc {got['rc']}: {stderr[-2000:]}"
    if needle == USAGE:
        assert "Error:" in stderr or "Usage:" in stderr
        return
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert needle in lines[0], lines[0]
