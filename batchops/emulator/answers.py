"""Deterministic model answers and usage, so tests can predict every byte of a response.

* Chat / Responses text: ``"<model> says: <first 80 chars of the last user text>"`` followed,
  when the last user message carries images, by `` [1 image: 2048 bytes]`` (``remote`` for URL
  images). Structured outputs (``json_schema``) answer a compact JSON object valid against the
  schema (values derived from model + user text); ``json_object`` answers ``{"answer": text}``.
* ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` cut the answer
  (finish_reason ``length``, Responses status ``incomplete``).
* prompt tokens = 3 + Σ per message (4 + text tokens + image tokens); embeddings: text tokens
  of each input (token-id lists count their length).
* Embeddings: unit vectors from a hash of (model, input, dimensions), 8 dimensions by default.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from batchops.emulator.ids import hex_id
from batchops.emulator.schema_fill import fill, violating
from batchops.emulator.tokens import (
    REMOTE_IMAGE_SIZE,
    ImageError,
    count_tokens,
    cut_to_tokens,
    decode_data_url,
)
from batchops.pricing import image_tokens as model_image_tokens

__all__ = [
    "Answer",
    "ImageError",
    "SchemaError",
    "count_tokens",
    "endpoint_kind",
    "expected_answer",
    "expected_embedding",
    "make_answer",
    "prompt_tokens",
    "success_body",
]

Kind = Literal["chat", "embeddings", "responses"]
SNIPPET_CHARS = 80
EMBEDDING_DIMENSIONS = 8
PER_MESSAGE_TOKENS = 4
REPLY_PRIMING_TOKENS = 3


@functools.lru_cache(maxsize=64)
def endpoint_kind(endpoint: str) -> Kind:
    """'/v1/chat/completions', '/chat/completions' … → 'chat' (also embeddings, responses)."""
    e = endpoint.rstrip("/")
    if e.endswith("/chat/completions"):
        return "chat"
    if e.endswith("/embeddings"):
        return "embeddings"
    if e.endswith("/responses"):
        return "responses"
    raise ValueError(f"unsupported endpoint {endpoint!r}")


# --------------------------------------------------------------------------- prompt parsing


@dataclass(slots=True)
class _Image:
    url: str
    detail: str
    size: tuple[int | None, tuple[int, int]] | None = None

    def measure(self) -> tuple[int | None, tuple[int, int]]:
        """(bytes or None for a remote URL, (width, height)); decoded once."""
        if self.size is None:
            if self.url.startswith("data:"):
                self.size = decode_data_url(self.url)
            elif self.url.startswith(("http://", "https://")):
                self.size = None, REMOTE_IMAGE_SIZE
            else:
                raise ImageError("image_url must be an http(s) URL or a base64 data URL")
        return self.size


@dataclass(slots=True)
class _Message:
    role: str
    texts: list[str]
    images: list[_Image]


def _parts(content: Any) -> tuple[list[str], list[_Image]]:
    """Text pieces and images of one message's content (chat or Responses style)."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    texts: list[str] = []
    images: list[_Image] = []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            ptype = part.get("type")
            if ptype in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif ptype == "image_url":
                iu = part.get("image_url")
                if isinstance(iu, str):
                    images.append(_Image(iu, "auto"))
                elif isinstance(iu, dict) and isinstance(iu.get("url"), str):
                    images.append(_Image(iu["url"], str(iu.get("detail") or "auto")))
            elif ptype == "input_image" and isinstance(part.get("image_url"), str):
                images.append(_Image(part["image_url"], str(part.get("detail") or "auto")))
    return texts, images


def _messages(body: dict[str, Any], kind: Kind) -> list[_Message]:
    out: list[_Message] = []
    if kind == "chat":
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                texts, images = _parts(m.get("content"))
                out.append(_Message(str(m.get("role", "user")), texts, images))
        return out
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append(_Message("system", [instructions], []))
    inp = body.get("input")
    if isinstance(inp, str):
        out.append(_Message("user", [inp], []))
    elif isinstance(inp, list):
        for item in inp:
            if isinstance(item, dict) and ("role" in item or item.get("type") == "message"):
                texts, images = _parts(item.get("content"))
                out.append(_Message(str(item.get("role", "user")), texts, images))
    return out


def _last_user(messages: list[_Message]) -> _Message | None:
    for m in reversed(messages):
        if m.role == "user":
            return m
    return messages[-1] if messages else None


