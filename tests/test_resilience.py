"""Never lose a row, never pay twice: fault scenarios of the emulator against the real CLI."""

from __future__ import annotations

import json
import random
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from cli_helpers import (
    PAID_ANSWERS_SQL,
    all_logs,
    assert_one_batch_per_chunk_and_attempt,
    awkward_table,
    calls,
    executions,
    expected_answers,
    invoke,
    kill_after_calls,
    read_csv,
    run_args,
    sent_bodies,
    subprocess_run,
)

from batchops.emulator.answers import prompt_tokens

FAST_RETRY = ["--retry-delay", "0.01", "--retry-max-delay", "0.05"]


def all_succeeded_once(emu) -> dict[str, dict[str, int]]:
    stats = executions(emu)
    assert stats, "nothing executed"
    assert all(v["succeeded"] == 1 for v in stats.values()), {
        k: v for k, v in stats.items() if v["succeeded"] != 1
    }
    return stats


def test_transient_failures_and_5xx_recover_without_double_execution(
    emulator_factory, tmp_path: Path
):
    emu = emulator_factory(fail_once_fraction=0.05, http_error_every=4, seed=3)
    src = awkward_table(tmp_path, n_plain=200, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "25", *FAST_RETRY))
    assert res.exit_code == 0, res.output
    stats = all_succeeded_once(emu)
    failed_once = [k for k, v in stats.items() if v["executed"] == 2]
    assert failed_once, "the scenario should have failed some requests once"
    assert all(v["executed"] <= 2 for v in stats.values())
    out = read_csv(run_dir / "final_output.csv")
    assert {o["status"] for o in out} == {"succeeded"}
    assert {o["sku"]: o["response"] for o in out} == expected_answers(run_dir)


def test_expired_batches_keep_their_finished_half(emulator_factory, tmp_path: Path):
    emu = emulator_factory(expire_first_n=2, expire_done_fraction=0.5)
    src = awkward_table(tmp_path, n_plain=33, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "10"))
    assert res.exit_code == 0, res.output
    stats = all_succeeded_once(emu)
    assert all(v["executed"] == 1 for v in stats.values())  # the finished half was not re-sent
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["batches_by_status"]["expired"] == 2
    assert st["rows"]["succeeded"] == 40


def test_enqueued_token_limit_waits_and_never_switches_model(emulator_factory, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=53, images=False)
    # Size the limit from a dry run: two chunks fit, a third does not.
    dry = tmp_path / "dry"
    assert (
        invoke(
            *run_args(
                None or type("E", (), {"base_url": "http://127.0.0.1:9/v1"})(),
                src,
                dry,
                "--batch-size",
                "10",
                "--dry-run",
            )
        ).exit_code
        == 0
    )
    bodies = list(sent_bodies(dry, folder="dry-run").values())
    per_chunk = max(
        sum(prompt_tokens(b, "/v1/chat/completions") for b in bodies[i : i + 10])
        for i in range(0, len(bodies), 10)
    )
    emu = emulator_factory(
        enqueued_token_limit={"gpt-4o-mini": int(per_chunk * 2.5)}, in_progress_seconds=0.3
    )
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "10", "--model", "gpt-4.1-mini"))
    assert res.exit_code == 0, res.output
    all_succeeded_once(emu)
    out = read_csv(run_dir / "final_output.csv")
    assert {o["model"] for o in out} == {"gpt-4o-mini"}
    failed = [
        b
        for b in json.loads(invoke("status", "--run-dir", run_dir, "--json").output)["batches"]
        if b["status"] == "failed"
    ]
    assert failed and all("token_limit_exceeded" in b["errors"] for b in failed)


def test_first_model_out_of_quota_fails_over_to_second(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-a": 0})
    src = awkward_table(tmp_path, n_plain=23, images=False)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(emu, src, run_dir, "--batch-size", "10", "--model", "gpt-b", model="gpt-a")
    )
    assert res.exit_code == 0, res.output
    out = read_csv(run_dir / "final_output.csv")
    assert {o["model"] for o in out} == {"gpt-b"}
    all_succeeded_once(emu)
    # gpt-a was tried once (refused at create), then every chunk went to gpt-b.
    assert calls(emu, "POST /v1/batches") == 3 + 1
    assert "switching to model gpt-b" in all_logs(tmp_path / "logs")


def test_quota_running_out_mid_batch_requeues_on_next_model(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-a": 15})
    src = awkward_table(tmp_path, n_plain=33, images=False)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(emu, src, run_dir, "--batch-size", "10", "--model", "gpt-b", model="gpt-a")
    )
    assert res.exit_code == 0, res.output
    out = read_csv(run_dir / "final_output.csv")
    models = [o["model"] for o in out]
    assert models.count("gpt-a") == 15 and models.count("gpt-b") == 25
    all_succeeded_once(emu)


