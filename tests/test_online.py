"""Online mode (`run --mode online`) against the emulator over HTTP, through the real CLI and SDK.

Every claim is checked on the emulator's own counters (executions per `X-Batchops-Custom-Id`)
and on the run database: rows answered exactly once, a kill loses at most the requests in
flight, Ctrl+C stops cleanly, limits are kept, quota fails over exactly as in batch mode.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
from cli_helpers import awkward_table, executions, invoke, read_csv, subprocess_run

import batchops
from batchops import pricing
from batchops.emulator.answers import expected_answer
from batchops.emulator.testing import DEFAULT_KEY
from batchops.store import Store

PROMPT = "Describe {name}: {text}"
FAST_RETRY = ["--retry-delay", "0.01", "--retry-max-delay", "0.05"]
WORKERS = 8


def table(tmp: Path, n: int, name: str = "table.csv") -> Path:
    path = tmp / name
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "name", "text"])
        for i in range(n):
            w.writerow([f"r{i:05d}", f"item {i}", f"note {i}"])
    return path


def online_args(emu: Any, src: Path, run_dir: Path, *extra: Any, model: str = "gpt-4o-mini"):
    return [
        "run",
        "--csv",
        src,
        "--id-column",
        "id",
        "--prompt",
        PROMPT,
        "--model",
        model,
        "--mode",
        "online",
        "--run-dir",
        run_dir,
        "--base-url",
        emu.base_url,
        "--log-dir",
        run_dir.parent / "logs",
        *FAST_RETRY,
        *extra,
    ]


def body(model: str, row: dict[str, str]) -> dict[str, Any]:
    text = PROMPT.format(name=row["name"], text=row["text"])
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def calls_of(emu: Any) -> int:
    return emu.stats()["calls"].get("POST /v1/chat/completions", 0)


def succeeded_total(emu: Any) -> int:
    return sum(v["succeeded"] for v in executions(emu).values())


def db_rows(run_dir: Path, sql: str, *args: Any) -> list[tuple]:
    with sqlite3.connect(run_dir / "state.db") as db:
        return db.execute(sql, args).fetchall()


def wait_until(pred, timeout: float = 60.0, step: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(step)


def test_online_run_answers_every_row_exactly_once(emulator_factory, tmp_path: Path):
    emu = emulator_factory(sync_latency_seconds=0.002)
    n = 2000
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    # A separate process: the client and the in-test emulator do not share one interpreter.
    proc = subprocess_run(online_args(emu, src, run_dir, "--workers", WORKERS))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    stats = executions(emu)
    assert len(stats) == n
    assert all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    rows = read_csv(run_dir / "final_output.csv")
    assert [r["id"] for r in rows] == [f"r{i:05d}" for i in range(n)]
    assert {r["status"] for r in rows} == {"succeeded"}
    assert all(
        r["response"] == expected_answer("gpt-4o-mini", body("gpt-4o-mini", r)) for r in rows
    )
    assert all(float(r["cost_usd"]) > 0 for r in rows)  # synchronous prices
    # Per-model statistics (calls, tokens, cost) for online mode, through `status`.
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    (m,) = st["cost_by_model"]
    assert (m["model"], m["mode"], m["calls"], m["failed"]) == ("gpt-4o-mini", "online", n, 0)
    assert m["prompt_tokens"] > 0 and m["completion_tokens"] > 0
    assert abs(m["cost_usd"] - sum(float(r["cost_usd"]) for r in rows)) < 1e-9
    # Every group was closed; nothing left queued.
    assert db_rows(run_dir, "SELECT DISTINCT state FROM chunks") == [("collected",)]
    # The last progress line shows the final counts (taken fresh, however recent the last).
    (log,) = (tmp_path / "logs").glob("*.log")
    progress = [ln for ln in log.read_text(encoding="utf-8").splitlines() if "progress: " in ln]
    assert f"rows {n}/{n} done ({n} succeeded" in progress[-1]


def test_kill_9_mid_run_loses_at_most_the_requests_in_flight(emulator_factory, tmp_path: Path):
    emu = emulator_factory(sync_latency_seconds=0.01)
    n = 200
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    args = online_args(emu, src, run_dir, "--workers", WORKERS)
    proc = subprocess_run(args)
    wait_until(lambda: succeeded_total(emu) >= 60 or proc.poll() is not None)
    # Hold every request sent from now on, so the run cannot finish before the kill lands
    # (an event, not a race against the machine's speed).
    emu.update_scenario(sync_latency_seconds=30.0)
    assert proc.poll() is None, "the run ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = {
        r[0] for r in db_rows(run_dir, "SELECT row_id FROM rows WHERE status = 'succeeded'")
    }
    assert 0 < len(recorded) < n
    assert db_rows(run_dir, "SELECT COUNT(*) FROM rows WHERE status = 'queued'")[0][0] > 0

    emu.update_scenario(sync_latency_seconds=0.01)
    res = invoke(*args)  # the re-run needs no signal: in process
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == n and all(v["succeeded"] >= 1 for v in stats.values())
    # Answered twice: only requests in flight at the kill (answered, never committed), at most
    # one per worker, and never a row whose answer was committed.
    twice = {cid for cid, v in stats.items() if v["succeeded"] > 1}
    assert len(twice) <= WORKERS and not twice & recorded
    assert all(v["succeeded"] <= 2 for v in stats.values())
    # The re-run sent only rows without a committed answer.
    assert all(stats[cid]["executed"] == 1 for cid in recorded)
    rows = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in rows} == {"succeeded"}
    assert "queued by an interrupted online run back to pending" in "".join(
        p.read_text() for p in (tmp_path / "logs").glob("*.log")
    )


def test_ctrl_c_stops_cleanly_with_exit_130_and_resumes(emulator_factory, tmp_path: Path):
    emu = emulator_factory(sync_latency_seconds=0.04)
    n = 150
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    args = online_args(emu, src, run_dir, "--workers", WORKERS)
    proc = subprocess_run(args)
    wait_until(lambda: succeeded_total(emu) >= 40 or proc.poll() is not None)
    # Requests sent from now on take 1 s: the run cannot finish before the signal lands, and
    # the ones in flight are still being answered when it does.
    emu.update_scenario(sync_latency_seconds=1.0)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()[-3000:]
    assert "interrupted" in err.decode()
    # Clean stop: the requests in flight finished and were recorded; nothing is left queued.
    stats = executions(emu)
    recorded = {
        r[0] for r in db_rows(run_dir, "SELECT row_id FROM rows WHERE status = 'succeeded'")
    }
    assert recorded == {cid for cid, v in stats.items() if v["succeeded"]}
    assert 0 < len(recorded) < n
    assert db_rows(run_dir, "SELECT COUNT(*) FROM rows WHERE status = 'queued'")[0][0] == 0
    assert db_rows(run_dir, "SELECT COUNT(*) FROM chunks WHERE state = 'online'")[0][0] == 0

    emu.update_scenario(sync_latency_seconds=0.04)
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == n
    assert all(v == {"executed": 1, "succeeded": 1} for v in stats.values())


def earliest_finish(total: float, burst: float, per_second: float) -> float:
    """A leaky bucket of `burst` at `per_second` lets at most burst + rate × T through in T
    seconds: `total` cannot all have been sent sooner than this after the start. The bound
    only says "never faster than the limit", which a loaded machine cannot break (it only
    slows a run down); that the limiter does not hold back more than asked is a speed
    question, measured by the benchmarks, not asserted here."""
    return (total - burst) / per_second


def test_rpm_limit_is_respected(emulator, tmp_path: Path):
    rpm, n = 1200.0, 60  # 20 requests/s: ~2 s
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    started = time.time()  # the clock the run database records with
    res = invoke(*online_args(emulator, src, run_dir, "--rpm", rpm))
    assert res.exit_code == 0, res.output
    ts = [r[0] for r in db_rows(run_dir, "SELECT ts FROM attempts WHERE mode = 'online'")]
    assert len(ts) == n and calls_of(emulator) == n  # each row sent once, none refused
    # The bucket holds one second's worth (20): the 60th request leaves ≥ 2 s after the start.
    took = max(ts) - started
    assert took >= earliest_finish(n, rpm / 60, rpm / 60), f"{n} requests in {took:.2f}s"


def test_tpm_limit_per_model_entry_is_respected(emulator, tmp_path: Path):
    n, max_tokens = 60, 16
    src = table(tmp_path, n)
    rows = read_csv(src)
    # The engine's own estimate of each request (prompt estimate + max_tokens) is what is paced.
    per_row = [
        pricing.estimate_request_tokens(
            {**body("gpt-4o-mini", r), "max_tokens": max_tokens}, "/v1/chat/completions"
        )
        + max_tokens
        for r in rows
    ]
    tpm = sum(per_row) / n * 60 * 20  # ≈ 20 requests/s
    config = tmp_path / "batchops.toml"
    config.write_text(f'[[models]]\nname = "gpt-4o-mini"\ntpm = {tpm}\n', encoding="utf-8")
    run_dir = tmp_path / "run"
    started = time.time()
    res = invoke(
        *online_args(emulator, src, run_dir, "--config", config, "--max-tokens", max_tokens)
    )
    assert res.exit_code == 0, res.output
    ts = [r[0] for r in db_rows(run_dir, "SELECT ts FROM attempts")]
    assert len(ts) == n and calls_of(emulator) == n
    took = max(ts) - started
    assert took >= earliest_finish(sum(per_row), tpm / 60, tpm / 60), f"took {took:.2f}s"


def test_rate_limit_429_pauses_every_worker_for_retry_after(emulator_factory, tmp_path: Path):
    emu = emulator_factory(rate_limit_rpm=20, retry_after_seconds=0.25)
    n = 60
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    # The limit is lifted on an event (the server has refused 2 rounds of calls), not a timer.
    done = threading.Event()
    lifted_at: list[float] = []

    def lift_after_refusals() -> None:
        while not done.is_set():
            s = emu.stats()
            executed = sum(v["executed"] for v in s["requests"].values())
            # calls - executed also counts the calls in flight (at most one per worker): wait
            # for one more round, so at least 2 rounds were refused for sure.
            if s["calls"].get("POST /v1/chat/completions", 0) - executed >= 3 * WORKERS:
                emu.update_scenario(rate_limit_rpm=None)
                lifted_at.append(time.monotonic())
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=lift_after_refusals)
    started = time.monotonic()
    watcher.start()
    try:
        res = invoke(*online_args(emu, src, run_dir, "--workers", WORKERS))
    finally:
        done.set()
        watcher.join()
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == n and all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    refused = calls_of(emu) - n
    assert lifted_at and refused >= 2 * WORKERS, "the limit should have been hit"
    # retry-after is honoured and shared: while limited, each worker sends at most one call per
    # retry-after (0.25 s). The window is measured from before the run to after the lift, so a
    # slow machine only widens it (without the pause it would be hundreds of calls).
    limited = lifted_at[0] - started
    assert refused <= WORKERS * (limited / 0.25 + 2), (refused, limited)
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["rows"]["failed"] == 0


def test_5xx_and_dropped_connections_retry_without_double_answers(emulator_factory, tmp_path: Path):
    emu = emulator_factory(http_error_every=5, drop_connection_every=7)
    n = 120
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    res = invoke(*online_args(emu, src, run_dir))
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == n and all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    assert emu.stats()["calls"]["POST /v1/chat/completions"] > n * 1.2  # retried


def test_per_request_4xx_fails_the_row_for_good(emulator_factory, tmp_path: Path):
    emu = emulator_factory(reject_fraction=0.15, seed=4)
    n = 60
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    res = invoke(*online_args(emu, src, run_dir))
    assert res.exit_code == 3, res.output
    rows = read_csv(run_dir / "final_output.csv")
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["error"].startswith("HTTP 400") for r in failed)
    stats = executions(emu)
    assert all(v["executed"] == 1 for v in stats.values())  # never retried
    assert {r["id"] for r in failed} == {cid for cid, v in stats.items() if not v["succeeded"]}


def test_quota_fails_over_to_the_next_model_like_batch_mode(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-a": 15})
    n = 40
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    res = invoke(*online_args(emu, src, run_dir, "--model", "gpt-b", model="gpt-a"))
    assert res.exit_code == 0, res.output
    rows = read_csv(run_dir / "final_output.csv")
    models = [r["model"] for r in rows]
    assert models.count("gpt-a") == 15 and models.count("gpt-b") == n - 15
    stats = executions(emu)  # quota refusals happen before execution
    assert all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    assert all(r["response"] == expected_answer(r["model"], body(r["model"], r)) for r in rows)
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    by_model = {m["model"]: m for m in st["cost_by_model"]}
    assert by_model["gpt-a"]["ok"] == 15 and 1 <= by_model["gpt-a"]["failed"] <= WORKERS
    assert by_model["gpt-b"]["ok"] == n - 15 and by_model["gpt-b"]["failed"] == 0
    assert st["rows"]["failed"] == 0  # the refused requests did not use a retry
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "switching to model gpt-b" in log
    # status shows the pool as the online run left it, like a batch run's
    pool = {p["model"]: p["state"] for p in st["pool"]}
    assert pool["gpt-a"].startswith("exhausted") and pool["gpt-b"] == "in use"
    assert any("switching to model gpt-b" in e["message"] for e in st["events"])


def test_bad_key_exhausts_the_key_and_never_logs_it(emulator_factory, tmp_path: Path):
    k1, k2 = "sk-bad-key-0000000000001111", "sk-good-key-000000000002222"
    emu = emulator_factory(api_keys=[k2])
    src = table(tmp_path, 30)
    run_dir = tmp_path / "run"
    res = invoke(
        *online_args(emu, src, run_dir), env={"OPENAI_API_KEYS": f"{k1},{k2}", "OPENAI_API_KEY": ""}
    )
    assert res.exit_code == 0, res.output
    assert set(emu.stats()["keys"]) == {"sk-…2222"}
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "sk-…1111" in log and k1 not in log and k2 not in log
    assert k1 not in (run_dir / "state.db").read_bytes().decode("latin-1")


def test_missing_image_row_is_skipped_and_never_sent(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=5)
    (tmp_path / "images" / "b.png").unlink()
    run_dir = tmp_path / "run"
    res = invoke(
        "run",
        "--csv",
        src,
        "--id-column",
        "sku",
        "--prompt",
        "Describe {name} ({price}): {description}",
        "--image-column",
        "image",
        "--image-dir",
        tmp_path / "images",
        "--model",
        "gpt-4o-mini",
        "--mode",
        "online",
        "--run-dir",
        run_dir,
        "--base-url",
        emulator.base_url,
        "--log-dir",
        tmp_path / "logs",
    )
    assert res.exit_code == 3, res.output
    out = {r["sku"]: r for r in read_csv(run_dir / "final_output.csv")}
    assert out["011"]["status"] == "skipped" and "image not found" in out["011"]["error"]
    assert "b.png" in out["011"]["error"]
    stats = executions(emulator)
    assert "011" not in stats and len(stats) == 11
    assert out["007"]["status"] == "succeeded"  # sent with its image (a.png)
    assert out["0042"]["response"] and out["0042"]["status"] == "succeeded"


def test_budget_stops_sending_with_exit_3(emulator, tmp_path: Path):
    src = table(tmp_path, 60)
    run_dir = tmp_path / "run"
    cap = 0.00004
    res = invoke(*online_args(emulator, src, run_dir, "--max-tokens", 30, "--max-cost", cap))
    assert res.exit_code == 3, res.output
    assert "budget reached" in res.output
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["spent_usd"] <= cap
    assert 0 < st["rows"]["succeeded"] < 60 and st["rows"]["queued"] == 0


def test_batch_run_switched_to_online_sends_only_unanswered_rows(emulator_factory, tmp_path: Path):
    emu = emulator_factory(in_progress_seconds=0.8, model_quota={"gpt-a": 20})
    n = 47
    src = table(tmp_path, n)
    run_dir = tmp_path / "run"
    batch = [
        a for a in online_args(emu, src, run_dir, model="gpt-a") if a not in ("--mode", "online")
    ]
    res = invoke(*batch, "--batch-size", "10", "--poll-interval", "0.05", "--no-wait")
    assert res.exit_code == 0, res.output
    # Online while every row sits in a batch still in flight: nothing is sent, the batches are
    # left alone, and the run says who collects them.
    online = online_args(emu, src, run_dir, "--model", "gpt-b", model="gpt-a")
    res = invoke(*online)
    assert res.exit_code == 3, res.output
    assert "still in flight" in res.output
    assert emu.stats()["calls"].get("POST /v1/chat/completions", 0) == 0
    res = invoke(
        "watch",
        "--run-dir",
        run_dir,
        "--base-url",
        emu.base_url,
        "--poll-interval",
        "0.05",
        "--log-dir",
        tmp_path / "logs",
    )
    assert res.exit_code == 3, res.output  # rows are left: gpt-a ran out of quota
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["rows"]["succeeded"] == 20 and st["rows"]["pending"] == n - 20
    # The rows the batches could not answer (gpt-a out of quota) go online, on gpt-b.
    res = invoke(*online)
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == n and all(v["succeeded"] == 1 for v in stats.values())
    rows = read_csv(run_dir / "final_output.csv")
    assert sum(r["model"] == "gpt-a" and r["batch_id"] != "" for r in rows) == 20
    assert sum(r["model"] == "gpt-b" and r["batch_id"] == "" for r in rows) == n - 20
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert {(m["model"], m["mode"]) for m in st["cost_by_model"] if m["ok"]} == {
        ("gpt-a", "batch"),
        ("gpt-b", "online"),
    }


def test_mixed_pool_hands_over_from_online_to_batch(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-a": 12})
    n = 30
    src = table(tmp_path, n)
    config = tmp_path / "batchops.toml"
    config.write_text(
        '[[models]]\nname = "gpt-a"\nmode = "online"\n\n[[models]]\nname = "gpt-b"\nmode = "batch"\n',
        encoding="utf-8",
    )
    run_dir = tmp_path / "run"
    args = [a for a in online_args(emu, src, run_dir) if a not in ("--model", "gpt-4o-mini")]
    res = invoke(*args, "--config", config, "--batch-size", "10", "--poll-interval", "0.05")
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == n and all(v["succeeded"] == 1 for v in stats.values())
    rows = read_csv(run_dir / "final_output.csv")
    online = [r for r in rows if r["model"] == "gpt-a"]
    batch = [r for r in rows if r["model"] == "gpt-b"]
    assert len(online) == 12 and all(r["batch_id"] == "" for r in online)
    assert len(batch) == n - 12 and all(r["batch_id"] for r in batch)
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "handing over" in log


def test_rows_a_killed_online_run_left_queued_are_sent_by_a_batch_run(emulator, tmp_path: Path):
    src = table(tmp_path, 30)
    run_dir = tmp_path / "run"
    res = invoke(*online_args(emulator, src, run_dir, "--max-tokens", 30, "--max-cost", 0.00002))
    assert res.exit_code == 3, res.output  # budget: some rows answered, the rest pending
    # What a kill leaves: pending rows queued in an open online group (as a SIGKILL would).
    store = Store.open(run_dir)
    try:
        pending = store.pending_row_idxs()
        store.add_online_chunk("gpt-4o-mini", pending[:10])
    finally:
        store.close()
    batch = [a for a in online_args(emulator, src, run_dir) if a not in ("--mode", "online")]
    res = invoke(*batch, "--max-tokens", 30, "--batch-size", "10", "--poll-interval", "0.05")
    assert res.exit_code == 0, res.output
    stats = executions(emulator)
    assert len(stats) == 30 and all(v == {"executed": 1, "succeeded": 1} for v in stats.values())


def test_python_api_online_inside_a_running_event_loop(emulator, tmp_path: Path, monkeypatch):
    # A notebook has an event loop running: the engine runs its own in a helper thread.
    monkeypatch.setenv("OPENAI_API_KEY", DEFAULT_KEY)
    df = pd.DataFrame({"id": ["007", "0042", "x"], "name": ["a", "b", "c"], "text": ["", "y", "z"]})

    async def notebook_cell() -> pd.DataFrame:
        return batchops.run(
            df,
            prompt=PROMPT,
            model="gpt-4o-mini",
            run_dir=tmp_path / "run",
            id_column="id",
            mode="online",
            workers=2,
            base_url=emulator.base_url,
        )

    out = asyncio.run(notebook_cell())
    assert list(out["id"]) == ["007", "0042", "x"]
    assert list(out["status"]) == ["succeeded"] * 3
    assert set(executions(emulator)) == {"007", "0042", "x"}
