"""Three processes sharing one local chain see the same blocks, registrations and commitments.

Each process is a separate interpreter (``spawn``), as a miner or validator of a local swarm
would be: it opens the SQLite file itself, registers its own hotkey, commits, and reports what it
sees once everyone is there. A fourth process dies in the middle of a write transaction; the
others must not notice anything but its absence.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
from _chain_mp_worker import BLOCK_TIME, PEERS, dies_mid_write, peer

from covenant.plugins.chain.local import LocalChain


@pytest.mark.timeout(120)
def test_three_processes_share_one_chain(tmp_path: Path) -> None:
    path = str(tmp_path / "chain.sqlite")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ghost = ctx.Process(target=dies_mid_write, args=(path,))
    procs = [ctx.Process(target=peer, args=(path, i, results)) for i in range(PEERS)]
    for p in [ghost, *procs]:
        p.start()
    seen = [results.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    ghost.join(30)
    assert ghost.exitcode == 1
    seen.sort(key=lambda r: r["index"])

    assert sorted(r["uid"] for r in seen) == list(range(PEERS))
    first = seen[0]
    expected_commitments = {r["hotkey"]: f"creds-of-peer-{r['index']}" for r in seen}
    for r in seen:
        assert r["genesis"] == first["genesis"]
        assert r["metagraph"] == first["metagraph"]
        assert r["commitments"] == expected_commitments  # no ghost: its write never happened
        assert r["hash_1"] == first["hash_1"] and r["t_1"] == first["t_1"]
        assert r["reached"] >= r["target"]
        for wall, block in r["samples"]:
            # Every process derives the block from the shared genesis; allow for the instant
            # between reading the clock and reading the block.
            expected = (wall - r["genesis"]) / BLOCK_TIME
            assert expected - 1 <= block <= expected + 1

    parent = LocalChain(path, block_time_s=BLOCK_TIME, blocks_per_window=5)
    assert [(n.uid, n.hotkey) for n in parent.metagraph()] == first["metagraph"]
    assert parent.block_hash(1) == first["hash_1"]