def test_every_model_and_key_exhausted_exits_3_then_retry_missing(emulator_factory, tmp_path: Path):
    k1, k2 = "sk-key-one-00000000001111", "sk-key-two-00000000002222"
    emu = emulator_factory(key_quota={k1: 0, k2: 0})
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    env = {"OPENAI_API_KEYS": f"{k1},{k2}", "OPENAI_API_KEY": ""}
    res = invoke(*run_args(emu, src, run_dir, "--model", "gpt-b", model="gpt-a"), env=env)
    assert res.exit_code == 3, res.output
    assert "exhausted" in res.output and "10 missing" in res.output
    out = read_csv(run_dir / "final_output.csv")
    assert {o["status"] for o in out} == {"missing"}
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert k1 not in log and k2 not in log and "sk-…1111" in log
    assert k1 not in (run_dir / "state.db").read_bytes().decode("latin-1")
    # The pool is remembered: retry-missing sends nothing to the exhausted pairs ...
    calls = dict(emu.stats()["calls"])
    args = ("--run-dir", run_dir, "--base-url", emu.base_url, "--poll-interval", "0.05")
    res = invoke("retry-missing", *args, "--log-dir", tmp_path / "logs", env=env)
    assert res.exit_code == 3, res.output
    assert emu.stats()["calls"] == calls
    # ... until the quota resets and the pool is reset; then the run completes.
    emu.update_scenario(key_quota={})
    res = invoke("pool", "reset", "--run-dir", run_dir)
    assert res.exit_code == 0 and "4 exhausted model/key pair(s) forgotten" in res.output
    res = invoke(
        "retry-missing",
        "--run-dir",
        run_dir,
        "--base-url",
        emu.base_url,
        "--poll-interval",
        "0.05",
        "--log-dir",
        tmp_path / "logs",
        env=env,
    )
    assert res.exit_code == 0, res.output
    assert {o["model"] for o in read_csv(run_dir / "final_output.csv")} == {"gpt-a"}
    all_succeeded_once(emu)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_and_sends_nothing_twice(
    emulator_factory, tmp_path: Path
):
    emu = emulator_factory(
        validating_seconds=0.05,
        in_progress_seconds=0.25,
        finalizing_seconds=0.05,
        fail_once_fraction=0.03,
        seed=11,
    )
    src = awkward_table(tmp_path, n_plain=233, images=False)  # 48 chunks of 5
    run_dir = tmp_path / "run"
    args = [
        "run",
        "--csv",
        src,
        "--id-column",
        "sku",
        "--prompt",
        "Describe {name}",
        "--model",
        "gpt-4o-mini",
        "--run-dir",
        run_dir,
        "--base-url",
        emu.base_url,
        "--poll-interval",
        "0.05",
        "--batch-size",
        "5",
        "--log-dir",
        tmp_path / "logs",
        *FAST_RETRY,
    ]
    rng = random.Random(5)
    # A fixed number of kills (not "as many as fit in N seconds", which depends on the machine's
    # speed), each one a few random milliseconds after the process's k-th call of a route: in
    # turn mid-upload, mid-create, mid-poll and mid-download, wherever the few milliseconds
    # land (the call in flight, the database write after it). The schedule leaves work for
    # every next process: 48 chunks, and few batches collected before the last kill.
    for i, (route, k) in enumerate(KILL_SCHEDULE):
        kill_after_calls(emu, args, route, k, then_wait=rng.uniform(0, 0.02), label=f"kill {i}")
    final = subprocess_run(args)
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()
    stats = all_succeeded_once(emu)
    assert len(stats) == 240
    rows = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in rows} == {"succeeded"}
    assert {r["sku"]: r["response"] for r in rows} == expected_answers(run_dir)
    with sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True) as db:
        (n,) = db.execute(PAID_ANSWERS_SQL).fetchone()
        known = set(db.execute("SELECT chunk_id, attempt FROM batches").fetchall())
    assert n == 240
    assert_one_batch_per_chunk_and_attempt(emu, known)


UPLOAD, CREATE = "POST /v1/files", "POST /v1/batches"
POLL, DOWNLOAD = "GET /v1/batches", "GET /v1/files/{id}/content"
# Uploads first: a run uploads up to 3 chunks ahead while it builds, so uploads run out before
# creates, polls and downloads do (each kill needs its call still to come).
KILL_SCHEDULE = [  # (route, k): kill the process just after its k-th call of route
    (UPLOAD, 1),
    (UPLOAD, 3),
    (UPLOAD, 2),
    (CREATE, 1),
    (CREATE, 2),
    (CREATE, 4),
    (POLL, 1),
    (DOWNLOAD, 1),
    (POLL, 1),
    (DOWNLOAD, 2),
    (DOWNLOAD, 1),
    (DOWNLOAD, 3),
]