def _embedding_inputs(body: dict[str, Any]) -> list[str | list[int]]:
    inp = body.get("input")
    if isinstance(inp, str):
        return [inp]
    if isinstance(inp, list):
        if inp and all(isinstance(x, int) for x in inp):
            return [inp]
        return [x for x in inp if isinstance(x, str | list)]
    return []


def prompt_tokens(body: dict[str, Any], endpoint: str) -> int:
    """Prompt (input) tokens of a request body; raises ImageError for an undecodable image."""
    kind = endpoint_kind(endpoint)
    if kind == "embeddings":
        return sum(
            count_tokens(x) if isinstance(x, str) else len(x) for x in _embedding_inputs(body)
        )
    return _message_tokens(_messages(body, kind), str(body.get("model") or ""))


def _message_tokens(messages: list[_Message], model: str | None = None) -> int:
    total = REPLY_PRIMING_TOKENS
    for m in messages:
        total += PER_MESSAGE_TOKENS
        for t in m.texts:
            total += count_tokens(t)
        for img in m.images:
            _, (w, h) = img.measure()
            # Billed like the real API: each model has its own image formula (gpt-4o-mini bills
            # ~33x gpt-4o's tokens per image), the same table batchops prices with.
            total += model_image_tokens(w, h, img.detail, model)
    return total


# --------------------------------------------------------------------------- answers


class SchemaError(ValueError):
    """A response_format schema too broken to answer (the API answers 400)."""


@dataclass(slots=True)
class Answer:
    """The assistant text of one request, as the emulator will return it."""

    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int


