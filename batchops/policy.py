"""The one place that decides what a failure means: retry, pace, fail over, or give up.

Backends classify a provider's error into an `ErrorClass` and a `Scope` (what the failure
condemns). This module turns that into an action and keeps the attempt accounting; the store
only persists what is decided here, and the batch and online lanes use the same rules.
"""

from __future__ import annotations

from enum import StrEnum

from batchops.records import ErrorClass
from batchops.states import RowState


class Scope(StrEnum):
    """How far a failure reaches."""

    REQUEST = "request"  # this row only
    MODEL = "model"  # this model on this key (quota, no access to the model)
    KEY = "key"  # every model on this key (bad key)
    ENDPOINT = "endpoint"  # every model served by this base URL (server down)
    ACCOUNT = "account"  # every key of the account (arrears)


class Action(StrEnum):
    RETRY = "retry"  # the same call again after a backoff
    PACE = "pace"  # wait (everyone slows down), then the same call again
    FAIL_OVER = "fail over"  # take the scope out of the pool; the row goes elsewhere
    GIVE_UP = "give up"  # the row (or call) fails for good


# Never improve by retrying the same request anywhere.
PERMANENT: frozenset[ErrorClass] = frozenset({"invalid_request", "input"})
# This model/key is used up: switch, don't retry it.
EXHAUSTING: frozenset[ErrorClass] = frozenset({"quota", "auth", "model_not_found"})
# Passing trouble: the same call may well succeed a moment later.
TRANSIENT: frozenset[ErrorClass] = frozenset({"api_error", "timeout"})
# The caller is too fast: slow down, then the same call again.
PACED: frozenset[ErrorClass] = frozenset({"rate_limit", "token_limit"})

# Remote calls (upload, create, poll, download) are tried this often on transient errors.
CALL_ATTEMPTS = 6
# A rate limit is pacing, not the request's fault: this many waits before the row is recorded
# as a retryable failure (online mode).
RATE_LIMIT_ATTEMPTS = 30


def default_scope(cls: ErrorClass) -> Scope:
    """The scope of a class when the provider's rules say nothing more specific."""
    if cls == "auth":
        return Scope.KEY
    if cls in ("quota", "model_not_found"):
        return Scope.MODEL
    return Scope.REQUEST


def decide(cls: ErrorClass) -> Action:
    """What to do about one failed call of this class."""
    if cls in EXHAUSTING:
        return Action.FAIL_OVER
    if cls in PACED:
        return Action.PACE
    if cls in TRANSIENT:
        return Action.RETRY
    return Action.GIVE_UP


def call_is_retried(cls: ErrorClass) -> bool:
    """A remote call (poll, download, list …) is tried again on these classes."""
    return decide(cls) in (Action.RETRY, Action.PACE) and cls != "token_limit"


def row_retryable(cls: ErrorClass | None, retry_on: list[str] | None = None) -> bool:
    """Whether a row failure of this class goes back to pending (within its retry budget).

    `retry_on` is the user's RetryPolicy.retry_on; exhausting classes and token limits always
    retry (on another model/key, or later): they are not the row's fault."""
    if cls is None or cls in PERMANENT:
        return False
    if cls in EXHAUSTING or cls == "token_limit":
        return True
    if retry_on is None:
        return True
    return cls in retry_on or (cls == "api_error" and "api_error" in retry_on)


def counts_as_attempt(cls: ErrorClass | None) -> bool:
    """Whether a failure uses up one of the row's retries. A refusal for quota, access or a
    bad key is the pool's problem, not the row's: the row is re-queued for the next model."""
    return cls not in EXHAUSTING


def next_row_state(retryable: bool, attempts: int, max_retries: int) -> RowState:
    """A failed row's next state after `attempts` counted attempts: pending while retries are
    left (`max_retries` retries = max_retries + 1 executions), failed after."""
    return RowState.PENDING if retryable and attempts <= max_retries else RowState.FAILED
