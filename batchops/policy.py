"""The one place that decides what a failure means: retry, pace, fail over, or give up.

Backends classify a provider's error into an `ErrorClass` and a `Scope` (what the failure
condemns). This module turns that into an action and keeps the attempt accounting; the store
only persists what is decided here, and the batch and online lanes use the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import get_args

from batchops.records import ErrorClass
from batchops.states import RowState

ERROR_CLASSES: tuple[str, ...] = get_args(ErrorClass)


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


def set_aside_scope(cls: ErrorClass, scope: Scope, refused_status: int | None) -> Scope | None:
    """What a failed upload or create takes out of the pool, or None (try again later).
    Exhausting classes take their own scope; a refusal (`refused_status`, a 4xx) that no retry
    can change takes the model — or every model of the endpoint for a 404, a route the server
    does not have (`--base-url` is no Batch API: a vLLM server, a URL missing /v1). Trying
    those again would wait for ever."""
    if cls in EXHAUSTING:
        return scope
    if refused_status is not None and decide(cls) == Action.GIVE_UP:
        return Scope.ENDPOINT if refused_status == 404 else Scope.MODEL
    return None


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


# ---------------------------------------------------------------------- error rules


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of an error-rules table: what it matches (every given field must match) and
    what it means. `code`, `type` and `message` are case-insensitive regular expressions
    searched in the error's fields; `status` is an exact HTTP status (None: any, incl. a
    connection error's missing status)."""

    cls: ErrorClass
    scope: Scope
    status: int | None = None
    code: str | None = None
    type: str | None = None
    message: str | None = None

    def matches(self, status: int | None, code: str, type_: str, message: str) -> bool:
        return (
            (self.status is None or self.status == status)
            and _search(self.code, code)
            and _search(self.type, type_)
            and _search(self.message, message)
        )


def _search(pattern: str | None, text: str) -> bool:
    return pattern is None or re.search(pattern, text, re.IGNORECASE) is not None


def _r(cls: ErrorClass, scope: Scope, status: int | None = None, **kw: str) -> Rule:
    return Rule(cls, scope, status, **kw)


# Built-in rules per provider dialect, tried after the user's `[[error_rules]]` and before the
# OpenAI code table. Sources: docs/failover.md (DashScope's error-code page, vLLM's server).
PRESETS: dict[str, tuple[Rule, ...]] = {
    "openai": (
        _r("auth", Scope.ACCOUNT, code="^account_deactivated$"),
        _r("quota", Scope.ACCOUNT, code="^billing_hard_limit_reached$"),
    ),
    "azure": (
        _r("model_not_found", Scope.MODEL, code="^DeploymentNotFound$"),
        _r("model_not_found", Scope.MODEL, status=404, message="deployment"),
    ),
    "dashscope": (
        _r("auth", Scope.KEY, code="^InvalidApiKey$|^invalid_api_key$"),
        _r("quota", Scope.MODEL, code=r"^AllocationQuota\.FreeTierOnly$"),
        _r("quota", Scope.MODEL, type=r"^AllocationQuota\.FreeTierOnly$"),
        _r("quota", Scope.ACCOUNT, code="^Arrearage$"),
        _r("model_not_found", Scope.MODEL, code="^AccessDenied$|^access_denied$"),
        _r("model_not_found", Scope.MODEL, code="^ModelNotFound$|^model_not_found$"),
        _r("rate_limit", Scope.REQUEST, code=r"^Throttling\.RateQuota$"),
        _r("quota", Scope.MODEL, code=r"^Throttling\.AllocationQuota$|^insufficient_quota$"),
        _r("invalid_request", Scope.REQUEST, code="^InvalidParameter$|^DataInspectionFailed$"),
    ),
    "vllm": (
        _r("model_not_found", Scope.MODEL, status=404, message="does not exist"),
        _r("auth", Scope.KEY, status=401),
    ),
    # Anthropic (shared/reference/providers.md §3; the backend passes the error `type` as the
    # code). Both quota wordings are 400 invalid_request_error: no credit left is the whole
    # account; a spend limit is taken per model (the emulator's model_quota says it so).
    "anthropic": (
        _r("quota", Scope.ACCOUNT, message="credit balance is too low"),
        _r("quota", Scope.ACCOUNT, status=402),
        _r("quota", Scope.MODEL, message="reached your specified API usage limits"),
        _r("rate_limit", Scope.REQUEST, status=429),
        _r("rate_limit", Scope.REQUEST, code="^rate_limit_error$"),
        _r("api_error", Scope.REQUEST, status=529),
        _r("api_error", Scope.REQUEST, code="^overloaded_error$|^api_error$"),
        _r("auth", Scope.KEY, status=401),
        _r("auth", Scope.KEY, code="^authentication_error$"),
        # "Your organization does not have access to model X": that model, not the key.
        _r("model_not_found", Scope.MODEL, status=403, message=r"access to (the )?model"),
        _r("auth", Scope.KEY, status=403),
        _r("auth", Scope.KEY, code="^permission_error$"),
        _r("model_not_found", Scope.MODEL, status=404, message=r"^model:|\bmodel\b"),
        _r("invalid_request", Scope.REQUEST, status=413),
    ),
    # Google's error statuses (docs/providers.md#gemini). Every Gemini 429 says "You exceeded
    # your current quota", per-minute limits too: the QuotaFailure quota id (the backend passes
    # it as `type`, and appends it to result-line messages) tells a rate from a quota.
    "gemini": (
        _r("auth", Scope.KEY, code="^UNAUTHENTICATED$"),
        _r("auth", Scope.KEY, type="API_KEY_INVALID|API_KEY_SERVICE_BLOCKED"),
        _r("auth", Scope.KEY, status=400, message="API key not valid|API key expired"),
        _r("rate_limit", Scope.REQUEST, status=429, type="PerMinute|PerSecond"),
        _r("rate_limit", Scope.REQUEST, status=429, message="PerMinute|PerSecond"),
        _r("quota", Scope.MODEL, status=429, message="quota"),
        _r("rate_limit", Scope.REQUEST, status=429),
        _r("invalid_request", Scope.REQUEST, status=400),
        _r("model_not_found", Scope.MODEL, status=403, message=r"\bmodel\b"),
        _r("auth", Scope.KEY, status=403),
        _r("model_not_found", Scope.MODEL, status=404, message=r"models/\S+ is not found"),
        _r("invalid_request", Scope.REQUEST, status=404),
        _r("api_error", Scope.REQUEST, status=500),
        _r("api_error", Scope.REQUEST, status=503),
        _r("timeout", Scope.REQUEST, status=504),
    ),
}
# Compatible servers (anything but OpenAI's own API): the seed scripts' rules. An unrecognised
# 403 means this model, not the key; messages about quota, permission or rate limits say so.
COMPATIBLE = (
    _r("quota", Scope.MODEL, message="quota"),
    _r("model_not_found", Scope.MODEL, message="permission denied"),
    _r("rate_limit", Scope.REQUEST, message="rate limit"),
    _r("model_not_found", Scope.MODEL, status=403),
)


