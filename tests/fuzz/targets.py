"""The fuzz targets: one registry entry per parser of bytes that someone else controls.

Shared by the default test run (``tests/fuzz/test_fuzz_*.py``: seeded, quick hypothesis
properties) and by the long run (``tools/fuzz.py --minutes N``: coverage-guided mutation within a
time budget). A :class:`Target` says what a parser reads and how it may fail:

* ``seeds()``: valid inputs (they must be accepted, and pass ``check``);
* ``parse(data)``: the parser under test, bytes in;
* ``errors``: the parser's own typed errors, the only exceptions it may raise;
* ``check(data, result)``: what must hold of an accepted input (a round trip, agreement with a
  reference parser, finite values...);
* ``rejected(result)``: for parsers that return their verdict (``verify_object`` returns a
  ``Rejection``) instead of raising;
* ``generate(rng)``: structure-aware inputs (valid-looking documents with hostile values), on top
  of the byte mutations every target gets (:func:`mutate`: flips, truncations, insertions of
  interesting tokens, duplications, splices);
* ``fixup(data)``: applied to some mutations so they get past a checksum (the payload's CRC);
* caps: ``max_input`` bytes of input, and for an input of ``n`` bytes at most ``mem_cap(n)``
  bytes of peak Python allocation (``tracemalloc``: numpy reports to it, torch's allocator does
  not) and ``cpu_cap(n)`` seconds of CPU (``time.process_time``). Generous by design: they catch
  work that grows with the numbers *in* an input rather than with its size, not slow machines.

Adding a parser is one :func:`register` call at the bottom of this file (peer lists, score
records and checkpoint manifests are parsed by ``storage-record``).
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import math
import random
import shutil
import struct
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covenant.engine.errors import ConfigError
from covenant.engine.protocols import ChainError, PayloadRejected
from covenant.engine.untrusted import UntrustedInputError
from covenant.models.weights import WeightsError
from covenant.plugins.sparseloco.errors import AggregationError, PayloadError
from covenant.plugins.storage.errors import CommitmentError, ManifestError, StorageError

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
_CHAIN_TESTS = ROOT / "tests" / "plugins" / "chain"

MiB = 1 << 20


class InputRefused(Exception):
    """The harness could not turn these bytes into an input for the parser (not JSON rows for
    the chain database, say): counted as a rejection, never as the parser's failure."""


def _default_mem(n: int) -> int:
    return 16 * MiB + 64 * n


def _default_cpu(n: int) -> float:
    return 2.0 + 20e-6 * n


@dataclass(frozen=True)
class Target:
    """One parser of untrusted bytes, and what it may and must do (see the module docstring)."""

    name: str
    description: str
    seeds: Callable[[], list[bytes]]
    parse: Callable[[bytes], Any]
    errors: tuple[type[BaseException], ...]
    check: Callable[[bytes, Any], None] | None = None
    rejected: Callable[[Any], bool] | None = None
    generate: Callable[[random.Random], bytes] | None = None
    fixup: Callable[[bytes], bytes] | None = None
    tokens: tuple[bytes, ...] = ()
    max_input: int = 1 << 16
    mem_cap: Callable[[int], int] = _default_mem
    cpu_cap: Callable[[int], float] = _default_cpu


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in TARGETS:
        raise ValueError(f"fuzz target {target.name!r} registered twice")
    TARGETS[target.name] = target
    return target


# ------------------------------------------------------------------------------------------
# Running one input
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """``kind`` is ``accepted``, ``rejected`` (a typed error or verdict) or ``failure``."""

    kind: str
    detail: str = ""
    peak_bytes: int = 0
    cpu_s: float = 0.0


def run_one(target: Target, data: bytes, *, measure: bool = True) -> Outcome:
    """Parse ``data`` with ``target``; classify; with ``measure``, enforce the caps."""
    started = False
    if measure:
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            started = True
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    typed: tuple[type[BaseException], ...] = (*target.errors, InputRefused)
    t0 = time.process_time()
    outcome: Outcome
    try:
        result = target.parse(data)
    except typed as exc:
        outcome = Outcome("rejected", f"{type(exc).__name__}: {str(exc)[:200]}")
    except Exception as exc:  # anything else is a finding
        outcome = Outcome("failure", f"untyped {type(exc).__name__}: {str(exc)[:300]}")
    else:
        if target.rejected is not None and target.rejected(result):
            outcome = Outcome("rejected", f"verdict: {str(result)[:200]}")
        else:
            try:
                if target.check is not None:
                    target.check(data, result)
                outcome = Outcome("accepted")
            except Exception as exc:
                outcome = Outcome("failure", f"accepted but {type(exc).__name__}: {exc}"[:400])
    cpu = time.process_time() - t0
    peak = 0
    if measure:
        peak = max(0, tracemalloc.get_traced_memory()[1] - base)
        if started:
            tracemalloc.stop()
        n = len(data)
        if outcome.kind != "failure" and peak > target.mem_cap(n):
            outcome = Outcome("failure", f"allocated {peak} bytes, cap {target.mem_cap(n)}")
        elif outcome.kind != "failure" and cpu > target.cpu_cap(n):
            outcome = Outcome("failure", f"took {cpu:.2f} s CPU, cap {target.cpu_cap(n):.2f}")
    return Outcome(outcome.kind, outcome.detail, peak, cpu)


def warm(target: Target) -> list[bytes]:
    """Build the target's fixtures and seeds (imports, temp dirs, keys) outside any measurement;
    returns the seeds, each parsed once unmeasured."""
    seeds = target.seeds()
    for seed in seeds:
        run_one(target, seed, measure=False)
    return seeds


