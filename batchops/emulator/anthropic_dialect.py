"""The Anthropic dialect: Message Batches (`/v1/messages/batches…`) and `POST /v1/messages`.

Requests are translated to chat-completions bodies (`to_chat`) and run by the shared runner and
executor, so answers are `expected_answer(model, to_chat(params))` and quotas, faults and stats
are the OpenAI dialect's. Shapes follow anthropic SDK 2.14.0 (types/messages/*) and
shared/reference/providers.md §3.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from batchops.emulator import dialects as D
from batchops.emulator.dialects import Call, DialectError, JSONResponse
from batchops.emulator.errors import ApiError
from batchops.emulator.executor import execute
from batchops.emulator.state import Batch, Emulator
from batchops.emulator.validation import BatchRequest
from batchops.masking import mask_key

NAME = "anthropic"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_BYTES = 256 * 1024 * 1024
BATCH_WINDOW = 86_400
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
# Real wordings, seen in public error reports (anthropics/claude-quickstarts#229,
# anthropics/claude-code#2127): both are 400 invalid_request_error.
CREDIT_MESSAGE = (
    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing "
    "to upgrade or purchase credits."
)


def error(status: int, message: str, kind: str | None = None) -> DialectError:
    kind = kind or ERROR_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    return DialectError(status, {"type": "error", "error": {"type": kind, "message": message}})


def usage_limit_message() -> str:
    now = datetime.now(UTC)
    first = datetime(now.year + now.month // 12, now.month % 12 + 1, 1)
    return (
        "You have reached your specified API usage limits. You will regain access on "
        f"{first:%Y-%m-%d} at 00:00 UTC."
    )


class Anthropic(D.Dialect):
    name = NAME

    def api_key(self, request: Request) -> str | None:
        key = request.headers.get("x-api-key")
        if key:
            return key
        auth = request.headers.get("authorization", "")
        return auth[7:].strip() or None if auth[:7].lower() == "bearer " else None

    def check_request(self, request: Request) -> None:
        if not request.headers.get("anthropic-version"):
            raise error(400, "anthropic-version: header is required")

    def auth_error(self, key: str | None) -> DialectError:
        if not key:
            return error(401, "x-api-key header is required")
        return error(401, f"invalid x-api-key ({mask_key(key)})")

    def translate(self, err: ApiError) -> DialectError:
        return error(err.status, _wording(err.status, err.message))


DIALECT = Anthropic()


def _wording(status: int, message: str) -> str:
    return {500: "Internal server error", 529: "Overloaded", 503: "Overloaded"}.get(status, message)


def from_executor(emu: Emulator, model: str, status: int, body: dict[str, Any]) -> DialectError:
    """A per-request failure (OpenAI body from the shared executor) as Anthropic words it."""
    message, code = D.openai_error(body)
    if code == "insufficient_quota":
        if D.quota_scope(emu, model) == "model":
            return error(400, usage_limit_message())
        return error(400, CREDIT_MESSAGE)
    if status == 403:
        return error(403, f"Your organization does not have access to model {model}.")
    return error(status, _wording(status, message))


# --------------------------------------------------------------------------- translation


def _blocks(content: Any) -> list[dict[str, Any]] | str:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif block.get("type") == "image" and isinstance(block.get("source"), dict):
            src = block["source"]
            if src.get("type") == "base64":
                url = f"data:{src.get('media_type', '')};base64,{src.get('data', '')}"
            else:
                url = str(src.get("url") or "")
            parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def to_chat(params: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body the emulator answers for Messages API `params`."""
    messages: list[dict[str, Any]] = []
    system = params.get("system")
    if isinstance(system, list):
        system = "\n".join(
            b["text"] for b in system if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for m in params.get("messages") or []:
        if isinstance(m, dict):
            messages.append(
                {"role": str(m.get("role", "user")), "content": _blocks(m.get("content"))}
            )
    body: dict[str, Any] = {
        "model": params.get("model"),
        "messages": messages,
        "max_tokens": params.get("max_tokens"),
    }
    if params.get("temperature") is not None:
        body["temperature"] = params["temperature"]
    fmt = (params.get("output_config") or {}).get("format") or params.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt.get("schema") or {}},
        }
    return body


