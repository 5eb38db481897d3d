"""batchops.results: every line kind of batch-api-facts §4 (+ §6 usage) → RowOutcome."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from batchops.errors import BatchopsError, InputError
from batchops.records import Usage
from batchops.results import (
    ResultFormatError,
    parse_file,
    parse_line,
    parse_lines,
    parse_sync_response,
)

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"


def line(custom_id: str, *, status: int | None = 200, body: Any = None, error: Any = None) -> str:
    response = (
        None if status is None else {"status_code": status, "request_id": "req_1", "body": body}
    )
    return json.dumps(
        {"id": "batch_req_1", "custom_id": custom_id, "response": response, "error": error},
        ensure_ascii=False,
    )


def chat_body(
    content: str | None = "Hello.",
    finish: str = "stop",
    usage: dict | None = None,
    **message: Any,
) -> dict:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1711652795,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage
        if usage is not None
        else {"prompt_tokens": 22, "completion_tokens": 2, "total_tokens": 24},
        "system_fingerprint": "fp_123",
    }


# --------------------------------------------------------------------------- successes


def test_chat_success_guide_line_verbatim() -> None:
    raw = (
        '{"id": "batch_req_123", "custom_id": "request-2", "response": {"status_code": 200, '
        '"request_id": "req_123", "body": {"id": "chatcmpl-123", "object": "chat.completion", '
        '"created": 1711652795, "model": "gpt-3.5-turbo-0125", "choices": [{"index": 0, '
        '"message": {"role": "assistant", "content": "Hello."}, "logprobs": null, '
        '"finish_reason": "stop"}], "usage": {"prompt_tokens": 22, "completion_tokens": 2, '
        '"total_tokens": 24}, "system_fingerprint": "fp_123"}}, "error": null}'
    )
    for raw_line in (raw, raw.encode()):
        o = parse_line(raw_line)
        assert o.ok and o.custom_id == "request-2"
        assert o.response == "Hello."
        assert o.finish_reason == "stop"
        assert o.model == "gpt-3.5-turbo-0125"
        assert o.usage == Usage(prompt_tokens=22, cached_tokens=0, completion_tokens=2)
        assert o.status_code == 200 and o.request_id == "req_123"
        assert o.error_class is None and not o.retryable


def test_chat_usage_cached_and_reasoning_tokens() -> None:
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0},
    }
    o = parse_line(line("r1", body=chat_body("答え 😀", usage=usage)))
    assert o.ok and o.response == "答え 😀"
    assert o.usage == Usage(
        prompt_tokens=1200, cached_tokens=1024, completion_tokens=300, reasoning_tokens=256
    )


def test_responses_success_concatenates_output_text_and_normalises_usage() -> None:
    body = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "o4-mini-2025-04-16",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "Part one, ", "annotations": []},
                    {"type": "output_text", "text": "part two.", "annotations": []},
                ],
            },
        ],
        "incomplete_details": None,
        "error": None,
        "usage": {
            "input_tokens": 500,
            "input_tokens_details": {"cached_tokens": 128},
            "output_tokens": 90,
            "output_tokens_details": {"reasoning_tokens": 64},
            "total_tokens": 590,
        },
    }
    o = parse_line(line("r", body=body), RESPONSES)
    assert o.ok and o.response == "Part one, part two."
    assert o.finish_reason == "stop"
    assert o.model == "o4-mini-2025-04-16"
    assert o.usage == Usage(
        prompt_tokens=500, cached_tokens=128, completion_tokens=90, reasoning_tokens=64
    )


def test_responses_incomplete_max_output_tokens_is_billed_format_error() -> None:
    body = {
        "object": "response",
        "status": "incomplete",
        "model": "o4-mini",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [{"type": "reasoning", "summary": []}],
        "usage": {"input_tokens": 10, "output_tokens": 100},
    }
    o = parse_line(line("r", body=body), RESPONSES)
    assert not o.ok and o.error_class == "format_error" and o.retryable
    assert o.finish_reason == "length"
    assert o.usage == Usage(prompt_tokens=10, completion_tokens=100)


def test_embeddings_success_compact_vector() -> None:
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 1e-07]}
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    o = parse_line(line("e1", body=body), EMBEDDINGS)
    assert o.ok and o.response == "[0.0023064255,-0.009327292,1e-7]"
    assert json.loads(o.response) == [0.0023064255, -0.009327292, 1e-07]  # exact round trip
    assert o.usage == Usage(prompt_tokens=8)
    assert o.model == "text-embedding-3-small" and o.finish_reason is None


def test_embeddings_several_inputs_in_index_order() -> None:
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 1, "embedding": [2.0]},
            {"object": "embedding", "index": 0, "embedding": [1.0]},
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    assert parse_line(line("e", body=body), EMBEDDINGS).response == "[[1.0],[2.0]]"


def test_azure_style_endpoint_names_are_accepted() -> None:
    assert parse_line(line("a", body=chat_body()), "/chat/completions").ok
    with pytest.raises(InputError):
        parse_line(line("a", body=chat_body()), "/v1/moderations")


# --------------------------------------------------------------------------- answers that are not answers


@pytest.mark.parametrize("finish", ["length", "content_filter"])
def test_truncated_answer_keeps_text_and_usage(finish: str) -> None:
    o = parse_line(line("r", body=chat_body("Half an answ", finish=finish)))
    assert not o.ok
    assert o.error_class == "format_error" and o.retryable
    assert o.error_code == finish and finish in (o.error_message or "")
    assert o.response == "Half an answ"  # billed: keep it
    assert o.usage == Usage(prompt_tokens=22, completion_tokens=2)
    assert o.model == "gpt-4o-mini-2024-07-18" and o.finish_reason == finish


def test_reasoning_model_length_with_empty_content() -> None:
    usage = {
        "prompt_tokens": 50,
        "completion_tokens": 1000,
        "completion_tokens_details": {"reasoning_tokens": 1000},
    }
    o = parse_line(line("r", body=chat_body("", finish="length", usage=usage)))
    assert not o.ok and o.error_class == "format_error"
    assert o.response == "" and o.usage is not None and o.usage.reasoning_tokens == 1000


def test_empty_string_content_is_an_answer() -> None:
    o = parse_line(line("r", body=chat_body("")))
    assert o.ok and o.response == ""


def test_null_content_without_refusal_is_format_error() -> None:
    o = parse_line(line("r", body=chat_body(None)))
    assert not o.ok and o.error_class == "format_error" and o.error_code == "empty_response"
    assert o.usage == Usage(prompt_tokens=22, completion_tokens=2)


def test_refusal_is_format_error_with_text_kept() -> None:
    o = parse_line(line("r", body=chat_body(None, refusal="I can't help with that.")))
    assert not o.ok and o.error_class == "format_error" and o.error_code == "refusal"
    assert o.response == "I can't help with that." and o.retryable


def test_tool_calls_become_json_response() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    o = parse_line(line("r", body=chat_body(None, finish="tool_calls", tool_calls=calls)))
    assert o.ok and json.loads(o.response or "") == calls


def test_status_200_without_choices_is_row_level_format_error() -> None:
    body = chat_body()
    body["choices"] = []
    o = parse_line(line("r", body=body))
    assert not o.ok and o.error_class == "format_error" and o.usage is not None


# --------------------------------------------------------------------------- HTTP failures


def _http_error_line(status: int, code: str | None, type_: str, message: str) -> str:
    err = {"message": message, "type": type_, "param": None, "code": code}
    return line("req-5", status=status, body={"error": err})


def test_http_400_body_error_is_permanent() -> None:
    raw = (
        '{"id": "batch_req_456", "custom_id": "request-5", "response": {"status_code": 400, '
        '"request_id": "req_789", "body": {"error": {"message": "max_tokens is too large: 1000000.", '
        '"type": "invalid_request_error", "param": "max_tokens", "code": null}}}, "error": null}'
    )
    o = parse_line(raw)
    assert not o.ok and o.custom_id == "request-5"
    assert o.status_code == 400 and o.error_code is None
    assert o.error_message == "max_tokens is too large: 1000000."
    assert o.error_class == "invalid_request" and not o.retryable
    assert o.response is None and o.usage is None and o.request_id == "req_789"


def test_http_429_insufficient_quota() -> None:
    o = parse_line(
        _http_error_line(429, "insufficient_quota", "insufficient_quota", "You exceeded your quota")
    )
    assert o.status_code == 429 and o.error_code == "insufficient_quota"
    assert o.error_class == "quota" and o.retryable  # on another model/key


def test_http_429_rate_limit() -> None:
    o = parse_line(_http_error_line(429, "rate_limit_exceeded", "tokens", "Rate limit reached"))
    assert o.error_class == "rate_limit" and o.retryable


def test_http_500_server_error() -> None:
    o = parse_line(_http_error_line(500, "server_error", "server_error", "The server had an error"))
    assert o.status_code == 500 and o.error_class == "api_error" and o.retryable


def test_http_404_model_not_found() -> None:
    o = parse_line(
        _http_error_line(
            404, "model_not_found", "invalid_request_error", "The model does not exist"
        )
    )
    assert o.error_class == "model_not_found"


def test_vllm_style_failure_body_null_error_at_top_level() -> None:
    o = parse_line(
        line("v", status=400, body=None, error="Request must not be sent in stream mode")
    )
    assert not o.ok and o.status_code == 400 and o.error_class == "invalid_request"
    assert o.error_message == "Request must not be sent in stream mode"


# --------------------------------------------------------------------------- non-HTTP failures


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("batch_expired", "expired"),
        ("batch_cancelled", "cancelled"),
        ("request_timeout", "timeout"),
    ],
)
def test_non_http_failures(code: str, cls: str) -> None:
    msg = "This request could not be executed before the completion window expired."
    o = parse_line(line("request-3", status=None, error={"code": code, "message": msg}))
    assert not o.ok and o.custom_id == "request-3"
    assert o.status_code is None and o.error_code == code and o.error_message == msg
    assert o.error_class == cls and o.retryable
    assert o.response is None and o.usage is None


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "raw",
    [
        '{"custom_id": "x", "response": {"status_code": 200',  # truncated download
        "[1, 2]",
        '{"response": null, "error": {"code": "batch_expired"}}',  # no custom_id
        '{"custom_id": "x", "response": null, "error": null}',
        '{"custom_id": "x", "response": "oops", "error": null}',
        '{"custom_id": "x", "response": {"body": {}}, "error": null}',  # no status_code
        b"\xff\xfe not utf-8",
    ],
)
def test_malformed_line_raises_result_format_error(raw: str | bytes) -> None:
    with pytest.raises(ResultFormatError) as exc:
        parse_line(raw, line_no=7)
    assert isinstance(exc.value, BatchopsError)
    assert exc.value.line_no == 7 and "line 7" in str(exc.value)


def test_parse_file_names_path_and_line(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_text(line("a", body=chat_body()) + "\n\n" + '{"custom_id": "b", "respo\n')
    it = parse_file(p)
    assert next(it).custom_id == "a"
    with pytest.raises(ResultFormatError) as exc:
        next(it)
    assert exc.value.line_no == 3 and str(p) in str(exc.value)


# --------------------------------------------------------------------------- files, order


def test_parse_lines_skips_blank_lines_crlf_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "mixed.jsonl"
    lines = [
        "\ufeff" + line("a", body=chat_body("A")),
        "",
        line(
            "b", status=500, body={"error": {"message": "x", "type": "server_error", "code": None}}
        ),
        "   ",
        line("c", status=None, error={"code": "batch_expired", "message": "expired"}),
    ]
    p.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    got = {o.custom_id: o for o in parse_file(p)}
    assert list(got) == ["a", "b", "c"]
    assert got["a"].response == "A" and got["b"].error_class == "api_error"
    assert got["c"].error_class == "expired"


def test_empty_file_yields_nothing(tmp_path: Path) -> None:
    p = tmp_path / "errors.jsonl"
    p.write_bytes(b"")
    assert list(parse_file(p)) == []


def test_order_independence() -> None:
    lines = [line(f"row-{i}", body=chat_body(f"answer {i}")) for i in range(200)]
    lines += [
        line(f"row-{i}", status=None, error={"code": "batch_expired", "message": "e"})
        for i in range(200, 260)
    ]
    base = {o.custom_id: o for o in parse_lines(lines)}
    rng = random.Random(7)
    for _ in range(3):
        shuffled = lines[:]
        rng.shuffle(shuffled)
        assert {o.custom_id: o for o in parse_lines(shuffled)} == base
    assert base["row-17"].response == "answer 17" and not base["row-230"].ok


def test_parse_lines_is_lazy() -> None:
    def gen():
        yield line("a", body=chat_body())
        raise AssertionError("read past the first outcome")

    assert next(parse_lines(gen())).custom_id == "a"


# --------------------------------------------------------------------------- synchronous bodies


def test_sync_response_matches_batch_success_line() -> None:
    body = chat_body(
        "Hi",
        usage={
            "prompt_tokens": 5,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    )
    sync = parse_sync_response(body, CHAT, custom_id="row-1")
    batch = parse_line(line("row-1", body=body))
    batch.request_id = None
    assert sync == batch


def test_sync_response_accepts_sdk_models_and_error_bodies() -> None:
    class FakeModel:
        def model_dump(self) -> dict:
            return chat_body("from sdk")

    assert parse_sync_response(FakeModel(), CHAT, "k").response == "from sdk"
    # openai SDK: APIStatusError.body is the inner error object
    err = {
        "message": "quota",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
    o = parse_sync_response(err, CHAT, "k", status_code=429)
    assert not o.ok and o.error_class == "quota" and o.status_code == 429
    with pytest.raises(TypeError):
        parse_sync_response(chat_body())
