"""Golden numerics: any change to selection, quantisation, format or aggregation fails here.

Fixture made by ``.venv/bin/python tools/make_codec_golden.py`` (inputs stored in the file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import covenant.plugins.sparseloco as sl

GOLDEN = Path(__file__).parent / "golden" / "codec_v1.npz"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


def _meta(golden: dict[str, np.ndarray]) -> dict:
    return json.loads(golden["meta"].tobytes())


def test_encoding_matches_golden(golden: dict[str, np.ndarray]) -> None:
    meta = _meta(golden)
    assert meta["format_version"] == sl.VERSION
    inputs = {n: torch.from_numpy(golden[f"input__{n}"].astype(np.float32)) for n in meta["cases"]}
    shapes = {n: tuple(s) for n, (s, _) in meta["cases"].items()}
    for cname, opts in meta["configs"].items():
        cfg = sl.SparseLoCoConfig(**opts)
        pieces = sl.encode_tensors(inputs, cfg)
        for n, p in pieces.items():
            assert np.array_equal(p.indices.numpy(), golden[f"{cname}__indices__{n}"]), (cname, n)
            assert p.codes is not None
            assert np.array_equal(p.codes.numpy(), golden[f"{cname}__codes__{n}"]), (cname, n)
            assert np.array_equal(
                np.asarray(p.table, np.float32), golden[f"{cname}__table__{n}"]
            ), (cname, n)
        payload = sl.pack_payload(pieces, cfg)
        assert payload == golden[f"{cname}__payload"].tobytes(), cname
        decoded = sl.decode(payload, shapes, cfg)
        for n, t in decoded.items():
            assert np.array_equal(t.numpy(), golden[f"{cname}__decoded__{n}"]), (cname, n)


def test_aggregation_matches_golden(golden: dict[str, np.ndarray]) -> None:
    meta = _meta(golden)
    cases = meta["agg_cases"]
    shapes = {n: tuple(meta["cases"][n][0]) for n in cases}
    payloads = [
        sl.encode(
            {n: torch.from_numpy(golden[f"agg_input__{i}__{n}"].astype(np.float32)) for n in cases}
        )
        for i in range(len(meta["agg_seeds"]))
    ]
    agg = sl.aggregate(payloads, shapes)
    for n in cases:
        assert np.array_equal(agg[n].numpy(), golden[f"agg_result__{n}"]), n