def cache_ttl(params: Any) -> str | None:
    """ "5m" or "1h" when the request asks for prompt caching (`cache_control` at the top level
    or on a system / message block), else None."""
    if not isinstance(params, dict):
        return None
    marks = [params.get("cache_control")]
    system = params.get("system")
    blocks: list[Any] = system if isinstance(system, list) else []
    for m in params.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            blocks = [*blocks, *m["content"]]
    marks += [b.get("cache_control") for b in blocks if isinstance(b, dict)]
    found = [m for m in marks if isinstance(m, dict)]
    if not found:
        return None
    return "1h" if any(m.get("ttl") == "1h" for m in found) else "5m"


def to_message(model: str, chat: dict[str, Any], ttl: str | None = None) -> dict[str, Any]:
    """A chat completion (from the executor) as an Anthropic Message. With prompt caching
    asked for (`ttl`), the emulator writes every prompt token it did not read from the cache
    (as if the breakpoint were at the end of the prompt)."""
    choice = chat["choices"][0]
    usage = chat.get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    written = prompt - cached if ttl else 0
    return {
        "id": "msg_" + chat["id"].removeprefix("chatcmpl-")[-24:],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": choice["message"]["content"] or ""}],
        "stop_reason": "max_tokens" if choice.get("finish_reason") == "length" else "end_turn",
        "stop_sequence": None,
        "usage": {
            # Anthropic counts cache reads apart from input_tokens
            "input_tokens": prompt - cached - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": cached,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written if ttl == "5m" else 0,
                "ephemeral_1h_input_tokens": written if ttl == "1h" else 0,
            },
            "output_tokens": int(usage.get("completion_tokens", 0)),
            "service_tier": "batch",
        },
    }


def _params_problem(i: int, params: Any) -> str | None:
    where = f"requests.{i}.params"
    if not isinstance(params, dict):
        return f"{where}: Input should be a valid dictionary"
    for name in ("model", "max_tokens", "messages"):
        if params.get(name) is None:
            return f"{where}.{name}: Field required"
    if not isinstance(params["model"], str):
        return f"{where}.model: Input should be a valid string"
    mt = params["max_tokens"]
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        return f"{where}.max_tokens: Input should be a valid integer greater than or equal to 1"
    if not isinstance(params["messages"], list) or not params["messages"]:
        return f"{where}.messages: List should have at least 1 item"
    if params.get("stream"):
        return f"{where}.stream: streaming is not supported in Message Batches"
    return None


def _parse_requests(emu: Emulator, body: Any) -> tuple[list[BatchRequest], str]:
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise error(400, "requests: Field required")
    reqs = body["requests"]
    limit = emu.scenario.anthropic_max_requests
    if not reqs:
        raise error(400, "requests: List should have at least 1 item after validation, not 0")
    if len(reqs) > limit:
        raise error(
            400,
            f"requests: List should have at most {limit} items after validation, not {len(reqs)}",
        )
    seen: set[str] = set()
    out: list[BatchRequest] = []
    known = emu.scenario.models
    for i, r in enumerate(reqs):
        if not isinstance(r, dict):
            raise error(400, f"requests.{i}: Input should be a valid dictionary")
        cid = r.get("custom_id")
        if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
            raise error(
                400,
                f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'",
            )
        if cid in seen:
            raise error(
                400,
                f"requests.{i}.custom_id: Duplicate custom_id '{cid}': each request in a batch "
                "needs a unique custom_id.",
            )
        seen.add(cid)
        problem = _params_problem(i, r.get("params"))
        if problem:
            raise error(400, problem)
        model = r["params"]["model"]
        if known is not None and model not in known:
            raise error(404, f"model: {model}")
        out.append(BatchRequest(cid, to_chat(r["params"]), None))
    return out, str(out[0].body["model"])


