"""An example third-party covenant plugin: every metric line also goes to a CSV file.

It shows the three things most plugins do:

1. contribute a config section (``[csv_metrics]``) through ``covenant_add_config_sections``;
2. open an output when the run starts (``covenant_run_started``, rank 0);
3. consume metrics (``covenant_log_metrics``) and close cleanly (``covenant_shutdown``).

Install it next to covenant (``pip install -e examples/covenant-example-plugin``) and it is
discovered through its entry point; ``COVENANT_PLUGINS`` or ``[plugins] enable`` can exclude it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field

from covenant.engine import hookimpl

__version__ = "0.1.0"


class CsvMetricsConfig(BaseModel):
    """``[csv_metrics]``: where the CSV goes (relative to the run directory)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field("metrics.csv", min_length=1)
    kinds: list[str] = Field(default_factory=lambda: ["train", "eval", "window"])


class _State:
    handle: TextIO | None = None
    writer: Any = None
    cfg: CsvMetricsConfig = CsvMetricsConfig()


_state = _State()


@hookimpl
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("csv_metrics", CsvMetricsConfig)


@hookimpl
def covenant_configure(config: Any) -> None:
    _state.cfg = config.section("csv_metrics")


@hookimpl
def covenant_run_started(config: Any, run_dir: str, versions: Mapping[str, str]) -> None:
    path = Path(run_dir) / _state.cfg.file
    _state.handle = path.open("a", newline="", encoding="utf-8")
    _state.writer = csv.writer(_state.handle)
    _state.writer.writerow(["kind", "step", "metric", "value"])


@hookimpl
def covenant_log_metrics(metrics: Mapping[str, float], step: int, kind: str) -> None:
    if _state.writer is None or kind not in _state.cfg.kinds:
        return
    for name, value in sorted(metrics.items()):
        _state.writer.writerow([kind, step, name, value])


@hookimpl
def covenant_shutdown(reason: str, error: BaseException | None) -> None:
    if _state.handle is not None:
        _state.handle.close()
        _state.handle, _state.writer = None, None
