"""Guarantees pinned end to end (the real CLI against the emulator over HTTP), each one a bug
that the rest of the suite let through once (issue 22): retries and quota refusals counted
exactly, a create that a crash hid reconciled to one batch, expired batches split exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    AWKWARD_ROWS,
    assert_one_batch_per_chunk_and_attempt,
    awkward_table,
    db_rows,
    executions,
    invoke,
    read_csv,
    run_args,
    sent_bodies,
)

from batchops.emulator.answers import expected_answer

FAST_RETRY = ["--retry-delay", "0.01", "--retry-max-delay", "0.05"]


def failover_args(emu: Any, src: Path, run_dir: Path, *extra: Any) -> list[Any]:
    return run_args(
        emu, src, run_dir, "--batch-size", "10", "--model", "gpt-b", *extra, model="gpt-a"
    )


# ------------------------------------------------------------------ quota refusals are free


def test_batch_quota_refusals_leave_attempts_at_zero(emulator_factory, tmp_path: Path):
    # gpt-a answers 15 requests, then refuses the rest inside its batches (429 insufficient_quota
    # lines): those rows go to gpt-b without using any of their retry budget.
    emu = emulator_factory(model_quota={"gpt-a": 15})
    src = awkward_table(tmp_path, n_plain=33, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*failover_args(emu, src, run_dir))
    assert res.exit_code == 0, res.output
    refused = {
        r
        for (r,) in db_rows(
            run_dir,
            "SELECT DISTINCT r.row_id FROM attempts a JOIN rows r USING (row_idx)"
            " WHERE a.ok = 0 AND a.error_class = 'quota'",
        )
    }
    assert refused, "gpt-a should have refused some rows inside a batch"
    rows = {r: (m, a) for r, m, a in db_rows(run_dir, "SELECT row_id, model, attempts FROM rows")}
    assert len(rows) == 40
    assert {rows[r] for r in refused} == {("gpt-b", 0)}
    assert {a for _, a in rows.values()} == {0}  # nobody failed for a reason of its own
    stats = executions(emu)
    assert all(v == {"executed": 1, "succeeded": 1} for v in stats.values())


def test_batch_quota_refusals_fail_over_even_with_max_retries_0(emulator_factory, tmp_path: Path):
    # With no retry budget at all, a refused row still moves to the next model: a refusal is
    # the model's exhaustion, not a retry of the row.
    emu = emulator_factory(model_quota={"gpt-a": 15})
    src = awkward_table(tmp_path, n_plain=33, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*failover_args(emu, src, run_dir, "--max-retries", "0"))
    assert res.exit_code == 0, res.output
    out = read_csv(run_dir / "final_output.csv")
    assert {o["status"] for o in out} == {"succeeded"}
    models = [o["model"] for o in out]
    assert models.count("gpt-a") == 15 and models.count("gpt-b") == 25


# ------------------------------------------------------------------ the retry budget, exactly


def always_truncated(tmp_path: Path, n: int = 4) -> Path:
    """Rows whose every answer is cut at --max-tokens 1: a retryable format_error each time."""
    src = tmp_path / "t.csv"
    lines = ["sku,name,price,description"] + [
        f"s{i},thing {i},{i},words of row {i}" for i in range(n)
    ]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src


@pytest.mark.parametrize(("max_retries", "mode"), [(1, "batch"), (2, "batch"), (1, "online")])
def test_max_retries_n_means_exactly_n_plus_1_executions(
    emulator, tmp_path: Path, max_retries: int, mode: str
):
    src = always_truncated(tmp_path)
    run_dir = tmp_path / "run"
    args = run_args(
        emulator, src, run_dir, "--max-tokens", "1", "--max-retries", max_retries, "--mode", mode
    )
    res = invoke(*args, *FAST_RETRY)
    assert res.exit_code == 3, res.output
    stats = executions(emulator)
    # a truncated answer is an HTTP 200 to the server: every execution "succeeded" there
    n = max_retries + 1
    assert stats == {f"s{i}": {"executed": n, "succeeded": n} for i in range(4)}
    rows = db_rows(run_dir, "SELECT status, attempts, error_class FROM rows")
    assert rows == [("failed", max_retries + 1, "format_error")] * 4
    out = read_csv(run_dir / "final_output.csv")
    assert {o["status"] for o in out} == {"failed"}


# ------------------------------------------------------------------ a create the client never saw


@pytest.mark.parametrize("every", [2, 4])
def test_batch_created_but_answer_lost_reconciles_to_one_batch(
    emulator_factory, tmp_path: Path, every: int
):
    # Every Nth API call is carried out and then its connection drops: among them uploads and
    # batch creations, which the client cannot tell from calls that never arrived.
    emu = emulator_factory(drop_connection_every=every, drop_after_processing=True)
    src = awkward_table(tmp_path, n_plain=23, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "10", *FAST_RETRY))
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == 30 and all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    known = set(db_rows(run_dir, "SELECT chunk_id, attempt FROM batches"))
    chunks = {c for (c,) in db_rows(run_dir, "SELECT chunk_id FROM chunks")}
    assert {c for c, _ in known} == chunks and len(chunks) == 3
    emu.update_scenario(drop_connection_every=0)  # the check's own calls must arrive
    assert emu.stats()["batches"]["created"] == len(known)
    assert_one_batch_per_chunk_and_attempt(emu, known)
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "reconciled" in log  # the drops did hit creating calls


# ------------------------------------------------------------------ expired batches


def batch_of(run_dir: Path) -> dict[str, str]:
    return {o["sku"]: o["batch_id"] for o in read_csv(run_dir / "final_output.csv")}


def test_expired_batch_keeps_finished_rows_and_requeues_the_rest(emulator_factory, tmp_path: Path):
    emu = emulator_factory(expire_first_n=1, expire_done_fraction=0.3)
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "20", "--max-retries", "1"))
    assert res.exit_code == 0, res.output
    (expired,) = [
        b for (b,) in db_rows(run_dir, "SELECT batch_id FROM batches WHERE status = 'expired'")
    ]
    (second,) = [
        b for (b,) in db_rows(run_dir, "SELECT batch_id FROM batches WHERE status = 'completed'")
    ]
    where = batch_of(run_dir)
    kept = {s for s, b in where.items() if b == expired}
    again = {s for s, b in where.items() if b == second}
    assert len(kept) == 6 and len(again) == 14 and kept | again == set(where)  # 30% of 20
    stats = executions(emu)
    assert all(v == {"executed": 1, "succeeded": 1} for v in stats.values()) and len(stats) == 20
    # expiry used one retry of the re-queued rows only
    attempts = dict(db_rows(run_dir, "SELECT row_id, attempts FROM rows"))
    assert {attempts[s] for s in kept} == {0} and {attempts[s] for s in again} == {1}


def test_expired_batches_collected_by_watch_keep_and_requeue(emulator_factory, tmp_path: Path):
    # The same guarantee through `--no-wait` then `watch --retry`: collection after the fact.
    emu = emulator_factory(expire_first_n=2, expire_done_fraction=0.5)
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "10", "--no-wait"))
    assert res.exit_code == 0, res.output
    watch = ["watch", "--run-dir", run_dir, "--base-url", emu.base_url, "--poll-interval", "0.05"]
    res = invoke(*watch, "--log-dir", tmp_path / "logs")
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    # both batches expired half way: 10 rows kept, 10 waiting to be sent again
    assert res.exit_code == 3, res.output
    assert st["batches_by_status"] == {"expired": 2}
    assert (st["rows"]["succeeded"], st["rows"]["pending"]) == (10, 10)
    res = invoke(*watch, "--retry", "--log-dir", tmp_path / "logs")
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == 20 and all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    out = read_csv(run_dir / "final_output.csv")
    assert {o["status"] for o in out} == {"succeeded"}


# ------------------------------------------------------------------ cells reach the prompt as written


def expected_prompts() -> dict[str, str]:
    """The prompt of each awkward row, from the CSV's cells by plain str.format: independent of
    batchops' own renderer (a test that compares the renderer with itself proves nothing)."""
    return {
        sku: f"Describe {name} ({price}): {description}"
        for sku, name, price, description, _ in AWKWARD_ROWS
    }


def user_texts(run_dir: Path, folder: str) -> dict[str, str]:
    return {cid: b["messages"][-1]["content"] for cid, b in sent_bodies(run_dir, folder).items()}


def test_numeric_looking_cells_are_sent_exactly_as_written(emulator, tmp_path: Path):
    # 19.90, 5, 1e3, -0, NaN, TRUE: any number parsing on the way would change them.
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emulator, src, run_dir))
    assert res.exit_code == 0, res.output
    want = expected_prompts()
    assert user_texts(run_dir, "inputs") == want
    out = {o["sku"]: o["response"] for o in read_csv(run_dir / "final_output.csv")}
    assert out == {
        sku: expected_answer("gpt-4o-mini", {"messages": [{"role": "user", "content": text}]})
        for sku, text in want.items()
    }


def test_dry_run_files_hold_the_cells_exactly_as_written(tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    fake = type("E", (), {"base_url": "http://127.0.0.1:9/v1"})()
    res = invoke(*run_args(fake, src, run_dir, "--dry-run"))
    assert res.exit_code == 0, res.output
    assert user_texts(run_dir, "dry-run") == expected_prompts()
