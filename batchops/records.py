"""Small value types passed between modules (builder → engine → store, results → store → merge)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Why a row or request failed: backends classify by error code, batchops.policy decides.
ErrorClass = Literal[
    "quota",  # insufficient_quota: this model/key is exhausted for this invocation
    "rate_limit",  # rate_limit_exceeded: wait and retry
    "auth",  # 401 invalid_api_key / 403 permission: this key is exhausted
    "model_not_found",  # 403/404 model_not_found: this model is exhausted
    "api_error",  # 5xx, connection errors: retry with backoff
    "timeout",  # request_timeout, client timeouts: retry
    "expired",  # batch_expired: retry (the finished part of the batch is kept)
    "cancelled",  # batch_cancelled: retry
    "token_limit",  # token_limit_exceeded: wait for in-flight batches, resubmit the same chunk
    "format_error",  # an answer that does not parse / violates the schema / is truncated
    "invalid_request",  # per-request 4xx: permanent failure of that row
    "input",  # our own input problem (missing image ...): row skipped, never sent
    "lost",  # the remote reports the row done but no result line says how: never re-sent
]


@dataclass(slots=True)
class Usage:
    """Token usage of one request, normalised across endpoints."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the prompt cache
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    # Prompt tokens written to the prompt cache (Anthropic bills them above the input rate:
    # 1.25x for the 5-minute cache, 2x for the 1-hour one). Both are part of prompt_tokens.
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.cached_tokens + other.cached_tokens,
            self.completion_tokens + other.completion_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.cache_write_1h_tokens + other.cache_write_1h_tokens,
        )


@dataclass(slots=True)
class RowOutcome:
    """What one output/error-file line (or one synchronous response) says about one request."""

    custom_id: str
    ok: bool
    response: str | None = None  # assistant text; output_text; embedding as a JSON list
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None  # the model that answered, as the API reports it
    status_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_class: ErrorClass | None = None  # None when ok
    retryable: bool = False
    request_id: str | None = None


# One common chat answer as the collection's fast path holds it (no objects per line):
# custom_id, response text, finish_reason, model, prompt, cached, completion and reasoning
# tokens, request_id. Always a 200 with billed usage; `AnswerRun.outcomes` gives the
# `RowOutcome`s the general path makes of the same lines.
AnswerTuple = tuple[str, str, str, str | None, int, int, int, int, str | None]


@dataclass(slots=True)
class AnswerRun:
    """Consecutive result-file lines of the most common shape (a 200 whose first choice has
    string content, a plain finish reason, no refusal, and usage), in file order."""

    rows: list[AnswerTuple]

    def outcomes(self) -> list[RowOutcome]:
        return [
            RowOutcome(
                cid,
                True,
                text,
                finish,
                Usage(p, c, co, r),
                model,
                200,
                None,
                None,
                None,
                False,
                rid,
            )
            for cid, text, finish, model, p, c, co, r, rid in self.rows
        ]


@dataclass(frozen=True, slots=True)
class BadLine:
    """A result-file line that is not a result line at all (truncated, not JSON, no custom_id)."""

    path: Path
    line_no: int
    reason: str


@dataclass(slots=True)
class Skipped:
    """A row that cannot be sent (e.g. its image is missing); it is never uploaded."""

    row_idx: int
    reason: str


@dataclass(slots=True)
class BuiltChunk:
    """One JSONL batch file written by the chunk builder."""

    chunk_no: int
    path: Path
    row_idxs: list[int]  # source row positions, in file order
    custom_ids: list[str]  # same order as row_idxs
    n_bytes: int
    est_prompt_tokens: int
    skipped: list[Skipped] = field(default_factory=list)  # rows dropped while building this chunk
