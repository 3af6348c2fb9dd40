"""Deadlines and retries for storage requests (SPEC section 6).

Every request gets ``retries`` tries with exponential backoff and jitter,
``base * (2^a + U(0, 1))`` seconds before try ``a + 1`` (tenacity), but only on failures that a
retry can fix: throttling (HTTP 429/503, ``SlowDown``), 5xx, timeouts, connection resets,
truncated bodies. Everything runs under a :class:`Deadline`; a retry that would sleep past it is
not attempted, and the caller sees :class:`StorageDeadlineError` instead of a late answer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from covenant.plugins.storage.errors import (
    ObjectChangedError,
    ObjectNotFoundError,
    StorageDeadlineError,
    StorageError,
    StorageTransportError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: S3 error codes that mean "try again later".
THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
    }
)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT})


class TruncatedReadError(ConnectionError):
    """A body ended before its announced length (retryable: the next try resumes)."""


class Deadline:
    """A point in monotonic time that bounds a whole operation (``None`` seconds = never)."""

    def __init__(self, seconds: float | None) -> None:
        self._end = math.inf if seconds is None else time.monotonic() + max(0.0, seconds)

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def timeout(self, cap: float) -> float:
        """Time one request may take: ``cap``, cut to what is left; raises if nothing is."""
        left = self.remaining()
        if left <= 0:
            raise StorageDeadlineError("deadline passed before the request could start")
        return min(cap, left)

    def check(self, what: str) -> None:
        if self.expired():
            raise StorageDeadlineError(f"{what}: deadline passed")


@dataclass(frozen=True)
class RetryPolicy:
    """``tries`` per request and the backoff scale (tests use a tiny ``backoff_base_s``)."""

    tries: int = 3
    backoff_base_s: float = 1.0


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _client_error_retryable(exc: BaseException) -> bool | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (
        code in THROTTLE_CODES or status in RETRY_STATUS or code in {str(s) for s in RETRY_STATUS}
    )


def is_retryable(exc: BaseException) -> bool:
    """Whether a retry can fix ``exc`` (throttling, 5xx, timeouts, resets, truncation)."""
    for e in _chain(exc):
        if isinstance(e, StorageError):
            # our own verdicts (deadline, too large, changed, not found) are final
            return False
        verdict = _client_error_retryable(e)
        if verdict is not None:
            return verdict
        if isinstance(
            e, TruncatedReadError | ConnectionError | TimeoutError | asyncio.TimeoutError
        ):
            return True
        name = type(e).__name__
        module = type(e).__module__
        if module.startswith("aiohttp") and name not in ("InvalidURL",):
            return True  # ClientPayloadError, ServerDisconnectedError, ClientOSError...
        if module.startswith("botocore") and name in (
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "EndpointConnectionError",
            "ConnectionClosedError",
            "IncompleteReadError",
            "ResponseStreamingError",
            "HTTPClientError",
            "ProxyConnectionError",
        ):
            return True
        if name == "FSTimeoutError":
            return True
        if isinstance(e, OSError) and e.errno in RESET_ERRNOS:
            return True
    return False


def _precondition_failed(exc: BaseException) -> bool:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
    return False


def call_with_retries(
    fn: Callable[[], T], *, what: str, policy: RetryPolicy, deadline: Deadline
) -> T:
    """Run ``fn`` with retries under ``deadline``; failures become typed storage errors.

    ``FileNotFoundError`` becomes :class:`ObjectNotFoundError`, an ETag precondition failure
    :class:`ObjectChangedError`, a retryable failure that outlived its tries
    :class:`StorageTransportError`, and one that outlived the deadline
    :class:`StorageDeadlineError`.
    """
    attempts = 0

    def counted() -> T:
        nonlocal attempts
        attempts += 1
        deadline.check(what)
        return fn()

    class out_of_time(stop_base):
        def __call__(self, state: RetryCallState) -> bool:
            return deadline.remaining() <= (state.upcoming_sleep or 0.0)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.info(
            "%s: try %d failed (%s); retrying in %.2fs",
            what,
            state.attempt_number,
            exc,
            state.upcoming_sleep,
        )

    base = policy.backoff_base_s
    retrying = Retrying(
        stop=stop_after_attempt(policy.tries) | out_of_time(),
        wait=wait_exponential(multiplier=base, exp_base=2, max=math.inf) + wait_random(0, base),
        retry=retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(counted)
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise ObjectNotFoundError(f"{what}: not found") from exc
    except Exception as exc:
        if _precondition_failed(exc):
            raise ObjectChangedError(f"{what}: object changed during the download") from exc
        if is_retryable(exc):
            if attempts < policy.tries or deadline.expired():
                raise StorageDeadlineError(
                    f"{what}: deadline passed after {attempts} tries (last: {_describe(exc)})"
                ) from exc
            raise StorageTransportError(
                f"{what}: failed after {attempts} tries: {_describe(exc)}"
            ) from exc
        raise StorageTransportError(f"{what}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
