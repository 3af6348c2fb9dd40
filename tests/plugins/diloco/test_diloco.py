"""The DiLoCo baseline: the dense/1 codec (round trips, every rejection), the Nesterov outer step
against hand computations and torch's SGD, and peers in lockstep through real services."""

from __future__ import annotations

import json
import random
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _diloco_swarm import MiniSwarm, ToyModel

from covenant.engine.protocols import ParamShard, PayloadRejected, WindowContext
from covenant.engine.window import OuterConfig
from covenant.plugins.diloco.codec import (
    PREFIX,
    DenseCodec,
    DenseEncodeError,
    DenseWriter,
    pack_dense,
    payload_size,
)
from covenant.plugins.diloco.config import DiLoCoConfig
from covenant.plugins.diloco.outer import DiLoCoOuterStep, nesterov_step


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(6, 8, generator=g),
        "b.bias": torch.randn(16, generator=g),
        "c.norm": torch.randn(3, 4, 5, generator=g),
    }


SHAPES = {n: tuple(t.shape) for n, t in tensors().items()}
CODEC = DenseCodec()


def reason(payload: bytes, shapes: Any = SHAPES, codec: DenseCodec = CODEC) -> str:
    with pytest.raises(PayloadRejected) as info:
        codec.validate(payload, shapes)
    return info.value.reason


def forge(header: str | bytes, data: bytes, *, version: int = 1, flags: int = 0) -> bytes:
    """A payload with any header and data, a correct CRC and zero padding."""
    raw = header.encode() if isinstance(header, str) else header
    pad = (-(PREFIX.size + len(raw))) % 8
    body = PREFIX.pack(b"CVDN", version, flags, len(raw)) + raw + b"\0" * pad + data
    return body + struct.pack("<I", zlib.crc32(body))


