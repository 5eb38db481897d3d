"""Checks of `POST /v1/batches` parameters (synchronous 400s) and of batch input files.

`validate_input` is a pure function over the file's lines (read from disk as it goes) so it
can run in a worker thread while the event loop keeps answering.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchops.emulator import errors as E
from batchops.emulator.answers import ImageError, endpoint_kind, prompt_tokens
from batchops.emulator.errors import ApiError

BATCH_ENDPOINTS = ["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
# The classic Azure API names endpoints without the /v1 prefix.
AZURE_BATCH_ENDPOINTS = ["/chat/completions", "/embeddings", "/responses"]
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MIN_EXPIRY, MAX_EXPIRY = 3600, 2_592_000
MAX_EMBEDDING_INPUTS = 50_000
# More errors than this are not listed (a broken 50,000-line file would make huge batch objects).
MAX_REPORTED_ERRORS = 100


@dataclass(slots=True)
class CreateParams:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    output_expires_seconds: int | None


def validate_create(body: Any, *, azure: bool = False) -> CreateParams:
    """The parameters of a batch creation, or the ApiError the real API would answer."""
    if not isinstance(body, dict):
        raise E.invalid_type("body", "an object", body)
    for name in ("input_file_id", "endpoint", "completion_window"):
        if body.get(name) is None:
            raise E.missing_param(name)
        if not isinstance(body[name], str):
            raise E.invalid_type(name, "a string", body[name])
    allowed = BATCH_ENDPOINTS + (AZURE_BATCH_ENDPOINTS if azure else [])
    if body["endpoint"] not in allowed:
        raise E.invalid_value("endpoint", body["endpoint"], BATCH_ENDPOINTS)
    if body["completion_window"] != "24h":
        raise E.invalid_value("completion_window", body["completion_window"], ["24h"])
    metadata = validate_metadata(body.get("metadata"))
    expiry = None
    if body.get("output_expires_after") is not None:
        expiry = validate_expiry(body["output_expires_after"], "output_expires_after")
    return CreateParams(
        body["input_file_id"], body["endpoint"], body["completion_window"], metadata, expiry
    )


def validate_metadata(md: Any) -> dict[str, str] | None:
    if md is None:
        return None
    if not isinstance(md, dict):
        raise E.invalid_type("metadata", "an object", md)
    if len(md) > MAX_METADATA_KEYS:
        raise ApiError(
            400,
            f"Invalid 'metadata': too many properties. Expected an object with at most "
            f"{MAX_METADATA_KEYS} properties, but got an object with {len(md)} properties instead.",
            param="metadata",
            code="object_above_max_size",
        )
    for k, v in md.items():
        if len(k) > MAX_METADATA_KEY:
            raise ApiError(
                400,
                f"Invalid 'metadata': key too long. Expected a key with maximum length "
                f"{MAX_METADATA_KEY}, but got a key with length {len(k)} instead.",
                param="metadata",
                code="string_above_max_length",
            )
        if not isinstance(v, str):
            raise E.invalid_type(f"metadata.{k}", "a string", v)
        if len(v) > MAX_METADATA_VALUE:
            raise ApiError(
                400,
                f"Invalid 'metadata.{k}': string too long. Expected a string with maximum length "
                f"{MAX_METADATA_VALUE}, but got a string with length {len(v)} instead.",
                param=f"metadata.{k}",
                code="string_above_max_length",
            )
    return dict(md)


def validate_expiry(value: Any, param: str) -> int:
    """Seconds of an `{anchor: "created_at", seconds}` expiry policy."""
    if not isinstance(value, dict):
        raise E.invalid_type(param, "an object", value)
    if value.get("anchor") != "created_at":
        raise E.invalid_value(f"{param}.anchor", value.get("anchor"), ["created_at"])
    secs = value.get("seconds")
    if isinstance(secs, str) and secs.isdigit():
        secs = int(secs)
    if not isinstance(secs, int) or isinstance(secs, bool):
        raise E.invalid_type(f"{param}.seconds", "an integer", secs)
    if secs < MIN_EXPIRY or secs > MAX_EXPIRY:
        low = secs < MIN_EXPIRY
        raise ApiError(
            400,
            f"Invalid '{param}.seconds': integer {'below minimum' if low else 'above maximum'} "
            f"value. Expected a value {'>=' if low else '<='} "
            f"{MIN_EXPIRY if low else MAX_EXPIRY}, but got {secs} instead.",
            param=f"{param}.seconds",
            code="integer_below_min_value" if low else "integer_above_max_value",
        )
    return secs


# --------------------------------------------------------------------------- input files


@dataclass(slots=True)
class BatchRequest:
    """One valid input line: what the runner executes."""

    custom_id: str
    body: dict[str, Any]
    prompt_tokens: int | None  # None: counted when executed (no enqueued-token limit to check)
    image_error: bool = False


@dataclass(slots=True)
class InputCheck:
    """Outcome of validating an input file: counts only (the runner reads the requests from
    the file again as it executes them), or the requests of another dialect's batch."""

    requests: list[BatchRequest] = field(default_factory=list)
    count: int = 0  # valid requests
    tokens: array[int] | None = None  # prompt tokens of each (-1: an unsupported image)
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    prompt_tokens: int = 0


