"""The ``reward`` plugin: the gauntlet's weights become chain weights, and a refusal is a skip.

Through the local chain (a manual-clock SQLite chain: the weights land in its history,
normalised), through the Bittensor SDK's own code against the substrate double (plain
``set_mechanism_weights`` with u16 values, commit-reveal), and through the validator's driver
(``GauntletScorer._publish``), which records the outcome in ``window.json`` and fires
``covenant_weights_set`` with ``ok`` and ``reason``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "chain"))

from substrate_double import SubstrateDouble

from covenant.engine.hookspecs import hookimpl
from covenant.engine.keys import load_hotkey
from covenant.engine.protocols import WeightsResult
from covenant.engine.session import Session, open_session
from covenant.plugins.chain.bittensor_chain import BittensorChain
from covenant.plugins.chain.local import LocalChain
from covenant.plugins.reward import plugin as reward
from covenant.plugins.reward.plugin import RewardConfig, submit

RATE_LIMIT = 5
VALIDATOR = "//Alice"


class Recorder:
    """A plugin that records ``covenant_weights_set``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[int, float], bool, str]] = []

    @hookimpl
    def covenant_weights_set(
        self, window: int, weights: Mapping[int, float], ok: bool, reason: str
    ) -> None:
        self.calls.append((window, dict(weights), ok, reason))


def _session(
    tmp_path: Path,
    *sets: str,
    hotkey: str = VALIDATOR,
    plugins: tuple[str, ...] = ("reward", "chain"),
    extra: tuple[tuple[str, object], ...] = (),
) -> Session:
    return open_session(
        None,
        [
            f"plugins.enable={json.dumps(list(plugins))}",
            f'run.root="{tmp_path}"',
            'run.id="reward"',
            'chain.name="local"',
            f'chain.db="{tmp_path / "chain.sqlite"}"',
            'chain.clock="manual"',
            f"chain.weights_rate_limit_blocks={RATE_LIMIT}",
            f'chain.hotkey="{hotkey}"',
            *(["reward.retry_wait_s=0"] if "reward" in plugins else []),
            *sets,
        ],
        environ={},
        extra_plugins=extra,
    )


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[LocalChain]:
    """uid 0 the validator (stake, permit), uids 1-3 miners."""
    c = LocalChain(tmp_path / "chain.sqlite", clock="manual", weights_rate_limit_blocks=RATE_LIMIT)
    validator = load_hotkey(VALIDATOR)
    assert c.register(validator) == 0
    c.set_stake(validator.ss58_address, 1e6, validator_permit=True)
    for i, name in enumerate(("//Bob", "//Charlie", "//Dave"), start=1):
        assert c.register(load_hotkey(name)) == i
    yield c
    c.close()


def _set(session: Session, weights: Mapping[int, float], window: int = 3) -> WeightsResult:
    result = session.hook.covenant_submit_weights(
        window=window, weights=weights, services=session.services, config=session.config
    )
    assert isinstance(result, WeightsResult)
    return result


# ------------------------------------------------------------------------------------------------
# the local chain
# ------------------------------------------------------------------------------------------------


def test_weights_land_in_the_local_chain_normalised(tmp_path: Path, chain: LocalChain) -> None:
    session = _session(tmp_path)
    result = _set(session, {1: 2.0, 2: 1.0, 3: 1.0})
    assert result.ok and result.block == chain.block()
    (latest,) = chain.weights_history()
    assert latest.uid == 0 and latest.hotkey == load_hotkey(VALIDATOR).ss58_address
    assert dict(latest.weights) == {1: 0.5, 2: 0.25, 3: 0.25}
    assert chain.last_weights_block() == {0: result.block}


def test_min_weight_drops_small_weights_before_normalising(
    tmp_path: Path, chain: LocalChain
) -> None:
    session = _session(tmp_path, "reward.min_weight=0.1")
    assert _set(session, {1: 3.0, 2: 0.05, 3: 1.0}).ok
    assert dict(chain.weights_history()[0].weights) == {1: 0.75, 3: 0.25}
    assert not _set(session, {2: 0.05}).ok  # nothing left: a skip, not a zero set


def test_an_unregistered_hotkey_is_a_recorded_skip(tmp_path: Path, chain: LocalChain) -> None:
    session = _session(tmp_path, hotkey="//Eve")
    result = _set(session, {1: 1.0})
    assert not result.ok and "not registered" in result.reason
    assert chain.weights_history() == []