def fix_crc(payload: bytes) -> bytes:
    body = payload[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def header_of(shapes: Any, dtype: str = "fp32", **extra: Any) -> str:
    body: dict[str, Any] = {
        "dtype": dtype,
        "format": "covenant-dense",
        "tensors": [{"name": n, "shape": list(shapes[n])} for n in sorted(shapes)],
    }
    body.update(extra)
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------


def test_fp32_round_trip_is_exact_and_sized() -> None:
    t = tensors()
    payload = pack_dense(t, "fp32")
    assert payload[:4] == b"CVDN"
    assert len(payload) == payload_size(SHAPES, "fp32") == CODEC.max_payload_bytes(SHAPES)
    CODEC.validate(payload, SHAPES)
    out = CODEC.decode(payload, SHAPES)
    assert set(out) == set(t)
    for n in t:
        assert out[n].dtype == torch.float32 and torch.equal(out[n], t[n])
    assert CODEC.tile_indices(payload, SHAPES) == {}
    norms = CODEC.norms(payload, SHAPES)
    for n in t:
        assert norms[n] == pytest.approx(float(t[n].double().norm()), rel=1e-12)
    assert pack_dense(t, "fp32") == payload  # one encoding per update


def test_bf16_round_trip_halves_the_data() -> None:
    t = tensors()
    codec = DenseCodec(DiLoCoConfig(wire_dtype="bf16"))
    payload = codec.encode(t)
    assert len(payload) == payload_size(SHAPES, "bf16") < payload_size(SHAPES, "fp32")
    data = sum(x.numel() for x in t.values())
    assert payload_size(SHAPES, "fp32") - len(payload) == 2 * data
    out = CODEC.decode(payload, SHAPES)  # the header says bf16: any dense/1 codec reads it
    for n in t:
        assert torch.equal(out[n], t[n].to(torch.bfloat16).float())
    norms = CODEC.norms(payload, SHAPES)
    assert norms["a.weight"] == pytest.approx(float(out["a.weight"].double().norm()), rel=1e-12)


def test_owned_slices_and_pieces_match_the_whole() -> None:
    t = tensors()
    payload = pack_dense(t)
    owned = [
        ParamShard("a.weight", (6, 8), (3, 0), (3, 8)),
        ParamShard("c.norm", (3, 4, 5), (0, 2, 0), (3, 2, 5)),
    ]
    part = CODEC.decode(payload, SHAPES, owned=owned)
    assert set(part) == {"a.weight", "c.norm"}
    assert torch.equal(part["a.weight"], t["a.weight"][3:6])
    assert torch.equal(part["c.norm"], t["c.norm"][:, 2:4])
    # a TP-like peer writes its slices in any order and gets the same bytes
    writer = DenseWriter(SHAPES, "fp32")
    writer.write("a.weight", (0, 4), t["a.weight"][:, 4:])
    writer.write("c.norm", (0, 0, 0), t["c.norm"])
    writer.write("b.bias", (8,), t["b.bias"][8:])
    writer.write("a.weight", (0, 0), t["a.weight"][:, :4])
    writer.write("b.bias", (0,), t["b.bias"][:8])
    assert writer.finish() == payload


def test_writer_refuses_gaps_and_non_finite() -> None:
    t = tensors()
    writer = DenseWriter(SHAPES, "fp32")
    writer.write("a.weight", (0, 0), t["a.weight"])
    writer.write("c.norm", (0, 0, 0), t["c.norm"])
    with pytest.raises(DenseEncodeError, match=r"b\.bias"):
        writer.finish()
    with pytest.raises(DenseEncodeError, match="leaves"):
        DenseWriter(SHAPES, "fp32").write("b.bias", (10,), t["b.bias"][:8])
    bad = dict(t, **{"b.bias": t["b.bias"].clone().index_fill_(0, torch.tensor([3]), float("nan"))})
    with pytest.raises(DenseEncodeError, match="non-finite"):
        pack_dense(bad)
    huge = dict(t, **{"b.bias": torch.full((16,), 3.4e38)})
    pack_dense(huge, "fp32")
    with pytest.raises(DenseEncodeError, match="bf16"):
        pack_dense(huge, "bf16")  # rounds up to infinity in bf16


def test_aggregate_is_the_mean_in_list_order() -> None:
    payloads = [pack_dense(tensors(s)) for s in range(3)]
    agg = CODEC.aggregate(payloads, SHAPES)
    for n in SHAPES:
        want = tensors(0)[n].clone()
        want += tensors(1)[n]
        want += tensors(2)[n]
        want /= 3.0
        assert torch.equal(agg[n], want)
    owned = [ParamShard("a.weight", (6, 8), (0, 2), (6, 2))]
    part = CODEC.aggregate(payloads, SHAPES, owned=owned)
    assert set(part) == {"a.weight"} and torch.equal(part["a.weight"], agg["a.weight"][:, 2:4])
    assert CODEC.aggregate([], SHAPES) == {}


def test_aggregate_overflow_is_rejected() -> None:
    big = {n: torch.full(s, 3.0e38) for n, s in SHAPES.items()}
    payload = pack_dense(big)
    CODEC.validate(payload, SHAPES)
    with pytest.raises(PayloadRejected) as info:
        CODEC.aggregate([payload, payload], SHAPES)
    assert info.value.reason == "nonfinite_aggregate"


def test_structural_rejections() -> None:
    good = pack_dense(tensors())
    assert reason(good[:10]) == "payload_size"
    assert reason(good + b"\0") == "payload_size"
    assert reason(b"XXXX" + good[4:]) == "payload_format"
    assert reason(fix_crc(good[:4] + struct.pack("<H", 2) + good[6:])) == "payload_version"
    assert reason(fix_crc(good[:6] + struct.pack("<H", 1) + good[8:])) == "payload_format"
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    assert reason(bytes(flipped)) == "payload_checksum"
    import io
    import pickle

    buf = io.BytesIO()
    torch.save(tensors(), buf)
    assert reason(buf.getvalue()[: len(good)]) in ("payload_format", "payload_size")
    assert reason(pickle.dumps(tensors())[: len(good)]) in ("payload_format", "payload_size")


def test_header_and_shape_rejections() -> None:
    t = tensors()
    data = pack_dense(t)[len(forge(header_of(SHAPES), b"")) - 4 : -4]
    assert CODEC.decode(forge(header_of(SHAPES), data), SHAPES)  # the forger itself is right
    cases = {
        "not json": ("{not json", "payload_format"),
        "not ascii": (header_of(SHAPES).replace("a.weight", "ä.weight"), "payload_format"),
        "spaces": (header_of(SHAPES).replace(",", ", "), "payload_format"),
        "extra key": (header_of(SHAPES, extra=1), "payload_format"),
        "fp16": (header_of(SHAPES, dtype="fp16"), "payload_format"),
        "nested": ("[" * 10 + "]" * 10, "payload_format"),
        "duplicate key": (
            header_of(SHAPES)[:-1] + ',"dtype":"fp32"}',
            "payload_format",
        ),
        "bool dim": (header_of(SHAPES).replace("[6,8]", "[true,8]"), "payload_format"),
        "unsorted": (
            header_of(SHAPES).replace('"a.weight"', '"z.weight"'),
            "payload_format",
        ),
        "wrong shape": (header_of(SHAPES).replace("[6,8]", "[8,6]"), "payload_shape"),
        "unknown": (header_of({**SHAPES, "d.x": (1,)}), "payload_shape"),
        "missing": (header_of({"a.weight": (6, 8), "b.bias": (16,)}), "payload_shape"),
    }
    short_data = data[:-64]  # the header checks come before the exact-length check
    for label, (header, want) in cases.items():
        assert reason(forge(header, short_data)) == want, label
    short = forge(header_of(SHAPES), data[:-4])
    assert reason(short) == "payload_size"
    padded = bytearray(forge(header_of(SHAPES), data))
    start = PREFIX.size + len(header_of(SHAPES))
    assert (PREFIX.size + len(header_of(SHAPES))) % 8 != 0, "the test needs padding bytes"
    padded[start] = 1
    assert reason(fix_crc(bytes(padded))) == "payload_format"
    huge_header = forge(" " * 100, b"")
    codec = DenseCodec(DiLoCoConfig(max_header_bytes=64))
    assert reason(huge_header, codec=codec) == "payload_size"


def test_non_finite_values_are_rejected_everywhere() -> None:
    t = tensors()
    for dtype, nan_bits in (("fp32", struct.pack("<I", 0x7FC00000)), ("bf16", b"\xc0\x7f")):
        payload = bytearray(pack_dense(t, dtype))
        at = len(payload) - 4 - len(nan_bits)  # the last element of the last tensor
        payload[at : at + len(nan_bits)] = nan_bits
        bad = fix_crc(bytes(payload))
        assert reason(bad) == "payload_nonfinite", dtype
        for call in (
            lambda b=bad: CODEC.decode(b, SHAPES),
            lambda b=bad: CODEC.norms(b, SHAPES),
            lambda b=bad: CODEC.aggregate([b], SHAPES),
        ):
            with pytest.raises(PayloadRejected) as info:
                call()
            assert info.value.reason == "payload_nonfinite"


def test_random_damage_is_always_a_rejection() -> None:
    good = pack_dense(tensors())
    rng = random.Random(7)
    for _ in range(300):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.5:  # damage that keeps a valid CRC reaches the deeper checks
            bad = bytearray(fix_crc(bytes(bad)))
        if rng.random() < 0.2:
            bad = bad[: rng.randrange(len(bad))]
        try:
            out = CODEC.decode(bytes(bad), SHAPES)
        except PayloadRejected:
            continue
        assert set(out) == set(SHAPES)  # a harmless change (e.g. in a value) still decodes


# --------------------------------------------------------------------------------------------
# The outer optimizer
# --------------------------------------------------------------------------------------------


def test_nesterov_step_by_hand() -> None:
    start, g, m = torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.2])
    new, m2 = nesterov_step(start, g, m, lr=0.7, mu=0.9, nesterov=True)
    # m' = 0.9*0.2 + 0.5 = 0.68; step = 0.5 + 0.9*0.68 = 1.112; 1 - 0.7*1.112 = 0.2216
    assert float(m2) == pytest.approx(0.68)
    assert float(new) == pytest.approx(0.2216)
    new, m2 = nesterov_step(start, g, m, lr=0.7, mu=0.9, nesterov=False)
    assert float(m2) == pytest.approx(0.68) and float(new) == pytest.approx(1 - 0.7 * 0.68)