# ------------------------------------------------------------------------------------------
# Mutations (the same engine for hypothesis and for tools/fuzz.py)
# ------------------------------------------------------------------------------------------

COMMON_TOKENS: tuple[bytes, ...] = (
    b"[",
    b"]",
    b"{",
    b"}",
    b'"',
    b"\\",
    b",",
    b":",
    b"=",
    b"\n",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b"\\ud800",
    b"\\u0000",
    b"NaN",
    b"Infinity",
    b"-0",
    b"1e999",
    b"true",
    b"null",
    b"9" * 80,
    b"-" + b"9" * 20,
    b"18446744073709551616",
    b"[" * 64,
    b"{" * 40,
    b'"a":1,"a":2',
    b"[/]",
    b"[bold]",
    b"\x1b[31m",
)


def mutate(
    data: bytes,
    rng: random.Random,
    corpus: Sequence[bytes] = (),
    tokens: Sequence[bytes] = (),
    max_size: int = 1 << 16,
) -> bytes:
    """One to four random edits of ``data``: bit flips, interesting bytes, truncation, deletion,
    insertion (random bytes or a token), duplication of a range, a splice with another input."""
    out = bytearray(data)
    pool = tuple(tokens) + COMMON_TOKENS
    for _ in range(rng.randint(1, 4)):
        n = len(out)
        op = rng.randrange(9)
        pos = rng.randint(0, n)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            out[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x22, 0x5B, 0x7B, 0x30))
        elif op == 2:  # truncate
            del out[pos:]
        elif op == 3 and n:  # delete a range
            del out[pos : pos + rng.randint(1, 32)]
        elif op == 4:  # insert random bytes
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op in (5, 6):  # insert a token
            out[pos:pos] = rng.choice(pool)
        elif op == 7 and n:  # duplicate a range, possibly many times (nesting, amplification)
            a = rng.randrange(n)
            piece = bytes(out[a : a + rng.randint(1, 64)])
            out[pos:pos] = piece * rng.choice((1, 2, 8, 100))
        elif op == 8 and corpus:  # splice with another input
            other = rng.choice(corpus)
            a = rng.randint(0, len(other))
            out[pos:] = other[a:]
        if len(out) > max_size:
            del out[max_size:]
    return bytes(out)


# ------------------------------------------------------------------------------------------
# Structure-aware generation helpers
# ------------------------------------------------------------------------------------------

HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2**16,
    2**63,
    2**70,
    -(2**70),
    1.5,
    -0.0,
    1e308,
    "",
    "x",
    "[/]",
    "\x1b[31m",
    "é",
    "a" * 300,
    [],
    {},
    [0],
    [[0]],
    {"a": 1},
)


def hostile(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(HOSTILE_VALUES))


def perturb_json(value: Any, rng: random.Random, edits: int = 3) -> Any:
    """A copy of a JSON value with a few leaves or members replaced, deleted or added."""
    value = copy.deepcopy(value)
    for _ in range(edits):
        path: list[Any] = []
        node = value
        while isinstance(node, dict | list) and node and rng.random() < 0.75:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append(key)
            node = node[key]
        if not path:
            continue
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        r = rng.random()
        if r < 0.15:
            del parent[key]
        elif r < 0.25 and isinstance(parent, dict):
            parent[rng.choice(("evil", "format", "x" * 70))] = hostile(rng)
        elif r < 0.35 and isinstance(parent, list):
            parent.extend([parent[key]] * rng.choice((1, 3, 100)))
        else:
            parent[key] = hostile(rng)
    return value


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=True).encode()


def _tmpdir(name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"covenant-fuzz-{name}-"))
    atexit.register(shutil.rmtree, path, True)
    return path


# ------------------------------------------------------------------------------------------
# 1. The bounded JSON / TOML reader
# ------------------------------------------------------------------------------------------

_JSON_SEEDS: tuple[Any, ...] = (
    {"a": 1, "b": [1, 2.5, "x", None, True], "c": {"d": "é\u2028\U0001f600"}},
    [[[[1]]]],
    {"format": "covenant-weights", "version": 3, "pieces": {"w": [[0, [0, 0], [4, 8]]]}},
    "plain",
    -12345678901234567890,
    0.1,
    [],
    {},
)


def _json_seeds() -> list[bytes]:
    from covenant.engine.untrusted import canonical_json

    return [canonical_json(v) for v in _JSON_SEEDS] + [b' { "spaced" : [ 1 , 2 ] } ']


def _json_parse(data: bytes) -> Any:
    from covenant.engine.untrusted import loads_json

    return loads_json(data, what="fuzz", max_bytes=1 << 18)


def _json_check(data: bytes, value: Any) -> None:
    from covenant.engine.untrusted import canonical_json, loads_canonical_json

    # the standard library agrees on everything we accept, and the canonical form round-trips
    assert json.loads(data) == value
    again = canonical_json(value)
    assert loads_canonical_json(again, what="fuzz") == value


