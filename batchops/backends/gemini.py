"""Google's Gemini Batch API (and `generateContent` for online mode). The only module that
imports `google.genai`; `make_backend` imports it lazily.

The engine hands over OpenAI-format chunk files (custom_id + chat body). `upload` translates
each line into `{"key": <custom_id>, "request": GenerateContentRequest}` (the key *is* the
custom id, unchanged, so results join back by key, never by order) and uploads that through
the Files API under the chunk's remote name, which `find_uploads` looks for after a crash.
`create` starts `models/{model}:batchGenerateContent` with the chunk's display name
(run/chunk/attempt): Gemini jobs carry no metadata, so `find_batch` matches that name.

Jobs and files are visible only to the key that created them; the engine records the key of
every chunk and polls, collects and cancels with that key's backend.

The SDK's retries are off (`attempts=1`): every call goes through `_call`, which classifies by
`policy.classify(..., provider="gemini")` and retries only what the policy says can improve.
The SDK drops a job's `batchStats` and `error` for the Gemini API, so the raw JSON of batch
responses is kept by an httpx response hook (`_OpLog`) and read from there.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib
import mimetypes
import os
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import orjson
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from batchops import results
from batchops.backends.base import (
    BatchProblem,
    RemoteBatch,
    RemoteError,
    RemoteFile,
    SubmitRequest,
)
from batchops.backends.listpoll import ListPoller
from batchops.backends.retrying import call_with_retries
from batchops.errors import ConfigError
from batchops.policy import CALL_ATTEMPTS, Rule, Scope, classify, row_retryable
from batchops.records import BadLine, ErrorClass, RowOutcome
from batchops.spec import ModelEntry, RetryPolicy
from batchops.states import BatchState

T = TypeVar("T")

MAX_FILE_BYTES = 2 * 1024**3  # Files API limit per file
DEFAULT_TIMEOUT = 600.0
PAGE_SIZE = 100
CHAT = "/v1/chat/completions"
CUSTOM_ID_HEADER = "X-Batchops-Custom-Id"

# REST `BATCH_STATE_*` and the SDK's `JOB_STATE_*` (prefix stripped) → batchops' states.
_STATES: dict[str, BatchState] = {
    "UNSPECIFIED": BatchState.VALIDATING,
    "QUEUED": BatchState.VALIDATING,
    "PENDING": BatchState.VALIDATING,
    "RUNNING": BatchState.IN_PROGRESS,
    "UPDATING": BatchState.IN_PROGRESS,
    "PAUSED": BatchState.IN_PROGRESS,
    "CANCELLING": BatchState.CANCELLING,
    "SUCCEEDED": BatchState.COMPLETED,
    "PARTIALLY_SUCCEEDED": BatchState.COMPLETED,
    "FAILED": BatchState.FAILED,
    "CANCELLED": BatchState.CANCELLED,
    "EXPIRED": BatchState.EXPIRED,
}
# Gemini finish reasons → chat vocabulary (results.py decides what they mean for a row).
_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}
# google.rpc.Code numbers (a failed operation's `error.code`) → names.
_RPC_CODES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}
_DATA_URL = re.compile(r"^data:([^;,]*)(;[^,]*)?,(.*)$", re.DOTALL)
_RETRY_IN = re.compile(r"retry in ([0-9.]+)\s*s", re.IGNORECASE)


def header_value(row_id: str) -> str:
    """The custom-id header (the emulator counts online executions by it): percent-encoded
    unless printable ASCII, as the OpenAI backend sends it."""
    if row_id.isascii() and row_id.isprintable():
        return row_id
    return quote(row_id, safe="")


class TranslationError(ValueError):
    """A chunk line that cannot be said in Gemini's dialect."""


# ---------------------------------------------------------------------- requests


