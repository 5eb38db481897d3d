"""The Gemini dialect: Files (resumable upload, download), Batch API and `generateContent`.

Requests are translated to chat-completions bodies (`to_chat`) and run by the shared runner and
executor, so answers are `expected_answer(model, to_chat(model, request))`. Paths, headers and
shapes follow google-genai 3.6.1 (files.py, batches.py, _api_client.upload_file) and
shared/reference/providers.md §4. Every route exists under /v1 and /v1beta; on the /v1 paths the
OpenAI dialect also uses, a request is Gemini's when it carries `x-goog-api-key`,
`x-goog-api-client` or `?key=`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from batchops.emulator import dialects as D
from batchops.emulator.dialects import Call, DialectError, JSONResponse
from batchops.emulator.errors import ApiError
from batchops.emulator.executor import execute
from batchops.emulator.state import Batch, Emulator
from batchops.emulator.validation import BatchRequest

NAME = "gemini"
VERSIONS = ("v1", "v1beta")
MAX_FILE_BYTES = 2 * 1024**3
MAX_INLINE_BYTES = 20 * 1024 * 1024
FILE_TTL = 48 * 3600
STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
MESSAGES = {
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "The request timed out. Please try again.",
}
# Real wording (google-gemini/gemini-cli#8437, googleapis/python-genai#1446).
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)
STATES = {
    "validating": "BATCH_STATE_PENDING",
    "in_progress": "BATCH_STATE_RUNNING",
    "finalizing": "BATCH_STATE_RUNNING",
    "cancelling": "BATCH_STATE_RUNNING",
    "completed": "BATCH_STATE_SUCCEEDED",
    "failed": "BATCH_STATE_FAILED",
    "cancelled": "BATCH_STATE_CANCELLED",
    "expired": "BATCH_STATE_EXPIRED",
}
_ALNUM = string.ascii_lowercase + string.digits


def error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> DialectError:
    # 529 is Anthropic's; Google says 503 UNAVAILABLE
    code = 503 if status == 529 else status
    if code not in STATUS:
        code = 500 if status >= 500 else 400
    body: dict[str, Any] = {"code": code, "message": message, "status": STATUS[code]}
    if details:
        body["details"] = details
    return DialectError(code, {"error": body})


def not_found() -> DialectError:
    return error(404, "Requested entity was not found.")


def quota_error(emu: Emulator, model: str, scope: str, per_minute: bool = False) -> DialectError:
    sc = emu.scenario
    message = QUOTA_MESSAGE
    details: list[dict[str, Any]] = []
    if scope == "model":
        if per_minute:
            limit, quota_id = sc.rate_limit_rpm or 0, "GenerateRequestsPerMinutePerProjectPerModel"
        else:
            limit, quota_id = (
                sc.model_quota.get(model, 0),
                "GenerateRequestsPerDayPerProjectPerModel",
            )
        metric = "generativelanguage.googleapis.com/generate_content_requests"
        message += f"\n* Quota exceeded for metric: {metric}, limit: {limit}, model: {model}"
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": metric,
                        "quotaId": quota_id,
                        "quotaDimensions": {"location": "global", "model": model},
                    }
                ],
            }
        )
    if not sc.omit_retry_after:
        wait = f"{sc.retry_after_seconds:g}s"
        message += f"\nPlease retry in {wait}."
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": wait})
    return error(429, message, details)


class Gemini(D.Dialect):
    name = NAME

    def api_key(self, request: Request) -> str | None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if key:
            return key
        upload_id = request.query_params.get("upload_id")
        if upload_id:  # an upload URL authorizes its own chunks, as Google's do
            emu: Emulator = request.app.state.emulator
            session = _reg(emu)["uploads"].get(upload_id)
            return session["key"] if session else None
        return None

    def auth_error(self, key: str | None) -> DialectError:
        if not key:
            return error(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        return error(
            400,
            "API key not valid. Please pass a valid API key.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ],
        )

    def translate(self, err: ApiError) -> DialectError:
        return error(
            err.status, MESSAGES.get(503 if err.status == 529 else err.status, err.message)
        )


DIALECT = Gemini()


def from_executor(emu: Emulator, model: str, status: int, body: dict[str, Any]) -> DialectError:
    message, code = D.openai_error(body)
    if code == "insufficient_quota":
        return quota_error(emu, model, D.quota_scope(emu, model))
    if status == 403:
        return error(403, f"Permission denied: the caller does not have access to model {model}.")
    return error(status, MESSAGES.get(status, message))


# --------------------------------------------------------------------------- translation


def _get(d: dict[str, Any], camel: str, snake: str) -> Any:
    return d.get(camel) if d.get(camel) is not None else d.get(snake)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = content.get("parts") if isinstance(content, dict) else None
    return "\n".join(
        p["text"] for p in parts or [] if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def _lower_types(schema: Any) -> Any:
    """Gemini's OpenAPI-style schema ("OBJECT", "STRING") as JSON Schema."""
    if isinstance(schema, dict):
        return {
            k: (v.lower() if k == "type" and isinstance(v, str) else _lower_types(v))
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_lower_types(x) for x in schema]
    return schema


