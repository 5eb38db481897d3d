"""Parse batch output/error files (and synchronous responses) into per-request `RowOutcome`s.

One line of an output or error file is one of three kinds (batch-api-facts §4):

* success: ``response.status_code == 200`` with the endpoint's normal body;
* HTTP failure: ``response.status_code != 200``, the error inside ``response.body.error``
  (vLLM writes ``body: null`` and puts the error, a string or an object, in the top-level
  ``error`` instead);
* non-HTTP failure: ``response: null`` and ``error{code, message}`` (``batch_expired``,
  ``batch_cancelled``, ``request_timeout``).

Decisions (the engine and merge rely on them):

* The *envelope* must be well formed (a JSON object with a ``custom_id`` and either a
  ``response`` object or an ``error``); otherwise `ResultFormatError` is raised, because a file
  we cannot read is a bug or a corrupt download, not a row's fault. A 200 whose *body* has an
  unexpected shape is a row-level ``format_error`` outcome instead, so one odd answer never
  stops a file of 50,000.
* ``finish_reason`` ``length`` / ``content_filter`` (responses API: ``incomplete`` with reason
  ``max_output_tokens`` / ``content_filter``) → ``ok=False``, ``error_class="format_error"``,
  but the text, model and usage are kept: those tokens were billed.
* A refusal (chat ``message.refusal``, responses ``refusal`` content part) → ``ok=False``,
  ``format_error``, ``error_code="refusal"``, refusal text kept as ``response``. It is not the
  answer the row asked for; like ``content_filter`` a re-sample may succeed, and the user's
  ``retry_on`` (re-applied by the engine) can exclude ``format_error`` to stop paying for it.
* Empty content: ``content == ""`` is the model's answer (an empty extraction is legitimate)
  → ``ok=True``, ``response=""``. ``content`` null with no refusal and no tool calls (or a
  responses body without any message output) → ``format_error``, code ``empty_response``.
* Tool / function calls without text → ``ok=True``, ``response`` = the calls as compact JSON.
* ``finish_reason`` uses the chat vocabulary for every endpoint (responses ``completed`` →
  ``stop``, ``max_output_tokens`` → ``length``) so callers need one rule; embeddings: None.
* ``retryable = is_retryable(error_class)`` (default policy); the engine re-applies the
  user's ``retry_on``. Classification itself lives only in `batchops.classify`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from sys import intern
from typing import Annotated, Any

import msgspec
import orjson

from batchops.classify import classify_http, classify_line_error
from batchops.errors import BatchopsError, InputError
from batchops.policy import row_retryable as is_retryable
from batchops.records import AnswerRun, AnswerTuple, BadLine, ErrorClass, RowOutcome, Usage

__all__ = [
    "ResultFormatError",
    "parse_file",
    "parse_line",
    "parse_lines",
    "parse_sync_response",
]

DEFAULT_ENDPOINT = "/v1/chat/completions"

_CHAT, _RESPONSES, _EMBEDDINGS, _COMPLETIONS = "chat", "responses", "embeddings", "completions"

# Chat finish reasons that mean "billed, but not the complete answer the row asked for".
_TRUNCATING = {
    "length": "answer truncated at the token limit",
    "content_filter": "answer cut by the content filter",
}
# Responses API `incomplete_details.reason` → chat finish_reason.
_INCOMPLETE_REASON = {"max_output_tokens": "length", "content_filter": "content_filter"}


class ResultFormatError(BatchopsError):
    """A line of an output/error file that is not a batch result line at all."""

    def __init__(self, line_no: int | None, reason: str, path: Path | str | None = None) -> None:
        self.line_no = line_no
        self.reason = reason
        self.path = path
        where = f"{path}: " if path is not None else ""
        where += f"line {line_no}: " if line_no is not None else ""
        super().__init__(f"{where}malformed batch result line: {reason}")


# --------------------------------------------------------------------------- public API


def parse_line(
    line: bytes | str,
    endpoint: str = DEFAULT_ENDPOINT,
    *,
    line_no: int | None = None,
) -> RowOutcome:
    """One output- or error-file line → `RowOutcome`. Raises `ResultFormatError` if malformed."""
    return _parse(line, _endpoint_kind(endpoint), line_no)


def _parse(line: bytes | str, kind: str, line_no: int | None) -> RowOutcome:
    if kind == _CHAT:
        typed = _typed_chat(line)
        if typed is not None:
            return typed
    return _parse_json(line, kind, line_no)


def _parse_json(line: bytes | str, kind: str, line_no: int | None) -> RowOutcome:
    """The line through orjson: the general path, which `_typed_chat` must equal."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ResultFormatError(line_no, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ResultFormatError(line_no, f"expected a JSON object, got {type(obj).__name__}")

    custom_id = obj.get("custom_id")
    if isinstance(custom_id, int) and not isinstance(custom_id, bool):
        custom_id = str(custom_id)  # lenient: some compatible servers echo numeric ids
    if not isinstance(custom_id, str) or not custom_id:
        raise ResultFormatError(line_no, "missing or non-string custom_id")

    response = obj.get("response")
    error = obj.get("error")
    if response is not None:
        if not isinstance(response, dict):
            raise ResultFormatError(
                line_no, f"custom_id {custom_id!r}: 'response' is not an object"
            )
        status = response.get("status_code")
        if not isinstance(status, int) or isinstance(status, bool):
            raise ResultFormatError(
                line_no, f"custom_id {custom_id!r}: missing integer status_code"
            )
        request_id = response.get("request_id")
        request_id = request_id if isinstance(request_id, str) else None
        body = response.get("body")
        if status == 200:
            return _success(custom_id, body, kind, request_id)
        return _http_failure(custom_id, status, body, error, request_id)
    if error is not None:
        return _line_failure(custom_id, error)
    raise ResultFormatError(line_no, f"custom_id {custom_id!r}: neither 'response' nor 'error'")