def _json_generate(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.2:  # nesting around the bound
        depth = rng.choice((31, 32, 33, 200, 5000))
        return b"[" * depth + b"]" * depth
    if r < 0.3:
        return b"1" * rng.choice((63, 64, 65, 4300, 5000))
    if r < 0.4:
        return b'{"k":1,"k":2}'
    return dumps(perturb_json(rng.choice(_JSON_SEEDS), rng))


register(
    Target(
        name="untrusted-json",
        description="covenant.engine.untrusted.loads_json (the bounded JSON reader)",
        seeds=_json_seeds,
        parse=_json_parse,
        errors=(UntrustedInputError,),
        check=_json_check,
        generate=_json_generate,
        max_input=1 << 18,
    )
)

_TOML_SEEDS = (
    b'[run]\nid = "abc"\n[train]\nlr = 3e-4\nsteps = 10\n',
    b"a = [1, [2, [3]]]\nb = { c = \"d\", e = [true, false] }\n\"q k\" = '''x\ny'''\n",
    b"[[t]]\nx = 0x1F\n[[t]]\nx = 0o17\nd = 1979-05-27T07:32:00Z\n# [[[[ comment\n",
)


def _toml_parse(data: bytes) -> Any:
    from covenant.engine.untrusted import loads_toml

    return loads_toml(data.decode("utf-8", "surrogateescape"), what="fuzz", max_bytes=1 << 18)


def _toml_check(data: bytes, value: Any) -> None:
    import tomllib

    assert tomllib.loads(data.decode("utf-8")) == value


def _toml_generate(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.25:
        depth = rng.choice((31, 32, 33, 400, 3000))
        return b"a = " + b"[" * depth + b"1" + b"]" * depth
    if r < 0.4:
        return b"a = " + rng.choice((b"1", b"0x", b"-")) + b"9" * rng.choice((60, 65, 5000))
    if r < 0.5:
        return b"a." * rng.choice((30, 33, 500)) + b"b = 1"
    if r < 0.6:
        return rng.choice((b"a = nan", b"a = -inf", b"a = 1e999", b"a = 1" + b"0" * 400 + b".5"))
    return rng.choice(_TOML_SEEDS)


register(
    Target(
        name="untrusted-toml",
        description="covenant.engine.untrusted.loads_toml (the bounded TOML reader)",
        seeds=lambda: list(_TOML_SEEDS),
        parse=_toml_parse,
        errors=(UntrustedInputError,),
        check=_toml_check,
        generate=_toml_generate,
        tokens=(b"'''", b'"""', b"[[", b"]]", b"#", b"0x", b"inf", b"nan", b"."),
        max_input=1 << 18,
        cpu_cap=lambda n: 3.0 + 40e-6 * n,  # tomllib is pure Python
    )
)


# ------------------------------------------------------------------------------------------
# 2. The config loader (a file, and --set values)
# ------------------------------------------------------------------------------------------


@functools.cache
def _config_schema() -> dict[str, Any]:
    from covenant.engine.plugins import PluginHost

    host = PluginHost()
    host.load(None)
    return host.config_schema()


@functools.cache
def _config_dir() -> Path:
    return _tmpdir("config")


def _config_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted((ROOT / "configs").glob("*.toml"))] + [
        b'[train]\nlr = 1e-3\n[run]\nid = "fuzz"\n'
    ]


def _config_parse(data: bytes) -> Any:
    from covenant.engine.config import build_config, read_toml

    path = _config_dir() / "fuzz.toml"
    path.write_bytes(data)
    tree = read_toml(path)
    return build_config(_config_schema(), tree, source=str(path), environ={})


def _config_generate(rng: random.Random) -> bytes:
    import tomllib

    seeds = _config_seeds()
    base = tomllib.loads(seeds[rng.randrange(len(seeds))].decode())
    section = rng.choice([*base, "train", "run", "plugins", "[/]"])
    key = rng.choice(("lr", "steps", "id", "enable", "[bold]", "x" * 80))
    value = rng.choice(
        (
            "1" + "0" * rng.choice((10, 70, 5000)),
            "[" * rng.choice((5, 33, 2000)) + "]" * 5,
            '"[/]"',
            "nan",
            "-inf",
            '"\\u0000"',
            "{a = {b = {c = 1}}}",
            "[1, 'two']",
        )
    )
    return f'{"".join(_dump_toml(base))}\n["{section}"]\n"{key}" = {value}\n'.encode()


def _dump_toml(tree: dict[str, Any]) -> list[str]:
    out = []
    for section, values in tree.items():
        if isinstance(values, dict):
            out.append(f"[{section}]\n")
            for k, v in values.items():
                out.append(f"{k} = {json.dumps(v)}\n")
    return out


register(
    Target(
        name="config-file",
        description="covenant.engine.config.read_toml + build_config (a config file)",
        seeds=_config_seeds,
        parse=_config_parse,
        errors=(ConfigError,),
        generate=_config_generate,
        tokens=(b"[train]", b"[plugins]\nenable = ", b"lr = ", b'"', b"'''"),
        cpu_cap=lambda n: 3.0 + 40e-6 * n,
    )
)

_SET_SEEDS = (
    b"train.lr=3e-4",
    b"train.steps=10",
    b'run.id="fuzz"',
    b'plugins.enable=["core", "model"]',
    b"storage.url=memory://fuzz",
)


def _set_parse(data: bytes) -> Any:
    from covenant.engine.config import build_config

    text = data.decode("utf-8", "replace")
    return build_config(_config_schema(), {}, overrides=[text], environ={})


register(
    Target(
        name="config-set",
        description="covenant.engine.config --set / environment values (parse_value)",
        seeds=lambda: list(_SET_SEEDS),
        parse=_set_parse,
        errors=(ConfigError,),
        tokens=(b"[", b"{", b"=", b".", b"0x", b"nan"),
        max_input=1 << 14,
    )
)


# ------------------------------------------------------------------------------------------
# 3. Commitments
# ------------------------------------------------------------------------------------------

_COMMITMENT_SEEDS = (
    b"0123456789abcdef0123456789abcdef" + b"fedcba9876543210fedcba9876543210" + b"a" * 64,
    b"v1|https://s3.eu-west-1.amazonaws.com|my-bucket/run-1|AKIAIOSFODNN7EXAMPLE|wJalrXUtnFEMI",
    b"v1|https://[2001:4860:4860::8888]:443|bucket|k|s",
    b"v1|http://127.0.0.1:9000|bucket/p|k|s",
    b"v1|memory://peer-3/store",
    b"v1|file:///srv/peer",
)


def _commitment_parse(data: bytes) -> Any:
    from covenant.plugins.storage.credentials import parse_commitment

    text = data.decode("latin-1")
    try:
        remote = parse_commitment(text)
    except CommitmentError:
        remote = None
    return remote, parse_commitment(text, allow_local=True)


def _commitment_check(data: bytes, result: Any) -> None:
    from covenant.plugins.storage.credentials import _host_problem, format_commitment
    from covenant.plugins.storage.credentials import parse_commitment as parse

    remote, local = result
    assert parse(format_commitment(local), allow_local=True) == local
    if remote is not None:  # the endpoint policy: a remote endpoint is a public https host
        assert remote == local
        if remote.endpoint_url:
            from urllib.parse import urlsplit

            parts = urlsplit(remote.endpoint_url)
            assert parts.scheme == "https" and _host_problem(parts.hostname or "") is None


def _commitment_generate(rng: random.Random) -> bytes:
    host = rng.choice(
        (
            "127.0.0.1",
            "2130706433",
            "0x7f.1",
            "[::ffff:169.254.169.254]",
            "[fe80::1%25eth0]",
            "metadata.google.internal",
            "localhost.",
            "a.b",
            "s3.amazonaws.com",
            "[",
            "]",
            "x" * 300,
            "h:0",
            "h:99999",
            "user@h",
        )
    )
    scheme = rng.choice(("https", "http", "ftp", "file", "memory", ""))
    tail = rng.choice(("|bucket|k|s", "|b/../x|k|s", "|bucket|k", "", "/p?q#f|bucket|k|s"))
    return f"v1|{scheme}://{host}{tail}".encode("utf-8", "replace")


register(
    Target(
        name="commitment",
        description="covenant.plugins.storage.credentials.parse_commitment (both modes)",
        seeds=lambda: list(_COMMITMENT_SEEDS),
        parse=_commitment_parse,
        errors=(CommitmentError,),
        check=_commitment_check,
        generate=_commitment_generate,
        tokens=(b"|", b"://", b"[", b"]", b"@", b"%", b"..", b"0x", b"127.", b"::"),
        max_input=512,
    )
)


# ------------------------------------------------------------------------------------------
# 4. Signed objects and manifests
# ------------------------------------------------------------------------------------------


@functools.cache
def _signing_keys() -> tuple[Any, Any]:
    from bittensor.sp_core import Keypair

    return Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Bob")


_KEY = "run/v1/gradient/5/3"


@functools.cache
def _object_seeds() -> tuple[bytes, ...]:
    from covenant.plugins.storage.exchange import build_signed_object

    alice, _ = _signing_keys()
    out = []
    for payload, extra in (
        (b"payload", {}),
        (b"", {"sizes": {"values": 3, "indices": 9}}),
        (bytes(range(256)) * 4, {"receipt": {"hash": "ab" * 16, "count": 7}}),
    ):
        fields = {"run": "run", "version": 1, "window": 5, "uid": 3, "codec": "c/1", **extra}
        out.append(build_signed_object(_KEY, payload, fields, alice)[1])
    return tuple(out)


def _object_parse(data: bytes) -> Any:
    from covenant.plugins.storage.manifest import unpack_object

    return unpack_object(data, 64 * 1024)


def _object_check(data: bytes, result: Any) -> None:
    from covenant.plugins.storage.manifest import pack_object

    signed, payload = result
    assert pack_object(signed, payload) == data  # only the canonical form is accepted


def _object_generate(rng: random.Random) -> bytes:
    seed = rng.choice(_object_seeds())
    n = struct.unpack_from(">I", seed, 5)[0]
    header = json.loads(seed[9 : 9 + n])
    header = perturb_json(header, rng, edits=rng.randint(1, 3))
    raw = dumps(header)
    if rng.random() < 0.3:
        raw = json.dumps(header, separators=(", ", ": ")).encode()
    return seed[:5] + struct.pack(">I", len(raw)) + raw + seed[9 + n :]


register(
    Target(
        name="storage-object",
        description="covenant.plugins.storage.manifest.unpack_object (signed object header)",
        seeds=lambda: list(_object_seeds()),
        parse=_object_parse,
        errors=(ManifestError,),
        check=_object_check,
        generate=_object_generate,
        tokens=(b'"format":true', b'"window":5,', b" ", b"\\u0072", b"1.0", b'"receipt":null'),
    )
)


def _verify_parse(data: bytes) -> Any:
    from covenant.engine.protocols import ObjectInfo
    from covenant.plugins.storage.exchange import ExpectedUpload, verify_object

    alice, _ = _signing_keys()
    exp = ExpectedUpload(
        run="run", version=1, window=5, uid=3, hotkey=alice.ss58_address, max_bytes=1 << 16
    )
    return verify_object(_KEY, data, exp, ObjectInfo(_KEY, len(data), 0.0))


def _verify_rejected(result: Any) -> bool:
    from covenant.plugins.storage.exchange import Rejection

    return isinstance(result, Rejection)


def _verify_check(data: bytes, result: Any) -> None:
    from covenant.plugins.storage.manifest import content_hash

    m = result.manifest
    assert (m.run, m.version, m.key, m.window, m.uid) == ("run", 1, _KEY, 5, 3)
    assert content_hash(result.payload) == m.sha256 and len(result.payload) == m.size


register(
    Target(
        name="storage-verify",
        description="covenant.plugins.storage.exchange.verify_object (never raises)",
        seeds=lambda: list(_object_seeds()),
        parse=_verify_parse,
        errors=(),
        check=_verify_check,
        rejected=_verify_rejected,
        generate=_object_generate,
        tokens=(b'"window":6', b'"uid":4', b"0x00"),
    )
)


# ------------------------------------------------------------------------------------------
# 5. Record bodies (peer lists, aggregate records, sync samples, scores, checkpoint manifests)
# ------------------------------------------------------------------------------------------


def _record_bodies() -> list[dict[str, Any]]:
    return [
        {"format": "covenant-start/1", "start_window": 7},
        {
            "format": "covenant-peers/1",
            "first_window": 9,
            "posted_window": 8,
            "gather": [1, 2, 5],
            "reserve": [7],
        },
        {
            "format": "covenant-aggregate/1",
            "window": 9,
            "outer_step": 4,
            "uploads": [[1, "a" * 64], [3, "b" * 64]],
        },
        {"format": "covenant-sync/1", "window": 9, "uid": 2, "values": {"w": [0.5, -1.25]}},
        {"format": "covenant-score/1", "window": 9, "uid": 2, "record": {"loss": 1.5}},
        {
            "format": "covenant-checkpoint/1",
            "window": 10,
            "outer_step": 10,
            "model": {"layers": 2},
            "files": {"covenant_model.json": {"sha256": "c" * 64, "size": 10}},
        },
    ]


def _record_seeds() -> list[bytes]:
    from covenant.plugins.storage.records import encode_record

    return [encode_record(b) for b in _record_bodies()]


def _record_parse(data: bytes) -> Any:
    from covenant.plugins.storage.records import FORMATS, RecordError, parse_record

    error: RecordError | None = None
    for fmt in FORMATS:
        try:
            return parse_record(data, fmt)
        except RecordError as exc:
            error = exc
    assert error is not None
    raise error


def _record_check(data: bytes, model: Any) -> None:
    from covenant.engine.untrusted import loads_json

    # what the reader acts on is what was signed: the fields equal the canonical bytes' fields
    dumped = json.loads(json.dumps(model.model_dump(mode="json")))
    assert dumped == loads_json(data, what="record", max_bytes=1 << 22)


def _record_generate(rng: random.Random) -> bytes:
    body = perturb_json(rng.choice(_record_bodies()), rng, edits=rng.randint(1, 3))
    return dumps(body)


register(
    Target(
        name="storage-record",
        description="covenant.plugins.storage.records.parse_record (every record format)",
        seeds=_record_seeds,
        parse=_record_parse,
        errors=(StorageError,),  # RecordError
        check=_record_check,
        generate=_record_generate,
        tokens=(b'"format":"covenant-peers/1"', b'"gather":[1,1]', b"1.0"),
    )
)


# ------------------------------------------------------------------------------------------
# 6. SparseLoCo payloads and aggregation
# ------------------------------------------------------------------------------------------

SL_SHAPES = {"a": (64, 128), "b": (100,), "c": (48, 40)}


def reseal(data: bytes) -> bytes:
    """Replace the payload's CRC-32 trailer so a mutation reaches the checks behind it."""
    if len(data) < 4:
        return data
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


@functools.cache
def _payload_seeds() -> tuple[bytes, ...]:
    import torch

    import covenant.plugins.sparseloco as sl

    g = torch.Generator().manual_seed(0)
    dense = [
        {n: torch.randn(s, generator=g) * (i + 1) for n, s in SL_SHAPES.items()} for i in (0, 1)
    ]
    zero = {n: torch.zeros(s) for n, s in SL_SHAPES.items()}
    return tuple(sl.encode(t) for t in (*dense, zero))


def _payload_parse(data: bytes) -> Any:
    import covenant.plugins.sparseloco as sl

    sl.validate_payload(data, SL_SHAPES)
    return sl.decode(data, SL_SHAPES)


def _dense_check(data: bytes, out: Any) -> None:
    import torch

    assert set(out) <= set(SL_SHAPES)
    for name, t in out.items():
        assert t.shape == torch.Size(SL_SHAPES[name]) and bool(torch.isfinite(t).all()), name


register(
    Target(
        name="sparseloco-payload",
        description="covenant.plugins.sparseloco.parse_payload / validate_payload / decode",
        seeds=lambda: list(_payload_seeds()),
        parse=_payload_parse,
        errors=(PayloadError,),
        check=_dense_check,
        fixup=reseal,
        tokens=(b'"tensors":[]', b'"k":', b'"shape":[100]'),
        max_input=1 << 17,
        mem_cap=lambda n: 64 * MiB + 64 * n,
    )
)


def _aggregate_parse(data: bytes) -> Any:
    import covenant.plugins.sparseloco as sl

    cfg = sl.SparseLoCoConfig(norm_eps=0.0)
    good, _, zero = _payload_seeds()
    return sl.aggregate([good, data, zero], SL_SHAPES, cfg)


register(
    Target(
        name="sparseloco-aggregate",
        description="covenant.plugins.sparseloco.aggregate of [valid, fuzzed, all-zero], eps 0",
        seeds=lambda: list(_payload_seeds()),
        parse=_aggregate_parse,
        errors=(PayloadError, AggregationError),
        check=_dense_check,
        fixup=reseal,
        max_input=1 << 17,
        mem_cap=lambda n: 64 * MiB + 64 * n,
    )
)


# DiLoCo's dense/1 payloads (the codec of the diloco outer step)

DN_SHAPES = {"a": (16, 24), "b": (100,), "c": (3, 4, 5)}


@functools.cache
def _dense_payload_seeds() -> tuple[bytes, ...]:
    import torch

    from covenant.plugins.diloco.codec import pack_dense

    g = torch.Generator().manual_seed(0)
    t = {n: torch.randn(s, generator=g) for n, s in DN_SHAPES.items()}
    zero = {n: torch.zeros(s) for n, s in DN_SHAPES.items()}
    return (pack_dense(t, "fp32"), pack_dense(t, "bf16"), pack_dense(zero, "fp32"))


def _dense_payload_parse(data: bytes) -> Any:
    from covenant.plugins.diloco.codec import DenseCodec

    codec = DenseCodec()
    codec.validate(data, DN_SHAPES)
    codec.norms(data, DN_SHAPES)
    return codec.aggregate([_dense_payload_seeds()[0], data], DN_SHAPES)


def _dense_payload_check(data: bytes, out: Any) -> None:
    import torch

    assert set(out) == set(DN_SHAPES)
    for name, t in out.items():
        assert t.shape == torch.Size(DN_SHAPES[name]) and bool(torch.isfinite(t).all()), name


register(
    Target(
        name="diloco-payload",
        description="covenant.plugins.diloco.codec.DenseCodec validate / norms / aggregate",
        seeds=lambda: list(_dense_payload_seeds()),
        parse=_dense_payload_parse,
        errors=(PayloadRejected,),
        check=_dense_payload_check,
        fixup=reseal,
        tokens=(b'"dtype":"bf16"', b'"shape":[100]', b'"tensors":[]', b"\x80\x7f"),
        max_input=1 << 14,
    )
)


# ------------------------------------------------------------------------------------------
# 7. The full-weights index
# ------------------------------------------------------------------------------------------


@functools.cache
def _weights_dir() -> tuple[Path, tuple[bytes, ...]]:
    """A directory with a tiny model's pieces as a TP=2 peer (files 0, 1) and as one file (2)."""
    import torch

    from covenant.models.config import ModelShape
    from covenant.models.layout import global_params, shard_of
    from covenant.models.weights import build_index, file_digests, write_pieces

    shape = ModelShape("fuzz", layers=1, hidden=8, heads=2, kv_heads=1, ffn=16, vocab=16, seq_len=8)
    g = torch.Generator().manual_seed(0)
    full = {p.name: torch.randn(p.shape, generator=g) for p in global_params(shape)}
    root = _tmpdir("weights")
    sources, digests = [], {}
    for rank in (0, 1):
        mine = {}
        for p in global_params(shape):
            s = shard_of(p, 2, rank)
            if s.replicated_over_tp and rank:
                continue
            sources.append((rank, s))
            box = tuple(slice(o, o + n) for o, n in zip(s.offsets, s.local_shape, strict=True))
            mine[p.name] = full[p.name][box]
        path = write_pieces(root, rank, mine)
        digests.update({(rank, k): v for k, v in file_digests(path).items()})
    tp2 = json.dumps(build_index(shape, sources, digests)).encode()
    whole = [(2, shard_of(p, 1, 0)) for p in global_params(shape)]
    path = write_pieces(root, 2, full)
    one = {(2, k): v for k, v in file_digests(path).items()}
    tp1 = json.dumps(build_index(shape, whole, one), separators=(",", ":")).encode()
    return root, (tp2, tp1)


def _weights_parse(data: bytes) -> Any:
    from covenant.models.weights import INDEX_FILE, open_full_weights

    root, _ = _weights_dir()
    (root / INDEX_FILE).write_bytes(data)
    weights = open_full_weights(root)
    weights.verify()
    return {name: weights.read(name) for name in weights.names()}


def _weights_generate(rng: random.Random) -> bytes:
    _, seeds = _weights_dir()
    index = json.loads(rng.choice(seeds))
    r = rng.random()
    if r < 0.3:  # point a piece at another file, or move it
        name = rng.choice(list(index["pieces"]))
        piece = rng.choice(index["pieces"][name])
        if rng.random() < 0.5:
            piece[0] = rng.randrange(-1, len(index["files"]) + 1)
        else:
            piece[1] = [o + rng.choice((-1, 1, 4)) for o in piece[1]]
    elif r < 0.45:  # huge numbers in the shape
        key = rng.choice(("layers", "hidden", "vocab", "ffn", "heads"))
        index["shape"][key] = rng.choice((0, 10**6, 10**9, 2**40, -1))
    elif r < 0.6:  # many pieces
        name = rng.choice(list(index["pieces"]))
        index["pieces"][name] = index["pieces"][name] * rng.choice((2, 64, 5000))
    else:
        index = perturb_json(index, rng, edits=rng.randint(1, 3))
    return dumps(index)


register(
    Target(
        name="weights-index",
        description="covenant.models.weights.open_full_weights + verify + read (index v3)",
        seeds=lambda: list(_weights_dir()[1]),
        parse=_weights_parse,
        errors=(WeightsError,),
        check=lambda data, out: None,
        generate=_weights_generate,
        tokens=(b'"version":2', b'"F16"', b"shard-00002", b'"layers":', b"[0,0]"),
        max_input=1 << 17,
        mem_cap=lambda n: 32 * MiB + 64 * n,
    )
)


# ------------------------------------------------------------------------------------------
# 8. Chain data: the local SQLite chain's rows, and a node's answers through the SDK
# ------------------------------------------------------------------------------------------


def _sql_value(value: Any) -> Any:
    """JSON to an SQLite value: ``{"blob": "hex"}`` is a BLOB, everything else as is."""
    if isinstance(value, dict) and set(value) == {"blob"} and isinstance(value["blob"], str):
        try:
            return bytes.fromhex(value["blob"])
        except ValueError:
            raise InputRefused("bad blob hex") from None
    if isinstance(value, list | dict):
        return json.dumps(value)
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return str(value)
    return value


_CHAIN_TABLES = {
    "neurons": ("uid", "hotkey", "stake", "validator_permit", "registered_block"),
    "commitments": ("hotkey", "data", "block"),
    "weights": ("block", "uid", "hotkey", "weights"),
    "nonces": ("hotkey", "nonce"),
}


@functools.cache
def _local_chain() -> Any:
    from covenant.plugins.chain.local import LocalChain

    root = _tmpdir("chain")
    return LocalChain(root / "chain.sqlite", clock="manual", sleep_fn=lambda s: None)


def _alice_bob() -> tuple[str, str]:
    alice, bob = _signing_keys()
    return alice.ss58_address, bob.ss58_address


def _chain_seeds() -> list[bytes]:
    a, b = _alice_bob()
    doc = {
        "neurons": [[0, a, 10.0, 1, 0], [1, b, 1.5, 0, 3]],
        "commitments": [[a, "v1|https://s3.amazonaws.com|bucket|k|s", 4]],
        "weights": [[5, 0, a, "[[0, 0.25], [1, 0.75]]"]],
        "nonces": [[a, 3]],
        "meta": {"manual_block": "12"},
    }
    return [dumps(doc), dumps({"neurons": [], "meta": {"manual_block": "0"}})]


def _chain_parse(data: bytes) -> Any:
    import sqlite3

    chain = _local_chain()
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise InputRefused("not a JSON row document") from None
    if not isinstance(doc, dict):
        raise InputRefused("not a JSON object")
    conn = sqlite3.connect(chain.path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for table in _CHAIN_TABLES:
            conn.execute(f"DELETE FROM {table}")  # fixed table names
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'manual_block'")
        for table, columns in _CHAIN_TABLES.items():
            rows = doc.get(table, [])
            if not isinstance(rows, list):
                raise InputRefused(f"{table} is not a list")
            for row in rows[:64]:
                if not isinstance(row, list) or len(row) != len(columns):
                    raise InputRefused(f"bad {table} row")
                marks = ", ".join("?" * len(columns))
                conn.execute(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                    [_sql_value(v) for v in row],
                )
        meta = doc.get("meta", {})
        if isinstance(meta, dict) and "manual_block" in meta:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'manual_block'",
                (_sql_value(meta["manual_block"]),),
            )
        conn.execute("COMMIT")
    except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:  # not storable rows
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise InputRefused(f"rows not insertable: {exc}") from None
    finally:
        conn.close()
    if isinstance(doc.get("meta_init"), dict):
        _reopen_with_meta(chain.path, doc["meta_init"])
    a, _ = _alice_bob()
    return (
        chain.block(),
        chain.metagraph(),
        chain.commitments(),
        chain.weights_history(),
        chain.last_weights_block(),
        chain.uid_of(a),
    )


def _reopen_with_meta(path: Path, meta: dict[str, Any]) -> None:
    """Open the chain anew after overwriting meta rows (genesis, clock...), then restore them."""
    import sqlite3

    from covenant.plugins.chain.local import LocalChain

    conn = sqlite3.connect(path, isolation_level=None)
    saved = conn.execute("SELECT key, value FROM meta").fetchall()
    try:
        for key, value in list(meta.items())[:16]:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (str(key), _sql_value(value)),
            )
        LocalChain(path, clock="manual", sleep_fn=lambda s: None).close()
    except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:
        raise InputRefused(f"meta not writable: {exc}") from None
    finally:
        conn.execute("DELETE FROM meta")
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", saved)
        conn.close()