def _get(d: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field in camelCase (REST) or snake_case (proto names, the SDK's model_dump)."""
    v = d.get(camel)
    return v if v is not None else d.get(snake)


def _part(p: Any) -> dict[str, Any] | None:
    """One chat content part → one Gemini part (None: nothing to send)."""
    if isinstance(p, str):
        return {"text": p}
    if not isinstance(p, dict):
        return None
    kind = p.get("type")
    if kind in ("text", "input_text"):
        return {"text": str(p.get("text") or "")}
    if kind in ("image_url", "input_image"):
        img = p.get("image_url")
        url = img.get("url") if isinstance(img, dict) else img
        if not isinstance(url, str):
            raise TranslationError("an image_url part has no url")
        m = _DATA_URL.match(url)
        if m:
            if not (m.group(2) or "").endswith("base64"):
                raise TranslationError("an image data URL is not base64")
            return {"inline_data": {"mime_type": m.group(1) or "image/png", "data": m.group(3)}}
        mime = mimetypes.guess_type(url)[0] or "image/jpeg"
        return {"file_data": {"mime_type": mime, "file_uri": url}}
    raise TranslationError(f"content part of type {kind!r} has no Gemini equivalent")


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, list):
        return [x for x in (_part(p) for p in content) if x is not None]
    raise TranslationError("message content is neither text nor a list of parts")


def to_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """A chat-completions body → a GenerateContentRequest (REST JSON, proto field names).

    system/developer messages → `system_instruction`; user/assistant → `contents` with roles
    user/model; image data URLs → `inline_data {mime_type, data}` (base64 unchanged);
    max_(completion_)tokens, temperature, top_p, stop, seed → `generation_config`; a
    `response_format` JSON schema → `response_mime_type` application/json +
    `response_json_schema` (Gemini's JSON Schema field: `response_schema` only takes an
    OpenAPI subset without e.g. additionalProperties, which strict schemas carry)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("the request has no messages: Gemini takes chat requests only")
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            raise TranslationError("a message is not an object")
        role = m.get("role")
        parts = _parts(m.get("content"))
        if role in ("system", "developer"):
            system += parts
        else:
            contents.append({"role": "model" if role == "assistant" else "user", "parts": parts})
    req: dict[str, Any] = {"contents": contents}
    if system:
        req["system_instruction"] = {"parts": system}
    gc: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        gc["max_output_tokens"] = max_tokens
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
        if body.get(src) is not None:
            gc[dst] = body[src]
    stop = body.get("stop")
    if stop:
        gc["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    rf = body.get("response_format")
    if isinstance(rf, dict):
        if rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema")
            gc["response_mime_type"] = "application/json"
            if isinstance(schema, dict):
                gc["response_json_schema"] = schema
        elif rf.get("type") == "json_object":
            gc["response_mime_type"] = "application/json"
    if gc:
        req["generation_config"] = gc
    return req


def translate_chunk(chunk: Path, dest: Path) -> tuple[int, int]:
    """Write the Gemini input file for an OpenAI-format chunk file: one `{"key", "request"}`
    line per request, key = custom_id. Returns (lines, bytes)."""
    n = size = 0
    with chunk.open("rb") as src, dest.open("wb") as out:
        for line_no, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
                key, body = line["custom_id"], line["body"]
                if not isinstance(key, str) or not key:
                    raise TranslationError("custom_id is empty")
                data = orjson.dumps({"key": key, "request": to_request(body)}) + b"\n"
            except (orjson.JSONDecodeError, KeyError, TypeError, TranslationError) as exc:
                raise TranslationError(f"{chunk.name} line {line_no}: {exc}") from None
            out.write(data)
            n += 1
            size += len(data)
    return n, size


def to_sdk_call(req: Mapping[str, Any]) -> tuple[list[types.Content], types.GenerateContentConfig]:
    """A GenerateContentRequest (as `to_request` writes it) → `generate_content` arguments.
    Inline data is decoded here: the SDK's Blob holds bytes and base64-encodes them itself."""

    def part(p: Mapping[str, Any]) -> types.Part:
        if "inline_data" in p:
            blob = p["inline_data"]
            try:
                data = base64.b64decode(blob["data"], validate=True)
            except (binascii.Error, ValueError):
                raise TranslationError("an image data URL is not valid base64") from None
            return types.Part.from_bytes(data=data, mime_type=blob["mime_type"])
        if "file_data" in p:
            fd = p["file_data"]
            return types.Part.from_uri(file_uri=fd["file_uri"], mime_type=fd["mime_type"])
        return types.Part(text=p.get("text", ""))

    contents = [
        types.Content(role=c["role"], parts=[part(p) for p in c["parts"]]) for c in req["contents"]
    ]
    system = req.get("system_instruction")
    cfg = dict(req.get("generation_config") or {})
    if system:
        cfg["system_instruction"] = types.Content(parts=[part(p) for p in system["parts"]])
    return contents, types.GenerateContentConfig(**cfg)


# ---------------------------------------------------------------------- results


def _int(d: Any, camel: str, snake: str) -> int:
    v = _get(d, camel, snake) if isinstance(d, dict) else None
    return int(v) if isinstance(v, int | str) and str(v).isdigit() else 0


def response_to_outcome(key: str, resp: Any) -> RowOutcome:
    """A GenerateContentResponse (camelCase REST or snake_case SDK dump) → RowOutcome, with
    the same rules as a chat answer (results.py): truncation and filtered answers are
    format errors that keep their text and usage; thought parts are not the answer."""
    if not isinstance(resp, dict):
        return results.parse_sync_response({}, CHAT, key)
    usage = _get(resp, "usageMetadata", "usage_metadata") or {}
    thoughts = _int(usage, "thoughtsTokenCount", "thoughts_token_count")
    chat_usage = {
        "prompt_tokens": _int(usage, "promptTokenCount", "prompt_token_count"),
        # thinking tokens are billed as output, as reasoning tokens are in OpenAI's usage
        "completion_tokens": _int(usage, "candidatesTokenCount", "candidates_token_count")
        + thoughts,
        "prompt_tokens_details": {
            "cached_tokens": _int(usage, "cachedContentTokenCount", "cached_content_token_count")
        },
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }
    candidates = resp.get("candidates") or []
    cand = candidates[0] if candidates and isinstance(candidates[0], dict) else None
    text: str | None = None
    finish: str | None
    if cand is None:
        feedback = _get(resp, "promptFeedback", "prompt_feedback") or {}
        blocked = (
            _get(feedback, "blockReason", "block_reason") if isinstance(feedback, dict) else None
        )
        finish = "content_filter" if blocked else None
    else:
        parts = (cand.get("content") or {}).get("parts") or []
        texts = [
            p["text"]
            for p in parts
            if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")
        ]
        text = "".join(texts) if texts else None
        raw_finish = _get(cand, "finishReason", "finish_reason")
        finish = _FINISH.get(str(raw_finish), str(raw_finish).lower() if raw_finish else None)
    body: dict[str, Any] = {
        "usage": chat_usage,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        ],
    }
    model = _get(resp, "modelVersion", "model_version")
    if isinstance(model, str):
        body["model"] = model
    request_id = _get(resp, "responseId", "response_id")
    return results.parse_sync_response(
        body, CHAT, key, request_id=request_id if isinstance(request_id, str) else None
    )