def parse_lines(
    lines: Iterable[bytes | str], endpoint: str = DEFAULT_ENDPOINT
) -> Iterator[RowOutcome]:
    """Parse lines lazily; blank lines are skipped; line numbers in errors are 1-based."""
    kind = _endpoint_kind(endpoint)  # fail on a bad endpoint before the first line, not at it
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line_no == 1:
            line = _strip_bom(line)
        yield _parse(line, kind, line_no)


def parse_file(path: Path | str, endpoint: str = DEFAULT_ENDPOINT) -> Iterator[RowOutcome]:
    """Stream one downloaded output or error file. A 0-byte file (Azure) yields nothing."""
    path = Path(path)
    with path.open("rb") as fh:
        try:
            yield from parse_lines(fh, endpoint)
        except ResultFormatError as exc:
            raise ResultFormatError(exc.line_no, exc.reason, path) from None


def read_file(path: Path | str, endpoint: str = DEFAULT_ENDPOINT) -> Iterator[RowOutcome | BadLine]:
    """Stream a downloaded result file for collection: a malformed line is yielded as a
    `BadLine` (named in the run's log) instead of stopping the file, so one broken line never
    keeps the other answers from being recorded. Chat files are read in blocks of whole lines
    (`READ_BLOCK` bytes at most, plus one line), see `_read_blocks`."""
    for item in read_runs(path, endpoint):
        if isinstance(item, AnswerRun):
            yield from item.outcomes()
        else:
            yield item


def read_runs(
    path: Path | str, endpoint: str = DEFAULT_ENDPOINT
) -> Iterator[RowOutcome | BadLine | AnswerRun]:
    """`read_file`, but consecutive lines of the common chat shape come as one `AnswerRun`
    (plain tuples, no objects a line): what collection records on its fast path."""
    path = Path(path)
    kind = _endpoint_kind(endpoint)
    with path.open("rb") as fh:
        if kind == _CHAT:
            yield from _read_blocks(fh, path)
        else:
            yield from _read_lines(fh, path, kind, 1, strip_bom=True)


def _read_lines(
    lines: Iterable[bytes], path: Path, kind: str, first_no: int, *, strip_bom: bool
) -> Iterator[RowOutcome | BadLine]:
    """Lines numbered from `first_no`, each parsed on its own (a malformed one: a BadLine)."""
    for line_no, line in enumerate(lines, start=first_no):
        # A line that opens an object is not blank: no stripped copy of it (~0.5 µs).
        if not line.startswith(b"{") and not line.strip():
            continue
        text: bytes | str = _strip_bom(line) if strip_bom and line_no == 1 else line
        try:
            yield _parse(text, kind, line_no)
        except ResultFormatError as exc:
            yield BadLine(path, line_no, exc.reason)


# Bytes of a chat result file decoded at once: one msgspec call for a block's ~80 lines saves
# splitting the file into line objects (2.65 against 3.2 µs a line of 800 bytes, measured).
# Small on purpose: 4 MiB blocks were slower than line by line (4.0 µs: every fresh large
# buffer is page-faulted in).
READ_BLOCK = 64 << 10


