"""Fixtures for the metrics consumers: a session with chosen consumers and a hook driver."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from _log_helpers import CONSUMERS, Run

from covenant.engine.session import open_session


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """``make_run("jsonl", "console", overrides=[...])`` -> :class:`Run`.

    Consumers are registered in the order given (pluggy calls the last one first).
    """

    def make(*names: str, overrides: Iterable[str] = ()) -> Run:
        extra: list[tuple[str, object]] = [(n, CONSUMERS[n]) for n in names]
        session = open_session(
            None,
            [f"run.root={str(tmp_path / 'runs')!r}", *overrides],
            environ={"COVENANT_PLUGINS": ""},
            extra_plugins=extra,
        )
        return Run(session)

    yield make
    # the consumers keep per-process state: never let one test's open outputs leak into the next
    for module in CONSUMERS.values():
        module.covenant_shutdown(reason="completed", error=None)