def test_nesterov_step_matches_torch_sgd() -> None:
    g = torch.Generator().manual_seed(3)
    start = torch.randn(5, 7, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4)]
    for nesterov in (True, False):
        param = torch.nn.Parameter(start.clone())
        opt = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=nesterov)
        theta, m = start.clone(), torch.zeros_like(start)
        for grad in grads:
            param.grad = grad.clone()
            opt.step()
            theta, m = nesterov_step(theta.double(), grad, m.double(), 0.7, 0.9, nesterov)
            theta, m = theta.double(), m.double()
        assert torch.allclose(theta, param.detach(), atol=1e-5), nesterov


def test_config_and_hook() -> None:
    cfg = DiLoCoConfig()
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.wire_dtype) == (0.7, 0.9, True, "fp32")
    with pytest.raises(ValueError):
        DiLoCoConfig(wire_dtype="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DiLoCoConfig(momentum=1.0)
    step = DiLoCoOuterStep(cfg, OuterConfig(alpha_schedule=[(10, 0.5)]), None)
    assert step.alpha(0) == pytest.approx(0.7) and step.alpha(10) == pytest.approx(0.35)
    from covenant.plugins.diloco import plugin

    assert plugin.covenant_outer_step(config=None, name="sparseloco", services=None) is None
    from covenant.engine.protocols import Codec, OuterStep

    assert isinstance(step, OuterStep) and isinstance(step.codec, Codec)
    assert not hasattr(plugin, "COVENANT_ROLES")  # the validator may enable it (codec, apply)


# --------------------------------------------------------------------------------------------
# Peers in lockstep, through the chain, storage and the exchange
# --------------------------------------------------------------------------------------------

START = {"w": torch.linspace(-1.0, 1.0, 32).reshape(4, 8), "b": torch.linspace(0.0, 1.0, 16)}


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[MiniSwarm]:
    s = MiniSwarm(tmp_path, "diloco", peers=2)
    yield s
    s.close()


def window(s: MiniSwarm, w: int, outer_step: int, deltas: list[dict[str, torch.Tensor]]) -> list:
    """One lockstep window: begin, 'train' (theta -= delta), publish all, finish all."""
    ctxs = []
    for m, delta in zip(s.peers, deltas, strict=True):
        ctx = WindowContext(w, outer_step, m.uid, 3)
        m.outer.begin(ctx, m.model)
        for n, p in m.model.params.items():
            p.sub_(delta[n])
        ctxs.append(ctx)
    s.advance_to((w + 1) * 10)
    pubs = [m.outer.publish(c, m.model) for m, c in zip(s.peers, ctxs, strict=True)]
    fins = [m.outer.finish(c, m.model) for m, c in zip(s.peers, ctxs, strict=True)]
    return [dict(p, **f) for p, f in zip(pubs, fins, strict=True)]


def test_two_peers_apply_identical_nesterov_updates(swarm: MiniSwarm) -> None:
    for m in swarm.peers:
        m.model = ToyModel(START)
    d1 = [{n: torch.full_like(t, 0.01 * (r + 1)) for n, t in START.items()} for r in range(2)]
    out = window(swarm, 1, 0, d1)
    assert [o["applied"] for o in out] == [1.0, 1.0], out
    assert [o["uploaded"] for o in out] == [1.0, 1.0]
    assert out[0]["peers"] == 2.0 and out[0]["bytes_up"] == payload_size(
        {n: tuple(t.shape) for n, t in START.items()}
    )
    a, b = (m.model.params for m in swarm.peers)
    g1 = 0.015  # mean pseudo-gradient of the window
    m1 = g1
    for n in START:
        assert torch.equal(a[n], b[n])
        want = START[n] - 0.7 * (g1 + 0.9 * m1)
        assert torch.allclose(a[n], want, atol=1e-6)
    assert all(m.model.reloads == 1 for m in swarm.peers)
    # second window: the momentum carries over
    d2 = [{n: torch.full_like(t, 0.02 * (r + 1)) for n, t in START.items()} for r in range(2)]
    before = {n: t.clone() for n, t in a.items()}
    out = window(swarm, 2, 1, d2)
    assert [o["applied"] for o in out] == [1.0, 1.0]
    g2 = 0.03
    m2 = 0.9 * m1 + g2
    for n in START:
        assert torch.equal(a[n], b[n])
        assert torch.allclose(a[n], before[n] - 0.7 * (g2 + 0.9 * m2), atol=1e-6)
    state = swarm.peers[0].outer.state_dict()
    assert state["format"] == 1 and torch.allclose(state["momentum"]["w"], torch.full((4, 8), m2))
    fresh = DiLoCoOuterStep(DiLoCoConfig(), OuterConfig(), None)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.momentum["b"], state["momentum"]["b"])
    with pytest.raises(ValueError):
        fresh.load_state_dict({"format": 2})


