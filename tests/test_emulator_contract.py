"""Contract of the emulator as seen through the real openai SDK over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import openai
import pytest

from batchops.emulator import EmulatorServer, Scenario
from batchops.emulator.answers import count_tokens, expected_answer, expected_embedding
from batchops.emulator.testing import (
    DEFAULT_KEY,
    chat_line,
    embedding_line,
    jsonl,
    parse_jsonl,
    responses_line,
    results,
    run_batch,
    wait_for_batch,
)

SPEC = json.loads((Path(__file__).parent / "data" / "openapi-files-batches.json").read_text())


def _validate(obj: dict[str, Any], schema_name: str, *, keep_nulls: bool = False) -> None:
    """Validate against the official schema. The spec subset types nullable fields (e.g.
    output_file_id) as plain strings while the real API sends null, so nulls are dropped."""

    def drop_nulls(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: drop_nulls(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [drop_nulls(v) for v in x]
        return x

    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    jsonschema.Draft202012Validator(schema).validate(obj if keep_nulls else drop_nulls(obj))


def _raw(emulator: EmulatorServer) -> httpx2.Client:
    return httpx2.Client(
        base_url=emulator.root_url, headers={"authorization": f"Bearer {DEFAULT_KEY}"}
    )


# --------------------------------------------------------------------------- life cycle


def test_chat_batch_round_trip(openai_client: openai.OpenAI) -> None:
    lines = [chat_line(f"r{i}", f"Question number {i}: what is {i} + {i}?") for i in range(12)]
    f = openai_client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert f.purpose == "batch" and f.status == "processed" and f.filename == "in.jsonl"
    assert f.expires_at == f.created_at + 2_592_000
    b = openai_client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"batchops_run": "r1"},
    )
    assert b.status == "validating"
    assert b.request_counts is not None and b.request_counts.total == 0
    assert b.output_file_id is None and b.error_file_id is None
    assert b.expires_at == b.created_at + 86_400
    assert b.metadata == {"batchops_run": "r1"}

    seen = {b.status}
    while b.status not in ("completed", "failed"):
        b = openai_client.batches.retrieve(b.id)
        seen.add(b.status)
    assert b.status == "completed", b.errors
    assert {"validating", "in_progress", "completed"} <= seen
    assert b.model == "gpt-4o-mini"
    assert b.in_progress_at and b.finalizing_at and b.completed_at
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    assert b.request_counts.total == 12 and b.request_counts.completed == 12
    assert b.request_counts.failed == 0 and b.error_file_id is None

    out_file = openai_client.files.retrieve(b.output_file_id)
    assert out_file.purpose == "batch_output"
    out = parse_jsonl(openai_client.files.content(b.output_file_id).text)
    assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(12))
    assert [o["custom_id"] for o in out] != [f"r{i}" for i in range(12)]  # shuffled
    by_id = {o["custom_id"]: o for o in out}
    total_in = total_out = 0
    for line in lines:
        o = by_id[line["custom_id"]]
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200
        assert o["response"]["request_id"].startswith("req_")
        body = o["response"]["body"]
        assert body["object"] == "chat.completion"
        text = body["choices"][0]["message"]["content"]
        assert text == expected_answer("gpt-4o-mini", line["body"])
        usage = body["usage"]
        assert usage["completion_tokens"] == count_tokens(text)
        # 3 reply-priming tokens + 4 per message + the text's tokens
        assert usage["prompt_tokens"] == 3 + 4 + count_tokens(
            line["body"]["messages"][0]["content"]
        )
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        total_in += usage["prompt_tokens"]
        total_out += usage["completion_tokens"]
    assert b.usage is not None
    assert b.usage.input_tokens == total_in and b.usage.output_tokens == total_out
    assert b.usage.total_tokens == total_in + total_out


def test_request_counts_grow_while_in_progress(emulator_factory: Any) -> None:
    emu = emulator_factory(in_progress_seconds=0.4)
    client = openai.OpenAI(base_url=emu.base_url, api_key=DEFAULT_KEY, max_retries=0)
    f = client.files.create(
        file=("in.jsonl", jsonl(chat_line(f"r{i}", "hi") for i in range(50))), purpose="batch"
    )
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    partial = set()
    while b.status not in ("completed", "failed"):
        b = client.batches.retrieve(b.id)
        if b.status == "in_progress":
            partial.add(b.request_counts.completed)
    assert b.status == "completed"
    assert any(0 < n < 50 for n in partial), partial


def test_embeddings_batch(openai_client: openai.OpenAI) -> None:
    lines = [
        embedding_line("e1", "hello world"),
        embedding_line("e2", ["first text", "second text"], dimensions=4),
    ]
    b = run_batch(openai_client, lines, endpoint="/v1/embeddings")
    assert b.status == "completed"
    out, err = results(openai_client, b)
    assert err == []
    by_id = {o["custom_id"]: o["response"]["body"] for o in out}
    e1 = by_id["e1"]
    assert e1["object"] == "list" and e1["model"] == "text-embedding-3-small"
    assert e1["data"][0]["embedding"] == expected_embedding("text-embedding-3-small", "hello world")
    assert len(e1["data"][0]["embedding"]) == 8
    assert e1["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    e2 = by_id["e2"]
    assert [len(d["embedding"]) for d in e2["data"]] == [4, 4]
    assert json.dumps([d["embedding"] for d in e2["data"]], separators=(",", ":")) == (
        expected_answer("text-embedding-3-small", lines[1]["body"], "/v1/embeddings")
    )


def test_responses_batch(openai_client: openai.OpenAI) -> None:
    lines = [
        responses_line("a", "Summarise the water cycle.", instructions="Be brief."),
        responses_line("b", "A very long question " * 10, max_output_tokens=16),
    ]
    b = run_batch(openai_client, lines, endpoint="/v1/responses")
    assert b.status == "completed", b.errors
    out, _ = results(openai_client, b)
    by_id = {o["custom_id"]: o["response"]["body"] for o in out}
    a = by_id["a"]
    assert a["object"] == "response" and a["status"] == "completed"
    msg = a["output"][0]
    assert msg["type"] == "message" and msg["content"][0]["type"] == "output_text"
    assert msg["content"][0]["text"] == expected_answer(
        "gpt-4o-mini", lines[0]["body"], "/v1/responses"
    )
    # instructions count as a system message
    assert a["usage"]["input_tokens"] == 3 + (4 + count_tokens("Be brief.")) + (
        4 + count_tokens("Summarise the water cycle.")
    )
    assert set(a["usage"]) == {
        "input_tokens",
        "input_tokens_details",
        "output_tokens",
        "output_tokens_details",
        "total_tokens",
    }
    cut = by_id["b"]
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["usage"]["output_tokens"] == 16


def test_sync_endpoints(openai_client: openai.OpenAI, emulator: EmulatorServer) -> None:
    msgs = [{"role": "user", "content": "Tell me about tea."}]
    r = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=msgs, extra_headers={"x-batchops-custom-id": "row-7"}
    )
    assert r.choices[0].message.content == "gpt-4o-mini says: Tell me about tea."
    assert r.choices[0].finish_reason == "stop"
    e = openai_client.embeddings.create(model="text-embedding-3-small", input="tea", dimensions=16)
    # the SDK asks for base64 and decodes float32: compare with tolerance
    assert e.data[0].embedding == pytest.approx(
        expected_embedding("text-embedding-3-small", "tea", 16), abs=1e-6
    )
    resp = openai_client.responses.create(model="gpt-4o-mini", input="Hello there")
    assert resp.output_text == "gpt-4o-mini says: Hello there"
    models = [m.id for m in openai_client.models.list()]
    assert "gpt-4o-mini" in models
    stats = emulator.stats()
    assert stats["requests"]["row-7"] == {"executed": 1, "succeeded": 1}
    assert any(k.startswith("sync:") and len(k) == 17 for k in stats["requests"])
    assert stats["calls"]["POST /v1/chat/completions"] == 1
    assert stats["calls"]["POST /v1/embeddings"] == 1


def test_answers_are_deterministic_and_cut_by_max_tokens(openai_client: openai.OpenAI) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * 50}]}
    a = openai_client.chat.completions.create(**body)
    b = openai_client.chat.completions.create(**body)
    assert a.choices[0].message.content == b.choices[0].message.content
    cut = openai_client.chat.completions.create(**body, max_tokens=6)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 6  # gpt - 4o - mini says
    assert cut.choices[0].message.content == expected_answer(
        "gpt-4o-mini", {**body, "max_tokens": 6}
    )
    assert cut.choices[0].message.content == "gpt-4o-mini says"


def test_structured_output_matches_schema(openai_client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "summary": {"type": "string"},
            "nested": {"$ref": "#/$defs/Nested"},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        },
        "required": ["sentiment", "score", "stars", "tags", "summary", "nested", "maybe"],
        "additionalProperties": False,
        "$defs": {
            "Nested": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            }
        },
    }
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "review", "schema": schema, "strict": True},
    }
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Great phone, bad battery."}],
        "response_format": rf,
    }
    r = openai_client.chat.completions.create(**body)
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert r.choices[0].message.content == expected_answer("gpt-4o-mini", body)
    resp = openai_client.responses.create(
        model="gpt-4o-mini",
        input="Great phone, bad battery.",
        text={"format": {"type": "json_schema", "name": "review", "schema": schema}},
    )
    jsonschema.validate(json.loads(resp.output_text), schema)


# --------------------------------------------------------------------------- shapes


def test_objects_match_official_schemas(
    openai_client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    with _raw(emulator) as http:
        up = http.post(
            "/v1/files",
            files={"file": ("x.jsonl", jsonl([chat_line("a", "hi"), "not json"]))},
            data={"purpose": "batch"},
        )
        assert up.status_code == 200
        _validate(up.json(), "OpenAIFile")
        fid = up.json()["id"]
        _validate(http.get(f"/v1/files/{fid}").json(), "OpenAIFile")
        _validate(http.get("/v1/files").json(), "ListFilesResponse")
        created = http.post(
            "/v1/batches",
            json={
                "input_file_id": fid,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        ).json()
        _validate(created, "Batch")
        done = wait_for_batch(openai_client, created["id"])
        assert done.status == "failed"
        failed = http.get(f"/v1/batches/{created['id']}").json()
        _validate(failed, "Batch")
        assert failed["errors"]["object"] == "list"
        _validate(failed["errors"]["data"][0], "BatchError")
        _validate(http.get("/v1/batches").json(), "ListBatchesResponse")
        ok = run_batch(openai_client, [chat_line("a", "hi")])
        _validate(http.get(f"/v1/batches/{ok.id}").json(), "Batch")
        out = parse_jsonl(http.get(f"/v1/files/{ok.output_file_id}/content").content)
        _validate(out[0], "BatchRequestOutput")
        _validate(http.delete(f"/v1/files/{fid}").json(), "DeleteFileResponse")
        missing = http.get(f"/v1/files/{fid}")
        assert missing.status_code == 404
        _validate(missing.json(), "ErrorResponse", keep_nulls=True)


def test_list_pagination_terminates(openai_client: openai.OpenAI) -> None:
    ids = []
    for i in range(7):
        f = openai_client.files.create(
            file=(f"f{i}.jsonl", jsonl([chat_line("a", "x")])), purpose="batch"
        )
        ids.append(f.id)
        openai_client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    page = openai_client.batches.list(limit=3)
    assert len(page.data) == 3 and page.has_more
    listed = [b.id for b in openai_client.batches.list(limit=3)]  # auto-paginates
    assert len(listed) == 7 and len(set(listed)) == 7
    created = [openai_client.batches.retrieve(i).created_at for i in listed]
    assert created == sorted(created, reverse=True)  # newest first
    files = [f.id for f in openai_client.files.list(limit=2, purpose="batch")]
    assert files == list(reversed(ids))
    asc = [f.id for f in openai_client.files.list(limit=2, order="asc", purpose="batch")]
    assert asc == ids
    assert list(openai_client.files.list(purpose="fine-tune")) == []
    last = openai_client.batches.list(limit=100, after=listed[-1])
    assert last.data == [] and last.has_more is False


def test_file_operations_and_404s(openai_client: openai.OpenAI, emulator: EmulatorServer) -> None:
    data = jsonl([chat_line("a", "hi")])
    f = openai_client.files.create(
        file=("a.jsonl", data),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert f.expires_at == f.created_at + 3600 and f.bytes == len(data)
    assert openai_client.files.content(f.id).content == data
    deleted = openai_client.files.delete(f.id)
    assert deleted.deleted is True and deleted.id == f.id
    for call in (
        lambda: openai_client.files.retrieve(f.id),
        lambda: openai_client.files.content(f.id),
        lambda: openai_client.files.delete(f.id),
    ):
        with pytest.raises(openai.NotFoundError) as ei:
            call()
        assert ei.value.body["message"] == f"No such File object: {f.id}"
        assert ei.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as ei:
        openai_client.batches.retrieve("batch_nope")
    assert "batch_nope" in ei.value.body["message"]
    stats = emulator.stats()
    assert stats["files"] == {"uploaded": 1, "deleted": 1, "live": 0}


def test_upload_rules(openai_client: openai.OpenAI, emulator_factory: Any) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        openai_client.files.create(file=("data.csv", b"a,b\n"), purpose="batch")
    assert ei.value.body == {
        "message": "Invalid file format for Batch API. Must be .jsonl",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    small = emulator_factory(max_file_bytes=100)
    client = openai.OpenAI(base_url=small.base_url, api_key=DEFAULT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as ei:
        client.files.create(file=("big.jsonl", b"x" * 101), purpose="batch")
    assert ei.value.body["message"] == "File is too large."
    # another purpose does not need .jsonl
    assert (
        client.files.create(file=("notes.txt", b"hello"), purpose="user_data").purpose
        == "user_data"
    )


# --------------------------------------------------------------------------- bad input


BAD_REQUESTS: list[tuple[str, str, Any, int]] = [
    ("POST", "/v1/batches", b"{not json", 400),
    ("POST", "/v1/batches", {"endpoint": "/v1/chat/completions", "completion_window": "24h"}, 400),
    (
        "POST",
        "/v1/batches",
        {"input_file_id": 7, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        400,
    ),
    (
        "POST",
        "/v1/batches",
        {"input_file_id": "f", "endpoint": "/v1/nope", "completion_window": "24h"},
        400,
    ),
    (
        "POST",
        "/v1/batches",
        {"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "48h"},
        400,
    ),
    (
        "POST",
        "/v1/batches",
        {
            "input_file_id": "f",
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "metadata": "x",
        },
        400,
    ),
    (
        "POST",
        "/v1/batches",
        {
            "input_file_id": "f",
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "metadata": {"k": ["v"]},
        },
        400,
    ),
    (
        "POST",
        "/v1/batches",
        {
            "input_file_id": "f",
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "metadata": {f"k{i}": "v" for i in range(17)},
        },
        400,
    ),
    (
        "POST",
        "/v1/batches",
        {
            "input_file_id": "f",
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "metadata": {"k" * 65: "v"},
        },
        400,
    ),
    (
        "POST",
        "/v1/batches",
        {
            "input_file_id": "f",
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "metadata": {"k": "v" * 513},
        },
        400,
    ),
    (
        "POST",
        "/v1/batches",
        {
            "input_file_id": "f",
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "output_expires_after": {"anchor": "created_at", "seconds": 5},
        },
        400,
    ),
    ("POST", "/v1/batches", [1, 2], 400),
    ("GET", "/v1/batches?limit=0", None, 400),
    ("GET", "/v1/batches?limit=101", None, 400),
    ("GET", "/v1/batches?limit=abc", None, 400),
    ("GET", "/v1/files?order=sideways", None, 400),
    ("POST", "/v1/files", b"garbage", 400),
    ("POST", "/v1/chat/completions", {"messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": "gpt-4o-mini"}, 400),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True},
        400,
    ),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400),
    ("POST", "/v1/embeddings", {"model": "m"}, 400),
    ("POST", "/v1/embeddings", {"model": "m", "input": "x", "dimensions": 10**9}, 400),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0},
        400,
    ),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": "hello"}, 400),
    ("POST", "/v1/responses", {"model": "m", "input": "x", "max_output_tokens": 5}, 400),
    ("POST", "/v1/batches/batch_x/cancel", None, 404),
    ("GET", "/v1/nothing/here", None, 404),
    ("DELETE", "/v1/batches", None, 404),
    ("POST", "/_emulator/scenario", {"no_such_knob": 1}, 400),
    ("POST", "/_emulator/scenario", {"in_progress_seconds": -1}, 400),
]


@pytest.mark.parametrize(("method", "path", "payload", "status"), BAD_REQUESTS)
def test_bad_input_gets_error_envelope(
    emulator: EmulatorServer, method: str, path: str, payload: Any, status: int
) -> None:
    with _raw(emulator) as http:
        kwargs: dict[str, Any] = {}
        if isinstance(payload, bytes):
            kwargs["content"] = payload
            kwargs["headers"] = {"content-type": "application/json"}
        elif payload is not None:
            kwargs["json"] = payload
        r = http.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert r.headers.get("x-request-id", "").startswith("req_") or path.startswith("/_emulator")


def test_create_batch_error_messages(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        openai_client.batches.create(
            input_file_id="f",
            endpoint="/v1/invalid/endpoint",
            completion_window="24h",  # type: ignore[arg-type]
        )
    assert ei.value.body["message"] == (
        "Invalid value: '/v1/invalid/endpoint'. Supported values are: '/v1/chat/completions', "
        "'/v1/embeddings', and '/v1/responses'."
    )
    assert ei.value.code == "invalid_value" and ei.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as ei:
        openai_client.batches.create(
            input_file_id="f",
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"tags": ["a"]},  # type: ignore[dict-item]
        )
    assert ei.value.body["message"] == (
        "Invalid type for 'metadata.tags': expected a string, but got an array instead."
    )
    assert ei.value.code == "invalid_type" and ei.value.param == "metadata.tags"


def test_cancel_semantics(emulator_factory: Any) -> None:
    emu = emulator_factory(in_progress_seconds=0.6, cancelling_seconds=0.05)
    client = openai.OpenAI(base_url=emu.base_url, api_key=DEFAULT_KEY, max_retries=0)
    lines = [chat_line(f"r{i}", "hi") for i in range(40)]
    f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while b.status != "in_progress" or b.request_counts.completed < 5:
        b = client.batches.retrieve(b.id)
    c = client.batches.cancel(b.id)
    assert c.status == "cancelling" and c.cancelling_at is not None
    done = wait_for_batch(client, b.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert client.batches.cancel(b.id).status == "cancelled"  # cancelling again is fine
    out, err = results(client, done)
    assert 5 <= len(out) < 40 and len(out) + len(err) == 40
    assert done.request_counts.completed == len(out) and done.request_counts.failed == len(err)
    assert all(e["response"] is None and e["error"]["code"] == "batch_cancelled" for e in err)
    emu.update_scenario(in_progress_seconds=0.05)
    ok = run_batch(client, [chat_line("x", "hi")])
    with pytest.raises(openai.ConflictError) as ei:
        client.batches.cancel(ok.id)
    assert ei.value.body["message"] == "Cannot cancel a batch with status 'completed'."
    assert ei.value.type == "invalid_request_error" and ei.value.code is None


def test_cancel_while_validating_gives_empty_cancelled_batch(emulator_factory: Any) -> None:
    emu = emulator_factory(validating_seconds=0.3, cancelling_seconds=0.0)
    client = openai.OpenAI(base_url=emu.base_url, api_key=DEFAULT_KEY, max_retries=0)
    f = client.files.create(file=("in.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.batches.cancel(b.id)
    done = wait_for_batch(client, b.id)
    assert done.status == "cancelled"
    assert done.output_file_id is None and done.error_file_id is None


# --------------------------------------------------------------------------- Azure


def test_azure_client(emulator: EmulatorServer) -> None:
    az = openai.AzureOpenAI(
        azure_endpoint=emulator.root_url,
        api_version="2024-10-21",
        api_key=DEFAULT_KEY,
        max_retries=0,
    )
    lines = [
        chat_line(f"r{i}", f"azure {i}", model="my-deployment", url="/chat/completions")
        for i in range(3)
    ]
    f = az.files.create(file=("az.jsonl", jsonl(lines)), purpose="batch")
    b = az.batches.create(input_file_id=f.id, endpoint="/chat/completions", completion_window="24h")
    done = wait_for_batch(az, b.id)
    assert done.status == "completed" and done.request_counts.completed == 3
    out = parse_jsonl(az.files.content(done.output_file_id).text)
    assert {o["response"]["body"]["model"] for o in out} == {"my-deployment"}
    r = az.chat.completions.create(
        model="my-deployment", messages=[{"role": "user", "content": "hi"}]
    )
    assert r.choices[0].message.content == "my-deployment says: hi"
    assert [x.id for x in az.batches.list()] == [b.id]
    # The Azure v1 API uses /openai/v1 with the plain OpenAI client
    v1 = openai.OpenAI(
        base_url=emulator.root_url + "/openai/v1", api_key=DEFAULT_KEY, max_retries=0
    )
    assert v1.batches.retrieve(b.id).id == b.id
    stats = emulator.stats()
    assert stats["calls"]["POST /v1/batches"] == 1
    assert stats["calls"]["POST /v1/chat/completions"] == 1


def test_api_key_header_and_missing_key(emulator: EmulatorServer) -> None:
    with httpx2.Client(base_url=emulator.root_url) as http:
        r = http.get("/v1/models", headers={"api-key": DEFAULT_KEY})
        assert r.status_code == 200
        r = http.get("/v1/models")
        assert r.status_code == 401
        assert r.json()["error"]["message"].startswith("You didn't provide an API key.")


# --------------------------------------------------------------------------- server API


def test_server_api_and_admin_routes(
    emulator: EmulatorServer, openai_client: openai.OpenAI
) -> None:
    assert emulator.base_url == emulator.root_url + "/v1"
    run_batch(openai_client, [chat_line("a", "hi")])
    with httpx2.Client(base_url=emulator.root_url) as http:
        assert http.get("/_emulator/health").json()["status"] == "ok"
        assert http.get("/_emulator/stats").json() == emulator.stats()
        r = http.post("/_emulator/scenario", json={"seed": 5})
        assert r.json()["seed"] == 5 and emulator.scenario.seed == 5
        assert emulator.stats()["batches"]["by_status"] == {"completed": 1}
        assert http.post("/_emulator/reset").json() == {"reset": True}
    s = emulator.stats()
    assert s["batches"]["created"] == 0 and s["files"]["live"] == 0 and s["requests"] == {}
    assert emulator.update_scenario(in_progress_seconds=0.1).in_progress_seconds == 0.1
    emulator.reset()
    assert emulator.scenario.seed == 5  # reset keeps the scenario


def test_scenario_from_file(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('seed = 3\nmodels = ["a", "b"]\n[model_quota]\na = 5\n')
    assert Scenario.from_file(toml).model_quota == {"a": 5}
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"fail_once_fraction": 0.1, "api_keys": ["sk-1"]}))
    sc = Scenario.from_file(js)
    assert sc.fail_once_fraction == 0.1 and sc.api_keys == ["sk-1"]
    nested = tmp_path / "n.toml"
    nested.write_text("[scenario]\nexpire_first_n = 2\n")
    assert Scenario.from_file(nested).expire_first_n == 2
    with EmulatorServer(scenario=js) as emu:
        assert emu.scenario.fail_once_fraction == 0.1