def _err(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


_REQUIRED_INPUT = {"chat": ("messages", "Messages"), "responses": ("input", "Input")}
_STREAM_NAMES = {"chat": "Chat Completions", "embeddings": "Embeddings", "responses": "Responses"}


def first_model(lines: bytes | Iterable[bytes], max_lines: int = 1000) -> str | None:
    """The model of the first line that names one (cheap: used on `POST /v1/batches`)."""
    if isinstance(lines, bytes):
        lines = lines.split(b"\n")
    for n, raw in enumerate(lines):
        if n >= max_lines:
            break
        if raw.strip():
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            body = obj.get("body") if isinstance(obj, dict) else None
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                return body["model"]
    return None


def validate_input(
    lines: bytes | Iterable[bytes],
    endpoint: str,
    *,
    known_models: set[str] | None,
    max_requests: int,
    need_tokens: bool = True,
) -> InputCheck:
    """Every line checked; all offending lines reported at once (capped), as the real API does.

    Prompt tokens are counted only with `need_tokens` (an enqueued-token limit is configured):
    counting is the costly part and is otherwise done as each request executes.
    `lines`: the file's lines (an open binary file reads them from disk) or its whole bytes.
    """
    if isinstance(lines, bytes):
        lines = lines.split(b"\n")
    kind = endpoint_kind(endpoint)
    out = InputCheck()
    seen: set[str] = set()
    n_lines = 0
    n_embedding_inputs = 0
    errors = out.errors
    tokens_of = array("l") if need_tokens else None

    def add(e: dict[str, Any]) -> None:
        if len(errors) < MAX_REPORTED_ERRORS:
            errors.append(e)

    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines (e.g. the final newline) are skipped
        n_lines += 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            add(
                _err("invalid_json_line", "This line is not parseable as valid JSON.", None, lineno)
            )
            continue
        missing = next((k for k in ("custom_id", "method", "url", "body") if k not in obj), None)
        if missing:
            add(
                _err(
                    "missing_required_parameter",
                    f"Missing required parameter: '{missing}'.",
                    missing,
                    lineno,
                )
            )
            continue
        cid, body = obj["custom_id"], obj["body"]
        problem = _line_problem(obj, endpoint, kind, known_models, lineno)
        if problem:
            add(problem)
            continue
        if cid in seen:
            add(
                _err(
                    "duplicate_custom_id",
                    f"The custom_id '{cid}' is used by more than one request. custom_id values "
                    "must be unique within a batch.",
                    "custom_id",
                    lineno,
                )
            )
            continue
        seen.add(cid)
        model = body["model"]
        if out.model is None:
            out.model = model
        elif model != out.model:
            add(
                _err(
                    "mismatched_model",
                    f"The model '{model}' does not match the model '{out.model}' of the other "
                    "requests. A batch input file may only contain requests for one model.",
                    "body.model",
                    lineno,
                )
            )
            continue
        image_error = False
        tokens: int | None = None
        if need_tokens:
            try:
                tokens = prompt_tokens(body, endpoint)
            except ImageError:
                tokens, image_error = 0, True
        if kind == "embeddings":
            inp = body.get("input")
            n_embedding_inputs += len(inp) if isinstance(inp, list) else 1
        out.count += 1
        if tokens_of is not None:
            tokens_of.append(-1 if image_error else tokens or 0)
        out.prompt_tokens += tokens or 0

    if n_lines == 0:
        add(
            _err(
                "empty_file",
                "The input file is empty. Please ensure that the batch contains at least one "
                "request.",
                None,
                None,
            )
        )
    elif n_lines > max_requests:
        add(
            _err(
                "too_many_requests",
                f"The input file contains {n_lines:,} requests, more than the limit of "
                f"{max_requests:,} requests per batch.",
                None,
                None,
            )
        )
    if n_embedding_inputs > MAX_EMBEDDING_INPUTS:
        add(
            _err(
                "too_many_requests",
                f"The input file contains {n_embedding_inputs:,} embedding inputs, more than the "
                f"limit of {MAX_EMBEDDING_INPUTS:,} per batch.",
                None,
                None,
            )
        )
    errors.sort(key=lambda e: (e["line"] is None, e["line"] or 0))
    out.tokens = None if errors else tokens_of
    return out


def parse_request(raw: bytes, tokens: int | None) -> BatchRequest:
    """A line validation accepted, parsed again to run it (`tokens` from validation: -1 is an
    unsupported image)."""
    obj = orjson.loads(raw)
    if tokens is not None and tokens < 0:
        return BatchRequest(obj["custom_id"], obj["body"], 0, True)
    return BatchRequest(obj["custom_id"], obj["body"], tokens)


def _line_problem(
    obj: dict[str, Any],
    endpoint: str,
    kind: str,
    known_models: set[str] | None,
    lineno: int,
) -> dict[str, Any] | None:
    """The first problem of a parsed line with all four fields present, or None."""
    if not isinstance(obj["custom_id"], str):
        return _err(
            "invalid_request",
            f"Invalid type for 'custom_id': expected a string, but got "
            f"{E.json_type_name(obj['custom_id'])} instead.",
            "custom_id",
            lineno,
        )
    if obj["method"] != "POST":
        return _err(
            "invalid_request",
            "The method provided for this request is not supported. Only 'POST' is supported.",
            "method",
            lineno,
        )
    if obj["url"] != endpoint:
        return _err(
            "invalid_url",
            "The URL provided for this request does not match the batch endpoint.",
            "url",
            lineno,
        )
    body = obj["body"]
    if not isinstance(body, dict):
        return _err(
            "invalid_request",
            f"Invalid type for 'body': expected an object, but got {E.json_type_name(body)} "
            "instead.",
            "body",
            lineno,
        )
    if body.get("stream") is True:
        return _err(
            "streaming_unsupported",
            f"{_STREAM_NAMES[kind]}: Streaming is not supported in the Batch API.",
            "body.stream",
            lineno,
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _err("invalid_request", "Model parameter is required.", "body.model", lineno)
    if known_models is not None and model not in known_models:
        return _err(
            "model_not_found",
            f"The provided model '{model}' is not supported by the Batch API.",
            "body.model",
            lineno,
        )
    if kind in _REQUIRED_INPUT:
        key, label = _REQUIRED_INPUT[kind]
        if body.get(key) in (None, "", []):
            return _err("invalid_request", f"{label} parameter is required.", f"body.{key}", lineno)
    elif body.get("input") in (None, "", []):
        return _err("invalid_request", "Input parameter is required.", "body.input", lineno)
    return None
