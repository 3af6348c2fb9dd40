"""The validator profile loads only the scoring side: no inner loop, no megatron at start-up.

The validator holds the model (it evaluates uploads and applies aggregates), so the model
plugin's config and the outer step's codec config load with its plugins; what must not load when
it only reads its config is the inner loop, megatron, Transformer Engine, or a miner-only plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys

TRAINING_SIDE = (
    "megatron",
    "covenant.engine.loop",
    "covenant.models.runtime",
    "covenant.plugins.sparseloco.codec",
    "covenant.plugins.adversaries",
    "covenant.plugins.ddp",
    "transformer_engine",
)


def test_validator_profile_imports_no_training_module() -> None:
    env = {k: v for k, v in os.environ.items() if k != "COVENANT_PLUGINS"}
    res = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "covenant.engine.cli.main",
            "config",
            "show",
            "--config",
            "validator",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in res.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert "covenant.engine.session" in imported
    leaked = sorted({m for m in imported if m.startswith(TRAINING_SIDE)})
    assert leaked == [], f"validator profile imported training-side modules: {leaked}"
    assert '"enable"' in res.stdout
