"""Write the golden whole-window fixture (tests/plugins/sparseloco/golden/windows.json).

Three peers run a few windows of the real SparseLoCo outer step in lockstep, in one process,
through the real services: a fresh local chain (manual clock), one ``memory://`` store per
participant, signed uploads fetched and verified through the Exchange from the peers' chain
commitments, a lead validator (this script) that publishes ``start_window`` and the peer list,
and the outer step from ``covenant_outer_step`` of the installed ``sparseloco`` plugin (with a
step-wise alpha schedule). The model is :class:`TinyLM`, a tiny pure-torch language model with a
real AdamW inner loop on a synthetic bigram corpus, so a window runs in well under a second.

Per window the fixture holds, for every tensor after the outer step, its sum, its L2 norm and a
few values at fixed flat positions, plus the window's outer step, whether it applied, how many
peers it aggregated and the bytes each peer uploaded. Every peer must hold bit-identical
weights after every window (the script refuses to write a fixture otherwise).

Run once, commit the output, and re-run only on a deliberate change of the outer step's
numerics (error feedback, selection, quantiser, aggregation, alpha):

    OMP_NUM_THREADS=1 .venv/bin/python tools/make_window_golden.py

``tests/plugins/sparseloco/test_sparseloco_windows_golden.py`` runs :func:`run_windows` and
compares with the fixture.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parents[1] / "tests/plugins/sparseloco/golden/windows.json"
FORMAT = 1

PEERS = 3
WINDOWS = 4
INNER_STEPS = 3
BATCH = 4
SEQ_LEN = 16
VOCAB = 64
DIM = 32
LR = 3e-2
SEED = 1234
START_WINDOW = 1
BLOCKS_PER_WINDOW = 10
SPARSELOCO = {"k": 16}
ALPHA_SCHEDULE = [[2, 0.5]]  # outer steps >= 2 use alpha 0.5 (the step-wise schedule)
POSITIONS = (0, 10, 11, 100)  # flat positions recorded per tensor (and the last one)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}  # CPU float math of another machine or torch build
LEAD_URI = "//Alice"
PEER_URIS = ("//Bob", "//Charlie", "//Dave")
PLUGINS = ["chain", "storage", "sparseloco"]


class TinyLM:
    """A two-layer language model with AdamW: the part of ``ModelRuntime`` a window uses.

    ``h = e + tanh(e @ mix^T) * norm``, logits ``h @ head^T``; one process, fp32, no
    parallelism (``parallel`` is the default :class:`ParallelInfo`).
    """

    seq_len = SEQ_LEN
    micro_batch = BATCH

    def __init__(self, seed: int) -> None:
        from covenant.engine.protocols import ParallelInfo

        self.parallel = ParallelInfo()
        g = torch.Generator().manual_seed(seed)
        self.params = {
            "embed.weight": torch.randn(VOCAB, DIM, generator=g) * 0.5,
            "mix.weight": torch.randn(DIM, DIM, generator=g) * DIM**-0.5,
            "norm.weight": torch.ones(DIM),
            "head.weight": torch.randn(VOCAB, DIM, generator=g) * 0.1,
        }
        for p in self.params.values():
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=LR, weight_decay=0.01)
        self.reloads = 0

    def layout(self) -> list[Any]:
        from covenant.engine.protocols import ParamShard

        return [
            ParamShard(n, tuple(p.shape), (0,) * p.dim(), tuple(p.shape))
            for n, p in self.params.items()
        ]

    def local_parameters(self) -> dict[str, torch.Tensor]:
        return self.params

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.params
        e = p["embed.weight"][tokens[:, :-1]]
        h = e + torch.tanh(e @ p["mix.weight"].T) * p["norm.weight"]
        logits = h @ p["head.weight"].T
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)
        )

    def train_step(self, tokens: torch.Tensor, lr: float) -> Any:
        from covenant.engine.protocols import StepResult

        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.loss(tokens)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
        self.opt.step()
        return StepResult(float(loss.detach()), float(grad_norm), tokens.numel())

    def reload_params(self) -> None:
        # AdamW updates these very tensors: nothing to refresh; counted for the test
        self.reloads += 1

    def group(self, kind: str) -> Any:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"params": {n: p.detach().clone() for n, p in self.params.items()}}


def corpus(uid: int, window: int, inner: int) -> torch.Tensor:
    """``BATCH`` sequences of a fixed random bigram chain, drawn for (uid, window, inner)."""
    table = torch.Generator().manual_seed(SEED)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=table)
    g = torch.Generator().manual_seed(SEED + 7919 * uid + 104729 * window + inner)
    tokens = torch.empty(BATCH, SEQ_LEN, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=g)
    for t in range(1, SEQ_LEN):
        choice = torch.randint(0, 4, (BATCH,), generator=g)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return tokens


class Swarm:
    """A lead validator and the peers on a fresh local chain with memory stores."""

    def __init__(self, root: Path) -> None:
        from covenant.engine.config import build_config
        from covenant.engine.plugins import PluginHost
        from covenant.engine.protocols import PeerList
        from covenant.engine.services import Services

        host = PluginHost()
        host.load(PLUGINS, environ={})
        host.check()
        tag = uuid.uuid4().hex[:8]
        base: dict[str, Any] = {
            "run": {"id": "golden", "root": str(root)},
            "chain": {
                "name": "local",
                "clock": "manual",
                "db": str(root / "chain.sqlite"),
                "blocks_per_window": BLOCKS_PER_WINDOW,
                "block_time_s": 0.001,
            },
            # the manual chain's time stays far behind the wall clock: with this grace every
            # upload made after its window's end is inside its interval (the checks still run)
            "storage": {"local_peers": True, "upload_grace_s": 10_000_000, "retries": 1},
            "outer": {"name": "sparseloco", "alpha_schedule": ALPHA_SCHEDULE},
            "sparseloco": dict(SPARSELOCO),
        }
        self.members: list[dict[str, Any]] = []
        for i, uri in enumerate((LEAD_URI, *PEER_URIS)):
            tree = copy.deepcopy(base)
            tree["chain"]["hotkey"] = uri
            tree["storage"]["url"] = url = f"memory://{tag}-{i}"
            cfg = build_config(host.config_schema(), tree, environ={})
            self.members.append({"config": cfg, "services": Services(cfg, host.hook), "url": url})
        self.chain = self.members[0]["services"].chain
        for m in self.members:
            m["uid"] = self.chain.register(m["services"].hotkey)
            self.chain.commit(m["services"].hotkey, f"v1|{m['url']}")
        lead = self.members[0]["services"]
        self.chain.set_stake(lead.hotkey.ss58_address, 1000.0, validator_permit=True)
        self.advance_to(START_WINDOW * BLOCKS_PER_WINDOW)
        lead.exchange.put_start_window(START_WINDOW)
        self.peers = self.members[1:]
        uids = tuple(m["uid"] for m in self.peers)
        lead.exchange.put_peer_list(PeerList(START_WINDOW, START_WINDOW - 1, uids))
        for m in self.peers:
            m["outer"] = host.hook.covenant_outer_step(
                config=m["config"], name="sparseloco", services=m["services"]
            )
            m["model"] = TinyLM(SEED)  # every peer starts from the same weights

    def advance_to(self, block: int) -> None:
        now = int(self.chain.block())
        if block > now:
            self.chain.advance(block - now)

    def close(self) -> None:
        for m in self.members:
            transport = m["services"].transport
            for info in transport.list("golden/v1/"):
                transport.delete(info.key)
            chain = m["services"].__dict__.get("chain")
            if chain is not None:
                chain.close()


def summary(
    params: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Per tensor: sum, L2 norm, a position-weighted sum, and the values at fixed flat
    positions plus at the four positions that changed most in this window (a sparse update
    leaves most fixed positions alone)."""
    out: dict[str, Any] = {}
    for name in sorted(params):
        flat = params[name].detach().reshape(-1).double()
        change = (flat - before[name].detach().reshape(-1).double()).abs()
        moved = torch.topk(change, 4).indices.tolist()
        fixed = [p for p in POSITIONS if p < flat.numel()] + [flat.numel() - 1]
        positions = sorted({*fixed, *moved})
        out[name] = {**checksums(flat), "values": {str(p): float(flat[p]) for p in positions}}
    return out


