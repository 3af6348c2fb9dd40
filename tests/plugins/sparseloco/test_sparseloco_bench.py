"""The benchmark runs end to end on a tiny tensor set and reports sane, JSON-able numbers."""

from __future__ import annotations

import json

import pytest

import covenant.plugins.sparseloco.bench as bench


def test_benchmark_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        bench, "layer_shapes", lambda preset, layer=0: {"w": (256, 256), "n": (64,)}
    )
    result = bench.run_codec_benchmark(peers=3, distinct_peers=2, repeats=1, device="cpu")
    json.dumps(result)
    paths = result["paths"]
    assert set(paths) == {"covenant", "covenant_symmetric", "reference"}
    assert paths["covenant"]["payload_bytes"] < paths["reference"]["payload_bytes"]
    assert paths["covenant"]["rel_l2_error_kept"] == pytest.approx(
        paths["reference"]["rel_l2_error_kept"], rel=1e-3
    )
    assert result["scaled"]["preset"] == "covenant-72b"
    assert 0.156 < result["scaled"]["bits_per_param"] < 0.157
