"""The (uid, window) sample assignment: golden values, determinism, shares, receipts."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from covenant.engine.data.assignment import (
    Receipt,
    active_shard,
    check_batch_layout,
    rank_share,
    receipt,
    sample_pool,
    step_ids,
    verify_receipt,
    window_seed,
)
from covenant.engine.data.errors import AssignmentError


def test_window_seed_golden_values() -> None:
    # Worked by hand: 3*1000003 = 3000009 = 0x2DC6C9; ^7 -> 0x2DC6CE = 3000014.
    assert window_seed(3, 7) == 3000014
    # 5000*1000003 = 5000015000 > 2**32: masked to 5000015000 - 4294967296 = 705047704.
    assert window_seed(5000, 0) == 705047704
    assert window_seed(0, 12345) == 12345
    # The mask also applies to the window: 2**32 + 5 behaves like 5.
    assert window_seed(1, 2**32 + 5) == (1000003 ^ 5)


def test_sample_pool_golden_draw() -> None:
    # Pinned: if numpy ever changes Generator.choice, every peer's data changes with it.
    assert sample_pool(3, 7, 1000, 3, 4).tolist() == [
        883,
        299,
        75,
        462,
        163,
        129,
        166,
        296,
        2,
        382,
        303,
        484,
    ]
    assert sample_pool(5000, 0, 50, 5, 2).tolist() == [44, 47, 9, 21, 14, 5, 35, 2, 23, 20]


def test_sample_pool_is_deterministic_distinct_and_in_range() -> None:
    a = sample_pool(17, 4242, 10_000, 30, 16)
    b = sample_pool(17, 4242, 10_000, 30, 16)
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == len(a) == 480
    assert a.min() >= 0 and a.max() < 10_000
    # Another uid or window draws another pool.
    assert not np.array_equal(a, sample_pool(18, 4242, 10_000, 30, 16))
    assert not np.array_equal(a, sample_pool(17, 4243, 10_000, 30, 16))


@pytest.mark.parametrize(
    ("uid", "window", "n", "h", "b"),
    [(-1, 0, 10, 1, 1), (0, -1, 10, 1, 1), (0, 0, 0, 1, 1), (0, 0, 10, 0, 1), (0, 0, 10, 3, 4)],
)
def test_sample_pool_rejects_bad_inputs(uid: int, window: int, n: int, h: int, b: int) -> None:
    with pytest.raises(AssignmentError):
        sample_pool(uid, window, n, h, b)


def test_pool_larger_than_shard_names_the_numbers() -> None:
    with pytest.raises(AssignmentError, match=r"3\*4 = 12 .* only 10 samples"):
        sample_pool(0, 0, 10, 3, 4)


def test_steps_and_dp_shares_partition_the_pool() -> None:
    h, b, d = 5, 12, 3
    pool = sample_pool(9, 77, 1000, h, b)
    steps = [step_ids(pool, i, b) for i in range(h)]
    np.testing.assert_array_equal(np.concatenate(steps), pool)
    for i, ids in enumerate(steps):
        np.testing.assert_array_equal(ids, pool[i * b : (i + 1) * b])
        shares = [rank_share(ids, r, d) for r in range(d)]
        assert all(len(s) == b // d for s in shares)
        assert sorted(np.concatenate(shares).tolist()) == sorted(ids.tolist())
        np.testing.assert_array_equal(shares[1], ids[[1, 4, 7, 10]])
    with pytest.raises(AssignmentError):
        step_ids(pool, h, b)
    with pytest.raises(AssignmentError):
        rank_share(steps[0], 3, 3)
    with pytest.raises(AssignmentError):
        rank_share(steps[0], 0, 5)  # 12 ids do not split over 5 ranks


def test_check_batch_layout() -> None:
    check_batch_layout(192, 4, 8)
    with pytest.raises(AssignmentError, match="multiple of micro_batch"):
        check_batch_layout(192, 5, 8)


def test_receipt_matches_independent_blake2b() -> None:
    pool = sample_pool(1, 2, 500, 4, 8)
    packed = b"".join(struct.pack("<Q", int(i)) for i in sorted(pool.tolist()))
    expected = hashlib.blake2b(packed, digest_size=16).hexdigest()
    r = receipt(pool)
    assert r == Receipt(hash=expected, count=32)
    # Order does not matter (the ids are sorted first); content and count do.
    assert receipt(pool[::-1]) == r
    assert verify_receipt(r, pool)
    assert not verify_receipt(Receipt(hash=r.hash, count=31), pool)
    assert not verify_receipt(r, np.append(pool[:-1], 499 if pool[-1] != 499 else 498))
    assert Receipt.model_validate_json(r.model_dump_json()) == r


def test_receipt_rejects_negative_ids() -> None:
    with pytest.raises(AssignmentError):
        receipt(np.array([1, -2]))


def test_active_shard_cycles() -> None:
    got = [active_shard(s, 3, 2) for s in range(8)]
    assert got == [0, 0, 1, 1, 2, 2, 0, 0]
    with pytest.raises(AssignmentError):
        active_shard(0, 0, 1)
