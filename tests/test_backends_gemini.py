"""The Gemini backend's translations on their own: chat bodies → GenerateContentRequest, result
lines → RowOutcome, Google errors → (class, scope), operations → RemoteBatch."""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchops.emulator.answers import expected_answer
from batchops.emulator.gemini_dialect import QUOTA_MESSAGE, to_chat
from batchops.emulator.testing import data_url, png_bytes
from batchops.policy import Rule, Scope, classify
from batchops.records import BadLine, RowOutcome
from batchops.spec import ModelEntry, RetryPolicy
from batchops.states import BatchState

pytest.importorskip("google.genai")
from batchops.backends import gemini as G  # noqa: E402

MODEL = "gemini-2.5-flash"
PNG = png_bytes(4, 3)


def chat(*content: Any, system: str | None = None, **extra: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for c in content:
        messages.append({"role": "user", "content": c})
    return {"model": MODEL, "messages": messages, **extra}


def image_body() -> dict[str, Any]:
    return chat(
        [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": data_url(PNG), "detail": "auto"}},
        ],
        system="be brief",
        max_tokens=50,
        temperature=0.2,
    )


# --------------------------------------------------------------------------- requests


def test_text_request_with_system_and_generation_config():
    req = G.to_request(
        chat("Describe 007", system="be brief", max_tokens=10, temperature=0, top_p=0.5, seed=3)
    )
    assert req == {
        "contents": [{"role": "user", "parts": [{"text": "Describe 007"}]}],
        "system_instruction": {"parts": [{"text": "be brief"}]},
        "generation_config": {"max_output_tokens": 10, "temperature": 0, "top_p": 0.5, "seed": 3},
    }


def test_image_data_url_becomes_inline_data_unchanged():
    req = G.to_request(image_body())
    parts = req["contents"][0]["parts"]
    assert parts[0] == {"text": "what is this?"}
    assert parts[1] == {
        "inline_data": {"mime_type": "image/png", "data": base64.b64encode(PNG).decode()}
    }


@pytest.mark.parametrize(
    "body",
    [
        chat("plain text"),
        chat("", system="empty prompt"),
        chat('Says "hi", then\nbye 🎉 {braces}', max_tokens=7),
        image_body(),
    ],
)
def test_the_emulator_answers_the_translation_as_it_answers_the_chat_body(body):
    # The dialect runs Gemini requests as chat bodies: same rows, same answers and tokens.
    assert expected_answer(MODEL, to_chat(MODEL, G.to_request(body))) == expected_answer(
        MODEL, body
    )


def test_assistant_turns_become_model_turns_and_stop_sequences():
    body = {
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ],
        "stop": "END",
        "max_completion_tokens": 5,
    }
    req = G.to_request(body)
    assert [c["role"] for c in req["contents"]] == ["user", "model", "user"]
    assert req["system_instruction"] == {"parts": [{"text": "rules"}]}
    assert req["generation_config"] == {"max_output_tokens": 5, "stop_sequences": ["END"]}


def test_json_schema_response_format_becomes_response_json_schema():
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string"}},
        "required": ["label"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    gc = G.to_request(chat("x", response_format=rf))["generation_config"]
    assert gc == {"response_mime_type": "application/json", "response_json_schema": schema}
    gc = G.to_request(chat("x", response_format={"type": "json_object"}))["generation_config"]
    assert gc == {"response_mime_type": "application/json"}


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"model": MODEL, "input": "responses API"}, "chat requests only"),
        (chat([{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]), "base64"),
        (chat([{"type": "input_audio", "input_audio": {}}]), "input_audio"),
    ],
)
def test_what_gemini_cannot_say_is_a_translation_error(body, needle):
    with pytest.raises(G.TranslationError, match=needle):
        G.to_request(body)


def test_translate_chunk_keys_lines_by_custom_id(tmp_path: Path):
    chunk = tmp_path / "c.jsonl"
    ids = ["007", "茶碗 tea bowl", 'a "quoted" id']
    chunk.write_text(
        "".join(
            json.dumps(
                {"custom_id": i, "method": "POST", "url": "/v1/chat/completions", "body": chat(i)}
            )
            + "\n"
            for i in ids
        ),
        encoding="utf-8",
    )
    out = tmp_path / "g.jsonl"
    n, size = G.translate_chunk(chunk, out)
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert n == 3 and size == out.stat().st_size
    assert [x["key"] for x in lines] == ids
    assert lines[1]["request"]["contents"][0]["parts"] == [{"text": "茶碗 tea bowl"}]


def test_translate_chunk_names_the_bad_line(tmp_path: Path):
    chunk = tmp_path / "c.jsonl"
    chunk.write_text('{"custom_id": "a", "body": {"messages": []}}\nnot json\n', encoding="utf-8")
    with pytest.raises(G.TranslationError, match="c.jsonl line 2"):
        G.translate_chunk(chunk, tmp_path / "g.jsonl")


