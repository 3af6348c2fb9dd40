"""Covenant's full-weight format: pieces written per rank, read as any box, index checked first."""

from __future__ import annotations

import json
import time
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
    file_digests,
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
    digests = {}
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
        path = write_pieces(root, rank, mine)
        digests.update({(rank, k): v for k, v in file_digests(path).items()})
    write_index(root, build_index(shape, sources, digests))


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
    with pytest.raises(WeightsError, match="no content hashes"):  # nothing to verify: opt in
        open_full_weights(tmp_path)
    got = open_full_weights(tmp_path, allow_unhashed=True).to_dict()
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


EMB = "embedding.word_embeddings.weight"


def test_a_piece_pointed_at_the_wrong_file_of_the_same_shape_is_an_error(
    full_and_shape: Any, tmp_path: Path
) -> None:
    full, shape = full_and_shape
    _write_as_tp2(full, shape, tmp_path)
    # rank 1's file also holds a QKV half of exactly this shape: same name, shape and dtype
    _tamper(tmp_path, lambda i: i["pieces"][QKV][0].__setitem__(0, 1))
    weights = open_full_weights(tmp_path)
    with pytest.raises(WeightsError, match="content hash"):
        weights.read(QKV)
    with pytest.raises(WeightsError, match="content hash"):
        weights.verify()
    assert torch.equal(weights.read(NORM), full[NORM])  # the untouched pieces still read


def test_a_replaced_file_is_caught_by_the_hashes(full_and_shape: Any, tmp_path: Path) -> None:
    full, shape = full_and_shape
    save_full_weights(full, shape, tmp_path / "a")
    save_full_weights({k: v + 1 for k, v in full.items()}, shape, tmp_path / "b")
    shard = "shard-00000.safetensors"
    (tmp_path / "a" / shard).write_bytes((tmp_path / "b" / shard).read_bytes())
    with pytest.raises(WeightsError, match="content hash"):
        open_full_weights(tmp_path / "a").read(NORM)


def test_index_records_dtype_and_hash_per_piece(full_and_shape: Any, tmp_path: Path) -> None:
    import hashlib

    full, shape = full_and_shape
    save_full_weights(full, shape, tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["version"] == 3
    file, offsets, box, dtype, sha = index["pieces"][NORM][0]
    assert (file, offsets, box, dtype) == (0, [0], list(full[NORM].shape), "F32")
    assert sha == hashlib.sha256(full[NORM].contiguous().numpy().tobytes()).hexdigest()
    weights = open_full_weights(tmp_path)
    weights.verify()
    assert torch.equal(weights.read(NORM), full[NORM])


def test_version_2_indexes_need_the_opt_in(full_and_shape: Any, tmp_path: Path) -> None:
    full, shape = full_and_shape
    _write_as_tp2(full, shape, tmp_path)

    def to_v2(index: dict[str, Any]) -> None:
        index["version"] = 2
        for entries in index["pieces"].values():
            for e in entries:
                del e[3:]

    _tamper(tmp_path, to_v2)
    with pytest.raises(WeightsError, match="no content hashes"):
        open_full_weights(tmp_path)
    got = open_full_weights(tmp_path, allow_unhashed=True).to_dict()
    assert all(torch.equal(got[k], full[k]) for k in full)


def _split_rows(index: dict[str, Any], name: str, rows: int, cols: int, n: int) -> None:
    step = rows // n
    digest = index["pieces"][name][0][3:]
    index["pieces"][name] = [[0, [r, 0], [step, cols], *digest] for r in range(0, rows, step)]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda i: i["shape"].update(layers=10**6), "layers 1000000 is over"),
        (lambda i: i["shape"].update(vocab=10**9), "vocab 1000000000 is over"),
        (lambda i: i["shape"].update(hidden=1 << 24, heads=1, kv_heads=1), "parameters"),
        (lambda i: i["shape"].update(name="x" * 1000), "too long"),
        (lambda i: i["shape"].update(vocab=int("9" * 80)), "longer than"),
        (lambda i: i["files"].extend(f"f{n}.safetensors" for n in range(70_000)), "at most"),
        (
            lambda i: i["pieces"].update({EMB: [[0, [0, 0], [1, 1], "F32", "0" * 64]] * 5000}),
            "over",
        ),
        (lambda i: i["pieces"][NORM][0].__setitem__(3, "I64"), "dtype"),
        (lambda i: i["pieces"][NORM][0].__setitem__(4, "XYZ"), "sha256"),
        (lambda i: i["pieces"][NORM][0].pop(), r"\[file, offsets, shape, dtype, sha256\]"),
        (lambda i: i["pieces"][QKV][1][1].__setitem__(0, 1), "overlap"),
        (lambda i: i["pieces"][QKV][0][1].__setitem__(0, 1), "overlap|cover"),
        (lambda i: i.update(deep=[[[[[[[[0]]]]]]]]), "nested deeper"),
    ],
)
def test_every_number_is_bounded_before_the_work_it_bounds(
    full_and_shape: Any, tmp_path: Path, edit: Any, match: str
) -> None:
    full, shape = full_and_shape
    _write_as_tp2(full, shape, tmp_path)
    _tamper(tmp_path, edit)
    with pytest.raises(WeightsError, match=match):
        open_full_weights(tmp_path)


