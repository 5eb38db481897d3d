"""The Anthropic backend below the CLI: translation of the one internal request (a chat body) to
Messages params, safe custom ids and back, result lines, batch states, the error preset, and the
backend itself through the real `anthropic` SDK against the emulator's Anthropic dialect."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchops.backends import RemoteError, SubmitRequest, make_backend
from batchops.backends import anthropic_wire as W
from batchops.emulator import EmulatorServer
from batchops.emulator.answers import expected_answer
from batchops.emulator.anthropic_dialect import CREDIT_MESSAGE, to_chat
from batchops.emulator.testing import png_bytes
from batchops.policy import Scope, classify
from batchops.records import BadLine, RowOutcome
from batchops.spec import ModelEntry, RetryPolicy
from batchops.states import BatchState

pytest.importorskip("anthropic")

KEY = "sk-ant-test-0000000000abcd"
MODEL = "claude-haiku-4-5"
Factory = Callable[..., EmulatorServer]


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


# --------------------------------------------------------------------------- translation


def test_system_image_max_tokens_temperature_schema_translate() -> None:
    png = png_bytes(4, 3)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                ],
            },
        ],
        "max_tokens": 77,
        "temperature": 0.3,
        "stop": "END",
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        "seed": 3,
        "top_k": 5,
    }
    dropped: set[str] = set()
    p = W.to_params(body, dropped=dropped)
    assert p["system"] == "Be terse."
    assert p["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe"},
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/png",
                        "data": base64.b64encode(png).decode(),
                    },
                },
            ],
        }
    ]
    assert (p["max_tokens"], p["temperature"], p["stop_sequences"]) == (77, 0.3, ["END"])
    assert p["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert p["top_k"] == 5 and "seed" not in p and dropped == {"seed"}
    # The emulator reads these params back into the same chat request.
    back = to_chat(p)
    assert back["messages"][0] == {"role": "system", "content": "Be terse."}
    assert back["messages"][1]["content"][1]["image_url"]["url"] == url


def test_max_tokens_default_and_plain_text() -> None:
    p = W.to_params(chat("hi"))
    assert p == {
        "model": MODEL,
        "max_tokens": W.DEFAULT_MAX_TOKENS,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert W.to_params(chat("hi", max_completion_tokens=9))["max_tokens"] == 9


def test_untranslatable_bodies_name_the_part() -> None:
    with pytest.raises(W.TranslationError, match="no messages"):
        W.to_params({"model": MODEL, "input": "responses body"})
    bad = chat("x")
    bad["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "file:///x.png"}}]
    with pytest.raises(W.TranslationError, match=r"messages\[0\]\.content\[0\]"):
        W.to_params(bad)


def test_safe_ids_are_short_distinct_and_map_back(tmp_path: Path) -> None:
    tag = {"batchops_run": "r" * 200, "batchops_chunk": "123456", "batchops_attempt": "7"}
    prefix = W.id_prefix(tag, "display")
    ids = [W.safe_id(prefix, n) for n in (0, 99_999)]
    assert all(W.SAFE_ID.match(i) for i in ids)
    assert W.id_prefix({**tag, "batchops_attempt": "8"}, "display") != prefix
    assert W.id_prefix({**tag, "batchops_run": "other"}, "display") != prefix
    assert W.line_of(ids[1]) == 99_999 and W.line_of("no-line") is None
    # Row ids of any length and alphabet come back from the chunk file's line order.
    rows = ["x" * 100, "a/b c:é?", "007"]
    chunk = tmp_path / "chunk.jsonl"
    chunk.write_bytes(
        b"".join(orjson.dumps({"custom_id": r, "body": chat(r)}) + b"\n" for r in rows)
    )
    body, n = W.batch_body(chunk, prefix, set())
    sent = orjson.loads(body)["requests"]
    assert n == 3 and [r["custom_id"] for r in sent] == [W.safe_id(prefix, i) for i in range(3)]
    assert W.chunk_ids(chunk) == rows


def _line(cid: str, result: dict[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": cid, "result": result}) + b"\n"


def test_result_lines_map_to_row_ids_in_any_order(tmp_path: Path) -> None:
    msg = {
        "id": "msg_1",
        "model": MODEL,
        "content": [{"type": "text", "text": "answer"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_read_input_tokens": 4,
            "cache_creation_input_tokens": 2,
        },
    }
    err = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    path = tmp_path / "results.jsonl"
    path.write_bytes(
        _line("p_3", {"type": "expired"})
        + _line("p_1", {"type": "errored", "error": err})
        + b"not json\n"
        + _line("p_0", {"type": "succeeded", "message": msg})
        + _line("p_2", {"type": "canceled"})
        + _line("p_9", {"type": "succeeded", "message": msg})
    )
    seen: list[tuple[int | None, str, str]] = []

    def cls(status: int | None, type_: str, message: str) -> Any:
        seen.append((status, type_, message))
        return "invalid_request"

    out = list(W.read_lines(path, ["row-a", "row-b", "row-c", "row-d"], cls))
    outcomes = {o.custom_id: o for o in out if isinstance(o, RowOutcome)}
    assert sum(isinstance(o, BadLine) for o in out) == 2  # not JSON, and p_9 (no such line)
    ok = outcomes["row-a"]
    assert ok.ok and ok.response == "answer" and ok.finish_reason == "stop"
    assert ok.usage is not None
    assert (ok.usage.prompt_tokens, ok.usage.cached_tokens, ok.usage.completion_tokens) == (
        16,
        4,
        5,
    )
    assert outcomes["row-b"].error_class == "invalid_request" and seen == [
        (400, "invalid_request_error", "bad")
    ]
    assert outcomes["row-b"].status_code == 400 and not outcomes["row-b"].retryable
    assert outcomes["row-c"].error_class == "cancelled" and outcomes["row-c"].retryable
    assert outcomes["row-d"].error_class == "expired" and outcomes["row-d"].retryable


def test_truncated_and_refused_answers_are_format_errors_with_tokens() -> None:
    msg = {"content": [{"type": "text", "text": "par"}], "stop_reason": "max_tokens"}
    msg["usage"] = {"input_tokens": 3, "output_tokens": 7}
    o = W.message_outcome("r", msg)
    assert not o.ok and o.error_class == "format_error" and o.response == "par"
    assert o.usage is not None and o.usage.completion_tokens == 7
    refused = W.message_outcome("r", {**msg, "stop_reason": "refusal"})
    assert refused.error_code == "refusal"


def test_batch_states() -> None:
    def b(status: str, cancel: str | None = None, **counts: int) -> Any:
        return W.remote_batch(
            {
                "id": "msgbatch_1",
                "processing_status": status,
                "request_counts": counts,
                "created_at": "2026-01-01T00:00:00.5Z",
                "cancel_initiated_at": cancel,
            }
        )

    running = b("in_progress", processing=4)
    assert running.state == BatchState.IN_PROGRESS and running.total == 4
    assert running.output_ref is None and running.created_at == 1767225600.5
    assert b("canceling", processing=4).state == BatchState.CANCELLING
    done = b("ended", succeeded=3, errored=1)
    assert (done.state, done.completed, done.failed, done.output_ref) == (
        BatchState.COMPLETED,
        3,
        1,
        "msgbatch_1",
    )
    assert b("ended", succeeded=2, expired=2).state == BatchState.EXPIRED
    assert b("ended", succeeded=2, canceled=2).state == BatchState.CANCELLED
    # A cancel asked for but every request finished: still a cancelled batch (canceling → ended).
    assert b("ended", "2026-01-01T00:00:01Z", succeeded=4).state == BatchState.CANCELLED


@pytest.mark.parametrize(
    ("status", "type_", "message", "cls", "scope"),
    [
        (429, "rate_limit_error", "Number of requests has exceeded your rate limit", "rate_limit", Scope.REQUEST),
        (529, "overloaded_error", "Overloaded", "api_error", Scope.REQUEST),
        (401, "authentication_error", "invalid x-api-key", "auth", Scope.KEY),
        (403, "permission_error", "Your API key does not have permission", "auth", Scope.KEY),
        (403, "permission_error", "Your organization does not have access to model claude-x.", "model_not_found", Scope.MODEL),
        (400, "invalid_request_error", CREDIT_MESSAGE, "quota", Scope.ACCOUNT),
        (400, "invalid_request_error", "You have reached your specified API usage limits. You will regain access on 2026-02-01 at 00:00 UTC.", "quota", Scope.MODEL),
        (404, "not_found_error", "model: claude-nope", "model_not_found", Scope.MODEL),
        (404, "not_found_error", "message_batch msgbatch_x not found", "invalid_request", Scope.REQUEST),
        (400, "invalid_request_error", "max_tokens: Field required", "invalid_request", Scope.REQUEST),
    ],
)  # fmt: skip
def test_error_preset(status: int, type_: str, message: str, cls: str, scope: Scope) -> None:
    from batchops.classify import classify_http

    got = classify(
        status,
        type_,
        type_,
        message,
        provider="anthropic",
        fallback=classify_http(status, type_, type_),
    )
    assert got == (cls, scope)


# --------------------------------------------------------------------------- over HTTP


def backend(emu: EmulatorServer, key: str = KEY, model: str = MODEL) -> Any:
    from batchops.backends import anthropic as A

    A._CLAIMED.clear()  # a fresh process: nothing known about earlier batches
    entry = ModelEntry(name=model, provider="anthropic", base_url=emu.base_url)
    return make_backend(entry, key, None, policy=RetryPolicy(initial_delay=0.01, max_delay=0.05))


def chunk_file(tmp: Path, rows: list[str], name: str = "chunk_000001.jsonl") -> Path:
    path = tmp / name
    path.write_bytes(
        b"".join(orjson.dumps({"custom_id": r, "body": chat(f"row {r}")}) + b"\n" for r in rows)
    )
    return path


def request(path: Path, chunk: int = 1, attempt: int = 0) -> SubmitRequest:
    tag = {"batchops_run": "run-1", "batchops_chunk": str(chunk), "batchops_attempt": str(attempt)}
    return SubmitRequest(path, None, MODEL, "/v1/chat/completions", "24h", tag, f"run-1-c{chunk}")


def wait_ended(be: Any, batch_id: str) -> Any:
    deadline = time.monotonic() + 20
    while (b := be.retrieve(batch_id)).output_ref is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return b


def test_create_poll_download_read_round_trip(emulator_factory: Factory, tmp_path: Path) -> None:
    emu = emulator_factory()
    be = backend(emu)
    rows = ["a" * 90, "with space/slash", "007"]
    path = chunk_file(tmp_path, rows)
    b = be.create(request(path))
    assert b.state == BatchState.IN_PROGRESS and b.total == 3
    assert set(be.poll([b.id])) == {b.id}
    done = wait_ended(be, b.id)
    assert done.state == BatchState.COMPLETED and done.completed == 3
    out = be.download(done.output_ref, tmp_path / "out" / "r.jsonl")
    got = {o.custom_id: o for o in be.read_results(out, path, "/v1/chat/completions")}
    assert set(got) == set(rows)
    for line in path.read_bytes().splitlines():
        req = orjson.loads(line)
        want = expected_answer(MODEL, to_chat(W.to_params(req["body"])))
        assert got[req["custom_id"]].response == want


def test_an_ended_batch_is_deleted_once_then_404(emulator_factory: Factory, tmp_path: Path) -> None:
    # Deleted only once ended (the engine deletes collected batches): a running one is refused,
    # a second delete answers 404 (the cleanup's "already gone").
    emu = emulator_factory(in_progress_seconds=0.3)
    be = backend(emu)
    assert be.deletes_batches and not be.uploads_files
    b = be.create(request(chunk_file(tmp_path, ["r1", "r2"])))
    with pytest.raises(RemoteError) as running:
        be.delete_batch(b.id)
    assert running.value.status == 400
    wait_ended(be, b.id)
    be.delete_batch(b.id)
    for call in (be.delete_batch, be.retrieve):
        with pytest.raises(RemoteError) as gone:
            call(b.id)
        assert gone.value.status == 404


def test_find_batch_after_a_lost_create(emulator_factory: Factory, tmp_path: Path) -> None:
    """A create whose answer was lost: no intent file → nothing was sent; a running unclaimed
    batch of the same size → undecided (raises, transient); once ended → found by its ids."""
    emu = emulator_factory(stuck_first_n=1)  # the first batch stays pending until released
    path = chunk_file(tmp_path, ["r1", "r2"])
    req = request(path)
    since = time.time() - 3600
    calls_before = sum(emu.stats()["calls"].values())
    assert backend(emu).find_batch(req, since) is None  # no intent: no call either
    assert sum(emu.stats()["calls"].values()) == calls_before
    made = backend(emu).create(req)
    # Another chunk of the same size, created and claimed by this process, is never taken.
    fresh = backend(emu)
    other = fresh.create(request(chunk_file(tmp_path, ["o1", "o2"], "c2.jsonl"), chunk=2))
    with pytest.raises(RemoteError) as info:
        fresh.find_batch(req, since)  # ours is stuck in progress: cannot tell yet
    assert info.value.cls == "api_error" and info.value.status is None
    assert not info.value.refused
    emu.update_scenario(stuck_first_n=0)  # now it runs and ends
    wait_ended(fresh, made.id)
    found = fresh.find_batch(req, since)
    assert found is not None and found.id == made.id != other.id
    # Attempt 1 of the same chunk was never created: nothing is found for it.
    assert fresh.find_batch(request(path, attempt=1), since) is None


def test_errors_are_classified_with_scope(emulator_factory: Factory, tmp_path: Path) -> None:
    path = chunk_file(tmp_path, ["r1"])
    emu = emulator_factory(key_quota={KEY: 0})
    with pytest.raises(RemoteError) as info:
        backend(emu).create(request(path))
    assert (info.value.cls, info.value.scope, info.value.refused) == ("quota", Scope.ACCOUNT, True)
    emu = emulator_factory(model_quota={MODEL: 0})
    with pytest.raises(RemoteError) as info:
        backend(emu).create(request(path))
    assert (info.value.cls, info.value.scope) == ("quota", Scope.MODEL)
    emu = emulator_factory(api_keys=["sk-ant-other-key-00001234"])
    with pytest.raises(RemoteError) as info:
        backend(emu).create(request(path))
    assert (info.value.cls, info.value.scope) == ("auth", Scope.KEY)
    assert KEY not in str(info.value)
    emu = emulator_factory(models=["claude-other"])
    with pytest.raises(RemoteError) as info:
        backend(emu).create(request(path))
    assert (info.value.cls, info.value.scope) == ("model_not_found", Scope.MODEL)


def test_overloaded_and_rate_limited_polls_are_retried(
    emulator_factory: Factory, tmp_path: Path
) -> None:
    emu = emulator_factory(http_error_every=2, http_error_status=529)
    be = backend(emu)
    b = be.create(request(chunk_file(tmp_path, ["r1"])))  # call 1: fine
    assert be.retrieve(b.id).id == b.id  # call 2 is a 529, retried
    assert emu.stats()["calls"]["GET /v1/messages/batches/{id}"] == 2


def test_online_call_and_rate_limit_error(emulator_factory: Factory) -> None:
    emu = emulator_factory(rate_limit_rpm=1, retry_after_seconds=7)
    be = backend(emu)
    body = chat("hello", max_tokens=50)

    async def two_calls() -> tuple[RowOutcome, RemoteError]:
        try:
            first = await be.call_online("/v1/chat/completions", body, "row/1 é")
            with pytest.raises(RemoteError) as info:
                await be.call_online("/v1/chat/completions", body, "row-2")
            return first, info.value
        finally:
            await be.aclose()

    o, err = asyncio.run(two_calls())
    assert o.ok and o.response == expected_answer(MODEL, to_chat(W.to_params(body)))
    assert o.usage is not None and o.usage.completion_tokens > 0
    assert (err.cls, err.status, err.retry_after) == ("rate_limit", 429, 7.0)
    assert "row%2F1%20%C3%A9" in emu.stats()["requests"]


def test_usage_splits_cache_reads_and_writes_by_lifetime() -> None:
    from batchops.backends.anthropic_wire import usage_of

    u = usage_of(
        {
            "input_tokens": 10,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 50,
            "cache_creation": {"ephemeral_5m_input_tokens": 20, "ephemeral_1h_input_tokens": 30},
            "output_tokens": 7,
        }
    )
    assert u is not None
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.cache_write_1h_tokens) == (
        160,
        100,
        20,
        30,
    )
    old = usage_of({"input_tokens": 1, "cache_creation_input_tokens": 5, "output_tokens": 2})
    assert old is not None and (old.cache_write_tokens, old.cache_write_1h_tokens) == (5, 0)