def _chain_check(data: bytes, result: Any) -> None:
    block, neurons, commitments, history, last, uid = result
    assert isinstance(block, int) and block >= 0
    for n in neurons:
        assert isinstance(n.uid, int) and isinstance(n.hotkey, str) and math.isfinite(n.stake)
    for c in commitments.values():
        assert isinstance(c.data, str) and c.data.isprintable() and isinstance(c.block, int)
    for rec in history:
        assert all(isinstance(u, int) and 0 <= w <= 1 for u, w in rec.weights.items())
    assert all(isinstance(k, int) and isinstance(v, int) for k, v in last.items())
    assert uid is None or isinstance(uid, int)


def _chain_generate(rng: random.Random) -> bytes:
    doc = json.loads(rng.choice(_chain_seeds()))
    doc = perturb_json(doc, rng, edits=rng.randint(1, 4))
    if rng.random() < 0.3:
        neurons = doc.get("neurons")
        doc["neurons"] = [*(neurons if isinstance(neurons, list) else []), [hostile(rng)] * 5]
    if rng.random() < 0.2:
        doc["meta"] = {"manual_block": rng.choice(("-1", "x", "9" * 30, {"blob": "00"}, None))}
    if rng.random() < 0.2:
        doc["weights"] = [[1, 0, _alice_bob()[0], rng.choice(("[", "[[0, NaN]]", "[" * 50, "{}"))]]
    if rng.random() < 0.15:
        key = rng.choice(
            ("schema_version", "genesis_time", "genesis_seed", "block_time_s", "clock")
        )
        doc["meta_init"] = {key: rng.choice(("", "x", "nan", "1e999", "00", None, -1, "wall"))}
    return dumps(doc)