# --------------------------------------------------------------------------- batch objects


def _entry(emu: Emulator, batch_id: str) -> dict[str, Any]:
    e = D.registry(emu, NAME)["batches"].get(batch_id)
    if e is None:
        raise error(404, f"message_batch {batch_id} not found")
    return e


def _final(emu: Emulator, e: dict[str, Any]) -> list[D.Line] | None:
    """The batch's result lines once it has ended (computed once)."""
    b: Batch = e["batch"]
    if b.status not in D.TERMINAL:
        return None
    if e.get("final") is None:
        e["final"] = D.lines(emu, b, e["order"])
    return e["final"]


def _to_api(emu: Emulator, e: dict[str, Any], base: str) -> dict[str, Any]:
    b: Batch = e["batch"]
    final = _final(emu, e)
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    if final is None:
        counts["processing"] = b.total
    else:
        for line in final:
            counts[line.kind] += 1
    st = b.stamps
    status = {"cancelling": "canceling"}.get(b.status, "in_progress")
    ended_at = None
    if final is not None:
        status = "ended"
        ended_at = st.get(f"{b.status}_at")
    return {
        "id": b.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "created_at": D.rfc3339(b.created_at),
        "expires_at": D.rfc3339(b.created_at + BATCH_WINDOW),
        "ended_at": D.rfc3339(ended_at),
        "cancel_initiated_at": D.rfc3339(st.get("cancelling_at")),
        "archived_at": None,
        "results_url": f"{base}v1/messages/batches/{b.id}/results" if final is not None else None,
    }


def _base(call: Call) -> str:
    return str(call.request.base_url)


async def create_batch(call: Call) -> Response:
    emu = call.emu
    raw = await call.request.body()
    if len(raw) > MAX_BYTES:
        raise error(413, "Request exceeds the maximum allowed number of bytes.")
    body = await call.json(DIALECT)
    requests, model = _parse_requests(emu, body)
    if not emu.quota_left(model, call.key):
        raise from_executor(emu, model, 429, {"error": {"code": "insufficient_quota"}})
    b = D.start_batch(emu, NAME, call.key, model, requests, "msgbatch_")
    order = {r.custom_id: i for i, r in enumerate(requests)}
    ttls = {r["custom_id"]: t for r in body["requests"] if (t := cache_ttl(r["params"]))}
    e = {"batch": b, "order": order, "final": None, "model": model, "cache_ttl": ttls}
    D.registry(emu, NAME)["batches"][b.id] = e
    return JSONResponse(_to_api(emu, e, _base(call)))


async def retrieve_batch(call: Call) -> Response:
    return JSONResponse(_to_api(call.emu, _entry(call.emu, call.path["batch_id"]), _base(call)))