def checksums(flat: torch.Tensor) -> dict[str, float]:
    """Sum, L2 norm and a position-weighted sum (sensitive to values moving between places)."""
    weights = (torch.arange(flat.numel(), dtype=torch.float64) % 13) - 6.0
    return {
        "sum": float(flat.sum()),
        "norm": float(flat.norm()),
        "weighted": float((flat * weights).sum()),
    }


def run_windows(root: Path) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """Run the golden swarm in ``root``: the JSON-ready fixture, and every window's weights
    (peer 0's; the fixture records whether the others are bit-identical)."""
    from covenant.engine.protocols import WindowContext
    from covenant.engine.schedule import TrainConfig, learning_rate

    torch.manual_seed(SEED)
    train = TrainConfig(
        steps=WINDOWS * INNER_STEPS,
        inner_steps=INNER_STEPS,
        batch_size=BATCH,
        lr=LR,
        warmup_steps=2,
        cosine_steps=WINDOWS * INNER_STEPS,
    )
    swarm = Swarm(root)
    windows = []
    weights: list[dict[str, torch.Tensor]] = []
    outer_step = 0
    try:
        for j in range(WINDOWS):
            w = START_WINDOW + j
            before = {
                n: p.detach().clone() for n, p in swarm.peers[0]["model"].local_parameters().items()
            }
            ctxs = []
            for m in swarm.peers:
                ctx = WindowContext(w, outer_step, m["uid"], INNER_STEPS)
                m["outer"].begin(ctx, m["model"])
                ctxs.append(ctx)
            losses = []
            for m, ctx in zip(swarm.peers, ctxs, strict=True):
                for i in range(INNER_STEPS):
                    lr = learning_rate(outer_step * INNER_STEPS + i, train)
                    result = m["model"].train_step(corpus(m["uid"], w, i), lr)
                    ctx.steps_done += 1
                losses.append(result.loss)
            swarm.advance_to((w + 1) * BLOCKS_PER_WINDOW)  # the window ended on the chain
            published = [
                m["outer"].publish(ctx, m["model"])
                for m, ctx in zip(swarm.peers, ctxs, strict=True)
            ]
            finished = [
                m["outer"].finish(ctx, m["model"]) for m, ctx in zip(swarm.peers, ctxs, strict=True)
            ]
            applied = [f["applied"] for f in finished]
            first = swarm.peers[0]["model"].local_parameters()
            divergence = max(
                float((m["model"].local_parameters()[n] - first[n]).detach().abs().max())
                for m in swarm.peers[1:]
                for n in first
            )
            identical = all(
                torch.equal(m["model"].local_parameters()[n], first[n])
                for m in swarm.peers[1:]
                for n in first
            )
            windows.append(
                {
                    "window": w,
                    "outer_step": outer_step,
                    "alpha": finished[0]["alpha"],
                    "applied": applied,
                    "peers": [f["peers"] for f in finished],
                    "bytes_up": [p["bytes_up"] for p in published],
                    "uploaded": [p["uploaded"] for p in published],
                    "loss": sum(losses) / len(losses),
                    "identical": identical,
                    "max_peer_divergence": divergence,
                    "reloads": [m["model"].reloads for m in swarm.peers],
                    "tensors": summary(first, before),
                }
            )
            weights.append({n: p.detach().clone() for n, p in first.items()})
            if all(applied):
                outer_step += 1
    finally:
        swarm.close()
    return {
        "format": FORMAT,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python tools/make_window_golden.py",
        "settings": {
            "peers": PEERS,
            "windows": WINDOWS,
            "inner_steps": INNER_STEPS,
            "batch": BATCH,
            "seq_len": SEQ_LEN,
            "vocab": VOCAB,
            "dim": DIM,
            "lr": LR,
            "seed": SEED,
            "sparseloco": SPARSELOCO,
            "alpha_schedule": ALPHA_SCHEDULE,
        },
        "tolerance": TOLERANCE,
        "torch": torch.__version__,
        "windows": windows,
    }, weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="covenant-window-golden-") as tmp:
        result, _ = run_windows(Path(tmp))
    bad = [w["window"] for w in result["windows"] if not w["identical"]]
    if bad:
        print(f"peers disagree after window(s) {bad}: not writing a fixture", file=sys.stderr)
        return 1
    if not all(math.isfinite(w["loss"]) for w in result["windows"]):
        print("non-finite loss: not writing a fixture", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