def _read_blocks(fh: Any, path: Path) -> Iterator[RowOutcome | BadLine | AnswerRun]:
    """A chat file by blocks of whole lines. A block whose every line is the common chat
    shape is decoded in one call (`_typed_block`); any other block line by line, exactly as
    `_read_lines` does (so a malformed line is named by its number as before)."""
    line_no, first = 1, True
    held: list[bytes] = []  # the start of the next block (a line not ended yet)
    while True:
        data = fh.read(READ_BLOCK)
        if data:
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no end of line yet: a line longer than a block, read on
                held.append(data)
                continue
            held.append(data[:cut])
            block = b"".join(held) if len(held) > 1 else held[0]
            held = [data[cut:]] if cut < len(data) else []
        else:
            block, held = b"".join(held), []  # the last line, without its end of line
        if first:
            block, first = block.removeprefix(b"\xef\xbb\xbf"), False
        if block:
            n_lines = block.count(b"\n") + (not block.endswith(b"\n"))
            outcomes = _typed_block(block, n_lines, path, line_no)
            if outcomes is None:
                lines = io.BytesIO(block)  # lines as the file gives them, ends of line kept
                yield from _read_lines(lines, path, _CHAT, line_no, strip_bom=False)
            else:
                yield from outcomes
            line_no += n_lines
        if not data:
            return


def _typed_block(
    block: bytes, n_lines: int, path: Path, first_no: int
) -> list[RowOutcome | BadLine | AnswerRun] | None:
    """A block's lines through msgspec at once; None (line by line instead) when any line
    does not decode into the typed structs or the block holds a blank line (line numbers
    would not match). Lines of the common shape with usage go into `AnswerRun`s (one per
    stretch of them: file order is kept); a line that decodes but is not the common shape (a
    failure, a cut answer) goes the general way on its own, as `_parse` sends it."""
    try:
        lines = _LINE.decode_lines(block)
    except msgspec.MsgspecError:
        return None
    if len(lines) != n_lines:
        return None
    out: list[RowOutcome | BadLine | AnswerRun] = []
    run: list[AnswerTuple] = []
    raw: list[bytes] | None = None
    for i, ln in enumerate(lines):
        # The conditions of `_typed_outcome`, inlined (a call a line costs ~0.1 µs), plus usage.
        r = ln.response
        if r is not None and r.status_code == 200 and ln.custom_id:
            body = r.body
            if body is not None and body.choices and body.usage is not None:
                choice = body.choices[0]
                message, finish = choice.message, choice.finish_reason
                if (
                    message is not None
                    and finish is not None
                    and finish not in _TRUNCATING
                    and message.content is not None
                    and message.refusal is None
                ):
                    u = body.usage
                    pd, cd = u.prompt_tokens_details, u.completion_tokens_details
                    model = body.model
                    run.append(
                        (
                            ln.custom_id,
                            message.content,
                            intern(finish),
                            intern(model) if model is not None else None,
                            u.prompt_tokens,
                            pd.cached_tokens if pd is not None else 0,
                            u.completion_tokens,
                            cd.reasoning_tokens if cd is not None else 0,
                            r.request_id,
                        )
                    )
                    continue
        if run:
            out.append(AnswerRun(run))
            run = []
        o = _typed_outcome(ln)
        if o is not None:
            out.append(o)
            continue
        if raw is None:
            raw = io.BytesIO(block).readlines()
        try:
            out.append(_parse_json(raw[i], _CHAT, first_no + i))
        except ResultFormatError as exc:
            out.append(BadLine(path, first_no + i, exc.reason))
    if run:
        out.append(AnswerRun(run))
    return out


def parse_sync_response(
    body: Mapping[str, Any] | Any,
    endpoint: str = DEFAULT_ENDPOINT,
    custom_id: str | None = None,
    *,
    status_code: int = 200,
    request_id: str | None = None,
) -> RowOutcome:
    """A synchronous response body → the same outcome a batch line with that body gives.

    `body` may be a dict or an openai SDK model (anything with ``model_dump()``). With a
    ``status_code`` other than 200, `body` is the error body (``{"error": {...}}`` or the
    SDK's ``e.body``, which is already the inner error object) and the outcome is an HTTP
    failure classified exactly like an error-file line.
    """
    if custom_id is None:
        raise TypeError("parse_sync_response() needs custom_id")
    if hasattr(body, "model_dump"):
        body = body.model_dump()
    kind = _endpoint_kind(endpoint)
    if status_code == 200:
        return _success(custom_id, body, kind, request_id)
    if isinstance(body, dict) and "error" not in body and ("message" in body or "code" in body):
        body = {"error": body}  # openai SDK exceptions expose the inner error object as .body
    return _http_failure(custom_id, status_code, body, None, request_id)


