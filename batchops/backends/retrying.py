"""One retry loop for every backend's SDK calls: transient failures (as `policy` says) are
tried again with the job's backoff, honouring a server's retry-after; anything else, or a
transient failure that outlasts the attempts, becomes the backend's classified RemoteError.

SDKs' own retries are off everywhere: they would retry an exhausted quota that can never
succeed. Calls that create something pass `attempts=1` (see engine._creating)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from loguru import logger
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from batchops.backends.base import RemoteError
from batchops.policy import call_is_retried
from batchops.spec import RetryPolicy

T = TypeVar("T")


def call_with_retries(
    fn: Callable[..., T],
    *args: Any,
    what: str,
    attempts: int,
    policy: RetryPolicy,
    sdk_errors: type[BaseException] | tuple[type[BaseException], ...],
    to_error: Callable[[BaseException, str], RemoteError],
    **kw: Any,
) -> T:
    """`fn(*args, **kw)`, retried on transient SDK errors; raises `to_error(exc, what)`."""

    def error_of(state: RetryCallState) -> RemoteError | None:
        exc = state.outcome.exception() if state.outcome else None
        return to_error(exc, what) if isinstance(exc, sdk_errors) else None

    def wait(state: RetryCallState) -> float:
        err = error_of(state)
        after = err.retry_after if err is not None else None
        return max(policy.delay(state.attempt_number), after or 0.0)

    def before_sleep(state: RetryCallState) -> None:
        err = error_of(state)
        if err is not None:
            logger.debug(
                "{} failed ({} HTTP {} {}: {}); retry {} of {}",
                what,
                err.cls,
                err.status,
                err.code,
                err.message,
                state.attempt_number,
                attempts - 1,
            )

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, sdk_errors) and call_is_retried(to_error(exc, what).cls)

    try:
        for attempt in Retrying(
            retry=retry_if_exception(transient),
            wait=wait,
            stop=stop_after_attempt(attempts),
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                logger.debug("remote call: {}", what)
                return fn(*args, **kw)
    except sdk_errors as exc:
        raise to_error(exc, what) from None
    raise AssertionError("unreachable")  # pragma: no cover
