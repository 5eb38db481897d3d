"""Contract tests of the emulator's Anthropic dialect through the real `anthropic` SDK over HTTP:
Message Batches (create, poll, results, cancel, delete, list), online Messages, fault knobs."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from batchops.emulator import EmulatorServer
from batchops.emulator.answers import expected_answer
from batchops.emulator.anthropic_dialect import CREDIT_MESSAGE, to_chat
from batchops.emulator.testing import png_bytes

anthropic = pytest.importorskip("anthropic")

KEY = "sk-ant-test-0000000000abcd"
MODEL = "claude-haiku-4-5"
Factory = Callable[..., EmulatorServer]


def client(emu: EmulatorServer, key: str = KEY) -> Any:
    return anthropic.Anthropic(api_key=key, base_url=emu.root_url, max_retries=0)


def params(text: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def reqs(n: int, prefix: str = "r", **extra: Any) -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}{i}", "params": params(f"row {i}", **extra)} for i in range(n)]


def wait_ended(c: Any, batch_id: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        b = c.messages.batches.retrieve(batch_id)
        if b.processing_status == "ended":
            return b
        assert time.monotonic() < deadline, f"batch {batch_id} did not end: {b}"
        time.sleep(0.02)


def results(c: Any, batch_id: str) -> list[Any]:
    return list(c.messages.batches.results(batch_id))


# --------------------------------------------------------------------------- happy path


def test_batch_round_trip_with_system_image_and_usage(emulator_factory: Factory) -> None:
    emu = emulator_factory()
    c = client(emu)
    image = base64.b64encode(png_bytes(64, 32)).decode()
    with_image = params("describe", system="You are terse.")
    with_image["messages"] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": image},
                },
            ],
        }
    ]
    requests = [*reqs(4), {"custom_id": "img", "params": with_image}]
    b = c.messages.batches.create(requests=requests)
    assert b.id.startswith("msgbatch_")
    assert b.type == "message_batch" and b.processing_status == "in_progress"
    assert b.request_counts.processing == 5 and b.results_url is None
    assert (b.expires_at - b.created_at).total_seconds() == 86_400

    done = wait_ended(c, b.id)
    assert done.request_counts.succeeded == 5 and done.request_counts.processing == 0
    assert done.ended_at is not None and done.results_url.endswith(f"/{b.id}/results")

    by_id = {r.custom_id: r.result for r in results(c, b.id)}
    assert set(by_id) == {r["custom_id"] for r in requests}
    for r in requests:
        msg = by_id[r["custom_id"]].message
        assert by_id[r["custom_id"]].type == "succeeded"
        assert msg.content[0].text == expected_answer(MODEL, to_chat(r["params"]))
        assert msg.model == MODEL and msg.stop_reason == "end_turn"
        u = msg.usage
        assert u.input_tokens > 0 and u.output_tokens > 0
        assert u.cache_creation_input_tokens == 0 and u.cache_read_input_tokens == 0
    assert "[1 image:" in by_id["img"].message.content[0].text
    assert by_id["img"].message.usage.input_tokens > by_id["r0"].message.usage.input_tokens
    stats = emu.stats()["requests"]
    assert all(stats[r["custom_id"]] == {"executed": 1, "succeeded": 1} for r in requests)
    assert emu.stats()["dialects"] == {"anthropic": {"created": 1, "listed": 1}}


def test_results_are_shuffled_by_the_seed_or_in_order(emulator_factory: Factory) -> None:
    requests = reqs(30)
    order = [r["custom_id"] for r in requests]
    c = client(emulator_factory())
    b = c.messages.batches.create(requests=requests)
    wait_ended(c, b.id)
    got = [r.custom_id for r in results(c, b.id)]
    assert sorted(got) == sorted(order) and got != order
    assert got == [r.custom_id for r in results(c, b.id)]  # stable between downloads

    c2 = client(emulator_factory(shuffle_output=False))
    b2 = c2.messages.batches.create(requests=requests)
    wait_ended(c2, b2.id)
    assert [r.custom_id for r in results(c2, b2.id)] == order


def test_a_batch_may_mix_models_and_keeps_max_tokens_and_cache_reads(
    emulator_factory: Factory,
) -> None:
    emu = emulator_factory(cached_tokens_fraction=0.5)
    c = client(emu)
    requests = [
        {"custom_id": "a", "params": params("alpha")},
        {"custom_id": "b", "params": params("beta " * 40, model="claude-sonnet-4-5")},
        {"custom_id": "cut", "params": {**params("gamma " * 50), "max_tokens": 3}},
    ]
    b = c.messages.batches.create(requests=requests)
    wait_ended(c, b.id)
    by_id = {r.custom_id: r.result.message for r in results(c, b.id)}
    assert by_id["a"].content[0].text.startswith(f"{MODEL} says:")
    assert by_id["b"].content[0].text.startswith("claude-sonnet-4-5 says:")
    assert by_id["cut"].stop_reason == "max_tokens" and by_id["cut"].usage.output_tokens == 3
    assert by_id["b"].usage.cache_read_input_tokens > 0
    assert set(emu.stats()["models"]) == {MODEL, "claude-sonnet-4-5"}


def test_structured_output_answers_json_matching_the_schema(emulator_factory: Factory) -> None:
    import json

    schema = {
        "type": "object",
        "properties": {"label": {"type": "string"}, "score": {"type": "integer"}},
        "required": ["label", "score"],
        "additionalProperties": False,
    }
    c = client(emulator_factory())
    msg = c.messages.create(
        **params("classify this"),
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    value = json.loads(msg.content[0].text)
    assert set(value) == {"label", "score"} and isinstance(value["score"], int)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("requests", "needle"),
    [
        ([{"custom_id": "x" * 65, "params": params("a")}], "custom_id"),
        ([{"custom_id": "row.1", "params": params("a")}], "custom_id"),
        (
            [
                {"custom_id": "same", "params": params("a")},
                {"custom_id": "same", "params": params("b")},
            ],
            "Duplicate custom_id 'same'",
        ),
        ([{"custom_id": "a", "params": {"model": MODEL, "messages": []}}], "max_tokens"),
        ([], "at least 1 item"),
    ],
)
def test_create_rejects_bad_requests(
    emulator: EmulatorServer, requests: list[dict[str, Any]], needle: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as exc:
        client(emulator).messages.batches.create(requests=requests)
    body = exc.value.body["error"]
    assert body["type"] == "invalid_request_error" and needle in body["message"]


def test_create_accepts_64_character_ids_and_rejects_too_many_requests(
    emulator_factory: Factory,
) -> None:
    c = client(emulator_factory(anthropic_max_requests=3))
    ok = c.messages.batches.create(requests=[{"custom_id": "A-_9" * 16, "params": params("x")}])
    assert ok.request_counts.processing == 1
    with pytest.raises(anthropic.BadRequestError, match="at most 3 items"):
        c.messages.batches.create(requests=reqs(4))


# --------------------------------------------------------------------------- life cycle


def test_list_pages_newest_first_with_after_and_before_ids(emulator: EmulatorServer) -> None:
    c = client(emulator)
    ids = [c.messages.batches.create(requests=reqs(1)).id for _ in range(5)]
    newest = ids[::-1]
    page = c.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest[:2]
    assert page.has_more and page.first_id == newest[0] and page.last_id == newest[1]
    assert [b.id for b in c.messages.batches.list(limit=2)] == newest  # auto-paging (after_id)
    before = c.messages.batches.list(limit=2, before_id=newest[3])
    assert [b.id for b in before.data] == newest[1:3] and before.has_more
    last = c.messages.batches.list(limit=2, after_id=newest[3])
    assert [b.id for b in last.data] == newest[4:] and not last.has_more


def test_stuck_batch_stays_in_progress_then_cancel_ends_it_canceled(
    emulator_factory: Factory,
) -> None:
    emu = emulator_factory(stuck_first_n=1, stuck_seconds=60)
    c = client(emu)
    stuck = c.messages.batches.create(requests=reqs(4, prefix="s"))
    other = c.messages.batches.create(requests=reqs(2, prefix="o"))
    wait_ended(c, other.id)  # a later batch ends while the stuck one has not started
    b = c.messages.batches.retrieve(stuck.id)
    assert b.processing_status == "in_progress" and b.request_counts.processing == 4
    assert not any(k.startswith("s") for k in emu.stats()["requests"])
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        c.messages.batches.results(stuck.id)

    cancelling = c.messages.batches.cancel(stuck.id)
    assert cancelling.processing_status == "canceling"
    assert cancelling.cancel_initiated_at is not None
    ended = wait_ended(c, stuck.id)
    assert ended.request_counts.canceled == 4
    assert {r.result.type for r in results(c, stuck.id)} == {"canceled"}


def test_delete_only_ended_batches(emulator_factory: Factory) -> None:
    c = client(emulator_factory(stuck_first_n=1, stuck_seconds=60))
    b = c.messages.batches.create(requests=reqs(2))
    with pytest.raises(anthropic.BadRequestError, match="still processing"):
        c.messages.batches.delete(b.id)
    c.messages.batches.cancel(b.id)
    wait_ended(c, b.id)
    deleted = c.messages.batches.delete(b.id)
    assert deleted.id == b.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError) as exc:
        c.messages.batches.retrieve(b.id)
    assert exc.value.body["error"]["type"] == "not_found_error"
    assert c.messages.batches.list().data == []


def test_raw_results_before_the_end_is_an_error(emulator_factory: Factory) -> None:
    emu = emulator_factory(stuck_first_n=1, stuck_seconds=60)
    b = client(emu).messages.batches.create(requests=reqs(1))
    r = httpx2.get(
        f"{emu.root_url}/v1/messages/batches/{b.id}/results",
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- faults


def test_expired_batch_keeps_finished_rows(emulator_factory: Factory) -> None:
    emu = emulator_factory(expire_first_n=1, expire_done_fraction=0.5)
    c = client(emu)
    b = c.messages.batches.create(requests=reqs(10))
    done = wait_ended(c, b.id)
    assert done.request_counts.succeeded == 5 and done.request_counts.expired == 5
    lines = results(c, b.id)
    finished = {r.custom_id for r in lines if r.result.type == "succeeded"}
    assert len(finished) == 5 and len([r for r in lines if r.result.type == "expired"]) == 5
    stats = emu.stats()["requests"]
    assert set(stats) == finished and all(v["executed"] == 1 for v in stats.values())
    # the next batch runs in full
    again = c.messages.batches.create(requests=reqs(3, prefix="z"))
    assert wait_ended(c, again.id).request_counts.succeeded == 3


def test_credit_and_usage_limit_exhaustion(emulator_factory: Factory) -> None:
    emu = emulator_factory(key_quota={KEY: 3})
    c = client(emu)
    b = c.messages.batches.create(requests=reqs(5))
    done = wait_ended(c, b.id)
    assert done.request_counts.succeeded == 3 and done.request_counts.errored == 2
    errored = [r.result for r in results(c, b.id) if r.result.type == "errored"]
    assert all(e.error.error.type == "invalid_request_error" for e in errored)
    assert all(e.error.error.message == CREDIT_MESSAGE for e in errored)
    with pytest.raises(anthropic.BadRequestError) as exc:
        c.messages.batches.create(requests=reqs(1))
    assert exc.value.body["error"]["message"] == CREDIT_MESSAGE

    c2 = client(emulator_factory(model_quota={MODEL: 0}))
    with pytest.raises(anthropic.BadRequestError, match="specified API usage limits"):
        c2.messages.create(**params("hi"))
    other = c2.messages.create(**params("hi", model="claude-sonnet-4-5"))
    assert other.content[0].text == "claude-sonnet-4-5 says: hi"


def test_failed_once_and_rejected_requests_are_errored_lines(emulator_factory: Factory) -> None:
    emu = emulator_factory(fail_once_fraction=1.0)
    c = client(emu)
    b = c.messages.batches.create(requests=reqs(3))
    wait_ended(c, b.id)
    lines = results(c, b.id)
    assert {r.result.error.error.type for r in lines} == {"api_error"}
    b2 = c.messages.batches.create(requests=reqs(3))  # second execution succeeds
    assert wait_ended(c, b2.id).request_counts.succeeded == 3
    assert all(v == {"executed": 2, "succeeded": 1} for v in emu.stats()["requests"].values())

    c2 = client(emulator_factory(reject_fraction=1.0))
    b3 = c2.messages.batches.create(requests=reqs(2))
    wait_ended(c2, b3.id)
    assert {r.result.error.error.type for r in results(c2, b3.id)} == {"invalid_request_error"}


def test_denied_and_unknown_models(emulator_factory: Factory) -> None:
    c = client(
        emulator_factory(denied_models=["claude-opus-4-1"], models=[MODEL, "claude-opus-4-1"])
    )
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        c.messages.create(**params("hi", model="claude-opus-4-1"))
    assert exc.value.body["error"]["type"] == "permission_error"
    b = c.messages.batches.create(requests=reqs(2, model="claude-opus-4-1"))
    wait_ended(c, b.id)
    assert {r.result.error.error.type for r in results(c, b.id)} == {"permission_error"}
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(**params("hi", model="claude-nope"))


def test_rate_limit_429_with_and_without_retry_after(emulator_factory: Factory) -> None:
    c = client(emulator_factory(rate_limit_rpm=1, retry_after_seconds=7))
    c.messages.create(**params("one"))
    with pytest.raises(anthropic.RateLimitError) as exc:
        c.messages.create(**params("two"))
    assert exc.value.body["error"]["type"] == "rate_limit_error"
    assert exc.value.response.headers["retry-after"] == "7"

    c2 = client(emulator_factory(rate_limit_rpm=1, omit_retry_after=True))
    c2.messages.create(**params("one"))
    with pytest.raises(anthropic.RateLimitError) as exc2:
        c2.messages.create(**params("two"))
    assert "retry-after" not in exc2.value.response.headers


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (529, "OverloadedError", "overloaded_error"),
        (500, "InternalServerError", "api_error"),
    ],
)
def test_injected_http_errors_use_the_anthropic_envelope(
    emulator_factory: Factory, status: int, error: str, kind: str
) -> None:
    c = client(emulator_factory(http_error_every=2, http_error_status=status))
    c.messages.batches.list()  # call 1 passes
    with pytest.raises(getattr(anthropic, error)) as exc:
        c.messages.batches.list()
    assert exc.value.status_code == status and exc.value.body["error"]["type"] == kind


def test_auth_headers_and_version(emulator_factory: Factory) -> None:
    emu = emulator_factory(api_keys=[KEY])
    with pytest.raises(anthropic.AuthenticationError) as exc:
        client(emu, key="sk-ant-wrong-0000wxyz").messages.batches.list()
    assert exc.value.body["error"]["type"] == "authentication_error"
    assert "sk-ant-wrong-0000wxyz" not in str(exc.value)

    url = f"{emu.root_url}/v1/messages"
    body = params("hi")
    ok = httpx2.post(url, json=body, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert ok.status_code == 200 and ok.json()["type"] == "message"
    no_version = httpx2.post(url, json=body, headers={"x-api-key": KEY})
    assert no_version.status_code == 400
    assert no_version.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "anthropic-version: header is required",
        },
    }
    no_key = httpx2.post(url, json=body, headers={"anthropic-version": "2023-06-01"})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"


def test_online_message_counts_in_stats(emulator: EmulatorServer) -> None:
    c = client(emulator)
    msg = c.messages.create(**params("hello there", system="be brief"))
    assert msg.content[0].text == "claude-haiku-4-5 says: hello there"
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    c.messages.create(**params("hello there"), extra_headers={"x-batchops-custom-id": "row-7"})
    stats = emulator.stats()
    assert stats["requests"]["row-7"] == {"executed": 1, "succeeded": 1}
    assert stats["calls"]["POST /v1/messages"] == 2


def test_dropped_connection_is_a_connection_error(emulator_factory: Factory) -> None:
    emu = emulator_factory(drop_connection_every=2, drop_after_processing=True)
    c = client(emu)
    c.messages.batches.list()
    with pytest.raises(anthropic.APIConnectionError):
        c.messages.batches.create(requests=reqs(2))
    # processed before the drop: the batch exists (what a crash-safe client must reconcile)
    assert len(c.messages.batches.list().data) == 1
