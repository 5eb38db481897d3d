"""Online mode's lean HTTP path (issue 21) against the emulator over HTTP.

The lean transport (`backends/http1.py`) must answer and fail exactly as the SDK's transport
did: every fault the emulator can inject is sent through both paths of the same backend class
and the outcomes / `RemoteError`s are compared field by field. Group commit must keep the kill
bound: a kill at any moment re-sends at most one request per worker, never a committed row.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import executions, invoke, read_csv, subprocess_run

from batchops.backends import RemoteError
from batchops.backends.http1 import _read_answer
from batchops.backends.openai import OpenAIBackend
from batchops.emulator.testing import DEFAULT_KEY
from batchops.policy import Scope
from batchops.spec import ModelEntry, RetryPolicy

MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"


def backends(base_url: str, key: str = DEFAULT_KEY, **kw: Any) -> tuple[OpenAIBackend, ...]:
    """The same backend twice: the lean transport, and the SDK's (lean_online=False)."""
    entry = ModelEntry(name=MODEL)
    return tuple(
        OpenAIBackend(
            entry,
            key,
            base_url=base_url,
            policy=RetryPolicy(),
            scrub=lambda t: t.replace(key, "sk-…" + key[-4:]),
            lean_online=lean,
            **kw,
        )
        for lean in (True, False)
    )


def body(text: str = "hello") -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}]}


async def call(backend: OpenAIBackend, custom_id: str) -> Any:
    """The outcome, or the error's fields (what the online engine decides on)."""
    try:
        return await backend.call_online(ENDPOINT, body(), custom_id)
    except RemoteError as e:
        return (e.what, e.cls, e.status, e.code, e.message, e.retry_after, e.scope)
    finally:
        await backend.aclose()


def both(base_url: str, ids: tuple[str, str] = ("a", "b"), **kw: Any) -> tuple[Any, Any]:
    lean, sdk = backends(base_url, **kw)
    return asyncio.run(call(lean, ids[0])), asyncio.run(call(sdk, ids[1]))


def same_outcome(a: Any, b: Any) -> None:
    if isinstance(a, tuple):
        assert a == b
        return
    # Answers differ only by the custom id they were sent with.
    assert (a.ok, a.status_code, a.error_class, a.model) == (
        b.ok,
        b.status_code,
        b.error_class,
        b.model,
    )


def test_answers_are_parsed_the_same(emulator: Any) -> None:
    lean, sdk = both(emulator.base_url, ids=("r1", "r2"))
    assert lean.ok and sdk.ok
    assert (lean.custom_id, sdk.custom_id) == ("r1", "r2")
    assert (lean.response, lean.usage, lean.finish_reason) == (
        sdk.response,
        sdk.usage,
        sdk.finish_reason,
    )
    stats = executions(emulator)
    assert stats["r1"] == stats["r2"] == {"executed": 1, "succeeded": 1}


@pytest.mark.parametrize(
    "knobs",
    [
        {"models": ["other-model"]},  # 404 model_not_found
        {"denied_models": [MODEL]},  # 403 no access
        {"http_error_every": 1, "http_error_status": 503},
        {"http_error_every": 1, "http_error_status": 500},
        {"reject_fraction": 1.0},  # 400 invalid_request_error
        {"model_quota": {MODEL: 0}},  # 429 insufficient_quota
        {"drop_connection_every": 1},  # no answer at all
    ],
    ids=["404", "403", "503", "500", "400", "quota", "dropped"],
)
def test_every_error_is_mapped_exactly_as_through_the_sdk(
    emulator_factory: Any, knobs: dict[str, Any]
) -> None:
    emu = emulator_factory(**knobs)
    lean, sdk = both(emu.base_url)
    assert isinstance(lean, tuple), lean
    same_outcome(lean, sdk)