def describe_error(err: Any) -> tuple[str | None, str, str, float | None]:
    """(status word, detail types, message, retry after) of a Google error object
    `{"code", "message", "status", "details"}`. Detail types are the quota ids
    (QuotaFailure) and ErrorInfo reasons, space-separated: the presets match on them."""
    if not isinstance(err, dict):
        return None, "", str(err or ""), None
    status = err.get("status") if isinstance(err.get("status"), str) else None
    message = str(err.get("message") or "")
    kinds: list[str] = []
    retry_after: float | None = None
    for d in err.get("details") or []:
        if not isinstance(d, dict):
            continue
        for v in d.get("violations") or []:
            if isinstance(v, dict) and v.get("quotaId"):
                kinds.append(str(v["quotaId"]))
        if d.get("reason"):
            kinds.append(str(d["reason"]))
        delay = d.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            with contextlib.suppress(ValueError):
                retry_after = float(delay[:-1])
    if retry_after is None and (m := _RETRY_IN.search(message)):
        retry_after = float(m.group(1))
    return status, " ".join(kinds), message, retry_after


def fallback_class(status: int | None) -> ErrorClass:
    """The class of a Google HTTP status when no rule says more (google.rpc codes)."""
    if status is None or status >= 500 or status == 409:
        return "timeout" if status == 504 else "api_error"
    if status == 429:
        return "rate_limit"
    if status in (401, 403):
        return "auth"
    if status == 408:
        return "timeout"
    return "invalid_request"


