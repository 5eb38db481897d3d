"""Anthropic Message Batches through the real CLI against the emulator's Anthropic dialect.

Every claim is checked on the emulator's own counters: executions per custom id (the backend's
safe `<prefix>_<line>` ids in batch mode, the row id in online mode) and per model.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from cli_helpers import (
    AWKWARD_ROWS,
    PAID_ANSWERS_SQL,
    awkward_table,
    invoke,
    read_csv,
    subprocess_run,
    write_csv,
)

from batchops import pricing
from batchops.backends.anthropic_wire import to_params
from batchops.emulator import EmulatorServer
from batchops.emulator.answers import expected_answer
from batchops.emulator.anthropic_dialect import to_chat

KEY = "sk-ant-test-0000000000abcd"
ENV = {"ANTHROPIC_API_KEY": KEY}
CLAUDE = "claude-haiku-4-5"
PROMPT = "Describe {name} ({price}): {description}"
FAST_RETRY = ["--retry-delay", "0.01", "--retry-max-delay", "0.05"]
Factory = Callable[..., EmulatorServer]


def config(tmp: Path, emu: EmulatorServer) -> Path:
    """A batchops.toml: the Claude model on the emulator."""
    text = (
        f'[[models]]\nname = "{CLAUDE}"\nprovider = "anthropic"\n'
        f'api_key_env = "ANTHROPIC_API_KEY"\nbase_url = "{emu.root_url}"\n'
    )
    path = tmp / "batchops.toml"
    path.write_text(text, encoding="utf-8")
    return path


def docs_config(tmp: Path, emu: EmulatorServer) -> Path:
    """The configuration docs/providers.md shows as tested, pointed at the emulator."""
    doc = (Path(__file__).parents[1] / "docs" / "providers.md").read_text(encoding="utf-8")
    block = doc.split("### A tested configuration", 1)[1].split("```toml\n", 1)[1]
    block = block.split("```", 1)[0]
    lines = [
        f'base_url = "{emu.root_url}"' if ln.startswith("# base_url") else ln
        for ln in block.splitlines()
    ]
    assert any(ln.startswith("base_url") for ln in lines)
    path = tmp / "batchops.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def args(
    emu: EmulatorServer, src: Path, run_dir: Path, cfg: Path, *extra: Any, images: bool = False
) -> list[Any]:
    out: list[Any] = [
        "run",
        "--csv",
        src,
        "--id-column",
        "sku",
        "--prompt",
        PROMPT,
        "--config",
        cfg,
        "--run-dir",
        run_dir,
        "--base-url",
        emu.base_url,  # the OpenAI models' endpoint; the Claude model has its own
        "--poll-interval",
        "0.05",
        "--log-dir",
        run_dir.parent / "logs",
        *FAST_RETRY,
    ]
    if images:
        out += ["--image-column", "image", "--image-dir", src.parent / "images"]
    return [*out, *extra]


def expected(run_dir: Path) -> dict[str, str]:
    """Row id → the emulator's answer to the Messages request each chunk line becomes."""
    out: dict[str, str] = {}
    for f in sorted((run_dir / "inputs").glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            req = orjson.loads(line)
            out[req["custom_id"]] = expected_answer(CLAUDE, to_chat(to_params(req["body"])))
    return out


def executions(emu: EmulatorServer) -> dict[str, dict[str, int]]:
    return emu.stats()["requests"]


def executed_once(emu: EmulatorServer, n: int) -> None:
    """n requests executed, each exactly once: with every row answered, no row ran twice."""
    stats = executions(emu)
    assert sum(v["executed"] for v in stats.values()) == n, stats
    assert all(v == {"executed": 1, "succeeded": 1} for v in stats.values())


def table(tmp: Path, n_plain: int) -> Path:
    """The awkward rows (two with images) plus plain rows, some with ids no custom_id allows:
    longer than 64 characters, spaces, slashes, colons, non-ASCII."""
    awkward_table(tmp, n_plain=0)  # writes images/a.png, images/b.png
    rows = [list(r) for r in AWKWARD_ROWS]
    for i in range(n_plain):
        sku = f"p{i:05d}"
        if i % 10 == 1:
            sku = f"{'very-long-product-identifier-' * 3}{i}"  # 90+ characters
        elif i % 10 == 2:
            sku = f"id {i}/größe:ü+{i}"
        rows.append([sku, f"item {i}", f"{i}.50", f"plain row {i}", ""])
    return write_csv(tmp / "table.csv", ["sku", "name", "price", "description", "image"], rows)


# --------------------------------------------------------------------------- round trip


def test_300_awkward_rows_with_images_round_trip(emulator_factory: Factory, tmp_path: Path):
    emu = emulator_factory()
    src = table(tmp_path, n_plain=293)
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, emu)
    res = invoke(*args(emu, src, run_dir, cfg, "--batch-size", "50", images=True), env=ENV)
    assert res.exit_code == 0, res.output
    executed_once(emu, 300)
    source = read_csv(src)
    out = read_csv(run_dir / "final_output.csv")
    assert len(out) == 300
    cols = ["sku", "name", "price", "description", "image"]
    assert [[r[c] for c in cols] for r in out] == [[r[c] for c in cols] for r in source]
    assert {r["status"] for r in out} == {"succeeded"}
    assert {r["model"] for r in out} == {CLAUDE}
    want = expected(run_dir)
    assert {r["sku"]: r["response"] for r in out} == want
    assert "[1 image: 67 bytes]" in want["007"]  # the image went as a base64 image block
    assert any(len(r["sku"]) > 64 for r in out) and any(" " in r["sku"] for r in out)
    # Results arrived shuffled and were joined by id.
    orders = []
    for f in (run_dir / "outputs").glob("*.jsonl"):
        ids = [orjson.loads(x)["custom_id"] for x in f.read_bytes().splitlines()]
        orders.append([int(i.rpartition("_")[2]) for i in ids])
    assert len(orders) == 6 and any(o != sorted(o) for o in orders)
    # Six batches in flight were polled with list pages (how many single retrieves remain
    # depends on timing: the tail under LIST_POLL_MIN in flight, stale checks; the poller's
    # rules are pinned by tests/test_listpoll.py).
    calls = emu.stats()["calls"]
    assert calls.get("GET /v1/messages/batches", 0) > 0
    # Collected batches are deleted (with their results: the run dir keeps them), each once.
    client = anthropic.Anthropic(api_key=KEY, base_url=emu.root_url, max_retries=0)
    assert list(client.messages.batches.list(limit=100)) == []
    assert calls.get("DELETE /v1/messages/batches/{id}") == 6, calls