def test_sdk_call_decodes_inline_data_and_carries_the_system_instruction():
    contents, config = G.to_sdk_call(G.to_request(image_body()))
    assert contents[0].parts[1].inline_data.data == PNG
    assert contents[0].parts[1].inline_data.mime_type == "image/png"
    assert config.system_instruction.parts[0].text == "be brief"
    assert config.max_output_tokens == 50 and config.temperature == 0.2


# --------------------------------------------------------------------------- results


def response(text: str = "answer", finish: str = "STOP", **usage: int) -> dict[str, Any]:
    return {
        "candidates": [
            {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": finish}
        ],
        "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 5, **usage},
        "modelVersion": MODEL,
        "responseId": "r1",
    }


def test_response_to_outcome_text_usage_and_cached_tokens():
    o = G.response_to_outcome("k", response(cachedContentTokenCount=4))
    assert o.ok and o.custom_id == "k" and o.response == "answer" and o.model == MODEL
    assert o.finish_reason == "stop" and o.request_id == "r1"
    assert (o.usage.prompt_tokens, o.usage.cached_tokens, o.usage.completion_tokens) == (12, 4, 5)


def test_thoughts_are_billed_as_output_but_are_not_the_answer():
    r = response(thoughtsTokenCount=7)
    r["candidates"][0]["content"]["parts"].insert(0, {"text": "thinking…", "thought": True})
    o = G.response_to_outcome("k", r)
    assert o.response == "answer"
    assert o.usage.completion_tokens == 12 and o.usage.reasoning_tokens == 7


def test_truncated_and_blocked_answers_are_format_errors_that_keep_what_was_billed():
    o = G.response_to_outcome("k", response("half an ans", finish="MAX_TOKENS"))
    assert not o.ok and o.error_class == "format_error" and o.error_code == "length"
    assert o.response == "half an ans" and o.usage.completion_tokens == 5
    blocked = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 9},
    }
    o = G.response_to_outcome("k", blocked)
    assert not o.ok and o.error_code == "content_filter" and o.usage.prompt_tokens == 9


def test_the_sdks_snake_case_dump_reads_the_same():
    from google.genai import types

    sdk = types.GenerateContentResponse.model_validate(response(cachedContentTokenCount=4))
    o = G.response_to_outcome("k", sdk.model_dump(mode="json", exclude_none=True))
    assert o.ok and o.response == "answer" and o.usage.cached_tokens == 4 and o.model == MODEL


def test_result_file_is_joined_by_key_whatever_the_order(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    lines = [
        {"key": "b", "response": response("B")},
        {"key": "a", "error": {"code": 400, "message": "bad image", "status": "INVALID_ARGUMENT"}},
        "not json",
        {"response": response("no key")},
        {"key": "c", "response": response("C")},
    ]
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )
    items = list(G.read_result_file(path))
    outcomes = {o.custom_id: o for o in items if isinstance(o, RowOutcome)}
    assert outcomes["b"].response == "B" and outcomes["c"].response == "C"
    assert outcomes["a"].error_class == "invalid_request" and not outcomes["a"].retryable
    assert outcomes["a"].status_code == 400 and outcomes["a"].error_code == "INVALID_ARGUMENT"
    bad = [x for x in items if isinstance(x, BadLine)]
    assert [(b.line_no, b.reason) for b in bad] == [(3, "not JSON"), (4, "no key")]


# --------------------------------------------------------------------------- errors


def quota_error(quota_id: str | None, *, retry: str | None = "30s") -> dict[str, Any]:
    details: list[dict[str, Any]] = []
    if quota_id:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaId": quota_id}],
            }
        )
    if retry:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry})
    return {
        "code": 429,
        "message": QUOTA_MESSAGE,
        "status": "RESOURCE_EXHAUSTED",
        "details": details,
    }


def gemini_class(err: dict[str, Any], rules: list[Rule] | None = None) -> tuple[str, Scope]:
    word, kinds, message, _ = G.describe_error(err)
    status = err.get("code")
    return classify(
        status,
        word,
        kinds,
        message,
        provider="gemini",
        rules=rules or [],
        fallback=G.fallback_class(status),
    )