def test_apply_replays_what_the_miners_did(swarm: MiniSwarm) -> None:
    """The validator's ``apply`` on the same uploads lands on the miners' weights."""
    for m in swarm.peers:
        m.model = ToyModel(START)
    deltas = [{n: torch.full_like(t, 0.01 * (r + 1)) for n, t in START.items()} for r in range(2)]
    window(swarm, 1, 0, deltas)
    uploads = list(
        swarm.peers[0].services.exchange.fetch_gradients(
            1, [m.uid for m in swarm.peers], max_bytes=10**6, codec="dense/1"
        )
    )
    validator = DiLoCoOuterStep(DiLoCoConfig(), OuterConfig(), None)
    model = ToyModel(START)
    ctx = WindowContext(1, 0, -1, 3)
    assert validator.apply(ctx, model, uploads)["applied"] == 1.0
    for n in START:
        assert torch.equal(model.params[n], swarm.peers[0].model.params[n])
    assert validator.apply(ctx, ToyModel(START), [])["applied"] == 0.0


def test_bf16_wire_keeps_peers_identical(tmp_path: Path) -> None:
    s = MiniSwarm(tmp_path, "diloco", peers=2, section={"wire_dtype": "bf16"})
    try:
        for m in s.peers:
            m.model = ToyModel(START)
        d = [{n: torch.full_like(t, 0.01 * (r + 1)) for n, t in START.items()} for r in range(2)]
        out = window(s, 1, 0, d)
        assert [o["applied"] for o in out] == [1.0, 1.0]
        assert out[0]["bytes_up"] == payload_size(
            {n: tuple(t.shape) for n, t in START.items()}, "bf16"
        )
        a, b = (m.model.params for m in s.peers)
        assert all(torch.equal(a[n], b[n]) for n in START)
    finally:
        s.close()


