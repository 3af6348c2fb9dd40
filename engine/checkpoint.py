"""Local checkpoints of one peer: written atomically, resumed bit-identically.

Layout under ``<run dir>/checkpoints/``::

    step-000100/            one folder per checkpoint (a miner's: window-00000123/, written
                            at the end of every window, after its outer step)
        meta.json           step counters, run id, model fingerprint, layout
        rank-00000.pt       each rank's model + optimizer state + RNG states
        weights/            the full weights: each rank's own pieces in safetensors plus an
                            index (any layout can load them; ``covenant export`` reads them)
    latest                  text file naming the newest complete folder

A checkpoint is first written to ``.tmp-step-000100-<pid>/`` and renamed into place only when
every rank has written its file; ``latest`` is replaced atomically afterwards. A crash at any
point leaves the previous checkpoint intact and ``latest`` pointing at it.

These files are this peer's *own* state, written by this process: they are read with
``torch.load(weights_only=True)``, which refuses to execute code. Peer data never goes through
this module (the wire format and the safetensors checkpoint loader handle that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covenant.engine.errors import CovenantError
from covenant.engine.fs import atomic_write_bytes
from covenant.engine.untrusted import loads_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest"


class CheckpointError(CovenantError):
    """A checkpoint is missing, damaged, or belongs to another run, preset or layout."""


def fingerprint(section: Mapping[str, Any]) -> str:
    """A short stable hash of a config section (the model's shape and layout)."""
    text = json.dumps(section, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG the inner loop may touch, as tensors/primitives (loadable with weights_only)."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1]).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": _python_rng_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_s = state["numpy"]
    np.random.set_state(
        ("MT19937", np_s["key"].numpy(), np_s["pos"], np_s["has_gauss"], np_s["cached"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["key"].tolist()), py["gauss"]))


def _python_rng_state() -> dict[str, Any]:
    version, key, gauss = random.getstate()
    return {"version": version, "key": torch.tensor(key, dtype=torch.int64), "gauss": gauss}


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    run_id: str
    model_fingerprint: str
    world_size: int
    format_version: int = FORMAT_VERSION
    window: int | None = None  # a miner checkpoints at the end of every window

    @property
    def name(self) -> str:
        """The checkpoint's folder name (``window-…`` for a miner, ``step-…`` alone)."""
        if self.window is not None:
            return f"window-{self.window:08d}"
        return f"step-{self.step:06d}"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


class Checkpointer:
    """Saves and restores this peer's local checkpoints under ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        rank: int,
        world_size: int,
        barrier: Callable[[], None] = lambda: None,
        keep: int = 2,
    ) -> None:
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        if not name or "/" in name or name.startswith("."):
            raise CheckpointError(f"{pointer}: does not name a checkpoint folder ({name!r})")
        path = self.root / name
        if not (path / "meta.json").is_file():
            raise CheckpointError(f"{pointer} names {path}, which is incomplete or missing")
        return path

    def save(
        self,
        meta: CheckpointMeta,
        state: Mapping[str, Any],
        write_extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write this rank's ``state``; rank 0 finalises. Collective: every rank must call it.

        ``write_extra(folder)`` runs on every rank inside the not-yet-published folder (the
        full, layout-independent weights go there), so a crash never publishes half of it.
        """
        name = meta.name
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        part = tmp / f"rank-{self.rank:05d}.pt"
        torch.save(dict(state), str(part) + ".part")
        os.replace(str(part) + ".part", part)
        if write_extra is not None:
            write_extra(tmp)
        self.barrier()
        if self.rank == 0:
            (tmp / "meta.json").write_text(meta.to_json(), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_bytes(self.root / LATEST, (name + "\n").encode())
            self._prune(keep_name=name)
            log.info("checkpoint saved: %s", final)
        self.barrier()
        return final

    def load(self, path: Path, expect: CheckpointMeta) -> tuple[CheckpointMeta, dict[str, Any]]:
        """Read ``path`` for this rank after checking it belongs to this run, preset and layout."""
        meta_path = path / "meta.json"
        try:
            raw = loads_json(meta_path.read_bytes(), what=str(meta_path), max_bytes=1 << 20)
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
            meta = CheckpointMeta(**raw)
        except (OSError, ValueError, TypeError) as exc:  # UntrustedInputError is a ValueError
            raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata: {exc}") from None
        for field_name, what in (  # the window and step may differ, nothing else
            ("run_id", "run"),
            ("model_fingerprint", "model preset/layout"),
            ("world_size", "world size"),
            ("format_version", "format"),
        ):
            got, want = getattr(meta, field_name), getattr(expect, field_name)
            if got != want:
                raise CheckpointError(
                    f"{meta_path}: checkpoint is from another {what} ({field_name} {got!r}, "
                    f"this run has {want!r})"
                )
        part = path / f"rank-{self.rank:05d}.pt"
        try:
            state = torch.load(part, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(
                f"{part}: missing (the checkpoint has no file for rank {self.rank})"
            ) from None
        except Exception as exc:  # a damaged file raises many things inside torch
            raise CheckpointError(
                f"{part}: damaged checkpoint file: {type(exc).__name__}: {exc}"
            ) from None
        return meta, state

    def _prune(self, keep_name: str) -> None:
        for pattern in ("step-*", "window-*"):
            folders = sorted(p for p in self.root.glob(pattern) if p.is_dir())
            for old in folders[: max(0, len(folders) - self.keep)]:
                if old.name != keep_name:
                    shutil.rmtree(old, ignore_errors=True)
