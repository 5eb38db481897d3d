"""Anthropic's Messages dialect as plain JSON (no SDK): the one internal request (an OpenAI chat
body, as batchops renders it) → Messages API `params`, safe custom ids and back, result lines and
Messages → `RowOutcome`, Message Batch objects → `RemoteBatch`.

Kept apart from `anthropic.py` so it is testable without HTTP and the SDK stays in one module.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from batchops.backends.base import RemoteBatch
from batchops.policy import row_retryable
from batchops.records import BadLine, ErrorClass, RowOutcome, Usage
from batchops.states import BatchState

# `max_tokens` is required by the Messages API. Without --max-tokens every request asks for up
# to this many (a cap, not a price: only generated tokens are billed). The cost estimate still
# assumes pricing.DEFAULT_COMPLETION_ESTIMATE tokens per answer; docs/providers.md says both.
DEFAULT_MAX_TOKENS = 4096
# Per batch (platform docs "Batch processing"; shared/reference/providers.md §3).
MAX_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
SAFE_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# Messages API parameters passed through unchanged when a body carries them (body_extra).
PASS_THROUGH = frozenset(
    {
        "top_p",
        "top_k",
        "stop_sequences",
        "metadata",
        "thinking",
        "tools",
        "tool_choice",
        "service_tier",
        "output_config",
        "cache_control",
        "inference_geo",
    }
)
# OpenAI-only chat options with no Messages equivalent: dropped (named in the log once).
DROPPED = frozenset(
    {
        "n",
        "seed",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "store",
        "parallel_tool_calls",
        "modalities",
        "prediction",
        "reasoning_effort",
        "stream_options",
    }
)
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?:;[^,]*)?;base64,(?P<data>.*)$", re.DOTALL)


class TranslationError(ValueError):
    """A chat body that cannot be said in the Messages dialect (names the part)."""


# --------------------------------------------------------------------------- requests


def to_params(body: dict[str, Any], *, dropped: set[str] | None = None) -> dict[str, Any]:
    """An OpenAI chat-completions body → Messages API `params`: system messages → top-level
    `system`; text parts → text blocks; `image_url` data URLs → base64 image blocks with their
    media type (http(s) URLs → url image blocks); max_tokens (or max_completion_tokens, else
    DEFAULT_MAX_TOKENS); temperature; `stop` → stop_sequences; a `json_schema` response_format →
    `output_config.format` (structured outputs). `dropped` collects OpenAI-only keys left out."""
    if not isinstance(body.get("messages"), list):
        raise TranslationError("the request has no messages (only chat bodies can be sent)")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict):
            raise TranslationError(f"messages[{i}] is not an object")
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(m.get("content"), f"messages[{i}]"))
        elif role in ("user", "assistant"):
            messages.append({"role": role, "content": _content(m.get("content"), i)})
        else:
            raise TranslationError(f"messages[{i}]: role {role!r} has no Messages equivalent")
    params: dict[str, Any] = {
        "model": body.get("model"),
        "max_tokens": body.get("max_tokens")
        or body.get("max_completion_tokens")
        or DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        params["system"] = "\n\n".join(system)
    if body.get("temperature") is not None:
        params["temperature"] = body["temperature"]
    stop = body.get("stop")
    if stop:
        params["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        params["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    elif fmt is not None and dropped is not None:
        dropped.add("response_format")  # json_object has no Messages equivalent
    own = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stop"}
    for key, value in body.items():
        if key in own or key == "response_format":
            continue
        if key in PASS_THROUGH:
            params[key] = value
        elif dropped is not None:
            dropped.add(key)
    return params


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    raise TranslationError(f"{where}: content is neither text nor a list of parts")


def _content(content: Any, i: int) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TranslationError(f"messages[{i}]: content is neither text nor a list of parts")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            blocks.append(_image(str(url or ""), f"messages[{i}].content[{j}]"))
        else:
            raise TranslationError(f"messages[{i}].content[{j}]: part type {kind!r} not supported")
    return blocks


def _image(url: str, where: str) -> dict[str, Any]:
    m = _DATA_URL.match(url)
    if m:
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": m["mime"], "data": m["data"]},
        }
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(f"{where}: image is neither a base64 data URL nor an http(s) URL")


# --------------------------------------------------------------------------- custom ids


def id_prefix(tag: dict[str, str], display_name: str) -> str:
    """The custom-id prefix of one submission (run, chunk, attempt): Message Batches have no
    metadata, so this is what identifies a batch's requests (`<prefix>_<line>`)."""
    run = tag.get("batchops_run") or display_name
    digest = hashlib.sha256(run.encode()).hexdigest()[:10]
    chunk = tag.get("batchops_chunk", "x")
    attempt = tag.get("batchops_attempt", "0")
    prefix = f"b{digest}c{chunk}a{attempt}"
    return prefix if SAFE_ID.match(prefix + "_0") else f"b{digest}"


