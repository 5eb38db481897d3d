"""Unattended maintenance: completion thresholds, re-sending by choice, missing-row details."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cli_helpers import (
    assert_one_batch_per_chunk_and_attempt,
    awkward_table,
    db_rows,
    executions,
    invoke,
    kill_after_calls,
    read_csv,
    run_args,
    subprocess_run,
)


def rejected_rows(emu, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 40-row table of which the emulator rejects a seeded ~10% for good (HTTP 400)."""
    src = awkward_table(tmp_path, n_plain=33, images=False)
    return src, tmp_path / "run"


@pytest.mark.parametrize(
    ("threshold", "code"), [(None, 3), ("0.95", 3), ("0.85", 0)], ids=["none", "0.95", "0.85"]
)
def test_completion_threshold_decides_the_exit_code(emulator_factory, tmp_path, threshold, code):
    emu = emulator_factory(reject_fraction=0.1, seed=4)  # exactly 4 of 40 rows
    src, run_dir = rejected_rows(emu, tmp_path)
    extra = ["--completion-threshold", threshold] if threshold else []
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "20", *extra))
    rows = read_csv(run_dir / "final_output.csv")
    failed = sum(r["status"] == "failed" for r in rows)
    assert failed / len(rows) == 0.1  # the scenario: 10% fail for good
    assert res.exit_code == code, res.output
    if code == 0:
        assert "meets the threshold 85.0%" in res.output
        assert "batchops missing" in res.output


def test_retry_missing_by_class_model_and_batch_sends_only_the_chosen_rows(
    emulator_factory, tmp_path: Path
):
    emu = emulator_factory(reject_fraction=0.25, seed=4)
    src, run_dir = rejected_rows(emu, tmp_path)
    assert invoke(*run_args(emu, src, run_dir, "--batch-size", "20")).exit_code == 3
    with sqlite3.connect(run_dir / "state.db") as db:
        failed = db.execute(
            "SELECT row_id, batch_id FROM rows WHERE status = 'failed' ORDER BY row_idx"
        ).fetchall()
    batches = sorted({b for _, b in failed})
    assert len(batches) == 2 and len(failed) >= 4
    emu.update_scenario(reject_fraction=0.0)
    before = {k: v["executed"] for k, v in executions(emu).items()}
    args = ("--run-dir", run_dir, "--base-url", emu.base_url, "--poll-interval", "0.05")

    # Nothing matches this class: nothing is sent.
    res = invoke("retry-missing", *args, "--class", "expired")
    assert res.exit_code == 3, res.output
    assert {k: v["executed"] for k, v in executions(emu).items()} == before

    # Only the first batch's failed rows.
    res = invoke("retry-missing", *args, "--class", "invalid_request", "--batch", batches[0])
    after = {k: v["executed"] for k, v in executions(emu).items()}
    resent = {k for k in after if after[k] != before.get(k)}
    assert resent == {r for r, b in failed if b == batches[0]}
    assert res.exit_code == 3  # the second batch's rows are still failed

    # The rest, chosen by the model they failed on.
    res = invoke("retry-missing", *args, "--from-model", "gpt-4o-mini")
    assert res.exit_code == 0, res.output
    assert all(v["succeeded"] == 1 for v in executions(emu).values())


def test_missing_rows_name_model_class_batch_and_last_attempt(emulator_factory, tmp_path: Path):
    emu = emulator_factory(reject_fraction=0.25, seed=4)
    src, run_dir = rejected_rows(emu, tmp_path)
    invoke(*run_args(emu, src, run_dir, "--batch-size", "20"))
    assert invoke("missing", "--run-dir", run_dir).exit_code == 0
    rows = read_csv(run_dir / "missing_rows.csv")
    assert rows and all(
        r["model"] == "gpt-4o-mini"
        and r["error_class"] == "invalid_request"
        and r["batch_id"].startswith("batch_")
        and r["last_attempt_at"][:2] == "20"
        for r in rows
    )


def test_failed_rows_wait_longer_before_each_retry(emulator_factory, tmp_path: Path):
    # Every execution fails with a retryable 500 line (the request's fault: the batch itself
    # runs; online, a server answering 500 to everything is set aside instead).
    mode = "batch"
    always = {"at": "line", "status": 500, "type": "server_error"}
    emu = emulator_factory(inject_errors=[{**always, "message": "boom"}])
    src = awkward_table(tmp_path, n_plain=0, images=False)
    run_dir = tmp_path / "run"
    delay, backoff = 0.3, 2.0
    res = invoke(
        *run_args(emu, src, run_dir, "--batch-size", "7", "--mode", mode),
        "--max-retries",
        "3",
        "--retry-delay",
        str(delay),
        "--retry-backoff",
        str(backoff),
    )
    assert res.exit_code == 3, res.output
    with sqlite3.connect(run_dir / "state.db") as db:
        ts = [t for (t,) in db.execute("SELECT ts FROM attempts WHERE row_idx = 0 ORDER BY ts")]
    # 4 executions (max_retries 3); the gaps grow: at least 0.3, 0.6, 1.2 s
    assert len(ts) == 4
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    assert all(g >= delay * backoff**i for i, g in enumerate(gaps)), gaps


def test_keep_latest_keeps_exactly_one_backup(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emulator, src, run_dir)).exit_code == 0
    for _ in range(2):
        assert invoke(*run_args(emulator, src, run_dir, "--keep-latest")).exit_code == 0
    backups = sorted(tmp_path.glob("run.backup-*"))
    assert len(backups) == 1 and (backups[0] / "state.db").exists()
    assert (run_dir / "final_output.csv").exists()


