"""``covenant replay``: recompute a validator's signed score record and print the diff.

A score record (``RUN_DIR/records/<window>/<uid>.json``, written by
:class:`~covenant.plugins.gauntlet.validator.GauntletScorer`) holds the inputs of a score (model
hash, payload hash, ``eval_seed``, sample ids, config hash, plugin versions) and every
intermediate number, signed with the validator's hotkey. Replaying one:

1. verifies the signature against the record's ``validator`` hotkey (exit 2 if it fails);
2. rebuilds the validator's session from ``RUN_DIR/resolved_config.json`` and checks the config
   hash;
3. loads the validator's local checkpoint of window ``S-1`` (the model the score saw: the
   validator keeps ``[gauntlet] keep_window_checkpoints`` of them) and checks the model hash;
4. recomputes ``eval_seed`` from the chain (the hash of the first block after ``S``'s upload
   interval closed);
5. re-downloads the peer's upload, and those of every peer gathered in ``S`` (the clip's
   median), from storage by their payload hashes;
6. recomputes stage 2 with the driver's own code (``GauntletScorer._evaluate``: the own and
   random sample ids, the clip to the lower median of the gathered norms, the step
   ``eval_lr_factor * alpha``, the four losses, the model restored bit-exactly), then the loss
   score, improvements, indicator and BMA with the pure rules, the window's match (from the
   other signed records of ``S``), the final score and this window's slashes.

Every recomputed number is compared with the recorded one exactly (on the same machine the
difference is exactly zero). Exit status: 0 everything matches, 1 something differs, 2 bad input
(unreadable record, bad signature, missing checkpoint or upload: the message says which).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from covenant.engine.cli.options import ConfigOpt, JsonOpt
from covenant.engine.errors import CovenantError

if TYPE_CHECKING:
    from covenant.engine.session import Session
    from covenant.plugins.gauntlet.validator import GauntletScorer

EXIT_MATCH = 0
EXIT_DIFFERS = 1
EXIT_BAD_INPUT = 2
#: Largest record file read (a record of a 72B model's window is a few hundred KiB).
MAX_RECORD_BYTES = 16 << 20

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DIFFERS",
    "EXIT_MATCH",
    "ReplayInputError",
    "ReplayReport",
    "Row",
    "open_recorded_session",
    "read_signed_record",
    "record_file",
    "replay_command",
    "replay_record",
]


class ReplayInputError(CovenantError):
    """The input of a replay is unusable: unreadable record, bad signature, missing checkpoint
    or upload (exit status 2)."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class Row:
    """One recomputed quantity: what the record says and what the replay got."""

    name: str
    rule: str  # the rule (or code) that produced it
    recorded: Any
    recomputed: Any

    @property
    def match(self) -> bool:
        return _same(self.recorded, self.recomputed)

    @property
    def diff(self) -> Any:
        """``recomputed - recorded`` for numbers; differing positions for lists; 0/None else."""
        a, b = self.recorded, self.recomputed
        if _number(a) and _number(b):
            if isinstance(a, int) and isinstance(b, int):
                return b - a
            return float(b) - float(a)
        if isinstance(a, list) and isinstance(b, list):
            return sum(1 for x, y in zip(a, b, strict=False) if not _same(x, y)) + abs(
                len(a) - len(b)
            )
        return 0 if self.match else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rule": self.rule,
            "recorded": self.recorded,
            "recomputed": self.recomputed,
            "diff": self.diff,
            "match": self.match,
        }