def safe_id(prefix: str, line_no: int) -> str:
    return f"{prefix}_{line_no}"


def line_of(custom_id: str) -> int | None:
    """The chunk-file line a safe custom id stands for (None: not one of ours)."""
    _, sep, tail = custom_id.rpartition("_")
    return int(tail) if sep and tail.isdigit() else None


def chunk_ids(chunk_path: Path) -> list[str]:
    """The custom ids (row ids) of a chunk file, in line order (blank lines skipped)."""
    ids: list[str] = []
    with chunk_path.open("rb") as fh:
        for line in fh:
            if line.strip():
                ids.append(str(orjson.loads(line)["custom_id"]))
    return ids


def batch_body(chunk_path: Path, prefix: str, dropped: set[str]) -> tuple[bytes, int]:
    """The create call's JSON body for a chunk file, and its request count."""
    parts: list[bytes] = []
    n = 0
    with chunk_path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            req = orjson.loads(line)
            try:
                params = to_params(req["body"], dropped=dropped)
            except TranslationError as exc:
                raise TranslationError(f"{chunk_path.name} line {n + 1}: {exc}") from None
            parts.append(orjson.dumps({"custom_id": safe_id(prefix, n), "params": params}))
            n += 1
    return b'{"requests":[' + b",".join(parts) + b"]}", n


# --------------------------------------------------------------------------- answers

# stop_reason → the chat finish_reason the rest of batchops understands.
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "pause_turn": "length",
    "refusal": "content_filter",
}
_TRUNCATED = {
    "length": "answer truncated at the token limit",
    "content_filter": "the model refused to answer",
}
# Error types → the HTTP status Anthropic answers them with (errored result lines carry none).
STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def usage_of(u: Any) -> Usage | None:
    """Anthropic usage → batchops Usage. input_tokens excludes cache reads and writes: prompt =
    input + cache_read + cache_creation, cached = cache_read; writes are split by cache lifetime
    (`cache_creation.ephemeral_5m/1h_input_tokens`; all 5-minute when the split is absent),
    each priced at its own rate."""
    if not isinstance(u, dict):
        return None
    read = int(u.get("cache_read_input_tokens") or 0)
    write = int(u.get("cache_creation_input_tokens") or 0)
    split = u.get("cache_creation")
    write_1h = 0
    if isinstance(split, dict):
        write_1h = min(int(split.get("ephemeral_1h_input_tokens") or 0), write)
    details = u.get("output_tokens_details") or {}
    return Usage(
        prompt_tokens=int(u.get("input_tokens") or 0) + read + write,
        cached_tokens=read,
        completion_tokens=int(u.get("output_tokens") or 0),
        reasoning_tokens=int(details.get("thinking_tokens") or 0)
        if isinstance(details, dict)
        else 0,
        cache_write_tokens=write - write_1h,
        cache_write_1h_tokens=write_1h,
    )


def message_outcome(custom_id: str, msg: Any) -> RowOutcome:
    """A Message (a succeeded result, or an online answer) → RowOutcome."""
    if not isinstance(msg, dict):
        return _format_failure(custom_id, "the answer is not a Message object")
    content = msg.get("content")
    texts = [
        str(b.get("text", ""))
        for b in content or []
        if isinstance(b, dict) and b.get("type") == "text"
    ]
    tools = [b for b in content or [] if isinstance(b, dict) and b.get("type") == "tool_use"]
    usage = usage_of(msg.get("usage"))
    model = msg.get("model") if isinstance(msg.get("model"), str) else None
    finish = _FINISH.get(str(msg.get("stop_reason")), msg.get("stop_reason"))
    if not texts and tools:
        text: str | None = orjson.dumps(
            [{"name": t.get("name"), "input": t.get("input")} for t in tools]
        ).decode()
    elif not isinstance(content, list):
        return _format_failure(custom_id, "the Message has no content", usage, model)
    else:
        text = "".join(texts)
    if finish in _TRUNCATED:
        return RowOutcome(
            custom_id,
            ok=False,
            response=text,
            finish_reason=finish,
            usage=usage,
            model=model,
            status_code=200,
            error_code="refusal" if msg.get("stop_reason") == "refusal" else str(finish),
            error_message=_TRUNCATED[str(finish)],
            error_class="format_error",
            retryable=row_retryable("format_error"),
            request_id=msg.get("id"),
        )
    return RowOutcome(
        custom_id,
        ok=True,
        response=text,
        finish_reason=str(finish) if finish else None,
        usage=usage,
        model=model,
        status_code=200,
        request_id=msg.get("id"),
    )