def error_to_outcome(key: str, err: Any, rules: list[Rule] | None = None) -> RowOutcome:
    """An error line of a result file → a failed RowOutcome, classified as a call would be."""
    code = err.get("code") if isinstance(err, dict) else None
    status = code if isinstance(code, int) else None
    word, kinds, message, _ = describe_error(err)
    cls, _scope = classify(
        status,
        word,
        kinds,
        message,
        provider="gemini",
        rules=rules or [],
        fallback=fallback_class(status),
    )
    if kinds:
        # The engine re-classifies lines by status, code and message: keep the quota id there.
        message = f"{message} [{kinds}]"
    return RowOutcome(
        key,
        ok=False,
        status_code=status,
        error_code=word,
        error_message=message or f"HTTP {status}",
        error_class=cls,
        retryable=row_retryable(cls),
    )


def read_result_file(path: Path, rules: list[Rule] | None = None) -> Iterator[RowOutcome | BadLine]:
    """The outcomes of a Gemini results file, by key; an unreadable line is a BadLine."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                yield BadLine(path, line_no, "not JSON")
                continue
            key = line.get("key") if isinstance(line, dict) else None
            if not isinstance(key, str) or not key:
                yield BadLine(path, line_no, "no key")
            elif isinstance(line.get("response"), dict):
                yield response_to_outcome(key, line["response"])
            elif line.get("error") is not None:
                yield error_to_outcome(key, line["error"], rules)
            else:
                yield BadLine(path, line_no, "neither response nor error")


# ---------------------------------------------------------------------- jobs


def _time(v: Any) -> float | None:
    if isinstance(v, datetime):
        return v.timestamp()
    if isinstance(v, str) and v:
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _count(v: Any) -> int | None:
    return int(v) if isinstance(v, int | str) and str(v).isdigit() else None


def _problem(err: Mapping[str, Any]) -> BatchProblem:
    """A failed job's `error` → a classified problem (the enqueued-token limit paces)."""
    code = err.get("code")
    word = _RPC_CODES.get(code, str(code)) if isinstance(code, int) else (code or None)
    message = str(err.get("message") or "the batch failed")
    low = message.lower()
    cls: ErrorClass
    if "token" in low and ("enqueued" in low or "limit" in low):
        cls = "token_limit"
    elif "quota" in low:
        cls = "quota"
    elif "not found" in low and "model" in low:
        cls = "model_not_found"
    else:
        cls = "api_error"
    return BatchProblem(word, message, cls)


def remote_job(op: Mapping[str, Any]) -> RemoteBatch:
    """A batch operation as REST JSON (`{"name", "metadata": {...}, "done", "error"}`) →
    RemoteBatch. Its id is the bare job id (`batches/<id>` without the prefix)."""
    meta: Mapping[str, Any] = op["metadata"] if isinstance(op.get("metadata"), dict) else op
    raw = str(meta.get("state") or "BATCH_STATE_PENDING")
    stats = meta.get("batchStats") or {}
    output = meta.get("output") or (op.get("response") or {})
    err = op.get("error")
    return RemoteBatch(
        id=str(op.get("name") or meta.get("name") or "").removeprefix("batches/"),
        state=_STATES.get(raw.removeprefix("BATCH_STATE_"), BatchState.IN_PROGRESS),
        raw_status=raw,
        total=_count(stats.get("requestCount")),
        completed=_count(stats.get("successfulRequestCount")),
        failed=_count(stats.get("failedRequestCount")),
        created_at=_time(meta.get("createTime")),
        ended_at=_time(meta.get("endTime")),
        tag={"display_name": str(meta.get("displayName"))} if meta.get("displayName") else {},
        input_ref=(meta.get("inputConfig") or {}).get("fileName"),
        output_ref=output.get("responsesFile") if isinstance(output, dict) else None,
        problems=[_problem(err)] if isinstance(err, dict) else [],
    )