def test_batch_that_expires_half_done_resends_only_the_rest(
    emulator_factory: Factory, tmp_path: Path
):
    emu = emulator_factory(expire_first_n=2, expire_done_fraction=0.5)
    src = table(tmp_path, n_plain=33)
    run_dir = tmp_path / "run"
    res = invoke(*args(emu, src, run_dir, config(tmp_path, emu), "--batch-size", "10"), env=ENV)
    assert res.exit_code == 0, res.output
    executed_once(emu, 40)  # the finished half of each expired batch was not sent again
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["batches_by_status"]["expired"] == 2
    assert st["rows"]["succeeded"] == 40
    out = read_csv(run_dir / "final_output.csv")
    assert {r["sku"]: r["response"] for r in out} == expected(run_dir)


def test_structured_outputs_and_cancel_then_resume(emulator_factory: Factory, tmp_path: Path):
    # The first batch is stuck in progress (nothing runs): cancel ends it with every request
    # `canceled`; resuming sends them again and each runs once.
    emu = emulator_factory(stuck_first_n=1, stuck_seconds=30)
    src = table(tmp_path, n_plain=5)
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"title": {"type": "string"}},
                "required": ["title"],
                "additionalProperties": False,
            }
        )
    )
    run_dir = tmp_path / "run"
    run = args(emu, src, run_dir, config(tmp_path, emu), "--schema", schema)
    assert invoke(*run, "--no-wait", env=ENV).exit_code == 0
    res = invoke("cancel", "--run-dir", run_dir, env=ENV)
    assert res.exit_code == 0, res.output
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["batches_by_status"] == {"cancelled": 1} and st["rows"]["pending"] == 12
    assert executions(emu) == {}
    res = invoke(*run, env=ENV)
    assert res.exit_code == 0, res.output
    executed_once(emu, 12)
    out = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in out} == {"succeeded"}
    assert all(json.loads(r["response"]) == {"title": r["title"]} for r in out)
    assert {r["sku"]: r["response"] for r in out} == expected(run_dir)


# --------------------------------------------------------------------------- crashes


def submitting(run_dir: Path, since: float) -> bool:
    """A chunk's create intent was committed after `since` and its batch is not attached yet."""
    try:
        with sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True, timeout=1) as db:
            (n,) = db.execute(
                "SELECT COUNT(*) FROM chunks WHERE state = 'submitting' AND updated_at > ?",
                (since,),
            ).fetchone()
        return bool(n)
    except sqlite3.Error:
        return False  # not created yet, or busy