def _format_failure(
    custom_id: str, message: str, usage: Usage | None = None, model: str | None = None
) -> RowOutcome:
    return RowOutcome(
        custom_id,
        ok=False,
        usage=usage,
        model=model,
        status_code=200,
        error_code="invalid_response",
        error_message=message,
        error_class="format_error",
        retryable=row_retryable("format_error"),
    )


def errored_outcome(custom_id: str, error: Any, cls: ErrorClass) -> RowOutcome:
    """An errored result (its class decided by the caller's policy)."""
    inner = error.get("error") if isinstance(error, dict) else None
    inner = inner if isinstance(inner, dict) else (error if isinstance(error, dict) else {})
    type_ = str(inner.get("type") or "api_error")
    return RowOutcome(
        custom_id,
        ok=False,
        status_code=STATUS_OF_TYPE.get(type_, 500),
        error_code=type_,
        error_message=str(inner.get("message") or type_),
        error_class=cls,
        retryable=row_retryable(cls),
    )


def not_run_outcome(custom_id: str, kind: str) -> RowOutcome:
    """A canceled or expired request: never executed, re-sent by the engine."""
    cls: ErrorClass = "cancelled" if kind == "canceled" else "expired"
    return RowOutcome(
        custom_id,
        ok=False,
        error_code=f"batch_{'cancelled' if kind == 'canceled' else 'expired'}",
        error_message=f"the batch {'was canceled' if kind == 'canceled' else 'expired'} "
        "before this request ran",
        error_class=cls,
        retryable=row_retryable(cls),
    )


def read_lines(
    path: Path,
    ids: list[str],
    classify_error: Any,
) -> Iterator[RowOutcome | BadLine]:
    """A results JSONL file → outcomes under the chunk file's ids (`ids`, line order).
    `classify_error(status, type, message) -> ErrorClass` decides errored lines."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield BadLine(path, line_no, f"not valid JSON ({exc})")
                continue
            cid = obj.get("custom_id") if isinstance(obj, dict) else None
            result = obj.get("result") if isinstance(obj, dict) else None
            n = line_of(cid) if isinstance(cid, str) else None
            if n is None or n >= len(ids) or not isinstance(result, dict):
                yield BadLine(path, line_no, f"custom_id {cid!r} is not a request of this chunk")
                continue
            row_id = ids[n]
            kind = result.get("type")
            if kind == "succeeded":
                yield message_outcome(row_id, result.get("message"))
            elif kind == "errored":
                inner = (result.get("error") or {}).get("error") or result.get("error") or {}
                type_ = str(inner.get("type") or "api_error") if isinstance(inner, dict) else ""
                msg = str(inner.get("message") or "") if isinstance(inner, dict) else ""
                cls = classify_error(STATUS_OF_TYPE.get(type_, 500), type_, msg)
                yield errored_outcome(row_id, result.get("error"), cls)
            elif kind in ("canceled", "expired"):
                yield not_run_outcome(row_id, str(kind))
            else:
                yield BadLine(path, line_no, f"unknown result type {kind!r}")


# --------------------------------------------------------------------------- batches


def remote_batch(b: dict[str, Any]) -> RemoteBatch:
    """A Message Batch (JSON) → RemoteBatch. `ended` becomes COMPLETED, or EXPIRED / CANCELLED
    when some requests expired or were canceled (their rows are re-sent, finished ones kept)."""
    rc = b.get("request_counts") or {}
    n = {
        k: int(rc.get(k) or 0)
        for k in ("processing", "succeeded", "errored", "canceled", "expired")
    }
    status = str(b.get("processing_status") or "")
    cancel_at = _time(b.get("cancel_initiated_at"))
    if status == "ended":
        if cancel_at is not None or (n["canceled"] and not n["expired"]):
            state = BatchState.CANCELLED
        elif n["expired"]:
            state = BatchState.EXPIRED
        else:
            state = BatchState.COMPLETED
    elif status == "canceling":
        state = BatchState.CANCELLING
    else:
        state = BatchState.IN_PROGRESS
    ended = status == "ended"
    return RemoteBatch(
        id=str(b["id"]),
        state=state,
        # Ended batches show batchops' word (completed / expired / cancelled), as `status` and
        # the report group batches by it.
        raw_status=state.value if ended else status,
        total=sum(n.values()),
        completed=n["succeeded"],
        failed=n["errored"] + n["canceled"] + n["expired"],
        created_at=_time(b.get("created_at")),
        expires_at=_time(b.get("expires_at")),
        ended_at=_time(b.get("ended_at")),
        output_ref=str(b["id"]) if ended else None,  # the results are fetched by batch id
    )


def _time(v: Any) -> float | None:
    if isinstance(v, datetime):
        return v.timestamp()
    if isinstance(v, str) and v:
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    if isinstance(v, int | float) and not isinstance(v, bool) and v:
        return float(v)
    return None
