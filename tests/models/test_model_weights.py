"""Covenant's full-weight format: pieces written per rank, read as any box, index checked first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from covenant.models.config import ModelConfig, ModelConfigError
from covenant.models.layout import gather_full_state, global_params, shard_of
from covenant.models.parallel import ParallelError, run_on_all
from covenant.models.runtime import build_runtime
from covenant.models.weights import (
    INDEX_FILE,
    LEGACY_FILE,
    WeightsError,
    build_index,
    find_full_weights,
    open_full_weights,
    save_full_weights,
    write_index,
    write_pieces,
)

MODEL: dict[str, Any] = {"preset": "tiny-2l", "vocab": 512, "seed": 5}


@pytest.fixture(scope="module")
def full_and_shape() -> tuple[dict[str, torch.Tensor], Any]:
    rt = build_runtime(ModelConfig(**MODEL))
    rt.train_step(torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1)), 1e-2)
    full = gather_full_state(rt)
    assert full is not None
    shape = rt.shape
    rt.close()
    return full, shape


def _write_as_tp2(full: dict[str, torch.Tensor], shape: Any, root: Path) -> None:
    """What a TP=2 peer writes: rank r's boxes in shard-0000r (norms only from rank 0)."""
    sources = []
    for rank in (0, 1):
        mine = {}
        for p in global_params(shape):
            s = shard_of(p, 2, rank)
            if s.replicated_over_tp and rank:
                continue
            sources.append((rank, s))
            mine[p.name] = full[p.name][
                tuple(slice(o, o + n) for o, n in zip(s.offsets, s.local_shape, strict=True))
            ]
        write_pieces(root, rank, mine)
    write_index(root, build_index(shape, sources))