@pytest.mark.parametrize(
    "err, expected",
    [
        (quota_error("GenerateRequestsPerDayPerProjectPerModel"), ("quota", Scope.MODEL)),
        (quota_error(None), ("quota", Scope.MODEL)),  # key-wide quota: no QuotaFailure
        (
            quota_error("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
            ("rate_limit", Scope.REQUEST),
        ),
        (
            {
                "code": 429,
                "message": "Resource has been exhausted.",
                "status": "RESOURCE_EXHAUSTED",
            },
            ("rate_limit", Scope.REQUEST),
        ),
        (
            {"code": 400, "message": "Invalid JSON payload", "status": "INVALID_ARGUMENT"},
            ("invalid_request", Scope.REQUEST),
        ),
        (
            {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [{"reason": "API_KEY_INVALID"}],
            },
            ("auth", Scope.KEY),
        ),
        (
            {
                "code": 403,
                "message": "Method doesn't allow unregistered callers",
                "status": "PERMISSION_DENIED",
            },
            ("auth", Scope.KEY),
        ),
        (
            {
                "code": 403,
                "message": "Permission denied: the caller does not have access to model m.",
                "status": "PERMISSION_DENIED",
            },
            ("model_not_found", Scope.MODEL),
        ),
        (
            {
                "code": 404,
                "message": "models/gemini-9 is not found for API version v1, or is not supported",
                "status": "NOT_FOUND",
            },
            ("model_not_found", Scope.MODEL),
        ),
        (
            {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND"},
            ("invalid_request", Scope.REQUEST),
        ),
        (
            {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"},
            ("api_error", Scope.REQUEST),
        ),
        (
            {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"},
            ("api_error", Scope.REQUEST),
        ),
    ],
)
def test_gemini_preset_classes_and_scopes(err, expected):
    assert gemini_class(err) == expected


def test_user_rules_come_before_the_gemini_preset():
    rule = Rule("rate_limit", Scope.REQUEST, status=429, message="quota")
    assert gemini_class(quota_error("GenerateRequestsPerDayPerProjectPerModel"), [rule]) == (
        "rate_limit",
        Scope.REQUEST,
    )


def test_retry_delay_from_retry_info_or_message():
    assert G.describe_error(quota_error(None, retry="12.5s"))[3] == 12.5
    msg = {"code": 429, "message": "quota gone. Please retry in 3.25s.", "status": "X"}
    assert G.describe_error(msg)[3] == 3.25


def test_result_line_errors_keep_the_quota_id_for_the_engine_to_reclassify():
    o = G.error_to_outcome("k", quota_error("GenerateRequestsPerMinutePerProjectPerModel"))
    assert o.error_class == "rate_limit"
    # The engine classifies lines again by status, code and message only: same answer.
    assert classify(
        o.status_code, o.error_code, None, o.error_message, provider="gemini", fallback="api_error"
    ) == ("rate_limit", Scope.REQUEST)


# --------------------------------------------------------------------------- jobs


def op(state: str, **meta: Any) -> dict[str, Any]:
    return {
        "name": "batches/abc123",
        "metadata": {
            "name": "batches/abc123",
            "displayName": "run_1-c000001-a0",
            "state": state,
            "createTime": "2026-01-02T03:04:05.500Z",
            "batchStats": {
                "requestCount": "10",
                "successfulRequestCount": "6",
                "failedRequestCount": "1",
            },
            "inputConfig": {"fileName": "files/in1"},
            **meta,
        },
    }


@pytest.mark.parametrize(
    "state, expected",
    [
        ("BATCH_STATE_PENDING", BatchState.VALIDATING),
        ("BATCH_STATE_RUNNING", BatchState.IN_PROGRESS),
        ("BATCH_STATE_SUCCEEDED", BatchState.COMPLETED),
        ("BATCH_STATE_FAILED", BatchState.FAILED),
        ("BATCH_STATE_CANCELLED", BatchState.CANCELLED),
        ("BATCH_STATE_EXPIRED", BatchState.EXPIRED),
    ],
)
def test_job_states(state, expected):
    b = G.remote_job(op(state))
    assert b.state == expected and b.raw_status == state


def test_job_fields_and_results_file():
    b = G.remote_job(
        op(
            "BATCH_STATE_EXPIRED",
            endTime="2026-01-03T03:04:05Z",
            output={"responsesFile": "files/out1"},
        )
    )
    assert b.id == "abc123" and (b.total, b.completed, b.failed) == (10, 6, 1)
    assert b.output_ref == "files/out1" and b.input_ref == "files/in1" and b.error_ref is None
    assert b.ended_at is not None and b.ended_at - b.created_at == pytest.approx(86399.5)
    assert b.tag == {"display_name": "run_1-c000001-a0"}


def test_failed_job_on_the_enqueued_token_limit_paces():
    failed = op("BATCH_STATE_FAILED")
    failed["error"] = {"code": 8, "message": "Enqueued token limit reached for gemini-2.5-flash."}
    (p,) = G.remote_job(failed).problems
    assert (p.code, p.cls) == ("RESOURCE_EXHAUSTED", "token_limit")


# --------------------------------------------------------------------------- wiring


def test_make_backend_gives_gemini_its_backend():
    from batchops.backends import make_backend

    entry = ModelEntry(name=MODEL, provider="gemini", base_url="http://127.0.0.1:9/v1beta")
    b = make_backend(entry, "gk-test-0000abcd", None, policy=RetryPolicy())
    assert isinstance(b, G.GeminiBackend) and b.uploads_files
    assert b.url == "http://127.0.0.1:9"  # the version is the SDK's api_version


def test_import_batchops_stays_light_and_only_the_gemini_backend_imports_google():
    code = "import sys, batchops, batchops.backends, batchops.api; print('google.genai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    pkg = Path(G.__file__).parent.parent
    users = []
    for path in sorted(pkg.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "google" or n.startswith("google.") for n in names):
                users.append(path.relative_to(pkg).as_posix())
    assert sorted(set(users)) == ["backends/gemini.py"]
