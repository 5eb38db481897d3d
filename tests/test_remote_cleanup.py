"""Remote cleanup is durable: no provider object of a finished batch is left behind, crash or not.

The engine runs on the in-memory backend (the emulator's own core). A crash between a
collection's commit and its deletes is the backend's `crash_after={"delete": n}` knob: the
process dies just before its n-th delete, and every later one (see MemoryBackend). What is due
is in the store (`remote_cleanup`), so the next invocation deletes it, each object once.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    awkward_table,
    calls,
    db_rows,
    executions,
    kill_after_calls,
    run_args,
    subprocess_run,
)

from batchops.api import build_spec
from batchops.backends import RemoteError, SubmitRequest
from batchops.backends.memory import MemoryBackend, SimulatedCrash, memory_emulator
from batchops.cleanup import DELETE_WORKERS
from batchops.emulator.state import Emulator
from batchops.engine import BatchEngine, EngineResult
from batchops.providers import Key, Pool
from batchops.rundir import create_or_resume
from batchops.store import SCHEMA_VERSION, CleanupItem, Store
from tests.test_store import database_at

KEY = "sk-test-clean-000000000001"


class Job:
    """One run dir on one emulator; every backend it made is kept (what each deleted)."""

    def __init__(
        self,
        tmp: Path,
        n_rows: int = 25,
        *,
        deletes_batches: bool = False,
        options: dict[str, Any] | None = None,
        **knobs: Any,
    ) -> None:
        self.emu: Emulator = memory_emulator(**knobs)
        self.n_rows = n_rows
        self.deletes_batches = deletes_batches
        self.options = {"batch_size": 10, "poll_interval": 0.001, "retry_delay": 0.0}
        self.options.update(options or {})
        self.csv = tmp / "table.csv"
        with self.csv.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["sku", "name"])
            w.writerows([f"{i:04d}", f"item {i}"] for i in range(n_rows))
        self.run_dir = tmp / "run"
        self.backends: list[MemoryBackend] = []

    def engine(self, crash_after: dict[str, int] | None = None, **options: Any) -> BatchEngine:
        spec = build_spec(
            source_path=str(self.csv),
            prompt="Describe {name}",
            models=["gpt-4o-mini"],
            id_column="sku",
            **{**self.options, **options},
        )

        def factory(entry, key, base_url):  # type: ignore[no-untyped-def]
            b = MemoryBackend(
                self.emu, key, crash_after=crash_after, deletes_batches=self.deletes_batches
            )
            self.backends.append(b)
            return b

        pool = Pool(spec, [Key(KEY)], env={}, backend_factory=factory)
        pool.lane = "batch"
        run, _ = create_or_resume(self.run_dir, spec)
        return BatchEngine(run, pool, wait=True, sleep=lambda s: None)

    def run(self, crash_after: dict[str, int] | None = None, **options: Any) -> EngineResult:
        engine = self.engine(crash_after, **options)
        try:
            return engine.execute()
        finally:
            engine.run.close()

    def deleted(self) -> Counter[str]:
        """Every object deleted (a delete that took effect), over every invocation."""
        return Counter(ref for b in self.backends for ref in b.deleted)

    def files(self) -> dict[str, int]:
        return dict(self.emu.stats()["files"])

    def db(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.run_dir / "state.db")
        try:
            return [tuple(r) for r in conn.execute(sql)]
        finally:
            conn.close()

    def statuses(self) -> Counter[str]:
        return Counter(r[0] for r in self.db("SELECT status FROM rows"))

    def open_records(self) -> int:
        return self.db("SELECT COUNT(*) FROM remote_cleanup WHERE done_at IS NULL")[0][0]


@pytest.fixture
def job(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(**kw: Any) -> Job:
        return Job(tmp_path, **kw)

    return make


# ------------------------------------------------------------------ 1. durable after a crash


def test_a_crash_after_the_commit_before_the_deletes_is_cleaned_by_the_next_run_once(job):
    j = job(n_rows=25)  # 3 batches: 3 inputs + 3 outputs
    with pytest.raises(SimulatedCrash):
        j.run(crash_after={"delete": 1})  # dies before any delete took effect
    assert not j.deleted()
    collected = j.db("SELECT COUNT(*) FROM chunks WHERE state = 'collected'")[0][0]
    assert collected >= 1 and j.statuses()["succeeded"] >= 10  # results committed first
    assert j.open_records() == 2 * collected  # what is due is on disk
    assert j.files()["live"] == 6  # left behind by the crash
    res = j.run()
    assert res.stopped_because is None and j.statuses() == {"succeeded": 25}
    deleted = j.deleted()
    assert len(deleted) == 6 and set(deleted.values()) == {1}, deleted  # each exactly once
    files = j.files()
    assert (files["uploaded"], files["live"], files["deleted"]) == (3, 0, 6)
    assert j.open_records() == 0
    assert dict(j.db("SELECT outcome, COUNT(*) FROM remote_cleanup GROUP BY outcome")) == {
        "deleted": 6
    }


def test_kill_9_after_the_first_delete_then_a_resume_leaves_no_file_behind(
    emulator_factory, tmp_path: Path
):
    """The real CLI, SIGKILLed the moment the server sees its first delete (a collection's
    commit is behind it, its other deletes not done or not recorded): the resumed run deletes
    every file that is left, and every record ends closed."""
    emu = emulator_factory(validating_seconds=0.05, in_progress_seconds=0.3)
    src = awkward_table(tmp_path, n_plain=23, images=False)  # 30 rows, 3 chunks of 10
    run_dir = tmp_path / "run"
    # --token-limit 1: one batch in flight at a time, so the process has two batches still to
    # send and collect when it is killed (it cannot have ended by then).
    args = run_args(emu, src, run_dir, "--batch-size", "10", "--token-limit", "1")
    kill_after_calls(emu, args, "DELETE /v1/files/{id}", 1, label="kill at the first delete")
    # A delete starts only once a collection committed.
    assert db_rows(run_dir, "SELECT COUNT(*) FROM chunks WHERE state = 'collected'") >= [(1,)]
    final = subprocess_run(args)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()
    assert len(executions(emu)) == 30
    assert all(v == {"executed": 1, "succeeded": 1} for v in executions(emu).values())
    files = emu.stats()["files"]
    assert (files["uploaded"], files["live"], files["deleted"]) == (3, 0, 6), files
    # Each file went once; only the deletes in flight when the process was killed (2 at a
    # time: its input and output file) may have been asked again, answered 404 (done).
    assert 6 <= calls(emu, "DELETE /v1/files/{id}") <= 6 + DELETE_WORKERS
    assert db_rows(run_dir, "SELECT COUNT(*) FROM remote_cleanup WHERE done_at IS NULL") == [(0,)]


def test_watch_after_a_crash_deletes_what_is_due_without_running_anything(job):
    # `watch` / `monitor` reconcile first: that is where the due deletes are taken up.
    j = job(n_rows=10)
    with pytest.raises(SimulatedCrash):
        j.run(crash_after={"delete": 1})
    assert j.statuses() == {"succeeded": 10} and j.files()["live"] == 2
    engine = j.engine()
    try:
        engine.reconcile()
        engine.finish_deletes()
    finally:
        engine.run.close()
    assert j.files()["live"] == 0 and set(j.deleted().values()) == {1}
    assert j.open_records() == 0


def test_keep_remote_files_writes_nothing_due(job):
    j = job(n_rows=25)
    j.run(keep_remote_files=True)
    assert j.db("SELECT COUNT(*) FROM remote_cleanup") == [(0,)]
    assert j.files()["live"] == 6 and not j.deleted()


def test_a_crash_then_a_resume_with_keep_remote_files_deletes_nothing(job):
    j = job(n_rows=10)
    with pytest.raises(SimulatedCrash):
        j.run(crash_after={"delete": 1})
    j.run(keep_remote_files=True)
    assert not j.deleted() and j.files()["live"] == 2


# Short results (kept as evidence, nothing due): over HTTP, where the emulator's result-file
# faults are, in test_never_twice.test_files_of_a_batch_whose_results_stay_short_are_kept_remotely.


def test_a_failing_delete_never_fails_the_run_and_is_tried_again_next_time(job):
    # Every file delete of the first invocation answers 500: the run still ends well, the
    # records stay due, and the next invocation deletes them.
    j = job(n_rows=10, delete_error_status=500)
    res = j.run()
    assert res.stopped_because is None and j.statuses() == {"succeeded": 10}
    assert j.open_records() == 2 and j.files()["live"] == 2
    assert sum(b.calls.get("delete", 0) for b in j.backends) == 2  # each asked once a run
    j.emu.scenario.delete_error_status = 0
    j.run()
    assert j.open_records() == 0 and j.files()["live"] == 0


def test_a_delete_refused_for_good_is_not_asked_again(job):
    j = job(n_rows=10, delete_error_status=403)
    j.run()
    assert j.open_records() == 0 and j.files()["live"] == 2
    assert dict(j.db("SELECT outcome, COUNT(*) FROM remote_cleanup GROUP BY outcome")) == {
        "refused": 2
    }


# ------------------------------------------------------------------ 2. batches failed as a whole


def test_inputs_of_batches_refused_for_the_token_limit_are_deleted_once_done_with(job):
    # Chunks refused for the enqueued-token limit are sent again with the same file: it is
    # deleted once collected with a later batch, never before.
    j = job(n_rows=50, enqueued_token_limit={"gpt-4o-mini": 60})
    j.run()
    assert j.statuses() == {"succeeded": 50}
    files = j.files()
    failed = j.db("SELECT COUNT(*) FROM batches WHERE status = 'failed'")[0][0]
    assert failed > 0  # the scenario did refuse some
    assert files["live"] == 0 and set(j.deleted().values()) == {1}, (files, j.deleted())


def test_the_file_of_a_chunk_split_after_a_token_limit_refusal_is_deleted(job):
    j = job(n_rows=20, options={"batch_size": 20}, enqueued_token_limit={"gpt-4o-mini": 60})
    j.run()
    assert j.statuses() == {"succeeded": 20}
    assert j.db("SELECT COUNT(*) FROM chunks WHERE state = 'abandoned'")[0][0] >= 1
    assert j.files()["live"] == 0 and set(j.deleted().values()) == {1}


def test_the_input_of_a_batch_that_failed_validation_is_deleted(job):
    # Batches over the request limit fail as a whole: their rows are re-packed (and fail for
    # good once their retries are spent); no chunk will send those files again.
    j = job(n_rows=10, max_requests_per_batch=5, options={"max_retries": 1})
    j.run()
    assert j.statuses() == {"failed": 10}
    assert j.db("SELECT COUNT(*) FROM batches WHERE status = 'failed'")[0][0] == 2
    assert j.files()["live"] == 0 and set(j.deleted().values()) == {1}


# ------------------------------------------------------------------ 3. batches deleted too


def test_ended_batches_are_deleted_where_the_api_deletes_batches(job):
    j = job(n_rows=25, deletes_batches=True)
    j.run()
    assert j.statuses() == {"succeeded": 25}
    ids = [r[0] for r in j.db("SELECT batch_id FROM batches")]
    assert len(ids) == 3 and not set(ids) & set(j.emu.batches)  # gone remotely
    assert all(j.deleted()[i] == 1 for i in ids) and j.files()["live"] == 0


def test_a_crash_before_a_batch_delete_is_cleaned_by_the_next_run(job):
    j = job(n_rows=10, deletes_batches=True)
    with pytest.raises(SimulatedCrash):
        j.run(crash_after={"delete": 1})
    (batch_id,) = [r[0] for r in j.db("SELECT batch_id FROM batches")]
    assert batch_id in j.emu.batches  # results committed, batch still there
    j.run()
    assert batch_id not in j.emu.batches and j.deleted()[batch_id] == 1


def test_batches_are_kept_with_keep_remote_files(job):
    j = job(n_rows=10, deletes_batches=True)
    j.run(keep_remote_files=True)
    (batch_id,) = [r[0] for r in j.db("SELECT batch_id FROM batches")]
    assert batch_id in j.emu.batches and not j.deleted()


def test_a_gemini_job_is_deleted_once_then_404(emulator_factory, tmp_path: Path) -> None:
    # Over the real SDK: batches.delete forgets an ended job; a second delete answers 404 (the
    # cleanup's "already gone").
    from batchops.backends import make_backend
    from batchops.spec import ModelEntry, RetryPolicy

    emu = emulator_factory()
    entry = ModelEntry(name="gemini-2.5-flash", provider="gemini", base_url=emu.root_url)
    be = make_backend(entry, "gk-test-0000000000clean", None, policy=RetryPolicy(max_delay=0.05))
    assert be.deletes_batches and be.uploads_files
    chunk = tmp_path / "c.jsonl"
    body = {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": body}
    chunk.write_text(json.dumps(line) + "\n", encoding="utf-8")
    file_ref = be.upload(chunk, "run-c1-a0.jsonl")
    req = SubmitRequest(
        chunk, file_ref, "gemini-2.5-flash", "/v1/chat/completions", "24h", {}, "run-c1-a0"
    )
    b = be.create(req)
    deadline = time.monotonic() + 20  # a bound, not a timing: the job ends in well under 1 s
    while (b := be.retrieve(b.id)).output_ref is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    be.delete_batch(b.id)
    with pytest.raises(RemoteError) as gone:
        be.delete_batch(b.id)
    assert gone.value.status == 404


# ------------------------------------------------------------------ schema


def test_a_schema_7_database_opens_and_migrates_in_place(tmp_path: Path) -> None:
    conn = database_at(tmp_path, 7)
    conn.execute(
        "INSERT INTO chunks(chunk_id, model, path, n_rows, n_bytes, est_tokens, state,"
        " file_id, created_at, updated_at) VALUES (1, 'm', 'c.jsonl', 3, 9, 9, 'collected',"
        " 'file-1', 0, 0)"
    )
    conn.close()
    store = Store.open(tmp_path)
    try:
        assert SCHEMA_VERSION == 8
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.chunk(1).file_id == "file-1"  # kept
        assert store.cleanup_due() == []  # a run collected before: nothing is planned
    finally:
        store.close()


def test_a_record_is_due_once_its_chunk_no_longer_uses_the_object(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    try:
        for no, file_id, batch_id in ((1, "f1", "b1"), (2, "f2", "b2")):
            store.conn.execute(
                "INSERT INTO chunks(chunk_id, model, path, n_rows, n_bytes, est_tokens, state,"
                " file_id, batch_id, created_at, updated_at)"
                " VALUES (?, 'm', 'c.jsonl', 3, 9, 9, 'submitted', ?, ?, 0, 0)",
                (no, file_id, batch_id),
            )

        def item(kind: str, ref: str, chunk: int, batch: str) -> CleanupItem:
            return CleanupItem(kind, ref, chunk, batch, "m", "k")

        collected = [item("input", "f1", 1, "b1"), item("output", "o1", 1, "b1")]
        refused = [item("error", "e2", 2, "b2"), item("batch", "b2", 2, "b2")]
        store.plan_cleanup([*collected, *refused])
        assert store.cleanup_due() == []  # both chunks still use everything
        # Chunk 2's batch was refused (token limit): it waits to send the same file again.
        store.conn.execute(
            "UPDATE chunks SET state = 'uploaded', batch_id = NULL WHERE chunk_id = 2"
        )
        assert store.cleanup_due() == refused
        store.conn.execute("UPDATE chunks SET state = 'collected' WHERE chunk_id = 1")
        assert store.cleanup_due() == [*collected, *refused]
        store.cleanup_done([("input", "f1", "deleted"), ("batch", "b2", "gone")])
        assert store.cleanup_due() == [collected[1], refused[0]]
        store.plan_cleanup([item("input", "f1", 1, "b1")])  # planned again: stays done
        assert store.cleanup_due() == [collected[1], refused[0]]
        assert store.cleanup_counts() == {"open": 2, "deleted": 1, "gone": 1}
    finally:
        store.close()
