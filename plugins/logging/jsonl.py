"""The ``jsonl`` metrics consumer: ``metrics.jsonl`` in the run directory, the source for reports.

One JSON object per line, appended (a resumed run continues the same file)::

    {"kind":"train","step":12,"time":1796000000.123,"loss":3.21,"lr":0.000117,...}

``kind`` and ``step`` are the arguments of ``covenant_log_metrics``, ``time`` is Unix seconds.
JSON has no NaN or infinity, so non-finite floats are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"``; :func:`read_metrics` turns them back into floats.

Crash safety: every ``flush_every`` lines the buffer is flushed to the OS; lines whose kind is
in ``fsync_kinds`` (window and eval by default) and shutdown also ``fsync``, so a power loss
costs at most the train lines since the last window. A crash can still leave a torn final
line: :func:`read_metrics` skips it, and :class:`JsonlWriter` cuts it off before appending, so
the next run never glues a new line onto a broken one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from covenant.engine.errors import CovenantError
from covenant.engine.hookspecs import hookimpl
from covenant.plugins.logging.common import Consumer, contained, open_consumer, process_rank

log = logging.getLogger(__name__)

__all__ = [
    "JsonlConfig",
    "JsonlWriter",
    "MetricsFileError",
    "encode_line",
    "read_metrics",
    "to_json_value",
]

#: Fields every line carries; a metric with one of these names is stored as ``metric_<name>``.
RESERVED = ("kind", "step", "time")
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
#: Chunk size used when looking backwards for the last newline of an existing file.
_TAIL_CHUNK = 64 * 1024


class MetricsFileError(CovenantError):
    """A metrics file has a damaged line that is not the torn last one."""


class JsonlConfig(BaseModel):
    """``[jsonl]``: the metrics file in the run directory (always on while the plugin loads)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(
        "metrics.jsonl",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="file name inside the run directory",
    )
    flush_every: int = Field(1, ge=1, description="flush the write buffer every N lines")
    fsync_kinds: list[str] = Field(
        default_factory=lambda: ["window", "eval"],
        description="kinds whose lines are flushed and fsynced at once (shutdown always is)",
    )


# ---------------------------------------------------------------------------------------------
# Encoding and reading
# ---------------------------------------------------------------------------------------------


def to_json_value(value: Any) -> Any:
    """A metric value as something ``json.dumps(allow_nan=False)`` accepts.

    Non-finite floats become ``"nan"``/``"inf"``/``"-inf"``; numpy and torch scalars become
    Python numbers (through ``.item()``); mappings and sequences are converted element-wise;
    anything else is written as its ``str``.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):  # numpy / torch scalars (0-d or one element)
        try:
            return to_json_value(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def encode_line(kind: str, step: int, metrics: Mapping[str, Any], now: float) -> str:
    """One line of the file (without the newline)."""
    record: dict[str, Any] = {"kind": str(kind), "step": int(step), "time": round(now, 6)}
    for key, value in metrics.items():
        name = str(key)
        record[f"metric_{name}" if name in RESERVED else name] = to_json_value(value)
    return json.dumps(record, allow_nan=False, separators=(",", ":"))


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: NONFINITE[v] if k not in RESERVED and isinstance(v, str) and v in NONFINITE else v
        for k, v in record.items()
    }


def read_metrics(
    path: str | os.PathLike[str],
    *,
    kinds: Iterable[str] | None = None,
    decode_nonfinite: bool = True,
) -> list[dict[str, Any]]:
    """Every record of a metrics file, in order.

    A torn final line (a crash in the middle of a write) is skipped; a damaged line anywhere
    else raises :class:`MetricsFileError` naming the file and line. ``kinds`` keeps only
    those kinds. With ``decode_nonfinite`` the strings ``"nan"``, ``"inf"``, ``"-inf"`` become
    floats again.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise MetricsFileError(f"{p}: metrics file not found") from None
    wanted = None if kinds is None else set(kinds)
    lines = data.split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    out: list[dict[str, Any]] = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except (ValueError, UnicodeDecodeError) as exc:
            if index == last:
                log.info("%s: skipped a torn last line (%d bytes)", p, len(raw))
                break
            raise MetricsFileError(f"{p}:{index + 1}: damaged metrics line: {exc}") from None
        if wanted is not None and record.get("kind") not in wanted:
            continue
        out.append(_decode(record) if decode_nonfinite else record)
    return out


def repair_tail(path: Path) -> int:
    """Cut a torn last line off ``path`` (left by a crash); returns the bytes removed.

    A last line that is complete JSON but lacks its newline gets the newline instead.
    """
    if not path.exists():
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        cut = 0  # offset just after the last newline
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            f.seek(start)
            chunk = f.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                cut = start + nl + 1
                break
            end = start
        if cut == size:
            return 0
        f.seek(cut)
        tail = f.read()
        try:
            complete = isinstance(json.loads(tail), dict)
        except (ValueError, UnicodeDecodeError):
            complete = False
        if complete:
            f.seek(size)
            f.write(b"\n")
            return 0
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    log.warning(
        "%s: removed a torn last line (%d bytes) left by an earlier crash", path, size - cut
    )
    return size - cut


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------


class JsonlWriter(Consumer):
    """Appends metric lines to one file; usable on its own, outside the plugin."""

    name = "jsonl"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_every: int = 1,
        fsync_kinds: Iterable[str] = ("window", "eval"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = Path(path)
        self.flush_every = flush_every
        self.fsync_kinds = frozenset(fsync_kinds)
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._pending = 0
        self.lines = 0

    @contained
    def write(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one line; flush (and fsync for ``fsync_kinds``) as configured."""
        self._file.write(encode_line(kind, step, metrics, self._clock()) + "\n")
        self.lines += 1
        self._pending += 1
        if kind in self.fsync_kinds:
            self._sync()
        elif self._pending >= self.flush_every:
            self._file.flush()
            self._pending = 0

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._pending = 0

    @contained
    def close(self) -> None:
        """Flush, fsync and close (idempotent)."""
        if self._file.closed:
            return
        self._sync()
        self._file.close()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()


# ---------------------------------------------------------------------------------------------
# Hook implementations (rank 0 only: run_started opens the writer there and nowhere else)
# ---------------------------------------------------------------------------------------------

_writer: JsonlWriter | None = None


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("jsonl", JsonlConfig)


@hookimpl
def covenant_run_started(config: Any, run_dir: str, versions: Mapping[str, str]) -> None:
    global _writer
    _close()  # one process hosts one run; a previous writer (tests) is closed first

    def build() -> JsonlWriter | None:
        if process_rank() != 0:
            return None
        cfg: JsonlConfig = config.typed("jsonl", JsonlConfig)
        return JsonlWriter(
            Path(run_dir) / cfg.file, flush_every=cfg.flush_every, fsync_kinds=cfg.fsync_kinds
        )

    _writer = open_consumer("jsonl", build)
    if _writer is not None:
        log.debug("jsonl: writing metrics to %s", _writer.path)


@hookimpl
def covenant_log_metrics(metrics: Mapping[str, Any], step: int, kind: str) -> None:
    if _writer is not None:
        _writer.write(kind, step, metrics)


@hookimpl
def covenant_shutdown(reason: str, error: BaseException | None) -> None:
    _close()


def _close() -> None:
    global _writer
    if _writer is not None:
        _writer.close()
        _writer = None