register(
    Target(
        name="chain-local",
        description="covenant.plugins.chain.local.LocalChain reads of rows someone wrote",
        seeds=_chain_seeds,
        parse=_chain_parse,
        errors=(ChainError, ConfigError),  # ConfigError: a chain created with another clock
        check=_chain_check,
        generate=_chain_generate,
        tokens=(b'{"blob":"ff"}', b"null", b"1e308"),
        max_input=1 << 15,
    )
)


@functools.cache
def _sdk_chain() -> tuple[Any, Any]:
    if str(_CHAIN_TESTS) not in sys.path:
        sys.path.insert(0, str(_CHAIN_TESTS))
    from substrate_double import SubstrateDouble

    from covenant.plugins.chain.bittensor_chain import BittensorChain

    class HostileNode(SubstrateDouble):
        """The substrate double, answering with a fuzzed metagraph and fuzzed commitments."""

        metagraph_override: Any = None  # set per input
        commitments_override: Any = None

        async def runtime_call(
            self, api: str, method: str, params: list, block_hash: str | None = None
        ) -> Any:
            value = await super().runtime_call(api, method, params, block_hash)
            if isinstance(value, dict) and isinstance(self.metagraph_override, dict):
                value = {**value, **self.metagraph_override}
            return value

        async def query_map(
            self,
            module: str,
            storage_function: str,
            params: list | None = None,
            block_hash: str | None = None,
        ) -> list[tuple[Any, Any]]:
            value = await super().query_map(module, storage_function, params, block_hash)
            fuzzed = self.commitments_override
            if (module, storage_function) == ("Commitments", "CommitmentOf") and fuzzed is not None:
                return [tuple(x) if isinstance(x, list) else x for x in fuzzed]
            return value

    node = HostileNode()
    alice, bob = _signing_keys()
    node.add_neuron(alice.ss58_address, stake=5.0, validator_permit=True)
    node.add_neuron(bob.ss58_address, stake=1.0)
    chain = BittensorChain(substrate=node, netuid=node.netuid, retries=1, sleep_fn=lambda s: None)
    chain.commit(bob, "v1|https://s3.amazonaws.com|bucket|k|s")
    return chain, node