# --------------------------------------------------------------------------- endpoints


def _endpoint_kind(endpoint: str) -> str:
    # Accept "/v1/chat/completions", Azure's "/chat/completions", "/openai/v1/…", no slash.
    ep = endpoint.strip().rstrip("/").lower()
    if ep.endswith("chat/completions"):
        return _CHAT
    if ep.endswith("responses"):
        return _RESPONSES
    if ep.endswith("embeddings"):
        return _EMBEDDINGS
    if ep.endswith("completions"):
        return _COMPLETIONS
    raise InputError(f"unsupported endpoint for result parsing: {endpoint!r}")


def _strip_bom(line: bytes | str) -> bytes | str:
    if isinstance(line, bytes):
        return line.removeprefix(b"\xef\xbb\xbf")
    return line.removeprefix("\ufeff")


# --------------------------------------------------------------------------- successes


# The common chat line as typed structs: msgspec decodes only these fields (the rest is
# checked as JSON and skipped, never built) in ~1.6 µs where orjson's whole tree and a walk
# of it took ~4.3. A line of any other shape fails to decode into them (wrong type, null
# where a value is needed, a count beyond 64 bits) and goes the general way.
# `gc=False`: they hold only strings, numbers and each other (no cycles), and untracked
# structs decode ~10% faster.
_Count = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Message(msgspec.Struct, gc=False):
    content: str | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct, gc=False):
    message: _Message | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: _Count = 0


class _CompletionDetails(msgspec.Struct, gc=False):
    reasoning_tokens: _Count = 0


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: _Count = 0
    completion_tokens: _Count = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Body(msgspec.Struct, gc=False):
    model: str | None = None
    choices: list[_Choice] | None = None
    usage: _Usage | None = None


class _Response(msgspec.Struct, gc=False):
    status_code: int
    request_id: str | None = None
    body: _Body | None = None


class _Line(msgspec.Struct, gc=False):
    custom_id: str
    response: _Response | None = None


_LINE = msgspec.json.Decoder(_Line)


def _typed_chat(line: bytes | str) -> RowOutcome | None:
    """The common chat line's outcome (a 200 whose first choice has string content, a plain
    finish reason and no refusal), built exactly as the general path builds it, straight
    from the line's bytes; None: the general path decides (it then names a malformed line).
    One difference from orjson: a number literal beyond a double's range in a field
    batchops does not read is accepted here (orjson rejects it)."""
    try:
        ln = _LINE.decode(line)
    except msgspec.MsgspecError:
        return None
    return _typed_outcome(ln)


def _typed_outcome(ln: _Line) -> RowOutcome | None:
    """`_typed_chat` of a decoded line."""
    r = ln.response
    if r is None or r.status_code != 200 or r.body is None or not ln.custom_id:
        return None
    body = r.body
    if not body.choices:
        return None
    choice = body.choices[0]
    message, finish = choice.message, choice.finish_reason
    if message is None or finish is None or finish in _TRUNCATING:
        return None
    if message.content is None or message.refusal is not None:
        return None
    u = body.usage
    usage = None
    if u is not None:
        pd, cd = u.prompt_tokens_details, u.completion_tokens_details
        usage = Usage(
            u.prompt_tokens,
            pd.cached_tokens if pd is not None else 0,
            u.completion_tokens,
            cd.reasoning_tokens if cd is not None else 0,
        )
    # Every field by position (keywords cost ~0.3 µs more a line): custom_id, ok, response,
    # finish_reason (one shared string, not one per held outcome), usage, model, status_code,
    # error_code, error_message, error_class, retryable, request_id.
    return RowOutcome(
        ln.custom_id,
        True,
        message.content,
        intern(finish),
        usage,
        intern(body.model) if body.model is not None else None,
        200,
        None,
        None,
        None,
        False,
        r.request_id,
    )


def _success(custom_id: str, body: Any, kind: str, request_id: str | None) -> RowOutcome:
    if not isinstance(body, dict):
        return _format_failure(
            custom_id, "empty_response", "status 200 without a response body", request_id=request_id
        )
    model = body.get("model") if isinstance(body.get("model"), str) else None
    if kind == _CHAT:
        return _chat_success(custom_id, body, model, request_id)
    if kind == _RESPONSES:
        return _responses_success(custom_id, body, model, request_id)
    if kind == _EMBEDDINGS:
        return _embeddings_success(custom_id, body, model, request_id)
    return _completions_success(custom_id, body, model, request_id)