def _sdk_job(job: types.BatchJob) -> RemoteBatch:
    """The SDK's view when the raw JSON was not seen (no batch stats, no error text)."""
    state = job.state.name if job.state else "JOB_STATE_PENDING"
    return RemoteBatch(
        id=str(job.name or "").removeprefix("batches/"),
        state=_STATES.get(state.removeprefix("JOB_STATE_"), BatchState.IN_PROGRESS),
        raw_status=state,
        created_at=_time(job.create_time),
        ended_at=_time(job.end_time),
        tag={"display_name": job.display_name} if job.display_name else {},
        output_ref=job.dest.file_name if job.dest else None,
        problems=[BatchProblem(None, "the batch failed", "api_error")]
        if state == "JOB_STATE_FAILED"
        else [],
    )


class _OpLog:
    """An httpx response hook keeping the raw JSON of batch operations by name: the SDK's
    BatchJob drops `batchStats` and `error` for the Gemini API."""

    def __init__(self) -> None:
        self.ops: dict[str, dict[str, Any]] = {}

    def __call__(self, response: Any) -> None:
        path = response.request.url.path
        if response.status_code != 200 or not (
            "/batches" in path or path.endswith(":batchGenerateContent")
        ):
            return
        response.read()  # sync client, small JSON bodies only (batch paths)
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return
        if not isinstance(body, dict):
            return
        for op in body.get("operations") or [body]:
            if isinstance(op, dict) and str(op.get("name", "")).startswith("batches/"):
                self.ops[op["name"]] = op

    def job(self, job: types.BatchJob) -> RemoteBatch:
        op = self.ops.pop(job.name or "", None)
        return remote_job(op) if op is not None else _sdk_job(job)