def _sdk_seeds() -> list[bytes]:
    _, node = _sdk_chain()
    records = [[hk, dict(rec)] for hk, rec in node.commitment_of.items()]
    return [dumps({"metagraph": {}, "commitments": None}), dumps({"commitments": records})]


def _sdk_parse(data: bytes) -> Any:
    chain, node = _sdk_chain()
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise InputRefused("not a JSON document") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("metagraph", {}), dict):
        raise InputRefused("not a node-answer document")
    node.metagraph_override = doc.get("metagraph", {})
    commitments = doc.get("commitments")
    node.commitments_override = commitments if isinstance(commitments, list) else None
    return chain.block(), chain.metagraph(), chain.last_weights_block(), chain.commitments()


def _sdk_check(data: bytes, result: Any) -> None:
    block, neurons, last, commitments = result
    assert isinstance(block, int)
    for n in neurons:
        assert isinstance(n.uid, int) and isinstance(n.hotkey, str) and math.isfinite(n.stake)
    assert all(isinstance(k, int) and isinstance(v, int) for k, v in last.items())
    for c in commitments.values():
        assert isinstance(c.data, str) and isinstance(c.block, int)


_METAGRAPH_KEYS = (
    "hotkeys",
    "coldkeys",
    "validator_permit",
    "last_update",
    "total_stake",
    "alpha_stake",
    "block",
    "num_uids",
    "name",
    "symbol",
    "tempo",
    "active",
    "block_at_registration",
    "emission",
    "axons",
    "identities",
    "netuid",
)