def test_kill_9_during_run_loses_nothing_and_runs_nothing_twice(
    emulator_factory: Factory, tmp_path: Path
):
    # Every call takes 50 ms, so a create is in flight long enough to be killed inside it; every
    # 9th call is carried out and then its connection dropped, so some batches exist that their
    # chunk has not attached yet (looked up, undecided while running) when a kill lands. Every
    # 3rd create is carried out and dropped too, counted per route: whether a kill or a 9th call
    # lands on a create depends on timing, so without it the "reconciled" check below (the
    # dangerous path was taken) failed now and then on a loaded machine.
    emu = emulator_factory(
        validating_seconds=0.05,
        in_progress_seconds=0.25,
        finalizing_seconds=0.05,
        slow_response_seconds=0.05,
        drop_connection_every=9,
        drop_after_processing=True,
        drop_route="POST /v1/messages/batches",
        drop_route_every=3,
        seed=11,
    )
    src = table(tmp_path, n_plain=113)
    run_dir = tmp_path / "run"
    run = args(emu, src, run_dir, config(tmp_path, emu), "--batch-size", "7")
    rng = random.Random(5)
    kills = in_create = 0
    for i in range(40):
        started = time.time()
        proc = subprocess_run(run, env=ENV)
        if i % 2:  # at a random moment
            time.sleep(rng.uniform(0.05, 1.2))
        else:  # while a create call is under way (its batch may or may not exist)
            deadline = time.monotonic() + 15
            while proc.poll() is None and not submitting(run_dir, started):
                assert time.monotonic() < deadline, "no create seen"
                time.sleep(0.005)
            in_create += proc.poll() is None
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        if kills >= 12:
            break
    assert kills >= 10 and in_create >= 5
    final = subprocess_run(run, env=ENV)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()[-3000:]
    executed_once(emu, 120)  # no batch was created twice for a chunk
    rows = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in rows} == {"succeeded"}
    assert {r["sku"]: r["response"] for r in rows} == expected(run_dir)
    with sqlite3.connect(run_dir / "state.db") as db:
        (n,) = db.execute(PAID_ANSWERS_SQL).fetchone()
        (batches,) = db.execute("SELECT COUNT(*) FROM batches").fetchone()
    assert n == 120
    reconciled = db_messages(run_dir, "%reconciled%")
    assert reconciled, "no create was carried out with its answer lost"
    assert emu.stats()["calls"].get("POST /v1/messages/batches", 0) >= 3  # the route drops
    # Every batch the emulator made is one the run knows (none orphaned, none paid twice).
    assert emu.stats()["dialects"]["anthropic"]["created"] == batches


def db_messages(run_dir: Path, like: str) -> list[str]:
    with sqlite3.connect(run_dir / "state.db") as db:
        rows = db.execute("SELECT message FROM events WHERE message LIKE ?", (like,)).fetchall()
    return [r[0] for r in rows]


def test_dropped_create_answers_never_duplicate_a_batch(emulator_factory: Factory, tmp_path: Path):
    # Every 3rd call is carried out, then the connection drops: the client cannot know whether
    # its batch exists. The lookup must find it (once it has ended) instead of creating another.
    emu = emulator_factory(drop_connection_every=3, drop_after_processing=True)
    src = table(tmp_path, n_plain=43)
    run_dir = tmp_path / "run"
    res = invoke(*args(emu, src, run_dir, config(tmp_path, emu), "--batch-size", "5"), env=ENV)
    assert res.exit_code == 0, res.output
    executed_once(emu, 50)
    with sqlite3.connect(run_dir / "state.db") as db:
        (batches,) = db.execute("SELECT COUNT(*) FROM batches").fetchone()
    assert emu.stats()["dialects"]["anthropic"]["created"] == batches == 10
    assert db_messages(run_dir, "re-attached to batch %"), "no create answer was lost"
    out = read_csv(run_dir / "final_output.csv")
    assert {r["sku"]: r["response"] for r in out} == expected(run_dir)


# --------------------------------------------------------------------------- failover


