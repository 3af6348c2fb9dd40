"""A local checkpoint's ``meta.json`` is read with the bounded JSON reader: a damaged or hostile
file is one CheckpointError, never a RecursionError or ValueError."""

from __future__ import annotations

from pathlib import Path

import pytest

from covenant.engine.checkpoint import Checkpointer, CheckpointError, CheckpointMeta

EXPECT = CheckpointMeta(step=1, run_id="r", model_fingerprint="f", world_size=1)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,  # was a RecursionError
        '{"step": 1' + "0" * 5000 + "}",  # was a ValueError (Python's int digit limit)
        '{"step": 1, "step": 2}',
        '{"step": NaN}',
        "[1, 2]",
        '{"unknown": 1}',
        "\xff",
    ],
)
def test_bad_metadata_is_a_checkpoint_error(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "step-000001"
    folder.mkdir()
    (folder / "meta.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        Checkpointer(tmp_path, rank=0, world_size=1).load(folder, EXPECT)