def _first_choice(body: dict[str, Any]) -> dict[str, Any] | None:
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    return choice if isinstance(choice, dict) else None


def _no_choices(
    custom_id: str, usage: Usage | None, model: str | None, request_id: str | None
) -> RowOutcome:
    return _format_failure(
        custom_id,
        "empty_response",
        "response has no choices",
        usage=usage,
        model=model,
        request_id=request_id,
    )


def _chat_success(
    custom_id: str, body: dict[str, Any], model: str | None, request_id: str | None
) -> RowOutcome:
    usage = _chat_usage(body.get("usage"))
    choice = _first_choice(body)
    if choice is None:
        return _no_choices(custom_id, usage, model, request_id)
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    raw_message = choice.get("message")
    message: dict[str, Any] = raw_message if isinstance(raw_message, dict) else {}
    content = message.get("content")
    if isinstance(content, list):
        # Some compatible servers return content parts even in answers.
        content = "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    text: str | None = content if isinstance(content, str) else None
    refusal = message.get("refusal")
    tool_calls = message.get("tool_calls") or message.get("function_call")
    if text is None and tool_calls:
        text = orjson.dumps(tool_calls).decode()
    return _finish(custom_id, text, refusal, finish, usage, model, request_id)


def _completions_success(
    custom_id: str, body: dict[str, Any], model: str | None, request_id: str | None
) -> RowOutcome:
    usage = _chat_usage(body.get("usage"))
    choice = _first_choice(body)
    if choice is None:
        return _no_choices(custom_id, usage, model, request_id)
    finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
    text = choice.get("text") if isinstance(choice.get("text"), str) else None
    return _finish(custom_id, text, None, finish, usage, model, request_id)


def _responses_success(
    custom_id: str, body: dict[str, Any], model: str | None, request_id: str | None
) -> RowOutcome:
    usage = _responses_usage(body.get("usage"))
    status = body.get("status")
    if status == "failed" or (
        status not in ("incomplete",) and isinstance(body.get("error"), dict)
    ):
        raw_err = body.get("error")
        err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
        code = _str_or_none(err.get("code"))
        cls = classify_http(None, code, _str_or_none(err.get("type")))
        return RowOutcome(
            custom_id=custom_id,
            ok=False,
            usage=usage,
            model=model,
            status_code=200,
            error_code=code,
            error_message=_str_or_none(err.get("message")) or "response status failed",
            error_class=cls,
            retryable=is_retryable(cls),
            request_id=request_id,
        )

    texts: list[str] = []
    refusals: list[str] = []
    calls: list[Any] = []
    saw_message = False
    output = body.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            saw_message = True
            for part in item.get("content") or ():
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                    refusals.append(part["refusal"])
        elif item.get("type") in ("function_call", "custom_tool_call"):
            calls.append(item)
    text: str | None = "".join(texts) if texts or (saw_message and not refusals) else None
    if text is None and isinstance(body.get("output_text"), str):
        text = body["output_text"]  # some compatible servers flatten it like the SDK property
    if text is None and calls:
        text = orjson.dumps(calls).decode()

    if status == "incomplete":
        details = body.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        finish = _INCOMPLETE_REASON.get(reason or "", "length")
    else:
        finish = "stop"
    return _finish(custom_id, text, "".join(refusals) or None, finish, usage, model, request_id)


def _embeddings_success(
    custom_id: str, body: dict[str, Any], model: str | None, request_id: str | None
) -> RowOutcome:
    usage = _embeddings_usage(body.get("usage"))
    data = body.get("data")
    items = (
        [d for d in data if isinstance(d, dict) and "embedding" in d]
        if isinstance(data, list)
        else []
    )
    if not items:
        return _format_failure(
            custom_id,
            "empty_response",
            "embeddings response has no data",
            usage=usage,
            model=model,
            request_id=request_id,
        )
    items.sort(key=lambda d: d["index"] if isinstance(d.get("index"), int) else 0)
    vectors = [d["embedding"] for d in items]
    # One input per row is the normal case: a flat vector; several inputs: a list of vectors.
    # base64-encoded embeddings (encoding_format="base64") are strings and are kept as such.
    value = vectors[0] if len(vectors) == 1 else vectors
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return RowOutcome(
        custom_id=custom_id,
        ok=True,
        response=text,
        usage=usage,
        model=model,
        status_code=200,
        request_id=request_id,
    )


