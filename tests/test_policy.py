"""The one place that decides: retry, pace, fail over or give up; attempt accounting."""

from batchops.policy import (
    Action,
    Scope,
    counts_as_attempt,
    decide,
    default_scope,
    next_row_state,
    row_retryable,
    set_aside_scope,
)
from batchops.states import RowState


def test_decisions_by_class():
    assert decide("quota") == Action.FAIL_OVER
    assert decide("auth") == Action.FAIL_OVER
    assert decide("model_not_found") == Action.FAIL_OVER
    assert decide("rate_limit") == Action.PACE
    assert decide("token_limit") == Action.PACE
    assert decide("api_error") == Action.RETRY
    assert decide("timeout") == Action.RETRY
    assert decide("invalid_request") == Action.GIVE_UP


def test_scopes():
    assert default_scope("auth") == Scope.KEY
    assert default_scope("quota") == Scope.MODEL
    assert default_scope("model_not_found") == Scope.MODEL
    assert default_scope("invalid_request") == Scope.REQUEST


def test_row_retryable():
    assert not row_retryable("invalid_request")
    assert row_retryable("expired", ["expired"])
    assert not row_retryable("expired", ["timeout"])
    assert row_retryable("quota", [])  # exhausting classes always go to the next model/key
    assert not row_retryable(None)


def test_quota_refusals_do_not_spend_retries():
    assert not counts_as_attempt("quota")
    assert not counts_as_attempt("auth")
    assert counts_as_attempt("api_error")
    assert counts_as_attempt("expired")


def test_retry_budget_is_max_retries_plus_one_executions():
    # max_retries=1: the first failure (attempts=1) goes back, the second (attempts=2) fails.
    assert next_row_state(True, 1, 1) == RowState.PENDING
    assert next_row_state(True, 2, 1) == RowState.FAILED
    assert next_row_state(False, 1, 3) == RowState.FAILED
    assert next_row_state(True, 1, 0) == RowState.FAILED


def test_what_a_failed_create_sets_aside() -> None:
    assert set_aside_scope("quota", Scope.KEY, 429) == Scope.KEY  # its own scope
    assert set_aside_scope("auth", Scope.KEY, None) == Scope.KEY
    assert set_aside_scope("invalid_request", Scope.REQUEST, 404) == Scope.ENDPOINT  # no route
    assert set_aside_scope("invalid_request", Scope.REQUEST, 400) == Scope.MODEL
    assert set_aside_scope("invalid_request", Scope.REQUEST, None) is None  # not refused
    assert set_aside_scope("api_error", Scope.ENDPOINT, 409) is None  # a retry may work
    assert set_aside_scope("rate_limit", Scope.MODEL, 429) is None  # paced, not set aside
