"""Failure containment and the rank check shared by the consumers."""

from __future__ import annotations

import logging

import pytest

from covenant.plugins.logging.common import Consumer, contained, open_consumer, process_rank


class Flaky(Consumer):
    name = "flaky"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.released = 0

    @contained
    def work(self, value: int) -> int:
        self.calls += 1
        if value < 0:
            raise OSError("disk full")
        return value * 2

    @contained
    def interrupt(self) -> None:
        raise KeyboardInterrupt

    def release(self) -> None:
        self.released += 1


def test_first_failure_warns_once_disables_and_releases(caplog: pytest.LogCaptureFixture) -> None:
    c = Flaky()
    assert c.work(2) == 4
    with caplog.at_level(logging.WARNING):
        assert c.work(-1) is None
        assert c.work(3) is None  # off now: not even called
        assert c.work(-1) is None
    assert c.disabled and c.calls == 2 and c.released == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'flaky' failed in work" in warnings[0].getMessage()
    assert "OSError: disk full" in warnings[0].getMessage()


def test_failing_release_is_still_contained() -> None:
    class BadRelease(Flaky):
        def release(self) -> None:
            raise RuntimeError("cannot close")

    c = BadRelease()
    assert c.work(-1) is None
    assert c.disabled


def test_keyboard_interrupt_is_not_swallowed() -> None:
    c = Flaky()
    with pytest.raises(KeyboardInterrupt):
        c.interrupt()
    assert not c.disabled


def test_open_consumer_contains_construction_errors(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Flaky:
        raise PermissionError("run dir is read-only")

    with caplog.at_level(logging.WARNING):
        assert open_consumer("flaky", broken) is None
    assert "could not start" in caplog.text and "read-only" in caplog.text
    assert isinstance(open_consumer("flaky", Flaky), Flaky)


@pytest.mark.parametrize(("env", "rank"), [({}, 0), ({"RANK": "3"}, 3), ({"RANK": " "}, 0)])
def test_process_rank_from_environment(env: dict[str, str], rank: int) -> None:
    assert process_rank(env) == rank


def test_process_rank_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="RANK='x'"):
        process_rank({"RANK": "x"})
