"""Contract tests of the emulator's Gemini dialect through the real `google-genai` SDK over HTTP:
resumable upload, batch jobs (file and inline), download, list, cancel, delete, generateContent,
key visibility and the fault knobs."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from typing import Any

import httpx2
import orjson
import pytest

from batchops.emulator import EmulatorServer
from batchops.emulator.answers import expected_answer
from batchops.emulator.gemini_dialect import QUOTA_MESSAGE, to_chat
from batchops.emulator.testing import png_bytes

genai = pytest.importorskip("google.genai")
from google.genai import errors, types  # noqa: E402

KEY = "gk-test-00000000000abcd"
OTHER_KEY = "gk-test-00000000000wxyz"
MODEL = "gemini-2.5-flash"
Factory = Callable[..., EmulatorServer]
ENDED = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")


def client(emu: EmulatorServer, key: str = KEY, version: str | None = None) -> Any:
    opts = types.HttpOptions(base_url=emu.root_url, api_version=version)
    return genai.Client(api_key=key, http_options=opts)


def request(text: str, **config: Any) -> dict[str, Any]:
    req: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if config:
        req["generationConfig"] = config
    return req


def jsonl(n: int, prefix: str = "k") -> bytes:
    lines = [{"key": f"{prefix}{i}", "request": request(f"row {i}")} for i in range(n)]
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


def upload(c: Any, data: bytes, name: str = "input") -> Any:
    cfg = types.UploadFileConfig(mime_type="application/jsonl", display_name=name)
    return c.files.upload(file=io.BytesIO(data), config=cfg)


def wait_done(c: Any, name: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = c.batches.get(name=name)
        if job.state.name in ENDED:
            return job
        assert time.monotonic() < deadline, f"job {name} did not end: {job}"
        time.sleep(0.02)


def result_lines(c: Any, job: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in c.files.download(file=job.dest.file_name).splitlines()]


def create(c: Any, data: bytes, display: str = "run-1", model: str = MODEL) -> Any:
    f = upload(c, data)
    return c.batches.create(model=model, src=f.name, config={"display_name": display})


# --------------------------------------------------------------------------- happy path


def test_file_batch_round_trip(emulator_factory: Factory) -> None:
    emu = emulator_factory()
    c = client(emu)
    image = base64.b64encode(png_bytes(40, 20)).decode()
    img_req = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "what is this"},
                    {"inline_data": {"mime_type": "image/png", "data": image}},
                ],
            }
        ],
        "system_instruction": {"parts": [{"text": "be brief"}]},
        "generation_config": {"max_output_tokens": 100, "temperature": 0},
    }
    data = jsonl(4) + orjson.dumps({"key": "img", "request": img_req}) + b"\n"
    f = upload(c, data)
    assert f.name.startswith("files/") and f.display_name == "input"
    assert f.size_bytes == len(data) and f.state.name == "ACTIVE"
    assert c.files.get(name=f.name).sha256_hash == f.sha256_hash

    job = c.batches.create(model=MODEL, src=f.name, config={"display_name": "run-1"})
    assert job.name.startswith("batches/") and job.display_name == "run-1"
    assert job.state.name in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert job.model == f"models/{MODEL}"
    done = wait_done(c, job.name)
    assert done.state.name == "JOB_STATE_SUCCEEDED" and done.end_time is not None
    assert done.display_name == "run-1"

    lines = result_lines(c, done)
    by_key = {x["key"]: x["response"] for x in lines}
    assert set(by_key) == {"k0", "k1", "k2", "k3", "img"}
    for key, req in [("k1", request("row 1")), ("img", img_req)]:
        text = by_key[key]["candidates"][0]["content"]["parts"][0]["text"]
        assert text == expected_answer(MODEL, to_chat(MODEL, req))
    assert "[1 image:" in by_key["img"]["candidates"][0]["content"]["parts"][0]["text"]
    usage = by_key["k0"]["usageMetadata"]
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert by_key["img"]["usageMetadata"]["promptTokenCount"] > usage["promptTokenCount"]
    stats = emu.stats()["requests"]
    assert all(stats[k] == {"executed": 1, "succeeded": 1} for k in by_key)


def test_results_are_shuffled_by_the_seed_or_in_order(emulator_factory: Factory) -> None:
    order = [f"k{i}" for i in range(30)]
    c = client(emulator_factory())
    job = wait_done(c, create(c, jsonl(30)).name)
    got = [x["key"] for x in result_lines(c, job)]
    assert sorted(got) == sorted(order) and got != order

    c2 = client(emulator_factory(shuffle_output=False))
    job2 = wait_done(c2, create(c2, jsonl(30)).name)
    assert [x["key"] for x in result_lines(c2, job2)] == order


def test_inline_requests_answer_inline_with_their_metadata(emulator: EmulatorServer) -> None:
    c = client(emulator)
    src = [
        {
            "contents": [{"role": "user", "parts": [{"text": f"inline {i}"}]}],
            "metadata": {"key": f"i{i}"},
        }
        for i in range(3)
    ]
    job = c.batches.create(model=MODEL, src=src, config={"display_name": "inline"})
    done = wait_done(c, job.name)
    got = {r.metadata["key"]: r.response.text for r in done.dest.inlined_responses}
    assert got == {f"i{i}": f"{MODEL} says: inline {i}" for i in range(3)}
    assert done.dest.file_name is None


def test_structured_output_with_a_gemini_schema(emulator: EmulatorServer) -> None:
    c = client(emulator)
    schema = types.Schema(
        type=types.Type.OBJECT,
        properties={"label": types.Schema(type=types.Type.STRING)},
        required=["label"],
    )
    cfg = types.GenerateContentConfig(response_mime_type="application/json", response_schema=schema)
    r = c.models.generate_content(model=MODEL, contents="classify", config=cfg)
    assert set(json.loads(r.text)) == {"label"}


def test_generate_content_online_and_v1beta(emulator: EmulatorServer) -> None:
    for version in (None, "v1beta"):
        c = client(emulator, version=version)
        cfg = types.GenerateContentConfig(system_instruction="be brief", max_output_tokens=3)
        r = c.models.generate_content(model=MODEL, contents="hello there world " * 10, config=cfg)
        assert r.candidates[0].finish_reason.name == "MAX_TOKENS"
        assert r.usage_metadata.candidates_token_count == 3
        r2 = c.models.generate_content(model=MODEL, contents="hello there")
        assert r2.text == f"{MODEL} says: hello there"
    calls = emulator.stats()["calls"]
    assert calls["POST /v1/models/{model}:{action}"] == 4


# --------------------------------------------------------------------------- jobs


def test_list_pages_newest_first_and_only_the_creators_jobs(emulator: EmulatorServer) -> None:
    c = client(emulator)
    names = [create(c, jsonl(1), display=f"job-{i}").name for i in range(5)]
    listed = [j.name for j in c.batches.list(config={"page_size": 2})]  # follows nextPageToken
    assert listed == names[::-1]
    page = httpx2.get(f"{emulator.root_url}/v1/batches", params={"pageSize": 2, "key": KEY}).json()
    assert len(page["operations"]) == 2 and page["nextPageToken"]
    assert page["operations"][0]["metadata"]["displayName"] == "job-4"

    other = client(emulator, key=OTHER_KEY)
    assert list(other.batches.list()) == []
    with pytest.raises(errors.ClientError) as exc:
        other.batches.get(name=names[0])
    assert exc.value.code == 404 and exc.value.status == "NOT_FOUND"
    with pytest.raises(errors.ClientError):
        other.batches.cancel(name=names[0])


def test_stuck_job_stays_pending_then_cancel_and_delete(emulator_factory: Factory) -> None:
    emu = emulator_factory(stuck_first_n=1, stuck_seconds=60)
    c = client(emu)
    stuck = create(c, jsonl(3, prefix="s"))
    later = create(c, jsonl(2, prefix="o"))
    assert wait_done(c, later.name).state.name == "JOB_STATE_SUCCEEDED"
    assert c.batches.get(name=stuck.name).state.name == "JOB_STATE_PENDING"
    assert not any(k.startswith("s") for k in emu.stats()["requests"])

    c.batches.cancel(name=stuck.name)
    done = wait_done(c, stuck.name)
    assert done.state.name == "JOB_STATE_CANCELLED"
    assert done.dest is None  # nothing ran: no results file
    c.batches.delete(name=stuck.name)
    with pytest.raises(errors.ClientError) as exc:
        c.batches.get(name=stuck.name)
    assert exc.value.code == 404


def test_expired_job_keeps_finished_rows(emulator_factory: Factory) -> None:
    emu = emulator_factory(expire_first_n=1, expire_done_fraction=0.5)
    c = client(emu)
    job = wait_done(c, create(c, jsonl(10)).name)
    assert job.state.name == "JOB_STATE_EXPIRED"
    lines = result_lines(c, job)
    assert len(lines) == 5 and all("response" in x for x in lines)
    stats = emu.stats()["requests"]
    assert set(stats) == {x["key"] for x in lines}
    raw = httpx2.get(f"{emu.root_url}/v1/{job.name}", headers={"x-goog-api-key": KEY}).json()
    assert raw["metadata"]["state"] == "BATCH_STATE_EXPIRED" and raw["done"] is True
    assert raw["metadata"]["batchStats"]["successfulRequestCount"] == "5"


def test_quota_is_resource_exhausted_at_create_and_per_line(emulator_factory: Factory) -> None:
    emu = emulator_factory(model_quota={MODEL: 3})
    c = client(emu)
    job = wait_done(c, create(c, jsonl(5)).name)
    lines = result_lines(c, job)
    errs = [x["error"] for x in lines if "error" in x]
    assert len(errs) == 2 and {e["status"] for e in errs} == {"RESOURCE_EXHAUSTED"}
    assert all(e["code"] == 429 and e["message"].startswith(QUOTA_MESSAGE) for e in errs)
    assert f"model: {MODEL}" in errs[0]["message"]
    with pytest.raises(errors.ClientError) as exc:
        create(c, jsonl(1))
    assert exc.value.code == 429 and exc.value.status == "RESOURCE_EXHAUSTED"
    # another model on the same key still works
    other = wait_done(c, create(c, jsonl(1), model="gemini-2.5-pro").name)
    assert other.state.name == "JOB_STATE_SUCCEEDED"


def test_enqueued_token_limit_fails_the_job(emulator_factory: Factory) -> None:
    emu = emulator_factory(enqueued_token_limit={MODEL: 20})
    c = client(emu)
    job = wait_done(c, create(c, jsonl(5)).name)
    assert job.state.name == "JOB_STATE_FAILED" and job.dest is None
    raw = httpx2.get(f"{emu.root_url}/v1/{job.name}", params={"key": KEY}).json()
    assert "Enqueued token limit reached" in raw["error"]["message"]
    ok = wait_done(c, create(c, jsonl(1)).name)
    assert ok.state.name == "JOB_STATE_SUCCEEDED"


def test_rate_limit_with_and_without_retry_info(emulator_factory: Factory) -> None:
    c = client(emulator_factory(rate_limit_rpm=1, retry_after_seconds=5))
    c.models.generate_content(model=MODEL, contents="one")
    with pytest.raises(errors.ClientError) as exc:
        c.models.generate_content(model=MODEL, contents="two")
    assert exc.value.code == 429
    kinds = {d["@type"].rsplit(".", 1)[-1] for d in exc.value.details["error"]["details"]}
    assert kinds == {"QuotaFailure", "RetryInfo"}

    c2 = client(emulator_factory(rate_limit_rpm=1, omit_retry_after=True))
    c2.models.generate_content(model=MODEL, contents="one")
    with pytest.raises(errors.ClientError) as exc2:
        c2.models.generate_content(model=MODEL, contents="two")
    kinds2 = {d["@type"].rsplit(".", 1)[-1] for d in exc2.value.details["error"]["details"]}
    assert kinds2 == {"QuotaFailure"} and "retry" not in exc2.value.message.lower()


@pytest.mark.parametrize(("status", "expected"), [(503, "UNAVAILABLE"), (500, "INTERNAL")])
def test_injected_server_errors(emulator_factory: Factory, status: int, expected: str) -> None:
    c = client(emulator_factory(http_error_every=2, http_error_status=status))
    c.models.generate_content(model=MODEL, contents="one")
    with pytest.raises(errors.ServerError) as exc:
        c.models.generate_content(model=MODEL, contents="two")
    assert exc.value.code == status and exc.value.status == expected


def test_failed_once_rejected_and_denied_requests(emulator_factory: Factory) -> None:
    emu = emulator_factory(fail_once_fraction=1.0)
    c = client(emu)
    lines = result_lines(c, wait_done(c, create(c, jsonl(2)).name))
    assert {x["error"]["status"] for x in lines} == {"INTERNAL"}
    again = result_lines(c, wait_done(c, create(c, jsonl(2)).name))
    assert all("response" in x for x in again)

    c2 = client(emulator_factory(denied_models=[MODEL]))
    with pytest.raises(errors.ClientError) as exc:
        c2.models.generate_content(model=MODEL, contents="hi")
    assert exc.value.code == 403 and exc.value.status == "PERMISSION_DENIED"

    c3 = client(emulator_factory(models=["gemini-2.5-pro"]))
    with pytest.raises(errors.ClientError) as exc3:
        c3.batches.create(model=MODEL, src=upload(c3, jsonl(1)).name)
    assert exc3.value.code == 404 and "is not found" in exc3.value.message


def test_auth_and_routing_next_to_the_openai_dialect(emulator_factory: Factory) -> None:
    emu = emulator_factory(api_keys=[KEY])
    wrong = client(emu, key="gk-wrong-000000000000")  # (a dropped Client closes its transport)
    with pytest.raises(errors.ClientError) as exc:
        wrong.models.generate_content(model=MODEL, contents="x")
    assert exc.value.code == 400 and exc.value.message.startswith("API key not valid")
    no_key = httpx2.get(f"{emu.root_url}/v1beta/batches")
    assert no_key.status_code == 403 and no_key.json()["error"]["status"] == "PERMISSION_DENIED"
    by_query = httpx2.get(f"{emu.root_url}/v1/batches", params={"key": KEY})
    assert by_query.status_code == 200 and by_query.json() == {"operations": []}
    # the same /v1 path without a Google key is still the OpenAI dialect
    openai_list = httpx2.get(
        f"{emu.root_url}/v1/batches", headers={"authorization": f"Bearer {KEY}"}
    )
    assert openai_list.status_code == 200 and openai_list.json()["object"] == "list"


def test_bad_input_files_are_invalid_argument(emulator: EmulatorServer) -> None:
    c = client(emulator)
    for data, needle in [
        (b'{"key": "a", "request": {}}\nnot json\n', "line 2"),
        (b'{"request": {"contents": []}}\n', "no 'key'"),
    ]:
        with pytest.raises(errors.ClientError) as exc:
            create(c, data)
        assert exc.value.code == 400 and needle in exc.value.message
    with pytest.raises(errors.ClientError) as exc2:
        c.batches.create(model=MODEL, src="files/doesnotexist")
    assert exc2.value.code == 404


def test_files_list_get_and_delete(emulator: EmulatorServer) -> None:
    c = client(emulator)
    f = upload(c, jsonl(2), name="in-a")
    assert [x.name for x in c.files.list()] == [f.name]
    c.files.delete(name=f.name)
    with pytest.raises(errors.ClientError):
        c.files.get(name=f.name)
    assert emulator.stats()["files"]["uploaded"] == 1


def test_resumable_upload_in_chunks_checks_offsets(emulator: EmulatorServer) -> None:
    root = emulator.root_url
    start = httpx2.post(
        f"{root}/upload/v1beta/files",
        json={"file": {"displayName": "chunks"}},
        headers={
            "x-goog-api-key": KEY,
            "x-goog-upload-protocol": "resumable",
            "x-goog-upload-command": "start",
            "x-goog-upload-header-content-length": "10",
            "x-goog-upload-header-content-type": "application/jsonl",
        },
    )
    assert start.headers["x-goog-upload-status"] == "active"
    url = start.headers["x-goog-upload-url"]
    assert url.startswith(f"{root}/upload/v1beta/files?upload_id=")

    def send(data: bytes, offset: int, command: str) -> Any:
        headers = {"x-goog-upload-command": command, "x-goog-upload-offset": str(offset)}
        return httpx2.post(url, content=data, headers=headers)  # the upload URL authorizes

    assert send(b"01234", 0, "upload").headers["x-goog-upload-status"] == "active"
    assert send(b"xx", 3, "upload").status_code == 400  # wrong offset
    final = send(b"56789", 5, "upload, finalize")
    assert final.headers["x-goog-upload-status"] == "final"
    f = final.json()["file"]
    assert f["displayName"] == "chunks" and f["sizeBytes"] == "10"
    c = client(emulator, version="v1beta")
    assert c.files.download(file=f["name"]) == b"0123456789"


def test_dropped_connections_and_slow_responses(emulator_factory: Factory) -> None:
    c = client(emulator_factory(drop_connection_every=2, slow_response_seconds=0.01))
    c.models.generate_content(model=MODEL, contents="one")
    with pytest.raises(httpx2.TransportError):
        c.models.generate_content(model=MODEL, contents="two")
    assert c.models.generate_content(model=MODEL, contents="three").text.endswith("three")
