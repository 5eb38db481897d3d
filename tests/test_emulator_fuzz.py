"""Odd input never yields a 500 or a stuck batch (seeded random bodies, real HTTP)."""

from __future__ import annotations

import random
from typing import Any

import httpx2
import openai

from batchops.emulator import EmulatorServer
from batchops.emulator.testing import DEFAULT_KEY, chat_line, results, run_batch

ROUTES = [
    "/v1/batches",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/openai/deployments/d/chat/completions",
]
KEYS = [
    "model",
    "messages",
    "input",
    "content",
    "role",
    "n",
    "max_tokens",
    "max_output_tokens",
    "dimensions",
    "response_format",
    "json_schema",
    "schema",
    "type",
    "text",
    "format",
    "image_url",
    "url",
    "detail",
    "endpoint",
    "input_file_id",
    "completion_window",
    "metadata",
    "instructions",
    "encoding_format",
]
LEAVES: list[Any] = [
    None,
    True,
    0,
    -1,
    3,
    10**12,
    1.5,
    "",
    "x",
    "user",
    "gpt-4o-mini",
    "24h",
    "/v1/chat/completions",
    "json_schema",
    "object",
    "array",
    "image_url",
    "data:image/png;base64,AAAA",
    "base64",
    "low",
    "#/$defs/A",
]


def _value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.45:
        return rng.choice(LEAVES)
    if roll < 0.7:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _body(rng: random.Random) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "input": "hi",
    }
    for _ in range(rng.randint(1, 4)):
        base[rng.choice(KEYS)] = _value(rng)
    return base


def test_random_sync_bodies_never_500(emulator: EmulatorServer) -> None:
    rng = random.Random(1234)
    headers = {"authorization": f"Bearer {DEFAULT_KEY}"}
    with httpx2.Client(base_url=emulator.root_url, headers=headers) as http:
        for _ in range(200):
            route = rng.choice(ROUTES)
            body = _body(rng) if rng.random() < 0.8 else _value(rng)
            r = http.post(route, json=body)
            assert r.status_code < 500, (route, body, r.text)
            if r.status_code != 200:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
        for q in ["limit=-5", "limit=1e3", "after=", "order=", "purpose=%00", "limit=99999999999"]:
            for path in ("/v1/files", "/v1/batches"):
                assert http.get(f"{path}?{q}").status_code < 500


def test_random_batch_lines_always_finish(emulator_factory: Any) -> None:
    emu = emulator_factory(validating_seconds=0, in_progress_seconds=0.05, finalizing_seconds=0)
    client = openai.OpenAI(base_url=emu.base_url, api_key=DEFAULT_KEY, max_retries=0)
    rng = random.Random(99)
    for round_no in range(5):
        lines: list[Any] = []
        for i in range(30):
            line = chat_line(f"r{round_no}-{i}", "hello")
            body = line["body"]
            for _ in range(rng.randint(0, 2)):
                body[rng.choice(KEYS)] = _value(rng)
            body["model"] = "gpt-4o-mini"
            body.pop("stream", None)
            lines.append(line)
        if round_no == 4:  # a line without a usable model: the whole file fails validation
            lines[7]["body"]["model"] = rng.choice([None, "", 3, [], {"a": 1}])
        b = run_batch(client, lines)
        # Per-request problems complete the batch with error lines; a file problem fails it.
        if round_no < 4:
            assert b.status == "completed", (round_no, b.status, b.errors)
            out, err = results(client, b)
            assert len(out) + len(err) == 30
            assert sorted(x["custom_id"] for x in out + err) == sorted(
                x["custom_id"] for x in lines
            )
            assert err and all(e["response"]["status_code"] == 400 for e in err), err
        else:
            assert b.status == "failed", b.status
            assert b.errors is not None
            assert [(e.line, e.param) for e in b.errors.data] == [(8, "body.model")]
            assert b.output_file_id is None and b.error_file_id is None