def test_runtime_save_reads_back_exactly(full_and_shape: Any, tmp_path: Path) -> None:
    rt = build_runtime(ModelConfig(**MODEL))
    rt.save_full_weights(str(tmp_path))
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["format"] == "covenant-weights" and index["files"] == ["shard-00000.safetensors"]
    expected = gather_full_state(rt)
    assert expected is not None
    got = open_full_weights(tmp_path).to_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_pieces_of_another_layout_assemble_and_any_box_reads(
    full_and_shape: Any, tmp_path: Path
) -> None:
    full, shape = full_and_shape
    _write_as_tp2(full, shape, tmp_path)
    weights = open_full_weights(tmp_path)
    for name, t in weights.items():
        assert torch.equal(t, full[name]), name
    name = "decoder.layers.1.self_attention.linear_proj.weight"  # split along columns
    rows, cols = full[name].shape
    box = weights.read(name, (3, cols // 2 - 5), (7, 10))  # straddles the two ranks' pieces
    assert torch.equal(box, full[name][3:10, cols // 2 - 5 : cols // 2 + 5])
    assert weights.read(name, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(WeightsError, match="outside"):
        weights.read(name, (rows, 0), (1, 1))


def test_a_runtime_starts_from_weights_another_layout_wrote(
    full_and_shape: Any, tmp_path: Path
) -> None:
    full, shape = full_and_shape
    _write_as_tp2(full, shape, tmp_path / "run" / "checkpoints" / "step-000001" / "weights")
    rt = build_runtime(ModelConfig(**MODEL, init_weights=str(tmp_path / "run")))
    got = gather_full_state(rt)
    assert got is not None and all(torch.equal(got[k], full[k]) for k in full)
    rt.close()
    with pytest.raises(ModelConfigError, match=r"init_weights.*do not fit"):
        build_runtime(ModelConfig(preset="tiny-2l", vocab=1024, init_weights=str(tmp_path / "run")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelConfigError, match=r"init_weights.*no covenant_model\.json"):
        build_runtime(ModelConfig(**MODEL, init_weights=str(tmp_path / "empty")))


def test_version_1_directories_still_read(full_and_shape: Any, tmp_path: Path) -> None:
    full, shape = full_and_shape
    save_file(full, str(tmp_path / LEGACY_FILE))
    (tmp_path / INDEX_FILE).write_text(json.dumps(shape.to_dict()))
    got = open_full_weights(tmp_path).to_dict()
    assert all(torch.equal(got[k], full[k]) for k in full)


def _tamper(root: Path, edit: Any) -> None:
    index = json.loads((root / INDEX_FILE).read_text())
    edit(index)
    (root / INDEX_FILE).write_text(json.dumps(index))


NORM = "decoder.final_layernorm.weight"
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda i: i.update(version=9), "version 9"),
        (lambda i: i["files"].__setitem__(0, "../escape.safetensors"), "plain"),
        (lambda i: i["pieces"].pop(NORM), "missing"),
        (lambda i: i["pieces"].update(extra=[]), "unexpected"),
        (lambda i: i["pieces"][QKV][1].__setitem__(1, [1, 0]), "overlap"),
        (lambda i: i["pieces"][QKV].pop(), "do not cover"),
        (lambda i: i["pieces"][NORM][0].__setitem__(2, [10**6]), "outside"),
        (lambda i: i["pieces"][NORM][0].__setitem__(0, 7), "file index"),
        (lambda i: i["pieces"][NORM][0].__setitem__(1, [-1]), "non-negative"),
        (lambda i: i["shape"].update(hidden="big"), "shape"),
    ],
)
def test_a_bad_index_is_refused_before_any_tensor_is_read(
    full_and_shape: Any, tmp_path: Path, edit: Any, match: str
) -> None:
    full, shape = full_and_shape
    _write_as_tp2(full, shape, tmp_path)
    _tamper(tmp_path, edit)
    with pytest.raises(WeightsError, match=match):
        open_full_weights(tmp_path)


def test_bad_files_are_refused(full_and_shape: Any, tmp_path: Path) -> None:
    full, shape = full_and_shape
    save_full_weights(full, shape, tmp_path)
    shard = tmp_path / "shard-00000.safetensors"
    with shard.open("ab") as f:  # far more bytes than the pieces need
        f.write(b"\0" * (sum(t.numel() for t in full.values()) * 4 + (2 << 20)))
    with pytest.raises(WeightsError, match="more than"):
        open_full_weights(tmp_path)
    # a piece stored with another shape than the index says
    swapped = dict(full)
    swapped[NORM] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in swapped.items()}, str(shard))
    with pytest.raises(WeightsError, match="stored as"):
        open_full_weights(tmp_path).read(NORM)
    numel = sum(t.numel() for t in full.values())
    shard.write_bytes(b"\xff" * (numel * 4))  # the right size, but not safetensors
    with pytest.raises(WeightsError, match="unreadable"):
        open_full_weights(tmp_path).read(NORM)
    shard.write_bytes(b"short")  # an index cannot make a reader allocate what is not on disk
    with pytest.raises(WeightsError, match="fewer than"):
        open_full_weights(tmp_path)
    shard.unlink()
    with pytest.raises(WeightsError, match="does not exist"):
        open_full_weights(tmp_path)


def test_find_full_weights_picks_the_newest(full_and_shape: Any, tmp_path: Path) -> None:
    full, shape = full_and_shape
    old = save_full_weights(full, shape, tmp_path / "a" / "weights")
    new = save_full_weights(full, shape, tmp_path / "b" / "weights")
    import os

    os.utime(old / INDEX_FILE, (1, 1))
    assert find_full_weights(tmp_path) == new
    assert find_full_weights(old) == old
    with pytest.raises(WeightsError, match="not a directory"):
        find_full_weights(tmp_path / "missing")


def test_run_on_all_raises_everywhere_with_the_failing_message() -> None:
    assert run_on_all(lambda: 3) == 3

    def boom() -> None:
        raise OSError("disk full")

    with pytest.raises(ParallelError, match="rank 0 failed: OSError: disk full"):
        run_on_all(boom)