def test_dropped_connections_after_processing_never_duplicate_a_batch(
    emulator_factory, tmp_path: Path
):
    # Every 3rd call is carried out, then the connection drops: the client cannot know whether
    # its upload or batch exists. Reconcile must find it instead of creating it again.
    emu = emulator_factory(drop_connection_every=3, drop_after_processing=True)
    src = awkward_table(tmp_path, n_plain=43, images=False)
    run_dir = tmp_path / "run"
    # Remote files kept: the live ones then show any orphaned upload.
    args = run_args(emu, src, run_dir, "--batch-size", "10", "--keep-remote-files", *FAST_RETRY)
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    stats = all_succeeded_once(emu)
    assert all(v["executed"] == 1 for v in stats.values())
    s = emu.stats()
    assert s["batches"]["created"] == 5  # one batch per chunk, never two
    # Every uploaded input file is some batch's input; duplicates were deleted.
    assert s["files"]["uploaded"] - s["files"]["deleted"] == 5
    with sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True) as db:
        known = set(db.execute("SELECT chunk_id, attempt FROM batches").fetchall())
    assert len(known) == 5
    emu.update_scenario(drop_connection_every=0)  # the check's own calls must not be dropped
    assert_one_batch_per_chunk_and_attempt(emu, known)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_cleanly_with_130_and_resumes(emulator_factory, tmp_path: Path, sig):
    emu = emulator_factory(in_progress_seconds=1.5)
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--batch-size", "10")
    proc = subprocess_run(args)
    deadline = time.time() + 20
    while emu.stats()["batches"]["created"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    # Remote batches keep running; the same command picks them up.
    final = subprocess_run(args)
    _, err = final.communicate(timeout=60)
    assert final.returncode == 0, err.decode()
    assert emu.stats()["batches"]["created"] == 2
    all_succeeded_once(emu)


def test_many_batches_in_flight_are_polled_with_one_list_call(emulator_factory, tmp_path: Path):
    # The batches run until the test has seen 5 list polls (an event, not a duration).
    emu = emulator_factory(in_progress_seconds=600)
    src = awkward_table(tmp_path, n_plain=53, images=False)
    run_dir = tmp_path / "run"
    proc = subprocess_run(
        run_args(emu, src, run_dir, "--batch-size", "10", "--poll-interval", "0.05")
    )
    deadline = time.monotonic() + 60
    while calls(emu, "GET /v1/batches") < 5 and proc.poll() is None:
        assert time.monotonic() < deadline, "no list polls"
        time.sleep(0.02)
    # 6 batches in flight the whole time: not one GET per batch per poll, not one at all.
    assert calls(emu, "GET /v1/batches") >= 5 and calls(emu, "GET /v1/batches/{id}") == 0
    emu.update_scenario(in_progress_seconds=0, finalizing_seconds=0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    all_succeeded_once(emu)
    # While 3+ were in flight, polls were list pages: the list is trusted for 10 polls before a
    # batch it shows unchanged is checked on its own (a stale list, issue 14 item 8).
    logs = sorted((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1
    log = logs[0].read_text().splitlines()
    lists = [i for i, ln in enumerate(log) if "remote call: poll 6 batches (one list page)" in ln]
    gets = [i for i, ln in enumerate(log) if re.search(r"remote call: poll batch \S+$", ln)]
    assert len(lists) >= 5 and (not gets or min(gets) > lists[min(len(lists), 10) - 1])
    assert len(gets) == calls(emu, "GET /v1/batches/{id}")


def test_chunk_over_the_token_limit_on_its_own_is_split(emulator_factory, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=17, images=False)
    dry = tmp_path / "dry"
    fake = type("E", (), {"base_url": "http://127.0.0.1:9/v1"})()
    assert invoke(*run_args(fake, src, dry, "--batch-size", "1", "--dry-run")).exit_code == 0
    per_row = max(
        prompt_tokens(b, "/v1/chat/completions") for b in sent_bodies(dry, "dry-run").values()
    )
    # Room for about three rows: a chunk of 10 never fits, even with nothing else in flight.
    emu = emulator_factory(enqueued_token_limit={"gpt-4o-mini": per_row * 3})
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "10"))
    assert res.exit_code == 0, res.output
    all_succeeded_once(emu)
    # The dry run above wrote a log file of its own: read them all, in no particular order.
    assert "re-packed in chunks of" in all_logs(tmp_path / "logs")