@dataclass
class ReplayReport:
    """The outcome of :func:`replay_record`."""

    path: str
    window: int
    uid: int
    validator: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.match for r in self.rows)

    @property
    def exit_code(self) -> int:
        return EXIT_MATCH if self.ok else EXIT_DIFFERS

    def to_json(self) -> dict[str, Any]:
        return {
            "record": self.path,
            "window": self.window,
            "uid": self.uid,
            "validator": self.validator,
            "signature": "valid",
            "status": "match" if self.ok else "differs",
            "compared": len(self.rows),
            "differing": [r.name for r in self.rows if not r.match],
            "rows": [r.to_json() for r in self.rows],
            "notes": list(self.notes),
        }


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _same(a: Any, b: Any) -> bool:
    """Exact equality (``1 == 1.0``; lists element-wise; a bool is not a number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _finite(x: float | None) -> float | None:
    """A number as the records hold it: non-finite values are ``null``."""
    if x is None:
        return None
    return float(x) if math.isfinite(float(x)) else None


# ------------------------------------------------------------------------------------------------
# reading and verifying records
# ------------------------------------------------------------------------------------------------


def record_file(run_dir: Path, window: int, uid: int) -> Path:
    """``RUN_DIR/records/<window>/<uid>.json``."""
    return Path(run_dir) / "records" / str(int(window)) / f"{int(uid)}.json"


def read_signed_record(path: Path) -> dict[str, Any]:
    """The record of a signed record file, after checking its form and its signature.

    Raises :class:`ReplayInputError` when the file is unreadable, is not a score record, or its
    signature does not verify against the record's ``validator`` hotkey.
    """
    from covenant.engine.keys import verify_signature
    from covenant.engine.untrusted import canonical_json, loads_json
    from covenant.plugins.gauntlet.validator import RECORD_FORMAT, SIGNING_DOMAIN

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReplayInputError(f"{path}: unreadable record ({exc.strerror or exc})") from None
    try:
        signed = loads_json(data, what=str(path), max_bytes=MAX_RECORD_BYTES)
    except ValueError as exc:  # UntrustedInputError is a ValueError
        raise ReplayInputError(f"{path}: not a score record ({exc})") from None
    record = signed.get("record") if isinstance(signed, dict) else None
    signature = signed.get("signature") if isinstance(signed, dict) else None
    if not isinstance(record, dict) or not isinstance(signature, str):
        raise ReplayInputError(f"{path}: not a signed score record ({{record, signature}})")
    shape = {"window": int, "uid": int, "validator": str, "inputs": dict, "score": dict}
    for key, kind in shape.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ReplayInputError(f"{path}: the record has no valid '{key}'")
    if record.get("format") != RECORD_FORMAT:
        raise ReplayInputError(
            f"{path}: unknown record format {record.get('format')!r} (expected {RECORD_FORMAT})"
        )
    try:
        message = SIGNING_DOMAIN + canonical_json(record)
        sig = bytes.fromhex(signature.removeprefix("0x"))
    except ValueError:
        sig, message = b"", b""
    if not sig or not verify_signature(record["validator"], message, sig):
        raise ReplayInputError(
            f"{path}: bad signature: the record is not signed by its validator "
            f"{record['validator']} (changed after signing, or signed by another key)"
        )
    return record


def _run_dir_of(path: Path) -> Path:
    parent = Path(path).resolve().parent
    if parent.parent.name != "records":
        raise ReplayInputError(
            f"{path}: not under RUN_DIR/records/<window>/: pass --run-dir to say where the "
            "validator's run directory is"
        )
    return parent.parent.parent


def open_recorded_session(run_dir: Path) -> Session:
    """The validator's session as it ran: plugins and config from ``resolved_config.json``.

    The environment is ignored (``COVENANT__*`` and ``COVENANT_PLUGINS``), so the config is the
    recorded one, which the config hash then confirms.
    """
    from covenant.engine.config import build_config
    from covenant.engine.plugins import PluginHost
    from covenant.engine.session import Session
    from covenant.engine.untrusted import loads_json

    path = Path(run_dir) / "resolved_config.json"
    try:
        resolved = loads_json(path.read_bytes(), what=str(path), max_bytes=4 << 20)
    except OSError as exc:
        raise ReplayInputError(
            f"{path}: the validator's resolved config is unreadable ({exc.strerror or exc}); "
            "is this the validator's run directory?"
        ) from None
    except ValueError as exc:
        raise ReplayInputError(f"{path}: unreadable resolved config ({exc})") from None
    data = resolved.get("config") if isinstance(resolved, dict) else None
    if not isinstance(data, dict):
        raise ReplayInputError(f"{path}: no 'config' object")
    plugins = data.get("plugins")
    enable = plugins.get("enable") if isinstance(plugins, dict) else None
    host = PluginHost()
    host.load(enable, environ={})
    config = build_config(host.config_schema(), data, source=str(path), environ={})
    host.hook.covenant_configure.call_historic(kwargs={"config": config})
    return Session(host=host, config=config)


# ------------------------------------------------------------------------------------------------
# the replay
# ------------------------------------------------------------------------------------------------


def replay_record(path: Path, *, run_dir: Path | None = None) -> ReplayReport:
    """Recompute the record in ``path`` (see the module docstring); never writes anything.

    Raises :class:`ReplayInputError` for bad input; the report says whether every number
    matched (:attr:`ReplayReport.ok`).
    """
    path = Path(path)
    record = read_signed_record(path)
    run_dir = Path(run_dir) if run_dir is not None else _run_dir_of(path)
    session = open_recorded_session(run_dir)
    return _Replay(session, run_dir, path, record).run()


class _Replay:
    def __init__(
        self, session: Session, run_dir: Path, path: Path, record: Mapping[str, Any]
    ) -> None:
        self.session = session
        self.run_dir = run_dir
        self.path = path
        self.record = record
        self.window = int(record["window"])
        self.uid = int(record["uid"])
        self.inputs: Mapping[str, Any] = record["inputs"]
        self.score: Mapping[str, Any] = record["score"]
        self.report = ReplayReport(str(path), self.window, self.uid, str(record["validator"]))

    def row(self, name: str, rule: str, recorded: Any, recomputed: Any) -> None:
        self.report.rows.append(Row(name, rule, recorded, recomputed))

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def int_input(self, name: str) -> int:
        value: Any = self.inputs.get(name)
        try:
            return int(value)  # eval_seed is a decimal string (a 256-bit block hash)
        except (TypeError, ValueError):
            raise ReplayInputError(f"{self.path}: inputs.{name} is not an integer") from None

    def run(self) -> ReplayReport:
        from covenant.engine.untrusted import canonical_json
        from covenant.plugins.gauntlet.validator import GauntletScorer

        session, cfg = self.session, self.session.config
        config_hash = hashlib.sha256(canonical_json(cfg.to_dict())).hexdigest()
        self.row(
            "config hash",
            "sha256 of the resolved config",
            self.inputs.get("config_hash"),
            config_hash,
        )
        versions = session.host.versions()
        recorded_versions = self.inputs.get("versions") or {}
        if isinstance(recorded_versions, dict):
            changed = sorted(
                n for n, v in recorded_versions.items() if versions.get(n, "absent") != v
            )
            if changed:
                self.note(
                    "plugin versions differ from the record's (a number that differs may be "
                    "why): "
                    + ", ".join(
                        f"{n} {recorded_versions[n]} -> {versions.get(n, 'absent')}"
                        for n in changed
                    )
                )
        folder = self._checkpoint_folder()  # before the model: a missing one fails fast
        model = session.hook.covenant_build_model(config=cfg)
        if model is None:
            raise ReplayInputError("the recorded config enables no model plugin")
        try:
            scorer = session.hook.covenant_scorer(
                config=cfg, services=session.services, model=model
            )
            if not isinstance(scorer, GauntletScorer):
                raise ReplayInputError("the recorded config's scorer is not the gauntlet")
            self._load_checkpoint(scorer, folder)
            self._check_seed(scorer)
            self._stage2(scorer)
        finally:
            model.close()
        return self.report

    # -- inputs ----------------------------------------------------------------------------------

    def _checkpoint_folder(self) -> Path:
        """The validator's checkpoint of window ``S-1``: the model the score saw."""
        root = self.run_dir / "checkpoints"
        folder = root / f"window-{self.window - 1:08d}"
        if not (folder / "meta.json").is_file():
            kept = sorted(p.name for p in root.glob("window-*")) if root.is_dir() else []
            section = self.session.config.to_dict().get("gauntlet", {})
            keep = section.get("keep_window_checkpoints", "?")
            raise ReplayInputError(
                f"missing checkpoint {folder}: the model window {self.window} was scored with "
                f"(the validator keeps its last [gauntlet] keep_window_checkpoints = {keep} "
                f"windows; kept: {', '.join(kept) or 'none'})"
            )
        return folder

    def _load_checkpoint(self, scorer: GauntletScorer, folder: Path) -> None:
        from covenant.engine.checkpoint import (
            Checkpointer,
            CheckpointError,
            CheckpointMeta,
            fingerprint,
        )
        from covenant.plugins.gauntlet.validator import _tensor_hash

        cfg = self.session.config
        root = folder.parent
        expect = CheckpointMeta(
            step=0,
            run_id=cfg.section("run").id,
            model_fingerprint=fingerprint(cfg.to_dict().get("model", {})),
            world_size=1,
        )
        try:
            meta, state = Checkpointer(root, rank=0, world_size=1).load(folder, expect)
        except CheckpointError as exc:
            raise ReplayInputError(str(exc)) from None
        if meta.window != self.window - 1:
            raise ReplayInputError(f"{folder}: holds window {meta.window}, not {self.window - 1}")
        scorer.model.load_state_dict(state["model"])
        scorer.load_state_dict(state["scorer"])
        self.row(
            "model hash",
            f"sha256 of the float32 weights of checkpoint {folder.name}",
            self.inputs.get("model_hash"),
            _tensor_hash(scorer.model.local_parameters()),
        )

    def _check_seed(self, scorer: GauntletScorer) -> None:
        seed, block = scorer._eval_seed(self.window)
        rule = "first block after the upload interval closed"
        self.row("eval_seed block", rule, self.inputs.get("eval_seed_block"), block)
        self.row("eval_seed", "the hash of that block", self.inputs.get("eval_seed"), str(seed))

    def _window_records(self) -> dict[int, Mapping[str, Any]]:
        """Every signed record of this window in this record's folder (signatures checked)."""
        out: dict[int, Mapping[str, Any]] = {}
        for p in sorted(self.path.parent.glob("*.json")):
            if not p.stem.isdigit():
                continue
            rec = read_signed_record(p)
            if rec["window"] != self.window or rec["validator"] != self.record["validator"]:
                raise ReplayInputError(f"{p}: a record of another window or validator")
            out[int(rec["uid"])] = rec
        return out

    def _gathered(self, others: Mapping[int, Mapping[str, Any]]) -> list[tuple[int, str]]:
        """(uid, payload hash) of the uploads gathered in this window (the clip's median)."""
        if set(others) - {self.uid}:
            out = []
            for u, rec in sorted(others.items()):
                score = rec["score"]
                if (score.get("gather") or {}).get("gathered"):
                    sha = (score.get("observation") or {}).get("payload_hash")
                    if not isinstance(sha, str):
                        raise ReplayInputError(f"uid {u} was gathered but has no payload hash")
                    out.append((u, sha))
            return out
        agg = self.session.services.exchange.aggregate_record(self.window)
        if agg is None:
            raise ReplayInputError(
                f"the uploads gathered in window {self.window} are unknown: neither the other "
                f"score records ({self.path.parent}) nor the lead's aggregate record are available"
            )
        self.note("gathered uploads taken from the lead validator's aggregate record")
        return [(int(u), str(sha)) for u, sha in agg.uploads]

    # -- stage 2 and the rules ---------------------------------------------------------------------

    def _stage2(self, scorer: GauntletScorer) -> None:
        from covenant.engine.protocols import UploadRejection
        from covenant.plugins.gauntlet import rules
        from covenant.plugins.gauntlet.scoring import Observation

        ev = self.score.get("evaluation")
        others = self._window_records()
        if not isinstance(ev, dict):
            self.note(f"uid {self.uid} was not evaluated in stage 2 in window {self.window}")
            self._match(scorer, others, None, None)
            return
        if ev.get("status") != "ok":
            self.note(
                f"stage-2 status {ev.get('status')!r} (rule {ev.get('rule')}): no losses to "
                "recompute"
            )
            self._match(scorer, others, None, None)
            return
        obs = self.score.get("observation") or {}
        payload_hash = obs.get("payload_hash")
        if not isinstance(payload_hash, str):
            raise ReplayInputError(f"{self.path}: the record has no observation.payload_hash")
        gathered = self._gathered(others)
        wanted = dict(gathered)
        if wanted.setdefault(self.uid, payload_hash) != payload_hash:
            raise ReplayInputError(
                f"uid {self.uid}: the gathered upload is not the observed one "
                f"({wanted[self.uid]} vs {payload_hash})"
            )
        exchange = self.session.services.exchange
        cap = scorer.codec.max_payload_bytes(scorer._shapes)
        uploads = {}
        for u, sha in sorted(wanted.items()):
            got = exchange.fetch_gradient_by_hash(
                self.window, u, sha, max_bytes=cap, codec=scorer.codec.name
            )
            if isinstance(got, UploadRejection):
                raise ReplayInputError(
                    f"the upload of uid {u} for window {self.window} (sha256 {sha}) is not "
                    f"available from storage: {got.reason}: {got.detail}"
                )
            uploads[u] = got
        self.row(
            "payload hash",
            "sha256 of the upload re-downloaded from storage",
            payload_hash,
            uploads[self.uid].sha256,
        )
        outer_step = self.int_input("outer_step")
        shard = scorer._shard(outer_step)
        alpha = scorer.outer.alpha(outer_step)
        observation = Observation(
            self.uid, str(obs.get("hotkey", "")), True, "ok", payload_hash=payload_hash
        )
        evaluations, extra = scorer._evaluate(
            self.window,
            [self.uid],
            {self.uid: observation},
            uploads,
            [u for u, _ in gathered],
            self.int_input("eval_seed"),
            shard,
            alpha,
            stop_on_window_change=False,
        )
        e = evaluations[self.uid]
        self.row("stage-2 status", "GauntletScorer._evaluate", "ok", e.status)
        if e.status != "ok":
            return
        got = extra[self.uid]
        self.row(
            "own sample ids",
            "rules.own_eval_ids(eval_seed, uid, pool(uid, S))",
            self.inputs.get("own_sample_ids"),
            got["own_sample_ids"],
        )
        self.row(
            "random sample ids",
            "rules.random_eval_ids(eval_seed, N)",
            self.inputs.get("random_sample_ids"),
            got["random_sample_ids"],
        )
        self.row(
            "eval step",
            "eval_lr_factor * alpha(outer_step)",
            self.inputs.get("eval_step"),
            got["eval_step"],
        )
        self.row(
            "clip factor (smallest)",
            "min(1, lower median of gathered norms / (norm + eps)) per tensor",
            self.inputs.get("clip_min"),
            got["clip_min"],
        )
        losses = (e.own_before, e.own_after, e.rand_before, e.rand_after)
        names = ("own_before", "own_after", "rand_before", "rand_after")
        for name, value in zip(names, losses, strict=True):
            what = name.replace("_", " loss ", 1)
            self.row(what, "model.eval_loss on the sample ids", ev.get(name), _finite(value))
        if ev.get("rule") is not None:
            self.note(f"evaluation rule {ev.get('rule')!r}: no score was computed")
            return
        ob, oa, rb, ra = (float(v) if v is not None else math.nan for v in losses)
        cfg = scorer.cfg
        score = rules.loss_score(rb, ra)
        own_imp = rules.relative_improvement(ob, oa)
        rand_imp = rules.relative_improvement(rb, ra)
        b = rules.eval_indicator(own_imp, rand_imp)
        bma_after = rules.bma_update(float(ev.get("bma_before") or 0.0), b, cfg.bma_decay)
        self.row("loss score", "rules.loss_score (float32)", ev.get("score"), score)
        self.row(
            "own improvement", "rules.relative_improvement", ev.get("own_improvement"), own_imp
        )
        self.row(
            "random improvement",
            "rules.relative_improvement",
            ev.get("random_improvement"),
            rand_imp,
        )
        self.row("indicator", "rules.eval_indicator (own > random: +1)", ev.get("indicator"), b)
        self.row(
            "BMA after evaluation",
            f"rules.bma_update(bma_before={ev.get('bma_before')}, b, {cfg.bma_decay})",
            ev.get("bma_after"),
            bma_after,
        )
        self._match(scorer, others, score, bma_after)

    def _match(
        self,
        scorer: GauntletScorer,
        others: Mapping[int, Mapping[str, Any]],
        score: float | None,
        bma: float | None,
    ) -> None:
        """The window's match (from every participant's signed record), final and slashes."""
        from covenant.plugins.gauntlet import rules

        match = self.score.get("match")
        if not isinstance(match, dict) or match.get("carried"):
            if isinstance(match, dict):
                self.note("the match entry carried over to the next window (fewer than 2)")
            return
        cfg = scorer.cfg
        if score is not None and match.get("rule") == "evaluated":
            self.row("match entry", "the loss score enters the match", match.get("score"), score)
        entries: dict[int, float] = {}
        before: dict[int, tuple[float, float] | None] = {}
        for u, rec in others.items():
            m = rec["score"].get("match")
            if isinstance(m, dict) and not m.get("carried") and "rating_after" in m:
                entries[u] = float(m["score"])
                rb = m.get("rating_before")
                before[u] = None if rb is None else (float(rb[0]), float(rb[1]))
        if len(entries) != match.get("size") or self.uid not in entries:
            self.note(
                f"the match had {match.get('size')} entries but {len(entries)} of their records "
                f"are in {self.path.parent}: rating not recomputed"
            )
            return
        rated = rules.rate_match(
            entries,
            before,
            beta=cfg.rating_beta,
            tau=cfg.rating_tau,
            mu=cfg.rating_mu,
            sigma=cfg.rating_sigma,
        )
        mine = rated[self.uid]
        self.row(
            f"rating after (mu, sigma), {len(entries)} entries",
            "rules.rate_match (OpenSkill PlackettLuce)",
            match.get("rating_after"),
            [mine[0], mine[1]],
        )
        final = self.score.get("final")
        if bma is None or not isinstance(final, dict) or not final.get("recomputed"):
            return
        sync = float(final.get("sync", 0.0))
        value = rules.final_score(
            mine,
            bma,
            sync,
            threshold=cfg.bma_threshold,
            z=cfg.rating_z,
            mu=cfg.rating_mu,
            sigma=cfg.rating_sigma,
        )
        self.row(
            "final score before slashes",
            "rules.final_score: ordinal x max(0, BMA') x sync",
            final.get("value_before_slashes"),
            value,
        )
        for sl in final.get("slashes") or []:
            if sl.get("reset"):
                value = 0.0
            else:
                value, bma = rules.apply_multiplier(
                    value,
                    bma,
                    float(sl["multiplier"]),
                    touches_bma=bool(sl.get("touches_bma", True)),
                    zero_below=cfg.zero_below if sl.get("zero_below") else None,
                )
        n = len(final.get("slashes") or [])
        self.row(
            "final score",
            f"after this window's {n} slash(es) (rules.apply_multiplier)",
            final.get("value"),
            value,
        )
        after = self.score.get("state_after") or {}
        self.row("BMA after the window", "after the slashes", after.get("bma"), bma)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list) and len(value) > 8:
        return json.dumps(value[:8])[:-1] + ", ...]"
    return json.dumps(value) if not isinstance(value, str) else value