def test_the_rate_limit_is_retried_then_a_recorded_skip(tmp_path: Path, chain: LocalChain) -> None:
    session = _session(tmp_path, "reward.tries=3")
    assert _set(session, {1: 1.0}).ok
    sleeps: list[float] = []
    cfg = session.config.typed("reward", RewardConfig)
    result = submit(
        session.services.chain, session.services.hotkey, {2: 1.0}, cfg, sleep=sleeps.append
    )
    assert not result.ok and "rate limit" in result.reason
    assert sleeps == [0.0, 0.0]  # three tries: rate limits are transient
    chain.advance(RATE_LIMIT)
    assert _set(session, {2: 1.0}).ok  # once the limit has passed
    assert [dict(r.weights) for r in chain.weights_history()] == [{2: 1.0}, {1: 1.0}]


class _Flaky:
    """A chain that refuses (or raises) a given number of times, then accepts."""

    def __init__(self, answers: list[WeightsResult | Exception]) -> None:
        self.answers = answers
        self.calls: list[dict[int, float]] = []

    def set_weights(self, hotkey: Any, weights: Mapping[int, float]) -> WeightsResult:
        self.calls.append(dict(weights))
        answer = self.answers.pop(0) if self.answers else WeightsResult(ok=True, block=7)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_retries_stop_at_the_first_success_or_a_permanent_refusal() -> None:
    cfg = RewardConfig(tries=4, retry_wait_s=1.5)
    sleeps: list[float] = []
    flaky = _Flaky([WeightsResult(ok=False, reason="Rate limit: too fast")])
    result = submit(flaky, None, {1: 1.0, 2: 3.0}, cfg, sleep=sleeps.append)
    assert result.ok and result.block == 7 and sleeps == [1.5]
    assert flaky.calls == [{1: 0.25, 2: 0.75}] * 2
    permanent = _Flaky([WeightsResult(ok=False, reason="unknown uid 9")])
    result = submit(permanent, None, {1: 1.0}, cfg, sleep=sleeps.append)
    assert not result.ok and result.reason == "unknown uid 9" and len(permanent.calls) == 1


def test_a_chain_that_raises_is_a_skip_never_an_exception() -> None:
    raising = _Flaky([RuntimeError("socket closed")] * 5)
    result = submit(raising, None, {1: 1.0}, RewardConfig(tries=2), sleep=lambda _s: None)
    assert not result.ok and result.reason == "RuntimeError: socket closed"
    assert len(raising.calls) == 1  # not a known transient reason: no retry
    assert not submit(raising, None, {}, RewardConfig()).ok  # nothing to set
    assert not submit(raising, None, {1: 0.0}, RewardConfig()).ok


def test_disabled_reward_records_without_submitting(tmp_path: Path, chain: LocalChain) -> None:
    session = _session(tmp_path, "reward.enabled=false")
    result = _set(session, {1: 1.0})
    assert not result.ok and result.reason == "[reward] enabled = false"
    assert chain.weights_history() == []


# ------------------------------------------------------------------------------------------------
# the validator's driver: window.json and covenant_weights_set
# ------------------------------------------------------------------------------------------------


class _NoModel:
    """The scorer's constructor reads the model's layout only; publishing needs no model."""

    def layout(self) -> list[Any]:
        return []


def _publish(session: Session, weights: dict[int, float], window: int = 3) -> dict[str, Any]:
    """The gauntlet driver's publishing step for a window with ``weights`` and no records."""
    from covenant.plugins.gauntlet.scoring import WindowOutcome
    from covenant.plugins.gauntlet.validator import GauntletScorer

    scorer = GauntletScorer(session.config, session.services, _NoModel())  # type: ignore[arg-type]
    outcome = WindowOutcome(
        window=window,
        records={},
        final_scores={},
        weights=weights,
        peer_list=None,
        slashes=[],
        scores={},
        summary={},
    )
    scorer._publish(window, outcome, {}, "0" * 64, 1, 1, 0)
    path = Path(session.config.section("run").dir) / "records" / str(window) / "window.json"
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary


DRIVER = ("sparseloco", "gauntlet", "reward", "storage", "chain")


@pytest.mark.parametrize("registered", [True, False])
def test_the_validator_records_the_outcome_and_fires_weights_set(
    tmp_path: Path, chain: LocalChain, registered: bool
) -> None:
    recorder = Recorder()
    session = _session(
        tmp_path,
        'outer.name="sparseloco"',
        f'storage.url="file://{tmp_path / "store"}"',
        hotkey=VALIDATOR if registered else "//Eve",
        plugins=DRIVER,
        extra=(("recorder", recorder),),
    )
    weights = {1: 0.5, 2: 0.3, 3: 0.2}
    summary = _publish(session, weights)
    assert summary["weights"] == {"1": 0.5, "2": 0.3, "3": 0.2}
    ((window, fired, ok, reason),) = recorder.calls
    assert (window, fired, ok) == (3, weights, registered)
    assert summary["weights_set"] == {"ok": ok, "reason": reason}
    if registered:
        assert dict(chain.weights_history()[0].weights) == weights
    else:
        assert "not registered" in reason and chain.weights_history() == []