def classify(
    status: int | None,
    code: str | None,
    type_: str | None,
    message: str | None,
    *,
    provider: str = "openai",
    rules: tuple[Rule, ...] | list[Rule] = (),
    fallback: ErrorClass,
) -> tuple[ErrorClass, Scope]:
    """(class, scope) of one error: the user's rules, then the provider's preset, then (for
    compatible servers) the seeds' rules; `fallback` is the class OpenAI's code table gives."""
    fields = (status, code or "", type_ or "", message or "")
    table = [*rules, *PRESETS.get(provider, ())]
    if provider not in ("openai", "azure"):
        table += COMPATIBLE
    for rule in table:
        if rule.matches(*fields):
            return rule.cls, rule.scope
    return fallback, default_scope(fallback)


# ---------------------------------------------------------------------- failure thresholds

# Consecutive failures of one model (on one key) before the pool moves on, per class. Quota
# switches at once; other classes as the seed scripts' config (2).
DEFAULT_FAILURES_BEFORE_SWITCH: dict[str, int] = {"quota": 1, "auth": 1, "model_not_found": 1}
FAILURES_BEFORE_SWITCH = 2


def failures_before_switch(cls: ErrorClass, overrides: dict[str, int] | None = None) -> int:
    """How many consecutive failures of this class set a model (or endpoint) aside."""
    overrides = overrides or {}
    if cls in overrides:
        return overrides[cls]
    if "*" in overrides:
        return overrides["*"]
    return DEFAULT_FAILURES_BEFORE_SWITCH.get(cls, FAILURES_BEFORE_SWITCH)


def presets_markdown() -> str:
    """The built-in rules as Markdown tables (docs/failover.md embeds this text)."""
    out: list[str] = []
    for provider, rules in [
        *PRESETS.items(),
        ("compatible servers (any but openai/azure)", COMPATIBLE),
    ]:
        out += [f"### {provider}", "", "| status | code | type | message | → class | scope |"]
        out.append("|---|---|---|---|---|---|")
        for r in rules:
            cells = [
                str(r.status) if r.status is not None else "any",
                *(f"`{v}`" if v else "any" for v in (r.code, r.type, r.message)),
                f"`{r.cls}`",
                str(r.scope),
            ]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