async def list_batches(call: Call) -> Response:
    q = call.request.query_params
    try:
        limit = int(q.get("limit") or 20)
    except ValueError:
        raise error(400, "limit: Input should be a valid integer") from None
    if not 1 <= limit <= 1000:
        raise error(400, "limit: Input should be between 1 and 1000")
    entries = list(reversed(D.registry(call.emu, NAME)["batches"].values()))  # newest first
    ids = [e["batch"].id for e in entries]
    before, after = q.get("before_id"), q.get("after_id")
    if after:
        start = ids.index(after) + 1 if after in ids else len(ids)
        chunk, more = entries[start : start + limit], start + limit < len(ids)
    elif before:
        end = ids.index(before) if before in ids else 0
        chunk, more = entries[max(0, end - limit) : end], end - limit > 0
    else:
        chunk, more = entries[:limit], limit < len(ids)
    data = [_to_api(call.emu, e, _base(call)) for e in chunk]
    return JSONResponse(
        {
            "data": data,
            "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


async def cancel_batch(call: Call) -> Response:
    e = _entry(call.emu, call.path["batch_id"])
    D.cancel(e["batch"])
    return JSONResponse(_to_api(call.emu, e, _base(call)))


async def delete_batch(call: Call) -> Response:
    batch_id = call.path["batch_id"]
    e = _entry(call.emu, batch_id)
    if _final(call.emu, e) is None:
        raise error(
            400,
            f"Message batch {batch_id} cannot be deleted while it is still processing. "
            "Cancel it first, then delete it once it has ended.",
        )
    del D.registry(call.emu, NAME)["batches"][batch_id]
    return JSONResponse({"id": batch_id, "type": "message_batch_deleted"})


def result_line(emu: Emulator, line: D.Line, model: str, ttls: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any]
    if line.kind == "succeeded":
        model = str(line.body.get("model") or "")
        result = {
            "type": "succeeded",
            "message": to_message(model, line.body, ttls.get(line.custom_id)),
        }
    elif line.kind == "errored":
        err = from_executor(emu, model, line.status, line.body)
        result = {"type": "errored", "error": err.body}
    else:
        result = {"type": line.kind}
    return {"custom_id": line.custom_id, "result": result}


async def batch_results(call: Call) -> Response:
    batch_id = call.path["batch_id"]
    e = _entry(call.emu, batch_id)
    final = _final(call.emu, e)
    if final is None:
        raise error(
            400, f"Message batch {batch_id} has not finished processing; results are not ready."
        )
    body = b"".join(
        orjson.dumps(result_line(call.emu, x, e["model"], e["cache_ttl"])) + b"\n" for x in final
    )
    return Response(body, media_type="application/binary")


# --------------------------------------------------------------------------- online


async def create_message(call: Call) -> Response:
    emu = call.emu
    sc = emu.scenario
    params = await call.json(DIALECT)
    problem = _params_problem(0, params)
    if problem:
        raise error(400, problem.removeprefix("requests.0.params."))
    model = params["model"]
    if sc.models is not None and model not in sc.models:
        raise error(404, f"model: {model}")
    try:
        emu.check_rate_limit(call.key, model)
    except ApiError as exc:
        rl = error(
            429,
            f"This request would exceed the rate limit for your organization of "
            f"{sc.rate_limit_rpm} requests per minute. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits.",
        )
        raise D.rate_limit_headers(emu, rl) from exc
    if sc.sync_latency_seconds:
        await asyncio.sleep(sc.sync_latency_seconds)
    cid = call.request.headers.get("x-batchops-custom-id")
    if not cid:
        cid = "sync:" + hashlib.sha1(await call.request.body()).hexdigest()[:12]
    out = execute(
        emu, custom_id=cid, model=model, body=to_chat(params), endpoint=D.CHAT, api_key=call.key
    )
    if out.error is not None:
        raise D.rate_limit_headers(emu, from_executor(emu, model, out.status, out.body))
    msg = to_message(model, out.body, cache_ttl(params))
    msg["usage"]["service_tier"] = "standard"
    return JSONResponse(msg)


# --------------------------------------------------------------------------- routes

ROUTES: list[tuple[str, str, D.Handler]] = [
    ("POST", "/v1/messages/batches", create_batch),
    ("GET", "/v1/messages/batches", list_batches),
    ("GET", "/v1/messages/batches/{batch_id}", retrieve_batch),
    ("DELETE", "/v1/messages/batches/{batch_id}", delete_batch),
    ("POST", "/v1/messages/batches/{batch_id}/cancel", cancel_batch),
    ("GET", "/v1/messages/batches/{batch_id}/results", batch_results),
    ("POST", "/v1/messages", create_message),
]


def routes() -> list[Route]:
    out = []
    for method, path, handler in ROUTES:
        template = f"{method} {path.replace('{batch_id}', '{id}')}"
        out.append(Route(path, D.endpoint(DIALECT, handler, template), methods=[method]))
    return out