def _sdk_generate(rng: random.Random) -> bytes:
    _, node = _sdk_chain()
    over: dict[str, Any] = {}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(_METAGRAPH_KEYS)
        if rng.random() < 0.5:
            over[key] = hostile(rng)
        else:
            over[key] = [hostile(rng) for _ in range(rng.choice((1, 2, 3)))]
    commitments: Any = None
    if rng.random() < 0.5:
        records = [[hk, dict(rec)] for hk, rec in node.commitment_of.items()]
        commitments = perturb_json(records, rng, edits=rng.randint(1, 3))
    return dumps({"metagraph": over, "commitments": commitments})


register(
    Target(
        name="chain-sdk",
        description="covenant.plugins.chain.bittensor_chain reads of a hostile node's answers",
        seeds=_sdk_seeds,
        parse=_sdk_parse,
        errors=(ChainError,),
        check=_sdk_check,
        generate=_sdk_generate,
        max_input=1 << 15,
    )
)


# ------------------------------------------------------------------------------------------
# The checked-in corpus
# ------------------------------------------------------------------------------------------


def corpus_files(name: str) -> list[Path]:
    """Saved inputs of target ``name`` (failures found once, and inputs that reached new code)."""
    folder = CORPUS / name
    return sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []


@dataclass
class Stats:
    """Per-target counts of a run."""

    tried: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: int = 0
    failure_details: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.tried += 1
        if outcome.kind == "accepted":
            self.accepted += 1
        elif outcome.kind == "rejected":
            self.rejected += 1
        else:
            self.failures += 1
            if len(self.failure_details) < 10:
                self.failure_details.append(outcome.detail)