def test_a_429_carries_the_same_retry_after(emulator_factory: Any) -> None:
    emu = emulator_factory(rate_limit_rpm=1, retry_after_seconds=2.5)
    keys = ("sk-lean-000000000000000000aaaa", "sk-sdk-0000000000000000000bbbb")
    got = []
    for key, (i, lean) in zip(keys, enumerate((True, False)), strict=True):
        backend = backends(emu.base_url, key=key)[i]
        assert asyncio.run(call(backend, f"ok-{lean}")).ok  # the minute's one request
        got.append(asyncio.run(call(backends(emu.base_url, key=key)[i], f"limited-{lean}")))
    assert got[0][1:4] == ("rate_limit", 429, "rate_limit_exceeded")
    assert got[0][5] == 2.5
    assert got[0] == got[1]


def test_a_bad_key_is_refused_and_never_shown(emulator_factory: Any) -> None:
    key = "sk-wrong-123456789012345678zzzz"
    emu = emulator_factory(api_keys=[DEFAULT_KEY])
    lean, sdk = both(emu.base_url, key=key)
    assert lean[1:3] == ("auth", 401) and lean == sdk
    assert key not in repr(lean)


def test_timeout_and_refused_connection_name_the_endpoint(emulator_factory: Any) -> None:
    emu = emulator_factory(sync_latency_seconds=5.0)
    lean, sdk = both(emu.base_url, timeout=0.3)
    assert lean[1:3] == ("timeout", None) and lean[6] == Scope.ENDPOINT
    assert lean == sdk
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    lean, sdk = both(dead)
    assert lean[1] == "api_error" and lean[6] == Scope.ENDPOINT and dead in lean[4]
    assert lean == sdk


def test_non_ascii_custom_id_reaches_the_server_percent_encoded(emulator: Any) -> None:
    lean, sdk = both(emulator.base_url, ids=("é 1", "é 2"))
    assert lean.ok and sdk.ok
    assert {"%C3%A9%201", "%C3%A9%202"} <= set(executions(emulator))


@pytest.mark.parametrize("close", [False, True])
def test_chunked_gzip_answers_are_read(close: bool) -> None:
    payload = b'{"ok": true}'
    packed = gzip.compress(payload)
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + b"%x\r\n" % 5
        + packed[:5]
        + b"\r\n"
        + b"%x;ext=1\r\n" % (len(packed) - 5)
        + packed[5:]
        + b"\r\n0\r\n\r\n"
    )

    async def read() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await _read_answer(reader)

    answer, keep = asyncio.run(read())
    assert (answer.status, answer.body, keep) == (200, payload, not close)


def test_kill_9_during_group_commits_resends_at_most_one_request_per_worker(
    emulator_factory: Any, tmp_path: Path
) -> None:
    """Killed while answers stream in and are committed in groups (nothing held back): the
    re-run re-sends only rows whose answer was not committed, at most one per worker."""
    workers = 8
    emu = emulator_factory(sync_latency_seconds=0.005)
    n = 600
    src = tmp_path / "t.csv"
    src.write_text("id,name\n" + "".join(f"r{i:04d},item {i}\n" for i in range(n)))
    run_dir = tmp_path / "run"
    args = [
        "run",
        "--csv",
        src,
        "--id-column",
        "id",
        "--prompt",
        "Describe {name}",
        "--model",
        MODEL,
        "--mode",
        "online",
        "--workers",
        workers,
        "--run-dir",
        run_dir,
        "--base-url",
        emu.base_url,
        "--log-dir",
        tmp_path / "logs",
    ]
    proc = subprocess_run(args)
    while proc.poll() is None and sum(v["succeeded"] for v in executions(emu).values()) < 150:
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(run_dir / "state.db") as db:
        recorded = {r[0] for r in db.execute("SELECT row_id FROM rows WHERE status='succeeded'")}
    answered_before = {cid for cid, v in executions(emu).items() if v["succeeded"]}
    # Answered by the server but not committed: these are re-sent (at most one per worker).
    assert len(answered_before - recorded) <= workers

    res = invoke(*args)
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == n
    twice = {cid for cid, v in stats.items() if v["succeeded"] > 1}
    assert len(twice) <= workers and not twice & recorded
    assert all(stats[cid]["executed"] == 1 for cid in recorded)
    assert {r["status"] for r in read_csv(run_dir / "final_output.csv")} == {"succeeded"}