def test_pieces_must_form_a_grid(full_and_shape: Any, tmp_path: Path) -> None:
    full, shape = full_and_shape
    save_full_weights(full, shape, tmp_path)
    rows, cols = full[EMB].shape
    digest = json.loads((tmp_path / INDEX_FILE).read_text())["pieces"][EMB][0][3:]

    def brick_wall(i: dict[str, Any]) -> None:  # a tiling, but not a grid: refused
        h, w = rows // 2, cols // 2
        i["pieces"][EMB] = [
            [0, [0, 0], [h, cols], *digest],
            [0, [h, 0], [h, w], *digest],
            [0, [h, w], [h, w], *digest],
        ]

    _tamper(tmp_path, brick_wall)
    with pytest.raises(WeightsError, match="grid"):
        open_full_weights(tmp_path)

    def gap_at_start(i: dict[str, Any]) -> None:
        i["pieces"][EMB] = [[0, [1, 0], [rows - 1, cols], *digest]]

    _tamper(tmp_path, gap_at_start)
    with pytest.raises(WeightsError, match="cover"):
        open_full_weights(tmp_path)


def test_many_pieces_are_checked_in_n_log_n(full_and_shape: Any, tmp_path: Path) -> None:
    full, shape = full_and_shape
    save_full_weights(full, shape, tmp_path)
    rows, cols = full[EMB].shape  # 512 rows: 512 one-row pieces, a valid grid
    _tamper(tmp_path, lambda i: _split_rows(i, EMB, rows, cols, rows))
    start = time.process_time()
    for _ in range(5):
        weights = open_full_weights(tmp_path)
    assert time.process_time() - start < 5.0
    with pytest.raises(WeightsError, match="stored as"):  # the file holds one whole tensor
        weights.read(EMB, (1, 0), (1, cols))


def test_the_tiling_check_is_not_quadratic() -> None:
    from covenant.models.weights import Piece, _check_tiling

    n = 4096  # pairwise, 8.4 million box comparisons: seconds; sorted cut points: milliseconds
    pieces = [Piece("f.safetensors", (r, 0), (1, 8)) for r in range(n)]
    start = time.process_time()
    _check_tiling("t", (n, 8), pieces, Path("index"))
    assert time.process_time() - start < 1.0
    pieces[-1] = Piece("f.safetensors", (n - 2, 0), (2, 8))
    with pytest.raises(WeightsError, match="overlap"):
        _check_tiling("t", (n, 8), pieces, Path("index"))