def test_without_a_reward_plugin_the_skip_says_so(tmp_path: Path, chain: LocalChain) -> None:
    recorder = Recorder()
    session = _session(
        tmp_path,
        'outer.name="sparseloco"',
        f'storage.url="file://{tmp_path / "store"}"',
        plugins=("sparseloco", "gauntlet", "storage", "chain"),
        extra=(("recorder", recorder),),
    )
    summary = _publish(session, {1: 1.0})
    assert summary["weights_set"] == {"ok": False, "reason": "no reward plugin is enabled"}
    assert recorder.calls == [(3, {1: 1.0}, False, "no reward plugin is enabled")]
    assert chain.weights_history() == []


# ------------------------------------------------------------------------------------------------
# the Bittensor SDK (substrate double)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def double() -> SubstrateDouble:
    d = SubstrateDouble(weights_rate_limit=RATE_LIMIT)
    d.add_neuron(load_hotkey(VALIDATOR).ss58_address, stake=1000.0, validator_permit=True)
    for name in ("//Bob", "//Charlie"):
        d.add_neuron(load_hotkey(name).ss58_address, stake=1.0)
    return d


@pytest.fixture
def bt_chain(double: SubstrateDouble) -> Iterator[BittensorChain]:
    c = BittensorChain(
        substrate=double,
        netuid=double.netuid,
        blocks_per_window=10,
        sleep_fn=lambda _s: None,
    )
    yield c
    c.close()


def _sdk_set(
    tmp_path: Path, bt_chain: BittensorChain, weights: Mapping[int, float], hotkey: str = VALIDATOR
) -> WeightsResult:
    """The reward hook with this chain and hotkey as the validator's services."""
    config = open_session(None, ['plugins.enable=["reward"]'], environ={}).config
    services = SimpleNamespace(chain=bt_chain, hotkey=load_hotkey(hotkey))
    result = reward.covenant_submit_weights(
        window=3,
        weights=weights,
        services=services,  # type: ignore[arg-type]
        config=config,
    )
    assert result is not None
    return result


def test_sdk_plain_weights_are_u16_set_weights(
    tmp_path: Path, bt_chain: BittensorChain, double: SubstrateDouble
) -> None:
    result = _sdk_set(tmp_path, bt_chain, {1: 1.0, 2: 3.0})
    assert result.ok, result.reason
    alice = load_hotkey(VALIDATOR).ss58_address
    assert double.submitted[-1] == ("SubtensorModule", "set_mechanism_weights", alice)
    assert double.weights[0] == [(1, 21845), (2, 65535)]  # 0.25 / 0.75, max-upscaled to u16


def test_sdk_commit_reveal_weights_are_timelocked(
    tmp_path: Path, bt_chain: BittensorChain, double: SubstrateDouble
) -> None:
    double.commit_reveal = True
    result = _sdk_set(tmp_path, bt_chain, {1: 1.0, 2: 1.0})
    assert result.ok, result.reason
    alice = load_hotkey(VALIDATOR).ss58_address
    assert double.submitted[-1] == ("SubtensorModule", "commit_timelocked_mechanism_weights", alice)
    assert double.timelocked[-1]["uid"] == 0 and "commit-reveal" in result.reason
    assert 0 not in double.weights  # hidden until the chain reveals them


def test_sdk_refusals_are_recorded_skips(
    tmp_path: Path, bt_chain: BittensorChain, double: SubstrateDouble
) -> None:
    unregistered = _sdk_set(tmp_path, bt_chain, {1: 1.0}, hotkey="//Eve")
    assert not unregistered.ok and unregistered.reason.startswith("not_registered: ")
    assert double.submitted == []
    assert _sdk_set(tmp_path, bt_chain, {1: 1.0}).ok
    limited = _sdk_set(tmp_path, bt_chain, {2: 1.0})  # inside the rate limit
    assert not limited.ok and limited.reason.startswith("rate_limited: ")
    assert "the rate limit is 5 blocks" in limited.reason  # retried (transient), then skipped
    assert len(double.submitted) == 1 and double.weights[0] == [(1, 65535)]
    double.block += RATE_LIMIT
    assert _sdk_set(tmp_path, bt_chain, {2: 1.0}).ok
    assert double.weights[0] == [(2, 65535)]
