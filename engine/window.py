"""Windows: where they come from, and what a peer knows about the outer steps behind it.

Two clocks drive :func:`covenant.engine.loop.run_training`:

* :class:`StepClock`: a peer training alone (``[outer] name = "none"``): windows are
  ``step // H``, every window has ``H`` inner steps, ``outer_step(w) = w``.
* :class:`ChainClock`: a miner (SPEC sections 1 and 3). The window is the chain's
  (``block // blocks_per_window``); an inner loop stops early when the chain moves to the next
  window; a miner that falls a whole window behind says so and skips to the current one; no
  window before the run's ``start_window`` is trained. ``outer_step(w)`` comes from the lead
  validator's aggregate records (every record carries it), completed for the windows whose
  record is not published yet by what this peer itself applied, so a restarted or late peer
  agrees with everyone else.

Only global rank 0 talks to the chain; every decision (which window, how far behind, whether
the window is over) is broadcast to the other ranks before the next collective, so all ranks
of a peer take the same branch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from covenant.engine.errors import ConfigError, CovenantError

if TYPE_CHECKING:
    from covenant.engine.services import Services

log = logging.getLogger(__name__)
T = TypeVar("T")


class OuterConfig(BaseModel):
    """``[outer]``: which outer step a miner runs, its learning rate and how long it runs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "none",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="outer step provider (sparseloco, diloco, ddp...); none = train alone",
    )
    alpha: float = Field(1.0, gt=0, description="outer learning rate (SPEC 4.9: 1.0)")
    alpha_schedule: list[tuple[int, float]] = Field(
        default_factory=list,
        description="step-wise changes: [[from_outer_step, alpha], ...] (production lowered "
        "alpha to 0.4 late in the run)",
    )
    snapshot_on_cpu: bool = Field(
        False, description="keep theta_start (the window's starting weights) in host memory"
    )
    max_windows: int = Field(
        0, ge=0, description="a miner stops after this many windows (0: until stopped)"
    )
    start_wait_s: float = Field(
        600.0, gt=0, description="how long a miner waits for the run's start_window to appear"
    )
    catch_up: bool = Field(
        True,
        description="a miner whose state is behind replays the missing windows' aggregate "
        "records (and loads the lead validator's checkpoint when too far behind) before training",
    )
    catch_up_max_windows: int = Field(
        8, ge=1, description="behind by more windows than this: load a checkpoint first"
    )
    catch_up_retries: int = Field(
        2, ge=0, description="reloads when the caught-up model still differs from the validator's"
    )
    record_wait_s: float = Field(
        600.0, gt=0, description="catch-up waits this long for an aggregate record to appear"
    )

    @field_validator("alpha_schedule")
    @classmethod
    def _ordered(cls, value: list[tuple[int, float]]) -> list[tuple[int, float]]:
        steps = [s for s, _ in value]
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise ValueError("alpha_schedule must list strictly increasing outer steps")
        if any(s < 0 or not a > 0 for s, a in value):
            raise ValueError("alpha_schedule: outer steps >= 0 and alphas > 0")
        return value


def alpha_at(outer_step: int, cfg: OuterConfig) -> float:
    """The outer learning rate at ``outer_step``: the last schedule entry at or before it."""
    alpha = cfg.alpha
    for start, value in cfg.alpha_schedule:
        if outer_step >= start:
            alpha = value
    return alpha


# --------------------------------------------------------------------------------------------
# Agreement across the ranks of one peer
# --------------------------------------------------------------------------------------------


