"""Windows from the chain: start window, outer steps from aggregate records, falling behind,
the alpha schedule and the state a miner keeps across restarts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import ValidationError

from covenant.engine.protocols import AggregateRecord, PeerList
from covenant.engine.window import (
    ChainClock,
    OuterConfig,
    PeerState,
    StepClock,
    alpha_at,
)
from covenant.plugins.chain.local import LocalChain


@dataclass
class FakeExchange:
    start: int | None = None
    records: dict[int, AggregateRecord] = field(default_factory=dict)
    upload_grace_s: float = 5.0

    def start_window(self) -> int | None:
        return self.start

    def aggregate_record(self, window: int) -> AggregateRecord | None:
        return self.records.get(window)

    def peer_list(self, window: int) -> PeerList | None:
        return None


@dataclass
class FakeServices:
    chain: LocalChain
    exchange: FakeExchange


def _clock(
    tmp_path: Path, start: int | None = 2, **kw: object
) -> tuple[ChainClock, LocalChain, FakeExchange]:
    chain = LocalChain(
        tmp_path / "chain.sqlite", blocks_per_window=10, block_time_s=1.0, clock="manual"
    )
    exchange = FakeExchange(start=start)
    clock = ChainClock(
        FakeServices(chain, exchange),  # type: ignore[arg-type]
        inner_steps=5,
        blocks_per_window=10,
        upload_grace_s=5.0,
        sleep=lambda s: None,
        **kw,  # type: ignore[arg-type]
    )
    return clock, chain, exchange


def test_alpha_schedule_is_stepwise() -> None:
    cfg = OuterConfig(alpha=1.0, alpha_schedule=[(10, 0.7), (20, 0.4)])
    assert [alpha_at(s, cfg) for s in (0, 9, 10, 19, 20, 500)] == [1.0, 1.0, 0.7, 0.7, 0.4, 0.4]
    with pytest.raises(ValidationError, match="increasing"):
        OuterConfig(alpha_schedule=[(20, 0.4), (10, 0.7)])


def test_step_clock_cuts_steps_into_windows_and_resumes_mid_window() -> None:
    plans = list(StepClock(total=12, inner_steps=5, start_step=7).windows(PeerState()))
    assert [(p.window, p.outer_step, p.first_inner) for p in plans] == [(1, 1, 2), (2, 2, 0)]
    clock = StepClock(total=12, inner_steps=5)
    assert not clock.window_over(plans[1], 1) and clock.window_over(plans[1], 2)


def test_outer_step_comes_from_records_completed_by_own_applies(tmp_path: Path) -> None:
    clock, _, exchange = _clock(tmp_path, start=2)
    state = PeerState()
    assert clock.outer_step(2, state) == 0  # the start window
    # no record yet: count what this peer applied since the start
    state.finish(2, 0, applied=True)
    state.finish(3, 1, applied=False)
    assert clock.outer_step(4, state) == 1
    # a record says window 3 was not empty after all: the record wins, then own applies
    exchange.records[3] = AggregateRecord(window=3, outer_step=1, uploads=((5, "a" * 64),))
    state.finish(4, 2, applied=True)
    assert clock.outer_step(5, state) == 2 + 1  # next_outer_step(3) = 2, plus window 4
    exchange.records[4] = AggregateRecord(window=4, outer_step=2, uploads=())  # an empty one
    assert clock.outer_step(5, state) == 2  # an empty record adds nothing


def test_a_miner_waits_for_the_start_window_and_says_when_it_fell_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, _, _ = _clock(tmp_path, start=None, start_wait_s=3.0)
    with pytest.raises(Exception, match="start_window"):
        next(clock.windows(PeerState()))
    clock, chain, _ = _clock(tmp_path / "b", start=2)
    chain.advance(25)  # window 2
    state = PeerState()
    windows = clock.windows(state)
    plan = next(windows)
    assert (plan.window, plan.skipped) == (2, ())
    state.finish(2, 0, applied=True)
    chain.advance(30)  # window 5: windows 3 and 4 went by
    plan = next(windows)
    assert plan.window == 5 and plan.skipped == (3, 4)
    assert "fell behind" in caplog.text
    assert clock.window_over(plan, 0) is False
    chain.advance(10)
    assert clock.window_over(plan, 0) is True


def test_the_upload_deadline_is_chain_time(tmp_path: Path) -> None:
    clock, chain, _ = _clock(tmp_path, start=0)
    chain.advance(19)  # window 1, last block
    assert not clock.upload_deadline_passed(1)
    chain.advance(1 + 4)  # 4 s into window 2: the interval [t(20), t(20) + 5] still holds
    assert not clock.upload_deadline_passed(1)
    chain.advance(2)  # 6 s in: closed
    assert clock.upload_deadline_passed(1)


def test_peer_state_round_trips_and_keeps_recent_windows() -> None:
    state = PeerState(steps=7, tokens=100)
    for w in range(300):
        state.finish(w, w // 2, applied=w % 3 != 0)
    back = PeerState.from_dict(state.to_dict())
    assert back == state
    assert len(back.applied) == PeerState.KEEP and back.last_window == 299
    assert back.last_applied == 299 and back.applied[297] is False