def test_status_group_by_a_source_column(emulator_factory, tmp_path: Path):
    emu = emulator_factory(reject_fraction=0.1, seed=4)  # exactly 4 of 40 rows fail
    src, run_dir = rejected_rows(emu, tmp_path)
    invoke(*run_args(emu, src, run_dir, "--batch-size", "20"))
    rows = read_csv(run_dir / "final_output.csv")
    want: dict[str, dict[str, int]] = {}
    for r in rows:
        group = want.setdefault(r["image"], {})
        group[r["status"]] = group.get(r["status"], 0) + 1
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json", "--group-by", "image").output)
    assert st["groups"] == {"column": "image", "values": dict(sorted(want.items()))}
    res = invoke("status", "--run-dir", run_dir, "--group-by", "image")
    assert "rows by image:" in res.output and "(empty): " in res.output
    bad = invoke("status", "--run-dir", run_dir, "--group-by", "nope")
    assert bad.exit_code == 2 and "no column 'nope'" in bad.output


def test_monitor_auto_maintains_a_run_whose_quota_came_back(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-4o-mini": 0})
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emu, src, run_dir, "--batch-size", "10")).exit_code == 3
    emu.update_scenario(model_quota={})  # the quota is back; the run remembers it was gone
    res = invoke(
        "monitor",
        "--run-dir",
        run_dir,
        "--base-url",
        emu.base_url,
        "--every",
        "0.3s",
        "--cooldown",
        "0.2s",
        "--auto-maintain",
        "--max-cycles",
        "20",
        "--log-dir",
        tmp_path / "logs",
    )
    assert res.exit_code == 0, res.output
    assert all(v == {"executed": 1, "succeeded": 1} for v in executions(emu).values())
    assert len(executions(emu)) == 20
    reports = sorted((run_dir / "reports").glob("maintenance_*.json"))
    cycles = [json.loads(p.read_text()) for p in reports]
    assert [c["cycle"] for c in sorted(cycles, key=lambda c: c["cycle"])] == list(
        range(1, len(cycles) + 1)
    )  # one report per cycle
    last = max(cycles, key=lambda c: c["cycle"])
    assert last["completion"] == 1.0 and last["next_check"] is None
    assert any("re-queued" in a for c in cycles for a in c["actions"])


def test_maintain_analyses_without_side_effects(emulator_factory, tmp_path: Path):
    emu = emulator_factory(reject_fraction=0.1, seed=4)
    src, run_dir = rejected_rows(emu, tmp_path)
    invoke(*run_args(emu, src, run_dir, "--batch-size", "20"))
    before = (run_dir / "state.db").read_bytes()
    calls = dict(emu.stats()["calls"])
    res = invoke("maintain", "--run-dir", run_dir, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["completion"] == 0.9 and data["missing_by_class"] == {"invalid_request": 4}
    assert data["recommended"] == f"batchops retry-missing --run-dir {run_dir}"
    assert emu.stats()["calls"] == calls and (run_dir / "state.db").read_bytes() == before


UPLOAD, CREATE = "POST /v1/files", "POST /v1/batches"
POLL, DOWNLOAD = (
    "GET /v1/batches/{id}",
    "GET /v1/files/{id}/content",
)  # one batch in flight: polled on its own
# (route, k): kill the monitor just after its k-th call of the route in that process. Uploads and
# creates first (the re-sent chunks), then polls and downloads while batches finish.
MONITOR_KILLS = [(CREATE, 1), (CREATE, 1), (POLL, 1), (DOWNLOAD, 1), (CREATE, 1), (DOWNLOAD, 1)]


@pytest.mark.slow
def test_kill_9_loop_against_monitor_pays_each_row_once(emulator_factory, tmp_path: Path):
    """The unattended monitor is killed at its uploads, creates, polls and downloads; the next
    monitor reconciles and goes on: every row answered, each executed once, one batch per
    (chunk, attempt)."""
    emu = emulator_factory(
        model_quota={"gpt-4o-mini": 0},
        validating_seconds=0.05,
        in_progress_seconds=0.3,
        finalizing_seconds=0.05,
    )
    src = awkward_table(tmp_path, n_plain=43, images=False)  # 50 rows, 10 chunks of 5
    run_dir = tmp_path / "run"
    # --token-limit 1: one batch in flight at a time, so every process still has creates, polls
    # and downloads to come when it is killed (each next create waits ~0.4 s for a batch to end).
    first = run_args(emu, src, run_dir, "--batch-size", "5", "--token-limit", "1")
    assert invoke(*first).exit_code == 3
    emu.update_scenario(model_quota={})  # quota back: the monitor re-sends every row
    args = [
        "monitor", "--run-dir", run_dir, "--base-url", emu.base_url, "--every", "0.2s",
        "--cooldown", "0.1s", "--auto-maintain", "--max-cycles", "200",
        "--log-dir", tmp_path / "logs",
    ]  # fmt: skip
    for i, (route, k) in enumerate(MONITOR_KILLS):
        kill_after_calls(emu, args, route, k, label=f"kill {i}")
    final = subprocess_run(args)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()
    assert len(executions(emu)) == 50
    assert all(v == {"executed": 1, "succeeded": 1} for v in executions(emu).values())
    assert {r["status"] for r in read_csv(run_dir / "final_output.csv")} == {"succeeded"}
    known = set(db_rows(run_dir, "SELECT chunk_id, attempt FROM batches"))
    assert_one_batch_per_chunk_and_attempt(emu, known)