def test_no_peer_list_applies_nothing(tmp_path: Path) -> None:
    s = MiniSwarm(tmp_path, "diloco", peers=2, peer_list=False)
    try:
        for m in s.peers:
            m.model = ToyModel(START)
        d = [{n: torch.full_like(t, 0.01) for n, t in START.items()} for _ in range(2)]
        out = window(s, 1, 0, d)
        assert [o["applied"] for o in out] == [0.0, 0.0]
        assert out[0]["skip_reason"] == "no peer list in force"
        for m in s.peers:  # theta stays theta_start, the momentum untouched
            assert all(torch.equal(m.model.params[n], START[n]) for n in START)
            assert all(float(x.abs().max()) == 0.0 for x in m.outer.momentum.values())
    finally:
        s.close()


def test_a_bad_upload_is_skipped_not_applied(tmp_path: Path) -> None:
    """A peer whose payload is damaged is rejected; the others' mean is applied."""
    s = MiniSwarm(tmp_path, "diloco", peers=3)
    try:
        for m in s.peers:
            m.model = ToyModel(START)
        deltas = [
            {n: torch.full_like(t, 0.01 * (r + 1)) for n, t in START.items()} for r in range(3)
        ]

        from covenant.engine.hookspecs import hookimpl

        class Corrupt:  # the third peer uploads garbage with a valid signature
            @hookimpl
            def covenant_payload(self, ctx: Any, payload: bytes, services: Any) -> bytes | None:
                if services is s.peers[2].services:
                    return payload[:-8] + b"\0" * 8
                return None

        s.host.register(Corrupt(), name="corrupt")
        out = window(s, 1, 0, deltas)
        assert [o["applied"] for o in out] == [1.0, 1.0, 1.0]
        assert out[0]["peers"] == 2.0 and out[0]["rejected"] == 1.0
        g = 0.015  # the mean of the two good peers
        for m in s.peers:
            for n in START:
                assert torch.allclose(m.model.params[n], START[n] - 0.7 * 1.9 * g, atol=1e-6)
    finally:
        s.close()


# --------------------------------------------------------------------------------------------
# The third-party example of docs/outer.md, run as written
# --------------------------------------------------------------------------------------------


def docs_example(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``my_outer.adam`` and ``my_outer.plugin`` from docs/outer.md, as importable modules."""
    import re
    import types

    text = (Path(__file__).resolve().parents[3] / "docs/outer.md").read_text()
    blocks = re.findall(r"```python\n(# my_outer/(\w+)\.py.*?)```", text, re.DOTALL)
    assert [name for _code, name in blocks] == ["adam", "plugin"]
    package = types.ModuleType("my_outer")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "my_outer", package)
    modules = {}
    for code, name in blocks:
        module = types.ModuleType(f"my_outer.{name}")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        exec(compile(code, f"docs/outer.md:my_outer/{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["plugin"]


def test_the_docs_outer_adam_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = docs_example(monkeypatch)
    s = MiniSwarm(tmp_path, "outer-adam", peers=2, section=None)
    try:
        s.host.register(plugin, name="my-outer")
        for m in s.peers:
            m.outer = s.host.hook.covenant_outer_step(
                config=m.config, name="outer-adam", services=m.services
            )
            assert type(m.outer).__name__ == "OuterAdam"
            m.model = ToyModel(START)
        deltas = [
            {n: torch.full_like(t, 0.01 * (r + 1)) for n, t in START.items()} for r in range(2)
        ]
        out = window(s, 1, 0, deltas)
        assert [o["applied"] for o in out] == [1.0, 1.0]
        a, b = (m.model.params for m in s.peers)
        for n in START:  # Adam's first step is lr * sign(g) (up to eps): 0.7 per coordinate
            assert torch.equal(a[n], b[n])
            assert torch.allclose(a[n], START[n] - 0.7, atol=1e-5)
        state = s.peers[0].outer.state_dict()
        assert state["adam"]["w"][0] == 1 and "momentum" in state
    finally:
        s.close()