def agree(fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0 only and hand its result (a small, locally made value) to
    every rank. A failure on rank 0 is re-raised on every rank as a :class:`CovenantError`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as exc:  # re-raised below on every rank
            box[0] = (False, f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise CovenantError(f"rank 0: {value}")
    return value  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# What a peer remembers about windows (saved in every checkpoint)
# --------------------------------------------------------------------------------------------


@dataclass
class PeerState:
    """Window bookkeeping that must survive a restart.

    ``last_window``: the last window whose outer step finished (applied or skipped);
    ``last_applied``: the last window whose aggregate was applied (never applied twice);
    ``applied``: recent windows -> whether a non-empty aggregate was applied (completes
    ``outer_step`` for windows whose record is not published yet); ``steps``/``tokens``: totals.
    """

    last_window: int | None = None
    last_applied: int | None = None
    outer_step: int = 0  # outer_step(last_window)
    applied: dict[int, bool] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0

    KEEP = 256

    def finish(self, window: int, outer_step: int, applied: bool) -> None:
        self.last_window = window
        self.outer_step = outer_step
        self.applied[window] = applied
        if applied:
            self.last_applied = window
        for old in sorted(self.applied)[: max(0, len(self.applied) - self.KEEP)]:
            del self.applied[old]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["applied"] = [[w, a] for w, a in sorted(self.applied.items())]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerState:
        return cls(
            last_window=data.get("last_window"),
            last_applied=data.get("last_applied"),
            outer_step=int(data.get("outer_step", 0)),
            applied={int(w): bool(a) for w, a in data.get("applied", [])},
            steps=int(data.get("steps", 0)),
            tokens=int(data.get("tokens", 0)),
        )


# --------------------------------------------------------------------------------------------
# Clocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowPlan:
    """One window to train: which, at which outer step, and the inner steps to run."""

    window: int
    outer_step: int
    first_inner: int
    inner_steps: int  # H
    skipped: tuple[int, ...] = ()  # windows this peer fell behind and did not train


class StepClock:
    """A peer training alone: ``total`` global inner steps cut into windows of ``H``."""

    chain_time = False

    def __init__(self, total: int, inner_steps: int, start_step: int = 0) -> None:
        self.total, self.h, self.start = total, inner_steps, start_step

    def windows(self, state: PeerState) -> Iterator[WindowPlan]:
        step = self.start
        while step < self.total:
            window, inner = divmod(step, self.h)
            yield WindowPlan(window, window, inner, self.h)
            step = (window + 1) * self.h

    def window_over(self, plan: WindowPlan, inner: int) -> bool:
        return plan.window * self.h + inner >= self.total

    def refresh(self, plan: WindowPlan, state: PeerState) -> WindowPlan:
        return plan

    def upload_deadline_passed(self, window: int) -> bool:
        return False


class ChainClock:
    """A miner's windows, from the chain (see the module docstring). Rank 0 does the I/O."""

    chain_time = True

    def __init__(
        self,
        services: Services | None,
        inner_steps: int,
        *,
        blocks_per_window: int,
        upload_grace_s: float,
        max_windows: int = 0,
        start_wait_s: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.services = services  # None on ranks other than 0
        self.h = inner_steps
        self.bpw = blocks_per_window
        self.grace = upload_grace_s
        self.max_windows = max_windows
        self.start_wait_s = start_wait_s
        self.sleep = sleep
        self._start: int | None = None

    # -- rank 0 only ------------------------------------------------------------------------

    def _chain(self) -> Any:
        assert self.services is not None, "the chain is read on global rank 0 only"
        return self.services.chain

    def start_window(self) -> int:
        """The run's ``start_window`` (written once by the lead validator); waits for it."""
        if self._start is not None:
            return self._start
        assert self.services is not None
        waited = 0.0
        announced = False
        while True:
            start = self.services.exchange.start_window()
            if start is not None:
                self._start = start
                return start
            if waited >= self.start_wait_s:
                raise CovenantError(
                    f"no start_window from the lead validator after {waited:.0f} s "
                    "(is a validator running and staked?)"
                )
            if not announced:
                log.info("waiting for the lead validator to publish the run's start_window")
                announced = True
            self.sleep(1.0)
            waited += 1.0

    def current_window(self) -> int:
        return int(self._chain().block()) // self.bpw

    def outer_step(self, window: int, state: PeerState) -> int:
        """``outer_step(window)``: the latest published aggregate record before ``window``,
        plus this peer's own applied windows after it (records of the last window or two are
        usually not published yet)."""
        assert self.services is not None
        start = self.start_window()
        if window <= start:
            return 0
        exchange = self.services.exchange
        known = sorted(w for w in state.applied if w < window)
        floor = max(start, (known[0] if known else window) - 1, window - PeerState.KEEP)
        for w in range(window - 1, floor - 1, -1):
            if w < start:
                break
            record = exchange.aggregate_record(w)
            if record is not None:
                local = sum(1 for v in range(w + 1, window) if state.applied.get(v, False))
                return record.next_outer_step + local
        # no record at all in reach: count what this peer applied since the start
        return sum(1 for v, a in state.applied.items() if start <= v < window and a)

    # -- every rank ------------------------------------------------------------------------

    def windows(self, state: PeerState) -> Iterator[WindowPlan]:
        done = 0
        while not self.max_windows or done < self.max_windows:
            plan = agree(lambda: self._next_plan(state))
            if plan.skipped:
                log.warning(
                    "fell behind: window(s) %s skipped (no upload for a closed interval); "
                    "joining window %d",
                    _span(plan.skipped),
                    plan.window,
                )
            yield plan
            done += 1

    def _next_plan(self, state: PeerState) -> WindowPlan:
        start = self.start_window()
        chain = self._chain()
        want = start if state.last_window is None else max(start, state.last_window + 1)
        current = self.current_window()
        if current < want:
            chain.wait_for_block(want * self.bpw)
            current = self.current_window()
        skipped = tuple(range(want, current)) if state.last_window is not None else ()
        window = max(current, want)
        # A peer that starts late in a window trains from inner step 0 until the window ends.
        return WindowPlan(window, self.outer_step(window, state), 0, self.h, skipped)

    def refresh(self, plan: WindowPlan, state: PeerState) -> WindowPlan:
        """``plan`` with its outer step recomputed (after a catch-up changed ``state``)."""
        outer_step = agree(lambda: self.outer_step(plan.window, state))
        return WindowPlan(plan.window, outer_step, plan.first_inner, plan.inner_steps, plan.skipped)

    def window_over(self, plan: WindowPlan, inner: int) -> bool:
        """Whether ``plan``'s window has ended on the chain (agreed by every rank)."""
        return agree(lambda: self.current_window() > plan.window)

    def upload_deadline_passed(self, window: int) -> bool:
        """Whether ``window``'s upload interval has closed (then this peer must not upload)."""

        def check() -> bool:
            chain = self._chain()
            t_end = chain.block_timestamp((window + 1) * self.bpw)
            now_block = int(chain.block())
            return bool(
                now_block >= (window + 1) * self.bpw
                and chain.block_timestamp(now_block) > int(t_end) + self.grace
            )

        return agree(check)


def _span(windows: tuple[int, ...]) -> str:
    return str(windows[0]) if len(windows) == 1 else f"{windows[0]}-{windows[-1]}"


def check_outer_config(cfg: OuterConfig, provider: object | None) -> None:
    if cfg.name != "none" and provider is None:
        raise ConfigError(
            f"[outer] name = {cfg.name!r}: no enabled plugin provides this outer step "
            "(enable 'sparseloco', 'diloco' or 'ddp', or set name = \"none\")"
        )


__all__ = [
    "ChainClock",
    "OuterConfig",
    "PeerState",
    "StepClock",
    "WindowPlan",
    "agree",
    "alpha_at",
    "check_outer_config",
]