# ---------------------------------------------------------------------- the backend


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transport errors, timeouts) of whichever httpx flavour the SDK runs on."""
    errs: list[type[BaseException]] = []
    timeouts: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        errs.append(mod.HTTPError)
        timeouts.append(mod.TimeoutException)
    return tuple(errs), tuple(timeouts)


TRANSPORT_ERRORS, TIMEOUTS = _transport_errors()
CALL_ERRORS: tuple[type[BaseException], ...] = (genai_errors.APIError, *TRANSPORT_ERRORS)


def _split_base_url(url: str | None) -> tuple[str | None, str | None]:
    """(root, api version): "https://host/v1beta" → ("https://host", "v1beta")."""
    if not url:
        return None, None
    url = url.rstrip("/")
    m = re.match(r"^(.*?)/(v1(?:alpha|beta)?)$", url)
    return (m.group(1), m.group(2)) if m else (url, None)


class GeminiBackend:
    """One Gemini API endpoint with one key."""

    name = "gemini"
    uploads_files = True
    # A collected job is deleted (`batches.delete`: the client is no longer interested in
    # it): its result file goes with the other files, inline answers go with it, and the
    # job list that polling and reconcile page through stays as short as the work in flight.
    deletes_batches = True

    def __init__(
        self,
        entry: ModelEntry,
        api_key: str,
        *,
        policy: RetryPolicy,
        scrub: Callable[[str], str] = str,
        timeout: float = DEFAULT_TIMEOUT,
        rules: list[Rule] | None = None,
    ) -> None:
        self.url, version = _split_base_url(entry.base_url)
        self.policy = policy
        self.scrub = scrub
        self.rules = list(rules or [])
        self._log = _OpLog()

        def options(hooks: bool) -> types.HttpOptions:
            return types.HttpOptions(
                base_url=self.url,
                api_version=version,
                timeout=int(timeout * 1000),  # milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),  # policy decides retries
                client_args={"event_hooks": {"response": [self._log]}} if hooks else None,
            )

        self._options = options
        self._api_key = api_key
        # Kept for the backend's lifetime: a collected client closes its transport.
        self._client = genai.Client(api_key=api_key, vertexai=False, http_options=options(True))
        self._aclient: genai.Client | None = None
        self._poller = ListPoller(self._list_page, self.retrieve)

    @property
    def aclient(self) -> genai.Client:
        # Async transports belong to one event loop: made per online run, closed by aclose().
        if self._aclient is None:
            self._aclient = genai.Client(
                api_key=self._api_key, vertexai=False, http_options=self._options(False)
            )
        return self._aclient

    async def aclose(self) -> None:
        client, self._aclient = self._aclient, None
        if client is not None:
            await client.aio.aclose()

    # ------------------------------------------------------------------ files
    def upload(self, path: Path, name: str) -> str:
        tmp = path.with_name(f".{path.stem}.gemini.tmp")  # one name per chunk: no leftovers pile up
        try:
            try:
                _, size = translate_chunk(path, tmp)
            except TranslationError as exc:
                raise ConfigError(f"provider gemini: {exc}") from None
            if size > MAX_FILE_BYTES:
                raise RemoteError(
                    f"upload chunk file {name}",
                    "invalid_request",
                    413,
                    "INVALID_ARGUMENT",
                    f"the Gemini input file is {size} bytes; the Files API takes up to "
                    f"{MAX_FILE_BYTES}: use a smaller --batch-size",
                )
            cfg = types.UploadFileConfig(mime_type="application/jsonl", display_name=name)
            f = self._call(
                self._client.files.upload,
                file=str(tmp),
                config=cfg,
                what=f"upload chunk file {name}",
                attempts=1,  # a retry could create a second file: reconcile first
            )
        finally:
            tmp.unlink(missing_ok=True)
        return str(f.name)

    def find_uploads(self, name: str) -> list[RemoteFile]:
        files = self._call(
            lambda: list(self._client.files.list(config={"page_size": PAGE_SIZE})),
            what="list files",
        )
        found = [
            RemoteFile(str(f.name), name, _time(f.create_time) or 0.0)
            for f in files
            if f.display_name == name
        ]
        return sorted(found, key=lambda f: f.created_at)

    def delete_file(self, file_id: str) -> None:
        self._call(
            self._client.files.delete, name=file_id, what=f"delete file {file_id}", attempts=2
        )

    def delete_batch(self, batch_id: str) -> None:
        self._call(
            self._client.batches.delete,
            name=f"batches/{batch_id}",
            what=f"delete batch {batch_id}",
            attempts=2,
        )

    def download(self, ref: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        self._call(
            self._client.files.download, file=ref, destination=str(tmp), what=f"download {ref}"
        )
        os.replace(tmp, dest)
        return dest

    def read_results(
        self, path: Path, chunk_path: Path, endpoint: str
    ) -> Iterator[RowOutcome | BadLine]:
        return read_result_file(path, self.rules)

    # ------------------------------------------------------------------ jobs
    def create(self, req: SubmitRequest) -> RemoteBatch:
        if not req.file_ref:
            raise ConfigError(f"chunk {req.display_name}: nothing uploaded to create a job from")
        job = self._call(
            self._client.batches.create,
            model=req.model,
            src=req.file_ref,
            config={"display_name": req.display_name},
            what=f"create batch for chunk {req.display_name}",
            attempts=1,  # a retried create could start a second, paid job: reconcile first
        )
        return self._log.job(job)

    def find_batch(self, req: SubmitRequest, since: float) -> RemoteBatch | None:
        """The job named after this chunk (newest first; stops once older than the run)."""

        def scan() -> types.BatchJob | None:
            for job in self._client.batches.list(config={"page_size": PAGE_SIZE}):
                if job.display_name == req.display_name:
                    return job
                created = _time(job.create_time)
                if created is not None and created < since:
                    return None
            return None

        job = self._call(scan, what="list batches")
        return self._log.job(job) if job is not None else None

    def retrieve(self, batch_id: str) -> RemoteBatch:
        job = self._call(
            self._client.batches.get, name=f"batches/{batch_id}", what=f"poll batch {batch_id}"
        )
        return self._log.job(job)

    def poll(self, batch_ids: list[str]) -> dict[str, RemoteBatch]:
        """With several jobs in flight, one list page (newest first) answers for them all
        (`listpoll`: a job it does not show, or shows unchanged for a while, is retrieved)."""
        return self._poller.poll(batch_ids)

    def _list_page(self, n: int) -> list[RemoteBatch]:
        def page() -> list[types.BatchJob]:
            return list(self._client.batches.list(config={"page_size": PAGE_SIZE}).page)

        return [
            self._log.job(job) for job in self._call(page, what=f"poll {n} batches (one list page)")
        ]

    def cancel(self, batch_id: str) -> None:
        b = self.retrieve(batch_id)
        if b.state in (
            BatchState.COMPLETED,
            BatchState.FAILED,
            BatchState.EXPIRED,
            BatchState.CANCELLED,
        ):
            raise RemoteError(
                f"cancel batch {batch_id}",
                "invalid_request",
                409,
                "FAILED_PRECONDITION",
                f"the job already ended ({b.raw_status})",
            )
        self._call(
            self._client.batches.cancel, name=f"batches/{batch_id}", what=f"cancel batch {batch_id}"
        )

    # ------------------------------------------------------------------ online
    async def call_online(self, endpoint: str, body: dict[str, Any], custom_id: str) -> RowOutcome:
        """One `generateContent` call, answered in batchops' terms."""
        if endpoint != CHAT:
            raise ConfigError(f"provider gemini answers {CHAT} requests only, not {endpoint}")
        try:
            contents, config = to_sdk_call(to_request(body))
        except TranslationError as exc:
            raise ConfigError(f"provider gemini: row {custom_id}: {exc}") from None
        config.http_options = types.HttpOptions(headers={CUSTOM_ID_HEADER: header_value(custom_id)})
        try:
            resp = await self.aclient.aio.models.generate_content(
                model=str(body.get("model")), contents=contents, config=config
            )
        except CALL_ERRORS as exc:
            raise self._error(exc, "online request") from None
        return response_to_outcome(custom_id, resp.model_dump(mode="json", exclude_none=True))

    # ------------------------------------------------------------------ calls and errors
    def _call(
        self, fn: Callable[..., T], *args: Any, what: str, attempts: int = CALL_ATTEMPTS, **kw: Any
    ) -> T:
        """One SDK call through the shared retry loop (backends/retrying.py)."""
        return call_with_retries(
            fn,
            *args,
            what=what,
            attempts=attempts,
            policy=self.policy,
            sdk_errors=CALL_ERRORS,
            to_error=self._error,
            **kw,
        )

    def _error(self, exc: BaseException, what: str) -> RemoteError:
        if isinstance(exc, genai_errors.APIError):
            status = exc.code if isinstance(exc.code, int) else None
            body = exc.details if isinstance(exc.details, dict) else {}
            err = body.get("error", body) if isinstance(body, dict) else {}
            word, kinds, message, retry_after = describe_error(err)
            word = word or (exc.status if isinstance(exc.status, str) else None)
            message = message or str(exc.message or "")
        else:  # the connection failed: no answer at all
            status, word, kinds, retry_after = None, None, "", None
            message = "request timed out" if isinstance(exc, TIMEOUTS) else "connection error"
        cls, scope = classify(
            status,
            word,
            kinds,
            message,
            provider="gemini",
            rules=self.rules,
            fallback="timeout" if isinstance(exc, TIMEOUTS) else fallback_class(status),
        )
        if cls in ("api_error", "timeout") and (status is None or status >= 500):
            scope = Scope.ENDPOINT  # the server is down or failing: every model it serves
        return RemoteError.of_call(
            exc,
            what,
            cls,
            status,
            word,
            message,
            retry_after,
            scope,
            where=self.url or "generativelanguage.googleapis.com",
            scrub=self.scrub,
        )
