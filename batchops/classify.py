"""OpenAI's error dialect → error classes, decided by error code, not only HTTP status.

Used by the OpenAI-dialect backends for synchronous API errors, for per-request lines of a batch
error file, and for a failed batch's `errors.data`. What a class means (retry, pace, fail over,
give up) is decided in `batchops.policy`.
"""

from __future__ import annotations

from batchops.records import ErrorClass


def classify_http(status: int | None, code: str | None, type_: str | None = None) -> ErrorClass:
    """Class of an HTTP-level error (sync call or a per-request line in an error file)."""
    code = (code or "").lower()
    type_ = (type_ or "").lower()
    if code == "insufficient_quota" or type_ == "insufficient_quota":
        return "quota"
    if code == "model_not_found":
        return "model_not_found"
    if code in ("invalid_api_key", "account_deactivated") or status == 401:
        return "auth"
    if code == "rate_limit_exceeded" or status == 429:
        return "rate_limit"
    if code == "token_limit_exceeded":
        return "token_limit"
    if code in ("request_timeout", "timeout") or status in (408, 504):
        return "timeout"
    if status == 403:
        return "auth"
    if status == 404:
        return "model_not_found" if "model" in code else "invalid_request"
    if status is None or status >= 500 or status == 409:
        return "api_error"
    return "invalid_request"


def classify_line_error(code: str | None) -> ErrorClass:
    """Class of a non-HTTP per-request error (`error.code` in an error-file line)."""
    code = (code or "").lower()
    if code == "batch_expired":
        return "expired"
    if code == "batch_cancelled":
        return "cancelled"
    if code == "request_timeout":
        return "timeout"
    if code == "insufficient_quota":
        return "quota"
    if code == "rate_limit_exceeded":
        return "rate_limit"
    return "api_error"


def classify_batch_error(code: str | None) -> ErrorClass:
    """Class of a whole-batch validation failure (`batch.errors.data[].code`)."""
    code = (code or "").lower()
    if code == "token_limit_exceeded" or "limit" in code and "enqueued" in code:
        return "token_limit"
    if code == "model_not_found":
        return "model_not_found"
    if code == "insufficient_quota":
        return "quota"
    # invalid_json_line, missing_required_parameter, invalid_url, duplicate_custom_id ... mean
    # batchops built a bad file: a bug, not the row's fault, so the rows go back to pending.
    return "api_error"
