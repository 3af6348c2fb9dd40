"""Process bodies of the multi-process local-chain test.

A module of its own so that spawned children import only the local chain and the keys (not the
test module, which pulls in the Bittensor SDK and its multi-second import).
"""

from __future__ import annotations

import os
import time
from typing import Any

from covenant.engine.keys import load_hotkey
from covenant.plugins.chain.local import LocalChain

BLOCK_TIME = 0.2
PEERS = 3


def peer(path: str, index: int, results: Any) -> None:
    """A miner: register, commit, wait for everyone, then report what it sees."""
    chain = LocalChain(path, block_time_s=BLOCK_TIME, blocks_per_window=5)
    me = load_hotkey(f"//Peer{index}")
    uid = chain.register(me)
    chain.commit(me, f"creds-of-peer-{index}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(chain.metagraph()) == PEERS and len(chain.commitments()) == PEERS:
            break
        time.sleep(0.05)
    target = chain.block() + 2
    reached = chain.wait_for_block(target, timeout_s=30)
    samples = []
    for _ in range(5):  # (wall time, block) pairs: all processes share one clock
        samples.append((time.time(), chain.block()))
        time.sleep(0.03)
    results.put(
        {
            "index": index,
            "uid": uid,
            "hotkey": me.ss58_address,
            "genesis": chain.genesis_time,
            "metagraph": [(n.uid, n.hotkey) for n in chain.metagraph()],
            "commitments": {k: c.data for k, c in chain.commitments().items()},
            "hash_1": chain.block_hash(1),
            "t_1": chain.block_timestamp(1),
            "target": target,
            "reached": reached,
            "samples": samples,
        }
    )


def dies_mid_write(path: str) -> None:
    """A process killed inside a write transaction, before COMMIT."""
    chain = LocalChain(path, block_time_s=BLOCK_TIME, blocks_per_window=5)
    with chain._transaction() as conn:
        conn.execute("INSERT INTO commitments VALUES ('5ghost', 'never-committed', 0)")
        os._exit(1)