def print_report(report: ReplayReport, console: Console) -> None:
    table = Table(
        title=f"replay: window {report.window}, uid {report.uid} (validator {report.validator})"
    )
    for col in ("quantity", "rule", "recorded", "recomputed", "diff"):
        table.add_column(col, overflow="fold")
    for r in report.rows:
        diff = r.diff
        shown = "=" if r.match and not _number(diff) else _fmt(diff)
        style = "green" if r.match else "bold red"
        table.add_row(
            escape(r.name),
            escape(r.rule),
            escape(_fmt(r.recorded)),
            escape(_fmt(r.recomputed)),
            f"[{style}]{escape(shown)}[/]",
        )
    console.print(table)
    for text in report.notes:
        console.print(f"note: {escape(text)}")
    bad = [r.name for r in report.rows if not r.match]
    if bad:
        console.print(
            f"[bold red]{len(bad)} of {len(report.rows)} recomputed values differ:[/] "
            + escape(", ".join(bad))
        )
    else:
        console.print(
            f"[green]signature valid; all {len(report.rows)} recomputed values match the "
            "record exactly[/]"
        )


def _default_run_dir(config: str | None) -> Path:
    from covenant.engine.session import open_session

    return open_session(config or "validator").run_dir


def replay_command(
    record: Annotated[
        Path | None,
        typer.Argument(help="a score record: RUN_DIR/records/<window>/<uid>.json"),
    ] = None,
    window: Annotated[int | None, typer.Option("--window", help="the record's window")] = None,
    uid: Annotated[int | None, typer.Option("--uid", help="the record's uid")] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option("--run-dir", help="the validator's run directory (default: the config's)"),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute a signed score record from the validator's checkpoint and storage.

    Prints every recomputed number against the record (exactly zero difference on the same
    machine). Exit status 0: everything matches; 1: something differs; 2: bad input
    (unreadable record, bad signature, missing checkpoint or upload).
    """
    if record is None:
        if window is None or uid is None:
            raise ReplayInputError("give a RECORD file, or --window and --uid (and --run-dir)")
        run_dir = run_dir if run_dir is not None else _default_run_dir(config)
        record = record_file(run_dir, window, uid)
    elif window is not None or uid is not None:
        raise ReplayInputError("give either a RECORD file or --window/--uid, not both")
    report = replay_record(record, run_dir=run_dir)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report, Console())
    if not report.ok:
        raise typer.Exit(EXIT_DIFFERS)
