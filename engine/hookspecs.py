"""The whole public plugin contract of covenant.

Every hook a plugin may implement is declared here, prefixed ``covenant_`` and grouped by
lifecycle under banner comments, in the order the engine calls them. Each docstring says *when*
the hook is called, *on which ranks*, and *what its return value means*. The layout follows
pytest's ``hookspec.py``; the conventions follow pluggy:

* ``firstresult=True`` hooks choose **one provider** (the outer step, the transport for a URL
  scheme, the chain, the model). pluggy calls implementations last-registered-first and stops at
  the first non-``None`` result; return ``None`` to say "not me".
* ``covenant_register_*`` hooks receive a ``register`` callback and add entries to a registry
  (config sections, text sources, CLI commands, benchmarks).
* ``historic=True`` hooks are replayed to plugins registered late, so they still see start-up
  events.

A plugin is any module or object with functions marked ``@hookimpl``::

    from covenant.engine import hookimpl

    @hookimpl
    def covenant_log_metrics(metrics, step, kind):
        ...

Implementations may accept any *subset* of the declared arguments (pluggy passes by name).
See docs/plugins.md for a guide with one section per hook group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from covenant.engine.config import Config
    from covenant.engine.protocols import (
        Chain,
        Exchange,
        ModelRuntime,
        OuterStep,
        ParamShard,
        Scorer,
        StepResult,
        Transport,
        WeightsResult,
        WindowContext,
    )
    from covenant.engine.services import Services

PROJECT_NAME = "covenant"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# A registry callback: ``register(name, thing)``.
Register = Callable[[str, Any], None]


# ============================================================================================
# Start-up and config
# ============================================================================================


@hookspec
def covenant_add_config_sections(register: Callable[[str, type[BaseModel]], None]) -> None:
    """Contribute this plugin's config section(s).

    Called once per process, on every rank, before any config file is read. Call
    ``register("section", Model)`` with a pydantic model (use ``extra="forbid"`` so typos are
    errors); the engine validates ``[section]`` of the TOML file against it, applies
    precedence (``--set`` > environment > file > defaults), and exposes the result as
    ``config.section("section")``. Registering a name twice is an error naming both plugins.
    The engine itself never names a plugin: this hook is how sections appear.
    """


@hookspec(historic=True)
def covenant_configure(config: Config) -> None:
    """The fully resolved, validated config is ready.

    Called once per process on every rank, right after loading; historic, so a plugin
    registered later still receives it. Use it to keep a reference to your section. Raise
    :class:`covenant.engine.errors.ConfigError` to reject a combination of values.
    """


@hookspec
def covenant_register_commands(register: Register) -> None:
    """Add sub-commands to the ``covenant`` CLI.

    Called when the CLI starts (rank-independent; the CLI runs before any process group).
    ``register("name", typer_app_or_function)``: a ``typer.Typer`` becomes a command group, a
    function a single command. Names already taken by the engine are refused.
    """


@hookspec
def covenant_register_benchmarks(register: Register) -> None:
    """Add benchmarks to ``covenant bench NAME``.

    ``register("name", fn)`` where ``fn(**options) -> dict`` returns JSON-serialisable results.
    Called when the CLI starts.
    """


@hookspec
def covenant_register_text_sources(register: Register) -> None:
    """Add named text sources for ``covenant data prepare --source NAME``.

    ``register("name", factory)`` where ``factory(ctx)`` takes a
    :class:`~covenant.engine.data.sources.SourceContext` (``ctx.arg`` is the text after
    ``name:`` in ``--source name:arg``, ``ctx.doc_max_chars`` the block size) and returns an object
    with ``name``, ``iter_documents()`` and ``describe()``.
    Called when data preparation starts, on the process that prepares (rank 0).
    """


# ============================================================================================
# Model and parallel set-up
# ============================================================================================


@hookspec(firstresult=True)
def covenant_build_model(config: Config) -> ModelRuntime | None:
    """Build the model, its inner optimizer and its parallel layout on this rank.

    Called once per training process, on every rank, after the process group exists.
    firstresult: the first provider that returns a :class:`ModelRuntime` wins; return ``None``
    if the configured model is not yours.
    """


@hookspec
def covenant_model_built(model: ModelRuntime, layout: list[ParamShard]) -> None:
    """The model exists on this rank; ``layout`` maps every owned parameter to its global slice.

    Called once on every rank. Use it to allocate per-parameter state (error buffers, snapshots).
    """


# ============================================================================================
# Inner loop
# ============================================================================================


@hookspec
def covenant_train_start(config: Config, model: ModelRuntime, start_step: int) -> None:
    """The inner loop is about to run its first step (``start_step`` > 0 after a resume).

    Called on every rank.
    """


@hookspec
def covenant_inner_step_end(step: int, result: StepResult, lr: float) -> None:
    """One inner optimizer step finished (global inner step ``step``, 0-based).

    Called on every rank; ``result`` is identical on all of them. Keep it cheap: this is the
    hot path. Metrics go through :func:`covenant_log_metrics`, which the engine calls itself.
    """


@hookspec
def covenant_evaluate_end(step: int, metrics: Mapping[str, float]) -> None:
    """A validation evaluation finished at inner step ``step``. Called on every rank."""


# ============================================================================================
# Window end and outer step
# ============================================================================================


@hookspec(firstresult=True)
def covenant_outer_step(config: Config, name: str, services: Services) -> OuterStep | None:
    """Provide the outer step called ``name`` (``sparseloco``, ``diloco``, ``ddp``...).

    Called once per process on every rank: by a miner when ``[outer] name`` is not ``"none"``,
    and by the validator (which applies each window's aggregate and evaluates single uploads
    through the outer step's :class:`~covenant.engine.protocols.Codec`). ``services`` gives the
    chain, the hotkey and storage (:class:`covenant.engine.services.Services`; use it lazily,
    only global rank 0 does I/O). firstresult: return an :class:`OuterStep` if ``name`` is
    yours, else ``None``.
    """


@hookspec
def covenant_window_start(ctx: WindowContext) -> None:
    """A window's inner loop starts. Called on every rank, after the outer step's ``begin``."""


@hookspec(firstresult=True)
def covenant_sample_uid(ctx: WindowContext) -> int | None:
    """Whose samples this peer trains on in ``ctx``'s window (default: its own uid).

    Called on every rank at the start of each window (all ranks must answer alike). The data
    receipt in the upload always names the peer's *assigned* pool, so a plugin that returns
    another uid (the ``adversaries`` plugin's wrong-data peer) trains on data the validator's
    own-versus-random test does not credit. firstresult; ``None`` = the peer's own uid.
    """


@hookspec(firstresult=True)
def covenant_payload(ctx: WindowContext, payload: bytes, services: Services) -> bytes | None:
    """The payload this peer is about to upload for ``ctx.window`` (global rank 0 only).

    Called after the window has ended and before the signed upload. Return replacement bytes to
    upload instead, ``b""`` to upload nothing (the plugin uploaded itself, or wants no upload),
    or ``None`` to leave it. Used by tests and by the ``adversaries`` plugin (copier, noise,
    invalid, late, forged peers); an honest miner has no implementation. firstresult.
    """


@hookspec(firstresult=True)
def covenant_apply_aggregate(ctx: WindowContext) -> bool | None:
    """Whether to apply this window's aggregate (``False``: keep theta_start, a stale peer).

    Called on every rank (all must answer alike) before the outer step applies. firstresult;
    ``None`` = apply.
    """


@hookspec
def covenant_window_end(ctx: WindowContext, metrics: Mapping[str, float]) -> None:
    """A window closed and its outer step was applied (or skipped); ``metrics`` are the outer
    step's (``applied``, ``peers``, ``bytes_up``...). Called on every rank, before the
    end-of-window checkpoint."""


# ============================================================================================
# Storage
# ============================================================================================


@hookspec(firstresult=True)
def covenant_transport(url: str, config: Config) -> Transport | None:
    """Open object storage at ``url``.

    Called whenever a component needs storage (once per URL per process, on any rank that
    does I/O, normally rank 0). firstresult: return a :class:`Transport` if you handle the
    URL's scheme, else ``None``; a third party adds a scheme by implementing this hook.
    """


@hookspec(firstresult=True)
def covenant_exchange(config: Config, services: Services) -> Exchange | None:
    """Provide the run's signed records in storage (this process's bucket, peers' buckets
    through their commitments, the lead validator's records).

    Called once per process, on the rank that does I/O, the first time
    :attr:`Services.exchange` is used. firstresult: the storage plugin provides the default.
    """


# ============================================================================================
# Validation and scoring
# ============================================================================================


@hookspec(firstresult=True)
def covenant_scorer(config: Config, services: Services, model: ModelRuntime) -> Scorer | None:
    """Provide the validator's scorer (the ``gauntlet`` plugin by default).

    Called once by ``covenant validate`` after the model is built. firstresult.
    """


@hookspec
def covenant_peer_scored(window: int, uid: int, record: Mapping[str, Any]) -> None:
    """The validator finished scoring ``uid`` for ``window``; ``record`` holds every input and
    intermediate number. Called on the validator process only."""


# ============================================================================================
# Chain and rewards
# ============================================================================================


@hookspec(firstresult=True)
def covenant_chain(config: Config) -> Chain | None:
    """Provide the chain client named by the config (``local``, ``bittensor``...).

    Called once per process that needs the chain (rank 0 of a peer, the validator, the CLI).
    firstresult: return a :class:`Chain` if the configured chain is yours, else ``None``.
    """


@hookspec(firstresult=True)
def covenant_hotkey(config: Config) -> Any:
    """Provide this process's signing hotkey (a ``bittensor.sp_core.Keypair``), or ``None``.

    Called once per process through :attr:`Services.hotkey`. firstresult: the chain plugin
    loads ``[chain] hotkey``.
    """


@hookspec(firstresult=True)
def covenant_submit_weights(
    window: int, weights: Mapping[int, float], services: Services, config: Config
) -> WeightsResult | None:
    """Turn the scorer's weights for ``window`` into chain weights (the ``reward`` plugin).

    Called by the validator when weights are due. Return a ``WeightsResult`` (``ok`` False with
    a reason is a recorded skip), or ``None`` if weights are not yours to set; never raise.
    firstresult: a third party replaces the reward scheme by implementing this hook.
    """


@hookspec
def covenant_weights_set(window: int, weights: Mapping[int, float], ok: bool, reason: str) -> None:
    """The validator submitted (or skipped, ``ok`` False) incentive weights for ``window``."""


# ============================================================================================
# Metrics
# ============================================================================================


@hookspec
def covenant_log_metrics(metrics: Mapping[str, float], step: int, kind: str) -> None:
    """Record metrics; every component reports through this hook.

    ``kind`` groups lines: ``"train"`` (one per inner step), ``"eval"``, ``"window"``,
    ``"score"``, ``"bench"``... ``step`` is the global inner step (or the window for window
    kinds). Called on rank 0 only. Consumers (console, jsonl, wandb) must never raise into
    training: a failing consumer logs a warning and carries on.
    """


@hookspec
def covenant_run_started(config: Config, run_dir: str, versions: Mapping[str, str]) -> None:
    """A run started; ``run_dir`` exists and holds ``resolved_config.json``.

    Called on rank 0 after configuration, before the model is built. Metric consumers open
    their outputs here.
    """


# ============================================================================================
# Shutdown
# ============================================================================================


@hookspec
def covenant_shutdown(reason: str, error: BaseException | None) -> None:
    """The process is about to exit (``reason``: ``"completed"``, ``"interrupted"``, ``"error"``).

    Called once on every rank, also after a failure. Flush and close what you opened; never raise.
    """
