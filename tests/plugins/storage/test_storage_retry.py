"""Retry classification, backoff and deadlines (no network)."""

from __future__ import annotations

import errno
import time

import pytest
from botocore.exceptions import ClientError

from covenant.plugins.storage.errors import (
    ObjectNotFoundError,
    StorageDeadlineError,
    StorageTransportError,
)
from covenant.plugins.storage.retry import (
    Deadline,
    RetryPolicy,
    TruncatedReadError,
    call_with_retries,
    is_retryable,
)


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def wrapped(exc: BaseException) -> OSError:
    out = OSError(errno.EIO, str(exc))
    out.__cause__ = exc
    return out


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (client_error("SlowDown", 503), True),
        (client_error("TooManyRequests", 429), True),
        (wrapped(client_error("503", 503)), True),  # as s3fs translates it
        (client_error("InternalError", 500), True),
        (client_error("AccessDenied", 403), False),
        (wrapped(client_error("NoSuchKey", 404)), False),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (TruncatedReadError("short"), True),
        (OSError(errno.ECONNRESET, "reset"), True),
        (ValueError("bug"), False),
        (StorageDeadlineError("late"), False),
    ],
)
def test_classification(exc: BaseException, retry: bool) -> None:
    assert is_retryable(exc) is retry


def test_retries_then_succeeds_with_backoff() -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise client_error("SlowDown", 503)
        return "ok"

    out = call_with_retries(flaky, what="t", policy=RetryPolicy(3, 0.05), deadline=Deadline(10))
    assert out == "ok" and len(calls) == 3
    # base * (2^a + U(0,1)): first wait in [0.05, 0.1], second in [0.1, 0.15]
    assert 0.04 <= calls[1] - calls[0] <= 0.5
    assert 0.09 <= calls[2] - calls[1] <= 0.6


def test_gives_up_after_tries() -> None:
    n = 0

    def always() -> None:
        nonlocal n
        n += 1
        raise ConnectionResetError("reset")

    with pytest.raises(StorageTransportError, match="after 3 tries"):
        call_with_retries(always, what="t", policy=RetryPolicy(3, 0.001), deadline=Deadline(10))
    assert n == 3


def test_non_retryable_fails_at_once() -> None:
    n = 0

    def denied() -> None:
        nonlocal n
        n += 1
        raise wrapped(client_error("AccessDenied", 403))

    with pytest.raises(StorageTransportError):
        call_with_retries(denied, what="t", policy=RetryPolicy(3, 0.001), deadline=Deadline(10))
    assert n == 1
    with pytest.raises(ObjectNotFoundError):
        call_with_retries(
            lambda: (_ for _ in ()).throw(FileNotFoundError("x")),
            what="t",
            policy=RetryPolicy(3, 0.001),
            deadline=Deadline(10),
        )


def test_deadline_stops_retries_that_would_sleep_past_it() -> None:
    def slow_fail() -> None:
        raise client_error("SlowDown", 503)

    start = time.monotonic()
    with pytest.raises(StorageDeadlineError):
        call_with_retries(slow_fail, what="t", policy=RetryPolicy(5, 1.0), deadline=Deadline(0.3))
    assert time.monotonic() - start < 0.2  # it did not sleep 1 s just to give up afterwards


def test_deadline_object() -> None:
    d = Deadline(0)
    assert d.expired()
    with pytest.raises(StorageDeadlineError):
        d.timeout(5)
    assert Deadline(None).remaining() == float("inf")
    assert Deadline(10).timeout(2) == 2