def test_mixed_pool_openai_out_of_quota_fails_over_to_claude(
    emulator_factory: Factory, tmp_path: Path
):
    emu = emulator_factory(model_quota={"gpt-4o-mini": 0})
    src = table(tmp_path, n_plain=43)
    run_dir = tmp_path / "run"
    cfg = docs_config(tmp_path, emu)  # gpt-4o-mini, then claude-haiku-4-5
    # Batches kept: their results are read below (collected batches are deleted otherwise).
    run = args(emu, src, run_dir, cfg, "--batch-size", "10", "--keep-remote-files")
    res = invoke(*run, env=ENV)
    assert res.exit_code == 0, res.output
    executed_once(emu, 50)
    assert emu.stats()["models"] == {CLAUDE: {"executed": 50, "succeeded": 50}}
    out = read_csv(run_dir / "final_output.csv")
    assert {r["model"] for r in out} == {CLAUDE}
    assert {r["sku"]: r["response"] for r in out} == expected(run_dir)
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert f"switching to model {CLAUDE}" in log and KEY not in log
    # Cost per provider = the emulator's reported usage at genai-prices' batch prices.
    client = anthropic.Anthropic(api_key=KEY, base_url=emu.root_url, max_retries=0)
    price = pricing.price_for(CLAUDE, batch=True)
    want = 0.0
    for b in client.messages.batches.list(limit=100):
        for r in client.messages.batches.results(b.id):
            u = r.result.message.usage  # type: ignore[union-attr]
            want += (
                u.input_tokens * price.input_per_mtok
                + (u.cache_creation_input_tokens or 0) * (price.cache_write_per_mtok or 0)
                + (u.cache_read_input_tokens or 0) * price.cached_input_per_mtok
                + u.output_tokens * price.output_per_mtok
            ) / 1e6
    cost = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)
    by_model = {m["model"]: m["cost_usd"] for m in cost["by_model"]}
    assert set(by_model) == {CLAUDE}  # nothing billed to the OpenAI model
    assert abs(by_model[CLAUDE] - want) < 1e-9 and want > 0


# --------------------------------------------------------------------------- online


def test_online_mode_2000_rows_exactly_once(emulator_factory: Factory, tmp_path: Path):
    emu = emulator_factory(sync_latency_seconds=0.002)
    n = 2000
    src = write_csv(
        tmp_path / "table.csv",
        ["sku", "name", "price", "description"],
        [[f"r{i:05d}", f"item {i}", f"{i}", f"note {i}"] for i in range(n)],
    )
    run_dir = tmp_path / "run"
    run = args(emu, src, run_dir, config(tmp_path, emu), "--mode", "online", "--workers", "8")
    proc = subprocess_run(run, env=ENV)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-3000:]
    stats = executions(emu)
    assert set(stats) == {f"r{i:05d}" for i in range(n)}  # keyed by row id (online header)
    assert all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    assert emu.stats()["calls"]["POST /v1/messages"] == n
    rows = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in rows} == {"succeeded"}
    for r in rows:
        body = {
            "model": CLAUDE,
            "messages": [{"role": "user", "content": PROMPT.format(**r)}],
        }
        assert r["response"] == expected_answer(CLAUDE, to_chat(to_params(body)))
    assert all(float(r["cost_usd"]) > 0 for r in rows)  # synchronous prices


@pytest.mark.parametrize("ttl", ["5m", "1h"])
def test_prompt_cache_writes_are_priced_at_their_own_rate(
    emulator_factory: Factory, tmp_path: Path, ttl: str
):
    """`cache_control` in --body-extra: the emulator reports the prompt as cache writes, and the
    run's cost bills them at 1.25x (5 minutes) or 2x (1 hour) the input rate, as Anthropic does."""
    emu = emulator_factory()
    src = table(tmp_path, n_plain=13)
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, emu)
    extra = json.dumps({"cache_control": {"type": "ephemeral", "ttl": ttl}})
    # Batches kept: their results are read below (collected batches are deleted otherwise).
    run = args(emu, src, run_dir, cfg, "--body-extra", extra, "--keep-remote-files")
    res = invoke(*run, env=ENV)
    assert res.exit_code == 0, res.output
    executed_once(emu, 20)
    price = pricing.price_for(CLAUDE, batch=True)
    rate = price.cache_write_per_mtok if ttl == "5m" else price.cache_write_1h_per_mtok
    assert rate == price.input_per_mtok * (1.25 if ttl == "5m" else 2)
    client = anthropic.Anthropic(api_key=KEY, base_url=emu.root_url, max_retries=0)
    want, written = 0.0, 0
    for b in client.messages.batches.list(limit=100):
        for r in client.messages.batches.results(b.id):
            u = r.result.message.usage  # type: ignore[union-attr]
            written += u.cache_creation_input_tokens or 0
            want += (
                u.input_tokens * price.input_per_mtok
                + (u.cache_creation_input_tokens or 0) * rate
                + (u.cache_read_input_tokens or 0) * price.cached_input_per_mtok
                + u.output_tokens * price.output_per_mtok
            ) / 1e6
    assert written > 0
    cost = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)
    assert abs(cost["by_model"][0]["cost_usd"] - want) < 1e-9