def _structured_format(body: dict[str, Any], kind: Kind) -> dict[str, Any] | None:
    """The requested JSON output format (json_schema / json_object), if any."""
    fmt: Any = body.get("response_format") if kind == "chat" else (body.get("text") or {})
    if kind == "responses":
        fmt = fmt.get("format") if isinstance(fmt, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        return fmt
    return None


def _schema_of(fmt: dict[str, Any]) -> dict[str, Any] | None:
    if fmt.get("type") != "json_schema":
        return None
    inner = fmt.get("json_schema")
    holder: dict[str, Any] = inner if isinstance(inner, dict) else fmt
    schema = holder.get("schema")
    return schema if isinstance(schema, dict) else {}


def _plain_text(model: str, messages: list[_Message]) -> tuple[str, str, int]:
    """(readable answer, full last-user text, the answer's tokens)."""
    last = _last_user(messages)
    text = "\n".join(last.texts) if last else ""
    head = f"{model} says:"
    snippet = text[:SNIPPET_CHARS]
    answer = f"{head} {snippet}".rstrip()
    # Whitespace separates tokens, so the parts can be counted apart: the head is cached and a
    # short text's snippet is the text itself, already counted (and cached) for the prompt.
    tokens = count_tokens(head) + count_tokens(snippet)
    if last and last.images:
        notes = []
        for img in last.images:
            n_bytes, _ = img.measure()
            notes.append("remote" if n_bytes is None else f"{n_bytes} bytes")
        label = "image" if len(notes) == 1 else "images"
        note = f"[{len(notes)} {label}: {', '.join(notes)}]"
        answer += " " + note
        tokens += count_tokens(note)
    return answer, text, tokens


def _max_tokens(body: dict[str, Any], kind: Kind) -> int | None:
    keys = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_output_tokens",)
    for k in keys:
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def make_answer(
    model: str,
    body: dict[str, Any],
    endpoint: str,
    *,
    truncate: bool = False,
    invalid_json: bool = False,
    messages: list[_Message] | None = None,
) -> Answer:
    """The answer to a chat/responses request; `truncate`/`invalid_json` inject faults."""
    kind = endpoint_kind(endpoint)
    if messages is None:
        messages = _messages(body, kind)
    text, user_text, tokens = _plain_text(model, messages)
    fmt = _structured_format(body, kind)
    if fmt is not None:
        schema = _schema_of(fmt)
        if invalid_json:
            value: Any = violating(schema if schema is not None else {"type": "object"})
        elif schema is None:
            value = {"answer": text}
        else:
            try:
                value = fill(schema, f"{model}\0{user_text}", user_text)
            except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
                raise SchemaError("the emulator cannot build a value for this schema") from None
        text = orjson.dumps(value).decode()
        tokens = count_tokens(text)
    finish: Literal["stop", "length"] = "stop"
    limit = _max_tokens(body, kind)
    if truncate:
        limit = min(limit, max(1, tokens // 2)) if limit is not None else max(1, tokens // 2)
    if limit is not None and (tokens > limit or truncate):
        text = cut_to_tokens(text, limit)
        tokens = count_tokens(text)
        finish = "length"
    return Answer(text, finish, tokens)


def expected_embedding(
    model: str, text: str | list[int], dimensions: int | None = None
) -> list[float]:
    """The embedding vector of one input: a unit vector from a hash of (model, input, dims)."""
    dims = dimensions or EMBEDDING_DIMENSIONS
    key = text if isinstance(text, str) else ",".join(map(str, text))
    raw = hashlib.shake_128(f"{model}\0{dims}\0{key}".encode()).digest(2 * dims)
    vals = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dims}H", raw)]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [round(v / norm, 6) for v in vals]


def expected_answer(
    model: str, body: dict[str, Any], endpoint: str = "/v1/chat/completions"
) -> str:
    """The exact answer text the emulator gives for this request (no injected faults).

    Chat / Responses: the assistant text (after any max-tokens cut). Embeddings: the JSON of
    the vector (a single string input) or of the list of vectors (a list input).
    """
    if endpoint_kind(endpoint) == "embeddings":
        dims = body.get("dimensions")
        vecs = [expected_embedding(model, x, dims) for x in _embedding_inputs(body)]
        single = isinstance(body.get("input"), str) or (
            isinstance(body.get("input"), list) and all(isinstance(x, int) for x in body["input"])
        )
        return orjson.dumps(vecs[0] if single and vecs else vecs).decode()
    return make_answer(model, body, endpoint).text


# --------------------------------------------------------------------------- response bodies


_rid = hex_id


def success_body(
    model: str,
    body: dict[str, Any],
    endpoint: str,
    *,
    n_prompt: int | None = None,
    cached_fraction: float = 0.0,
    truncate: bool = False,
    invalid_json: bool = False,
) -> tuple[dict[str, Any], int, int]:
    """(response body, prompt tokens, completion tokens) of a successful request.

    `n_prompt` None: counted here. Raises ImageError for an undecodable image.
    """
    kind = endpoint_kind(endpoint)
    now = int(time.time())
    if kind == "embeddings":
        if n_prompt is None:
            n_prompt = prompt_tokens(body, endpoint)
        return _embeddings_body(model, body, n_prompt), n_prompt, 0
    messages = _messages(body, kind)
    if n_prompt is None:
        n_prompt = _message_tokens(messages, model)
    cached = math.floor(n_prompt * cached_fraction)
    ans = make_answer(
        model, body, endpoint, truncate=truncate, invalid_json=invalid_json, messages=messages
    )
    if kind == "chat":
        n_raw = body.get("n")
        n = n_raw if isinstance(n_raw, int) and n_raw > 0 else 1  # n choices, all alike
        completion = ans.completion_tokens * n
        out = {
            "id": _rid("chatcmpl-"),
            "object": "chat.completion",
            "created": now,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": ans.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": ans.finish_reason,
                }
                for i in range(n)
            ],
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": completion,
                "total_tokens": n_prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_emulator",
        }
        return out, n_prompt, completion
    return _responses_body(model, body, ans, n_prompt, cached, now), n_prompt, ans.completion_tokens


def _responses_body(
    model: str, body: dict[str, Any], ans: Answer, n_prompt: int, cached: int, now: int
) -> dict[str, Any]:
    incomplete = ans.finish_reason == "length"
    text_cfg = (
        body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
    )
    return {
        "id": _rid("resp_"),
        "object": "response",
        "created_at": now,
        "status": "incomplete" if incomplete else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": [
            {
                "type": "message",
                "id": _rid("msg_"),
                "status": "incomplete" if incomplete else "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": ans.text, "annotations": [], "logprobs": []}
                ],
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": body.get("temperature", 1.0),
        "text": text_cfg,
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": {
            "input_tokens": n_prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": ans.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_prompt + ans.completion_tokens,
        },
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def _embeddings_body(model: str, body: dict[str, Any], n_prompt: int) -> dict[str, Any]:
    dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else None
    as_b64 = body.get("encoding_format") == "base64"
    data = []
    for i, x in enumerate(_embedding_inputs(body)):
        vec = expected_embedding(model, x, dims)
        emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt},
    }