def _finish(
    custom_id: str,
    text: str | None,
    refusal: Any,
    finish: str | None,
    usage: Usage | None,
    model: str | None,
    request_id: str | None,
) -> RowOutcome:
    """Common tail of chat/responses/completions: truncation, refusal, empty, success."""
    if finish in _TRUNCATING:
        return _format_failure(
            custom_id,
            finish,
            f"{_TRUNCATING[finish]} (finish_reason={finish})",
            response=text if text is not None else (refusal if isinstance(refusal, str) else None),
            finish_reason=finish,
            usage=usage,
            model=model,
            request_id=request_id,
        )
    if isinstance(refusal, str) and refusal and not text:
        return _format_failure(
            custom_id,
            "refusal",
            f"model refused: {refusal}",
            response=refusal,
            finish_reason=finish,
            usage=usage,
            model=model,
            request_id=request_id,
        )
    if text is None:
        return _format_failure(
            custom_id,
            "empty_response",
            "answer has no content",
            finish_reason=finish,
            usage=usage,
            model=model,
            request_id=request_id,
        )
    return RowOutcome(
        custom_id=custom_id,
        ok=True,
        response=text,
        finish_reason=finish,
        usage=usage,
        model=model,
        status_code=200,
        request_id=request_id,
    )


def _format_failure(
    custom_id: str,
    code: str,
    message: str,
    *,
    response: str | None = None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    model: str | None = None,
    request_id: str | None = None,
) -> RowOutcome:
    cls: ErrorClass = "format_error"
    return RowOutcome(
        custom_id=custom_id,
        ok=False,
        response=response,
        finish_reason=finish_reason,
        usage=usage,
        model=model,
        status_code=200,
        error_code=code,
        error_message=message,
        error_class=cls,
        retryable=is_retryable(cls),
        request_id=request_id,
    )


# --------------------------------------------------------------------------- failures


def _http_failure(
    custom_id: str, status: int, body: Any, line_error: Any, request_id: str | None
) -> RowOutcome:
    err: Any = body.get("error") if isinstance(body, dict) else None
    if err is None:
        err = line_error  # vLLM: body null, error string or ErrorResponse object at top level
    code = type_ = message = None
    if isinstance(err, dict):
        code = _str_or_none(err.get("code"))
        type_ = _str_or_none(err.get("type"))
        message = _str_or_none(err.get("message"))
    elif isinstance(err, str):
        message = err
    cls = classify_http(status, code, type_)
    model = (
        body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
    )
    return RowOutcome(
        custom_id=custom_id,
        ok=False,
        model=model,
        status_code=status,
        error_code=code,
        error_message=message or f"HTTP {status}",
        error_class=cls,
        retryable=is_retryable(cls),
        request_id=request_id,
    )


def _line_failure(custom_id: str, error: Any) -> RowOutcome:
    if isinstance(error, dict):
        code = _str_or_none(error.get("code"))
        message = _str_or_none(error.get("message"))
    else:
        code, message = None, str(error)
    cls = classify_line_error(code)
    return RowOutcome(
        custom_id=custom_id,
        ok=False,
        error_code=code,
        error_message=message or code or "request failed",
        error_class=cls,
        retryable=is_retryable(cls),
    )


# --------------------------------------------------------------------------- usage


def _int(d: Any, key: str) -> int:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _usage(u: dict[str, Any], prompt: str, completion: str) -> Usage:
    """Usage from one endpoint's field names: `<prompt>_tokens` (+ `_details.cached_tokens`) and
    `<completion>_tokens` (+ `_details.reasoning_tokens`)."""
    return Usage(
        prompt_tokens=_int(u, f"{prompt}_tokens"),
        cached_tokens=_int(u.get(f"{prompt}_tokens_details"), "cached_tokens"),
        completion_tokens=_int(u, f"{completion}_tokens"),
        reasoning_tokens=_int(u.get(f"{completion}_tokens_details"), "reasoning_tokens"),
    )


def _chat_usage(u: Any) -> Usage | None:
    return _usage(u, "prompt", "completion") if isinstance(u, dict) else None


def _responses_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    if "input_tokens" not in u and "prompt_tokens" in u:
        return _chat_usage(u)  # compatible servers that answer /v1/responses with chat usage
    return _usage(u, "input", "output")


def _embeddings_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    return Usage(prompt_tokens=_int(u, "prompt_tokens"))


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None
