"""Every scenario knob yields the documented status, code and message (real SDK, real HTTP)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import jsonschema
import openai
import pytest

from batchops.emulator import EmulatorServer
from batchops.emulator.answers import count_tokens
from batchops.emulator.testing import (
    DEFAULT_KEY,
    chat_line,
    data_url,
    image_message,
    jsonl,
    png_bytes,
    results,
    run_batch,
    wait_for_batch,
)

MSG = [{"role": "user", "content": "hello"}]
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)


# Faster than the shared fixture's timings: these tests do not look at progress.
QUICK = {"validating_seconds": 0.0, "in_progress_seconds": 0.05, "finalizing_seconds": 0.0}


@pytest.fixture
def make(emulator_factory: Any) -> Any:
    """emulator_factory with QUICK timings unless a test sets its own."""
    return lambda **kw: emulator_factory(**{**QUICK, **kw})


def _client(emu: EmulatorServer, key: str = DEFAULT_KEY, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=emu.base_url, api_key=key, **kw)


def _lines(n: int, prefix: str = "r", **body: Any) -> list[dict[str, Any]]:
    return [chat_line(f"{prefix}{i}", f"question {i}", **body) for i in range(n)]


# --------------------------------------------------------------------------- keys and models


def test_invalid_api_key_is_masked(make: Any) -> None:
    good, bad = "sk-good-1111111111111111aaaa", "sk-bad-22222222222222222wxyz"
    emu = make(api_keys=[good])
    assert _client(emu, good).models.list().data
    with pytest.raises(openai.AuthenticationError) as ei:
        _client(emu, bad).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert ei.value.code == "invalid_api_key"
    assert ei.value.body["message"] == (
        "Incorrect API key provided: sk-…wxyz. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
    )
    assert bad not in json.dumps(ei.value.body) and bad not in json.dumps(emu.stats())


def test_denied_model(make: Any) -> None:
    emu = make(denied_models=["gpt-4o"])
    client = _client(emu)
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert ei.value.code == "model_not_found"
    assert (
        ei.value.body["message"] == "Project `proj_emulator` does not have access to model `gpt-4o`"
    )
    b = run_batch(client, _lines(3, model="gpt-4o"))
    assert b.status == "completed" and b.output_file_id is None
    assert b.request_counts.failed == 3
    _, err = results(client, b)
    assert {e["response"]["status_code"] for e in err} == {403}
    assert all(e["error"] is None for e in err)
    assert err[0]["response"]["body"]["error"]["code"] == "model_not_found"
    assert "gpt-4o" not in [m.id for m in client.models.list()]


def test_unknown_model(make: Any) -> None:
    emu = make(models=["gpt-4o-mini"])
    client = _client(emu)
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-9", messages=MSG)
    assert ei.value.code == "model_not_found"
    assert (
        ei.value.body["message"]
        == "The model `gpt-9` does not exist or you do not have access to it."
    )
    b = run_batch(client, _lines(2, model="gpt-9"))
    assert b.status == "failed" and b.failed_at is not None
    e = b.errors.data[0]
    assert (e.code, e.param, e.line) == ("model_not_found", "body.model", 1)
    assert e.message == "The provided model 'gpt-9' is not supported by the Batch API."
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]


# --------------------------------------------------------------------------- validation


def test_validation_reports_every_bad_line(openai_client: openai.OpenAI) -> None:
    good = chat_line("ok", "hi")
    lines: list[Any] = [
        good,
        "{not json",
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},
        chat_line("u", "hi", url="/v1/embeddings"),
        chat_line("s", "hi", stream=True),
        {
            "custom_id": "m",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": MSG},
        },
        chat_line("mix", "hi", model="gpt-4o"),
        chat_line("ok", "again"),
    ]
    b = run_batch(openai_client, lines)
    assert b.status == "failed" and b.in_progress_at is None
    got = [(e.code, e.param, e.line) for e in b.errors.data]
    assert got == [
        ("invalid_json_line", None, 2),
        ("missing_required_parameter", "custom_id", 3),
        ("invalid_url", "url", 4),
        ("streaming_unsupported", "body.stream", 5),
        ("invalid_request", "body.model", 6),
        ("mismatched_model", "body.model", 7),
        ("duplicate_custom_id", "custom_id", 8),
    ]
    msgs = {e.code: e.message for e in b.errors.data}
    assert msgs["invalid_json_line"] == "This line is not parseable as valid JSON."
    assert msgs["missing_required_parameter"] == "Missing required parameter: 'custom_id'."
    assert (
        msgs["invalid_url"]
        == "The URL provided for this request does not match the batch endpoint."
    )
    assert (
        msgs["streaming_unsupported"]
        == "Chat Completions: Streaming is not supported in the Batch API."
    )
    assert msgs["invalid_request"] == "Model parameter is required."


def test_validation_file_level_errors(make: Any) -> None:
    emu = make(max_requests_per_batch=2)
    client = _client(emu)
    b = run_batch(client, [])
    assert [(e.code, e.line, e.param) for e in b.errors.data] == [("empty_file", None, None)]
    b = run_batch(client, _lines(3))
    assert b.errors.data[0].code == "too_many_requests"
    f = client.files.create(file=("x.jsonl", jsonl(_lines(1))), purpose="batch")
    client.files.delete(f.id)
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    b = wait_for_batch(client, b.id)
    e = b.errors.data[0]
    assert b.status == "failed" and (e.code, e.param) == ("invalid_request", "file_id")
    assert (
        e.message
        == f"Cannot find file {f.id}, or organization org-emulator does not have access to it."
    )


def test_enqueued_token_limit(make: Any) -> None:
    emu = make(in_progress_seconds=0.5, enqueued_token_limit={"gpt-4o-mini": 1000})
    client = _client(emu)
    lines = [chat_line(f"r{i}", "word " * 60) for i in range(9)]  # 9 * (3+4+60) = 603 tokens
    f = client.files.create(file=("a.jsonl", jsonl(lines)), purpose="batch")
    first = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while client.batches.retrieve(first.id).status == "validating":
        time.sleep(0.01)
    second = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    second = wait_for_batch(client, second.id)
    assert second.status == "failed"
    e = second.errors.data[0]
    assert (e.code, e.line, e.param) == ("token_limit_exceeded", None, None)
    assert e.message == (
        "Enqueued token limit reached for gpt-4o-mini in organization org-emulator. Limit: 1,000 "
        "enqueued tokens. Please try again once some in_progress batches have been completed."
    )
    assert wait_for_batch(client, first.id).status == "completed"
    emu.update_scenario(in_progress_seconds=0.05)
    third = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for_batch(client, third.id).status == "completed"  # room again
    assert wait_for_batch(client, third.id).usage.input_tokens == 603


# --------------------------------------------------------------------------- quotas and limits


def test_model_quota(make: Any) -> None:
    emu = make(model_quota={"gpt-4o-mini": 3})
    client = _client(emu)
    b = run_batch(client, _lines(5))
    assert b.status == "completed"
    assert (b.request_counts.completed, b.request_counts.failed) == (3, 2)
    _, err = results(client, b)
    assert {e["response"]["status_code"] for e in err} == {429}
    assert err[0]["response"]["body"]["error"] == {
        "message": QUOTA_MESSAGE,
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
    assert emu.stats()["models"]["gpt-4o-mini"] == {"executed": 3, "succeeded": 3}

    retrying = _client(emu, max_retries=2)  # x-should-retry: false stops the SDK's retries
    f = retrying.files.create(file=("a.jsonl", jsonl(_lines(1))), purpose="batch")
    before = emu.stats()["calls"].get("POST /v1/batches", 0)
    with pytest.raises(openai.RateLimitError) as ei:
        retrying.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert ei.value.code == "insufficient_quota" and ei.value.body["message"] == QUOTA_MESSAGE
    assert ei.value.response.headers["x-should-retry"] == "false"
    assert ei.value.response.headers["x-request-id"].startswith("req_")
    assert emu.stats()["calls"]["POST /v1/batches"] == before + 1
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert ei.value.code == "insufficient_quota"
    assert ei.value.response.headers["retry-after"] == "1"
    # other models are unaffected; a quota reset makes the model usable again
    client.chat.completions.create(model="gpt-4o", messages=MSG)
    emu.update_scenario(model_quota={})
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)


def test_key_quota(make: Any) -> None:
    k1, k2 = "sk-one-00000000000000001111", "sk-two-00000000000000002222"
    emu = make(key_quota={k1: 2})
    c1, c2 = _client(emu, k1), _client(emu, k2)
    c1.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    c1.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.RateLimitError) as ei:
        c1.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert ei.value.code == "insufficient_quota"
    f = c1.files.create(file=("a.jsonl", jsonl(_lines(1))), purpose="batch")
    with pytest.raises(openai.RateLimitError):
        c1.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    c2.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert run_batch(c2, _lines(2)).request_counts.completed == 2
    assert emu.stats()["keys"] == {"sk-…1111": {"executed": 2}, "sk-…2222": {"executed": 3}}


def test_rate_limit_rpm(make: Any) -> None:
    emu = make(rate_limit_rpm=2, retry_after_seconds=1.0)
    client = _client(emu)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert ei.value.code == "rate_limit_exceeded" and ei.value.type == "requests"
    assert ei.value.body["message"] == (
        "Rate limit reached for gpt-4o-mini in organization org-emulator on requests per min "
        "(RPM): Limit 2, Used 2, Requested 1. Please try again in 1s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more."
    )
    assert ei.value.response.headers["retry-after"] == "1"
    assert ei.value.response.headers["x-request-id"].startswith("req_")
    # another key has its own window; batch endpoints are not rate limited
    _client(emu, "sk-other-000000000000000009999").chat.completions.create(
        model="gpt-4o-mini", messages=MSG
    )
    assert run_batch(client, _lines(1)).status == "completed"


# --------------------------------------------------------------------------- per-request faults


def test_fail_once_fraction(make: Any) -> None:
    emu = make(fail_once_fraction=0.3, seed=7)
    client = _client(emu)
    lines = _lines(40)
    b = run_batch(client, lines)
    out, err = results(client, b)
    failed = {e["custom_id"] for e in err}
    assert 4 <= len(failed) <= 20 and len(out) + len(err) == 40
    e = err[0]
    assert e["error"] is None and e["response"]["status_code"] == 500
    assert e["response"]["body"]["error"]["type"] == "server_error"
    retry = run_batch(client, [x for x in lines if x["custom_id"] in failed])
    assert retry.request_counts.completed == len(failed) and retry.error_file_id is None
    stats = emu.stats()["requests"]
    assert all(stats[c] == {"executed": 2, "succeeded": 1} for c in failed)
    assert all(
        stats[x["custom_id"]] == {"executed": 1, "succeeded": 1}
        for x in lines
        if x["custom_id"] not in failed
    )
    # the same seed picks the same ids, in any emulator
    other = make(fail_once_fraction=0.3, seed=7)
    _, err2 = results(_client(other), run_batch(_client(other), lines))
    assert {e["custom_id"] for e in err2} == failed


def test_fail_once_sync(make: Any) -> None:
    emu = make(fail_once_fraction=1.0)
    client = _client(emu)
    hdr = {"x-batchops-custom-id": "row-1"}
    with pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=hdr)
    assert ei.value.response.headers["x-request-id"].startswith("req_")
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=hdr)
    assert r.choices[0].message.content == "gpt-4o-mini says: hello"
    assert emu.stats()["requests"]["row-1"] == {"executed": 2, "succeeded": 1}


def test_reject_fraction(make: Any) -> None:
    emu = make(reject_fraction=1.0)
    client = _client(emu)
    for _ in range(2):
        b = run_batch(client, _lines(2))
        assert b.output_file_id is None and b.request_counts.failed == 2
        _, err = results(client, b)
        body = err[0]["response"]["body"]["error"]
        assert err[0]["response"]["status_code"] == 400 and body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)


SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["label", "score"],
    "additionalProperties": False,
}
RF = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}


def test_invalid_json_fraction(make: Any) -> None:
    emu = make(invalid_json_fraction=1.0)
    client = _client(emu)
    kw = {"model": "gpt-4o-mini", "messages": MSG, "response_format": RF}
    first = json.loads(client.chat.completions.create(**kw).choices[0].message.content)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(first, SCHEMA)
    second = json.loads(client.chat.completions.create(**kw).choices[0].message.content)
    jsonschema.validate(second, SCHEMA)


def test_truncate_fraction(make: Any) -> None:
    emu = make(truncate_fraction=1.0)
    client = _client(emu)
    b = run_batch(client, _lines(3, response_format=RF))
    out, _ = results(client, b)
    for o in out:
        choice = o["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice["message"]["content"])
    again = run_batch(client, _lines(3, response_format=RF))
    out, _ = results(client, again)
    assert {o["response"]["body"]["choices"][0]["finish_reason"] for o in out} == {"stop"}


def test_cached_tokens_fraction(make: Any) -> None:
    emu = make(cached_tokens_fraction=0.5)
    client = _client(emu)
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}]
    )
    assert r.usage.prompt_tokens == 10 and r.usage.prompt_tokens_details.cached_tokens == 5
    b = run_batch(client, _lines(2))
    assert b.usage.input_tokens_details.cached_tokens == sum(
        (3 + 4 + count_tokens(f"question {i}")) // 2 for i in range(2)
    )


def test_images_count_tokens_and_bad_images_fail(openai_client: openai.OpenAI) -> None:
    png = png_bytes(1024, 1024)
    good = {
        "custom_id": "img",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": image_message("What is this?", data_url(png))},
    }
    low = json.loads(json.dumps(good))
    low["custom_id"] = "low"
    low["body"]["messages"][0]["content"][1]["image_url"]["detail"] = "low"
    bad = json.loads(json.dumps(good))
    bad["custom_id"] = "bad"
    bad["body"]["messages"][0]["content"][1]["image_url"]["url"] = "data:image/png;base64,AAAAAAAA"
    b = run_batch(openai_client, [good, low, bad])
    out, err = results(openai_client, b)
    by_id = {o["custom_id"]: o["response"]["body"] for o in out}
    text_tokens = 3 + 4 + count_tokens("What is this?")
    # gpt-4o-mini bills images at its own rate: 2833 + 5667 per 512-px tile (gpt-4o: 85 + 170).
    assert by_id["img"]["usage"]["prompt_tokens"] == text_tokens + 2833 + 4 * 5667
    assert by_id["low"]["usage"]["prompt_tokens"] == text_tokens + 2833
    assert by_id["img"]["choices"][0]["message"]["content"] == (
        f"gpt-4o-mini says: What is this? [1 image: {len(png)} bytes]"
    )
    assert [e["custom_id"] for e in err] == ["bad"]
    assert err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"]["error"]["code"] == "invalid_image_format"


# --------------------------------------------------------------------------- transport faults


def test_http_error_every(make: Any) -> None:
    emu = make(http_error_every=3, http_error_status=503)
    client = _client(emu)
    client.models.list()
    client.models.list()
    with pytest.raises(openai.InternalServerError) as ei:
        client.models.list()
    assert ei.value.status_code == 503 and ei.value.type == "server_error"
    assert ei.value.response.headers["x-request-id"].startswith("req_")
    # the SDK's own retry gets through (call 6 fails, 7 succeeds)
    client.models.list()
    client.models.list()
    assert _client(emu, max_retries=1).models.list().data
    with httpx2.Client(base_url=emu.root_url) as http:  # admin calls are never faulted
        assert all(http.get("/_emulator/health").status_code == 200 for _ in range(6))
    assert emu.stats()["calls"]["GET /v1/models"] == 7


def test_drop_connection_every(make: Any) -> None:
    emu = make(drop_connection_every=2)
    client = _client(emu)
    client.models.list()
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
    client.models.list()


def test_drop_after_processing_creates_the_batch(make: Any) -> None:
    emu = make(drop_connection_every=2, drop_after_processing=True)
    client = _client(emu)
    f = client.files.create(file=("a.jsonl", jsonl(_lines(1))), purpose="batch")  # call 1
    with pytest.raises(openai.APIConnectionError):  # call 2: processed, then dropped
        client.batches.create(
            input_file_id=f.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"batchops_chunk": "7"},
        )
    listed = client.batches.list().data  # call 3
    assert [b.metadata for b in listed] == [{"batchops_chunk": "7"}]


def test_slow_response_and_sync_latency(make: Any) -> None:
    emu = make(slow_response_seconds=0.3)
    with pytest.raises(openai.APITimeoutError):
        _client(emu, timeout=0.1).models.list()
    emu.update_scenario(slow_response_seconds=0.0, sync_latency_seconds=1.0)
    client = _client(emu)
    # The latency delays model calls only: a models list sent while a chat call is held
    # answers first (ordering, not a stopwatch), and the chat call still takes its latency.
    with ThreadPoolExecutor(1) as pool:
        t = time.monotonic()
        chat = pool.submit(client.chat.completions.create, model="gpt-4o-mini", messages=MSG)
        while emu.stats()["calls"].get("POST /v1/chat/completions", 0) == 0:
            time.sleep(0.005)  # the chat call has reached the server
        assert client.models.list().data
        assert not chat.done()
        assert chat.result().choices[0].message.content
        assert time.monotonic() - t >= 1.0


# --------------------------------------------------------------------------- batch-level faults


def test_expire_first_n(make: Any) -> None:
    emu = make(expire_first_n=1, expire_done_fraction=0.5)
    client = _client(emu)
    b = run_batch(client, _lines(10))
    assert b.status == "expired" and b.expired_at is not None
    assert (b.request_counts.completed, b.request_counts.failed) == (5, 5)
    out, err = results(client, b)
    assert len(out) == 5 and all(o["response"]["status_code"] == 200 for o in out)
    assert all(e["response"] is None for e in err)
    assert {e["error"]["code"] for e in err} == {"batch_expired"}
    assert err[0]["error"]["message"] == (
        "This request could not be executed before the completion window expired."
    )
    stats = emu.stats()["requests"]
    assert sum(v["executed"] for v in stats.values()) == 5  # expired lines were never executed
    assert run_batch(client, _lines(10)).status == "completed"  # only the first N expire


def test_timings_scale(make: Any) -> None:
    emu = make(
        validating_seconds=0.05, in_progress_seconds=0.1, finalizing_seconds=0.05, time_scale=2.0
    )
    client = _client(emu)
    t = time.monotonic()
    run_batch(client, _lines(2))
    assert time.monotonic() - t >= 0.4
    # time_scale 0 means no wait at all: a batch configured to run for hours finishes within
    # run_batch's patience (unscaled it would still be in progress).
    emu.update_scenario(time_scale=0.0, per_request_seconds=3600.0, in_progress_seconds=3600.0)
    assert run_batch(client, _lines(2)).status == "completed"


def test_shuffle_is_seeded_and_optional(make: Any) -> None:
    lines = _lines(30)
    orders = []
    for _ in range(2):
        emu = make(seed=11)
        client = _client(emu)
        out, _ = results(client, run_batch(client, lines))
        orders.append([o["custom_id"] for o in out])
    assert orders[0] == orders[1] != [x["custom_id"] for x in lines]
    emu = make(shuffle_output=False)
    client = _client(emu)
    out, _ = results(client, run_batch(client, lines))
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]


def test_stats_shape(emulator: EmulatorServer, openai_client: openai.OpenAI) -> None:
    run_batch(openai_client, _lines(2))
    openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
    s = emulator.stats()
    assert set(s) == {"requests", "calls", "batches", "files", "models", "keys"}
    assert s["requests"]["r0"] == {"executed": 1, "succeeded": 1}
    assert s["batches"] == {"created": 1, "by_status": {"completed": 1}}
    assert s["files"] == {"uploaded": 1, "deleted": 0, "live": 2}
    assert s["models"] == {
        "gpt-4o-mini": {"executed": 2, "succeeded": 2},
        "gpt-4o": {"executed": 1, "succeeded": 1},
    }
    assert s["calls"]["POST /v1/files"] == 1 and s["calls"]["POST /v1/batches"] == 1
    assert s["calls"]["GET /v1/batches/{id}"] >= 1


# --------------------------------------------------------------------------- result-file and listing faults


def _download(client: openai.OpenAI, file_id: str) -> bytes:
    return client.files.content(file_id).content


def _ids(raw: bytes) -> list[str]:
    return [json.loads(x)["custom_id"] for x in raw.splitlines() if x.strip()]


def test_output_drop_fraction_only_on_first_download(make: Any) -> None:
    emu = make(output_drop_fraction=0.3, seed=4)
    client = _client(emu)
    b = run_batch(client, _lines(40))
    assert b.request_counts.completed == 40
    first = _ids(_download(client, b.output_file_id))
    second = _ids(_download(client, b.output_file_id))
    assert 0 < len(first) < 40 and len(set(first)) == len(first)
    assert sorted(second) == sorted(f"r{i}" for i in range(40))
    # Dropped lines were executed (and paid) all the same.
    assert all(v == {"executed": 1, "succeeded": 1} for v in emu.stats()["requests"].values())


def test_result_fault_downloads_zero_hits_every_download(make: Any) -> None:
    emu = make(output_drop_fraction=0.5, result_fault_downloads=0, seed=4)
    client = _client(emu)
    b = run_batch(client, _lines(20))
    a, c = _download(client, b.output_file_id), _download(client, b.output_file_id)
    assert sorted(_ids(a)) == sorted(_ids(c)) and len(_ids(a)) < 20


def test_output_truncate_last(make: Any) -> None:
    emu = make(output_truncate_last=True, result_fault_downloads=2)
    client = _client(emu)
    b = run_batch(client, _lines(5))
    for _ in range(2):
        raw = _download(client, b.output_file_id)
        lines = raw.split(b"\n")
        assert not raw.endswith(b"\n") and len(lines) == 5
        assert all(json.loads(x) for x in lines[:-1])
        with pytest.raises(json.JSONDecodeError):
            json.loads(lines[-1])
    assert len(_ids(_download(client, b.output_file_id))) == 5  # third download: whole


def test_output_duplicate_and_failure_first(make: Any) -> None:
    emu = make(output_duplicate_fraction=1.0, output_failure_first_fraction=1.0)
    client = _client(emu)
    b = run_batch(client, _lines(3))
    rows = [json.loads(x) for x in _download(client, b.output_file_id).splitlines()]
    assert len(rows) == 9
    by_id: dict[str, list[int]] = {}
    for r in rows:
        by_id.setdefault(r["custom_id"], []).append(r["response"]["status_code"])
    assert by_id == {f"r{i}": [500, 200, 200] for i in range(3)}
    fail = next(r for r in rows if r["response"]["status_code"] == 500)
    assert fail["response"]["body"]["error"]["type"] == "server_error"
    assert b.request_counts.completed == 3 and b.request_counts.failed == 0


def test_output_malformed_lines(make: Any) -> None:
    emu = make(output_malformed_lines=2, seed=1)
    client = _client(emu)
    b = run_batch(client, _lines(6))
    lines = _download(client, b.output_file_id).splitlines()
    bad = []
    for x in lines:
        try:
            json.loads(x)
        except json.JSONDecodeError:
            bad.append(x)
    assert len(lines) == 8 and len(bad) == 2


def test_error_files_and_input_files_are_never_damaged(make: Any) -> None:
    emu = make(output_drop_fraction=1.0, output_malformed_lines=3, reject_fraction=1.0)
    client = _client(emu)
    data = jsonl(_lines(4))
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert _download(client, f.id) == data
    b = run_batch(client, _lines(4))
    assert b.output_file_id is None
    assert len(_ids(_download(client, b.error_file_id))) == 4


def test_list_stale_freezes_listed_state(make: Any) -> None:
    emu = make(list_stale=True, validating_seconds=0.0, in_progress_seconds=0.05)
    client = _client(emu)
    f = client.files.create(file=("in.jsonl", jsonl(_lines(2))), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    first = client.batches.list().data[0].status
    assert first in ("validating", "in_progress")
    done = wait_for_batch(client, b.id)
    assert done.status == "completed"  # retrieve shows the truth
    assert client.batches.list().data[0].status == first  # the list never moves


def test_upload_error_keys(make: Any) -> None:
    bad, good = "sk-upload-fails-000000000000bad1", "sk-upload-works-00000000000good"
    emu = make(upload_error_keys=[bad])
    with pytest.raises(openai.InternalServerError):
        _client(emu, bad).files.create(file=("in.jsonl", jsonl(_lines(1))), purpose="batch")
    assert _client(emu, bad).models.list().data  # only uploads fail
    assert _client(emu, good).files.create(file=("in.jsonl", jsonl(_lines(1))), purpose="batch")
    assert emu.stats()["files"]["uploaded"] == 1