def to_chat(model: str, req: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body the emulator answers for a GenerateContentRequest."""
    messages: list[dict[str, Any]] = []
    system = _text_of(_get(req, "systemInstruction", "system_instruction") or "")
    if system:
        messages.append({"role": "system", "content": system})
    contents = req.get("contents")
    if isinstance(contents, str | dict):
        contents = [contents]
    for c in contents or []:
        if isinstance(c, str):
            messages.append({"role": "user", "content": c})
            continue
        if not isinstance(c, dict):
            continue
        parts: list[dict[str, Any]] = []
        for p in c.get("parts") or []:
            if not isinstance(p, dict):
                continue
            if isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            inline = _get(p, "inlineData", "inline_data")
            if isinstance(inline, dict):
                mime = _get(inline, "mimeType", "mime_type") or ""
                url = f"data:{mime};base64,{inline.get('data') or ''}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
        role = "assistant" if c.get("role") == "model" else "user"
        messages.append({"role": role, "content": parts})
    body: dict[str, Any] = {"model": model, "messages": messages}
    gc = _get(req, "generationConfig", "generation_config") or {}
    if _get(gc, "maxOutputTokens", "max_output_tokens") is not None:
        body["max_tokens"] = _get(gc, "maxOutputTokens", "max_output_tokens")
    if gc.get("temperature") is not None:
        body["temperature"] = gc["temperature"]
    schema = _get(gc, "responseJsonSchema", "response_json_schema")
    if schema is None:
        schema = _lower_types(_get(gc, "responseSchema", "response_schema"))
    if isinstance(schema, dict):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema},
        }
    elif _get(gc, "responseMimeType", "response_mime_type") == "application/json":
        body["response_format"] = {"type": "json_object"}
    return body


def to_response(model: str, chat: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (from the executor) as a GenerateContentResponse."""
    choice = chat["choices"][0]
    usage = chat.get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    out = int(usage.get("completion_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    meta: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": out,
        "totalTokenCount": prompt + out,
    }
    if cached:
        meta["cachedContentTokenCount"] = cached
    return {
        "candidates": [
            {
                "content": {
                    "parts": [{"text": choice["message"]["content"] or ""}],
                    "role": "model",
                },
                "finishReason": "MAX_TOKENS" if choice.get("finish_reason") == "length" else "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": meta,
        "modelVersion": model,
        "responseId": chat["id"].removeprefix("chatcmpl-")[-22:],
    }


# --------------------------------------------------------------------------- files


@dataclass(slots=True)
class GFile:
    name: str  # "files/abc123"
    display_name: str | None
    mime_type: str
    data: bytes
    created: float
    source: str  # UPLOADED | GENERATED

    def to_api(self, base: str) -> dict[str, Any]:
        created = D.rfc3339(self.created)
        out: dict[str, Any] = {
            "name": self.name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": created,
            "updateTime": created,
            "expirationTime": D.rfc3339(self.created + FILE_TTL),
            "sha256Hash": base64.b64encode(hashlib.sha256(self.data).digest()).decode(),
            "uri": f"{base}v1beta/{self.name}",
            "state": "ACTIVE",
            "source": self.source,
        }
        if self.display_name:
            out["displayName"] = self.display_name
        if self.source == "GENERATED":
            out["downloadUri"] = f"{base}download/v1beta/{self.name}:download?alt=media"
        return out


def _reg(emu: Emulator) -> dict[str, Any]:
    reg = D.registry(emu, NAME)
    reg.setdefault("files", {})
    reg.setdefault("uploads", {})
    return reg


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def _add_file(emu: Emulator, data: bytes, mime: str, display: str | None, source: str) -> GFile:
    f = GFile(f"files/{_rand(12)}", display, mime, data, time.time(), source)
    _reg(emu)["files"][f.name] = f
    return f


def _file(emu: Emulator, name: str) -> GFile:
    f = _reg(emu)["files"].get(name if name.startswith("files/") else f"files/{name}")
    if f is None:
        raise error(
            403, f"You do not have permission to access the File {name} or it may not exist."
        )
    return f


def _base(call: Call) -> str:
    return str(call.request.base_url)


async def upload(call: Call) -> Response:
    """Resumable upload: `start` answers the upload URL; `upload[, finalize]` sends bytes."""
    req = call.request
    command = req.headers.get("x-goog-upload-command", "").lower()
    uploads = _reg(call.emu)["uploads"]
    if "start" in command:
        meta = await call.json(DIALECT) if await req.body() else {}
        fmeta = meta.get("file") if isinstance(meta, dict) else None
        fmeta = fmeta if isinstance(fmeta, dict) else {}
        size = int(req.headers.get("x-goog-upload-header-content-length") or 0)
        if size > MAX_FILE_BYTES:
            raise error(400, f"File size {size} exceeds the limit of {MAX_FILE_BYTES} bytes.")
        mime = (
            req.headers.get("x-goog-upload-header-content-type")
            or _get(fmeta, "mimeType", "mime_type")
            or "application/octet-stream"
        )
        upload_id = _rand(24)
        uploads[upload_id] = {
            "key": call.key,
            "mime": mime,
            # google-genai 3.6.1 sends this body in snake_case (display_name), the docs camelCase
            "display": _get(fmeta, "displayName", "display_name"),
            "data": bytearray(),
        }
        version = req.url.path.split("/")[2]
        url = f"{_base(call)}upload/{version}/files?upload_id={upload_id}&upload_protocol=resumable"
        return JSONResponse(
            {},
            headers={
                "x-goog-upload-url": url,
                "x-goog-upload-status": "active",
                "x-goog-upload-chunk-granularity": str(8 * 1024 * 1024),
            },
        )
    session = uploads.get(req.query_params.get("upload_id", ""))
    if session is None:
        raise error(404, "Upload session not found.")
    offset = int(req.headers.get("x-goog-upload-offset") or len(session["data"]))
    if offset != len(session["data"]):
        raise error(400, f"Invalid upload offset {offset}; expected {len(session['data'])}.")
    session["data"] += await req.body()
    if len(session["data"]) > MAX_FILE_BYTES:
        raise error(400, f"File exceeds the limit of {MAX_FILE_BYTES} bytes.")
    if "finalize" not in command:
        return Response(b"", headers={"x-goog-upload-status": "active"})
    del uploads[req.query_params["upload_id"]]
    f = _add_file(call.emu, bytes(session["data"]), session["mime"], session["display"], "UPLOADED")
    call.emu.counters.files_uploaded += 1
    return JSONResponse({"file": f.to_api(_base(call))}, headers={"x-goog-upload-status": "final"})


async def file_get(call: Call) -> Response:
    target: str = call.path["target"]
    if target.endswith(":download"):
        return await _download(call, target.removesuffix(":download"))
    return JSONResponse(_file(call.emu, target).to_api(_base(call)))


async def file_download(call: Call) -> Response:
    return await _download(call, call.path["target"].removesuffix(":download"))


async def _download(call: Call, name: str) -> Response:
    f = _file(call.emu, name)
    return Response(f.data, media_type=f.mime_type)


async def file_delete(call: Call) -> Response:
    f = _file(call.emu, call.path["target"])
    del _reg(call.emu)["files"][f.name]
    call.emu.counters.files_deleted += 1
    return JSONResponse({})


async def file_list(call: Call) -> Response:
    files = list(reversed(_reg(call.emu)["files"].values()))
    start, size = _page_args(call.request)
    chunk = files[start : start + size]
    out: dict[str, Any] = {"files": [f.to_api(_base(call)) for f in chunk]}
    if start + size < len(files):
        out["nextPageToken"] = str(start + size)
    return JSONResponse(out)


def _page_args(request: Request) -> tuple[int, int]:
    q = request.query_params
    try:
        size = int(q.get("pageSize") or 50)
        start = int(q.get("pageToken") or 0)
    except ValueError:
        raise error(400, "Invalid pageSize or pageToken.") from None
    return max(0, start), max(1, min(size, 1000))


# --------------------------------------------------------------------------- batches


def _entry(call: Call, batch_id: str) -> dict[str, Any]:
    e = _reg(call.emu)["batches"].get(batch_id.removeprefix("batches/"))
    if e is None or e["key"] != call.key:  # a job is visible only to the key that created it
        raise not_found()
    return e


Item = tuple[str, dict[str, Any], dict[str, Any]]  # (key, request, metadata)


def _lines_from_file(data: bytes, name: str) -> list[Item]:
    out: list[Item] = []
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise error(400, f"Invalid JSON on line {n} of {name}.") from None
        if not isinstance(line, dict) or not isinstance(line.get("request"), dict):
            raise error(400, f"Line {n} of {name} has no 'request' object.")
        key = line.get("key")
        if not isinstance(key, str) or not key:
            raise error(400, f"Line {n} of {name} has no 'key'.")
        out.append((key, line["request"], {}))
    return out


def _inline_lines(reqs: Any) -> list[Item]:
    if isinstance(reqs, dict):
        reqs = reqs.get("requests")
    if not isinstance(reqs, list):
        raise error(400, "inputConfig.requests.requests must be a list.")
    out: list[Item] = []
    for i, item in enumerate(reqs):
        if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
            raise error(400, f"inputConfig.requests.requests[{i}].request is required.")
        meta: dict[str, Any] = item["metadata"] if isinstance(item.get("metadata"), dict) else {}
        key = str(meta.get("key") or f"inline-{i}")
        out.append((key, item["request"], meta))
    return out


async def model_action(call: Call) -> Response:
    target: str = call.path["target"]
    model, _, action = target.rpartition(":")
    model = model.removeprefix("models/")
    version = call.request.url.path.split("/")[1]
    sc = call.emu.scenario
    if sc.models is not None and model not in sc.models:
        raise error(
            404,
            f"models/{model} is not found for API version {version}, or is not supported for "
            f"{action}. Call ListModels to see the list of available models and their supported "
            "methods.",
        )
    if action == "batchGenerateContent":
        return await _create_batch(call, model)
    if action == "generateContent":
        return await _generate(call, model)
    raise error(404, f"Method {action} is not supported by the batchops emulator.")


async def _create_batch(call: Call, model: str) -> Response:
    emu = call.emu
    raw = await call.request.body()
    body = await call.json(DIALECT)
    batch = body.get("batch") if isinstance(body, dict) else None
    if not isinstance(batch, dict) or not isinstance(batch.get("inputConfig"), dict):
        raise error(400, "batch.inputConfig is required.")
    cfg = batch["inputConfig"]
    if cfg.get("fileName") and cfg.get("requests"):
        raise error(400, "Only one of inputConfig.fileName and inputConfig.requests may be set.")
    if cfg.get("fileName"):
        f = _reg(emu)["files"].get(cfg["fileName"])
        if f is None:
            raise not_found()
        items = _lines_from_file(f.data, f.name)
        source: dict[str, Any] = {"fileName": f.name}
    elif cfg.get("requests") is not None:
        if len(raw) > MAX_INLINE_BYTES:
            raise error(400, f"Request payload size exceeds the limit: {MAX_INLINE_BYTES} bytes.")
        items = _inline_lines(cfg["requests"])
        source = {"requests": {"requests": [{"metadata": m} for _, _, m in items]}}
    else:
        raise error(400, "batch.inputConfig needs fileName or requests.")
    if not items:
        raise error(400, "The batch has no requests.")
    if not emu.quota_left(model, call.key):
        raise quota_error(emu, model, D.quota_scope(emu, model))
    requests = [BatchRequest(k, to_chat(model, r), None) for k, r, _ in items]
    b = D.start_batch(emu, NAME, call.key, model, requests, "", enqueued_limit=True)
    e = {
        "batch": b,
        "key": call.key,
        "model": model,
        "display": batch.get("displayName"),
        "source": source,
        "inline": "requests" in source,
        "meta": {k: m for k, _, m in items},
        "order": {r.custom_id: i for i, r in enumerate(requests)},
        "output": None,
        "final": None,
        "updated": time.time(),
    }
    name = b.id
    e["name"] = f"batches/{name}"
    _reg(emu)["batches"][name] = e
    return JSONResponse(_op(emu, e, _base(call)))


def _result(emu: Emulator, e: dict[str, Any], line: D.Line) -> dict[str, Any]:
    if line.kind == "succeeded":
        return {"response": to_response(e["model"], line.body)}
    return {"error": from_executor(emu, e["model"], line.status, line.body).body["error"]}


def _output(emu: Emulator, e: dict[str, Any], base: str) -> dict[str, Any] | None:
    """The job's results once ended (made once): a responses file or inline responses.
    Requests never executed (expired, cancelled) have no line."""
    b: Batch = e["batch"]
    if b.status not in D.TERMINAL or b.status == "failed":
        return None
    if e["output"] is None:
        done = [x for x in _final(emu, e) or [] if x.kind in ("succeeded", "errored")]
        if not done:
            return None  # nothing ran (e.g. cancelled while pending): no results at all
        if e["inline"]:
            items = []
            for x in done:
                item = _result(emu, e, x)
                if e["meta"].get(x.custom_id):
                    item["metadata"] = e["meta"][x.custom_id]
                items.append(item)
            e["output"] = {"inlinedResponses": {"inlinedResponses": items}}
        else:
            data = b"".join(
                orjson.dumps({"key": x.custom_id, **_result(emu, e, x)}) + b"\n" for x in done
            )
            display = f"{e['name']}-results"
            f = _add_file(emu, data, "application/jsonl", display, "GENERATED")
            e["output"] = {"responsesFile": f.name}
    return e["output"]


def _final(emu: Emulator, e: dict[str, Any]) -> list[D.Line] | None:
    b: Batch = e["batch"]
    if b.status not in D.TERMINAL:
        return None
    if e.get("final") is None:
        e["final"] = D.lines(emu, b, e["order"])
    return e["final"]


def _op(emu: Emulator, e: dict[str, Any], base: str) -> dict[str, Any]:
    b: Batch = e["batch"]
    final = _final(emu, e)
    ended = final is not None
    if final is None:
        ok, failed = len(b.ok_lines), len(b.err_lines)
    else:
        ok = sum(1 for x in final if x.kind == "succeeded")
        failed = sum(1 for x in final if x.kind == "errored")
    output = _output(emu, e, base)
    stamps = [v for v in b.stamps.values() if v is not None]
    updated = max([b.created_at, *stamps])
    meta: dict[str, Any] = {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "name": e["name"],
        "model": f"models/{e['model']}",
        "inputConfig": e["source"],
        "createTime": D.rfc3339(b.created_at),
        "updateTime": D.rfc3339(updated),
        "batchStats": {
            "requestCount": str(b.total),
            "successfulRequestCount": str(ok),
            "failedRequestCount": str(failed),
            "pendingRequestCount": str(0 if ended else b.total - ok - failed),
        },
        "state": STATES[b.status],
    }
    if e["display"] is not None:
        meta["displayName"] = e["display"]
    op: dict[str, Any] = {"name": e["name"], "metadata": meta}
    if ended:
        meta["endTime"] = D.rfc3339(b.stamps.get(f"{b.status}_at"))
        op["done"] = True
        if output is not None:
            meta["output"] = output
            op["response"] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1main."
                "GenerateContentBatchOutput",
                **output,
            }
        if b.status == "failed":
            message = (b.errors or [{}])[0].get("message") or "The batch failed."
            op["error"] = {"code": 8, "message": message}
    return op


async def batch_get(call: Call) -> Response:
    return JSONResponse(_op(call.emu, _entry(call, call.path["target"]), _base(call)))


async def batch_post(call: Call) -> Response:
    target: str = call.path["target"]
    if not target.endswith(":cancel"):
        raise error(404, f"Method not found: {target}.")
    e = _entry(call, target.removesuffix(":cancel"))
    D.cancel(e["batch"])
    return JSONResponse({})


async def batch_delete(call: Call) -> Response:
    e = _entry(call, call.path["target"])
    # Google: deleting the operation means "no longer interested"; it does not cancel it.
    del _reg(call.emu)["batches"][e["name"].removeprefix("batches/")]
    return JSONResponse({})


async def batch_list(call: Call) -> Response:
    mine = [e for e in _reg(call.emu)["batches"].values() if e["key"] == call.key]
    mine.reverse()  # newest first
    start, size = _page_args(call.request)
    chunk = mine[start : start + size]
    out: dict[str, Any] = {"operations": [_op(call.emu, e, _base(call)) for e in chunk]}
    if start + size < len(mine):
        out["nextPageToken"] = str(start + size)
    return JSONResponse(out)


# --------------------------------------------------------------------------- online


async def _generate(call: Call, model: str) -> Response:
    emu = call.emu
    sc = emu.scenario
    body = await call.json(DIALECT)
    if not isinstance(body, dict) or not body.get("contents"):
        raise error(400, "* GenerateContentRequest.contents: contents is not specified")
    try:
        emu.check_rate_limit(call.key, model)
    except ApiError:
        raise quota_error(emu, model, "model", per_minute=True) from None
    if sc.sync_latency_seconds:
        await asyncio.sleep(sc.sync_latency_seconds)
    cid = call.request.headers.get("x-batchops-custom-id")
    if not cid:
        cid = "sync:" + hashlib.sha1(await call.request.body()).hexdigest()[:12]
    out = execute(
        emu,
        custom_id=cid,
        model=model,
        body=to_chat(model, body),
        endpoint=D.CHAT,
        api_key=call.key,
    )
    if out.error is not None:
        raise from_executor(emu, model, out.status, out.body)
    return JSONResponse(to_response(model, out.body))


# --------------------------------------------------------------------------- routes


def _is_gemini(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    if path.startswith(("/v1beta/", "/upload/", "/download/")):
        return True
    for name, _ in scope.get("headers") or []:
        if name in (b"x-goog-api-key", b"x-goog-api-client"):
            return True
    query: bytes = scope.get("query_string") or b""
    return query.startswith(b"key=") or b"&key=" in query


class GeminiRoute(Route):
    """Matches only Gemini requests, so the OpenAI routes on the same /v1 paths keep theirs."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get("type") == "http" and not _is_gemini(scope):
            return Match.NONE, {}
        return super().matches(scope)


ROUTES: list[tuple[str, str, str, D.Handler]] = [
    ("POST", "/upload/{v}/files", "POST /upload/v1/files", upload),
    ("GET", "/{v}/files", "GET /v1/files (gemini)", file_list),
    ("GET", "/{v}/files/{target}", "GET /v1/files/{id} (gemini)", file_get),
    ("DELETE", "/{v}/files/{target}", "DELETE /v1/files/{id} (gemini)", file_delete),
    ("GET", "/download/{v}/files/{target}", "GET /download/v1/files/{id}", file_download),
    ("POST", "/{v}/models/{target}", "POST /v1/models/{model}:{action}", model_action),
    ("GET", "/{v}/batches", "GET /v1/batches (gemini)", batch_list),
    ("GET", "/{v}/batches/{target}", "GET /v1/batches/{id} (gemini)", batch_get),
    ("POST", "/{v}/batches/{target}", "POST /v1/batches/{id}:cancel", batch_post),
    ("DELETE", "/{v}/batches/{target}", "DELETE /v1/batches/{id} (gemini)", batch_delete),
]


def routes() -> list[Route]:
    out: list[Route] = []
    for version in VERSIONS:
        for method, path, template, handler in ROUTES:
            out.append(
                GeminiRoute(
                    path.replace("{v}", version),
                    D.endpoint(DIALECT, handler, template),
                    methods=[method],
                )
            )
    return out
