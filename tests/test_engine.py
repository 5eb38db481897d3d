"""The batch engine on the in-memory backend: every fault scenario in milliseconds.

The backend drives the emulator's own core (same knobs as over HTTP), so these tests assert the
same guarantees as the HTTP tests — every row answered exactly once, finished work kept, the
pool failing over — without sockets or wall-clock waits. Crashes are the backend's
`crash_after` knob: the process 'dies' right after a remote call took effect, and a new engine
on the same run dir must reconcile instead of paying again.
"""

from __future__ import annotations

import csv
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batchops.api import build_spec
from batchops.backends.memory import MemoryBackend, SimulatedCrash, memory_emulator
from batchops.emulator.answers import expected_answer
from batchops.emulator.state import Emulator
from batchops.engine import BatchEngine, EngineResult
from batchops.errors import StateError
from batchops.providers import Key, Pool
from batchops.rundir import create_or_resume
from batchops.states import CHUNK_TRANSITIONS, ChunkState, StopReason

KEY1 = "sk-test-key1-000000000001"
KEY2 = "sk-test-key2-000000000002"


@dataclass
class Harness:
    tmp: Path
    emu: Emulator
    n_rows: int = 40
    models: list[str] = field(default_factory=lambda: ["gpt-4o-mini"])
    keys: list[str] = field(default_factory=lambda: [KEY1])
    options: dict[str, Any] = field(default_factory=dict)
    crash_after: dict[str, int] = field(default_factory=dict)
    transitions: set[tuple[str, str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.csv = self.tmp / "table.csv"
        with self.csv.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["sku", "name"])
            w.writerows([f"{i:04d}", f"item {i}"] for i in range(self.n_rows))
        self.run_dir = self.tmp / "run"

    def spec(self):  # type: ignore[no-untyped-def]
        # No retry waits: time does not pass on the memory backend (the wait itself is
        # tested over HTTP in test_maintenance).
        opts = {"batch_size": 10, "poll_interval": 0.001, "retry_delay": 0.0, **self.options}
        return build_spec(
            source_path=str(self.csv),
            prompt="Describe {name}",
            models=self.models,
            id_column="sku",
            **opts,
        )

    def engine(self, *, wait: bool = True, crash: bool = True) -> BatchEngine:
        spec = self.spec()
        crash_after = self.crash_after if crash else {}

        def factory(entry, key, base_url):  # type: ignore[no-untyped-def]
            return MemoryBackend(self.emu, key, crash_after=crash_after)

        pool = Pool(spec, [Key(k) for k in self.keys], env={}, backend_factory=factory)
        pool.lane = "batch"
        run, _ = create_or_resume(self.run_dir, spec)
        return BatchEngine(run, pool, wait=wait, sleep=lambda s: None)

    def run(self, **kw: Any) -> EngineResult:
        engine = self.engine(**kw)
        try:
            return engine.execute()
        finally:
            self.transitions |= engine.store.transitions
            engine.run.close()

    def rows(self) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.run_dir / "state.db")
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute("SELECT * FROM rows ORDER BY row_idx").fetchall()
        finally:
            conn.close()

    def executed(self) -> dict[str, int]:
        return {k: v["executed"] for k, v in self.emu.stats()["requests"].items()}

    def assert_all_answered_once(self) -> None:
        rows = self.rows()
        assert [r["status"] for r in rows] == ["succeeded"] * self.n_rows
        for r in rows:
            body = {
                "model": r["model"],
                "messages": [{"role": "user", "content": f"Describe item {int(r['row_id'])}"}],
            }
            assert r["response"] == expected_answer(r["model"], body)
        assert set(self.executed().values()) == {1}
        assert len(self.executed()) == self.n_rows


@pytest.fixture
def make(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Harness] = []

    def build(**kw: Any) -> Harness:
        knobs = kw.pop("knobs", {})
        h = Harness(tmp_path / f"h{len(made)}", memory_emulator(**knobs), **kw)
        made.append(h)
        return h

    yield build
    for h in made:  # every transition any test performed is one the table allows
        for kind, old, new in h.transitions:
            assert kind == "chunk" and ChunkState(new) in CHUNK_TRANSITIONS[ChunkState(old)]


# ---------------------------------------------------------------------- the happy path


@pytest.mark.parametrize("batch_size", [3, 7, 10, 40, 1000])
def test_every_row_answered_once(make, batch_size):
    h = make(options={"batch_size": batch_size})
    result = h.run()
    assert result.stopped_because is None
    h.assert_all_answered_once()


def test_answers_joined_by_id_despite_shuffled_output(make):
    h = make(n_rows=60, options={"batch_size": 60}, knobs={"shuffle_output": True, "seed": 7})
    h.run()
    h.assert_all_answered_once()


def test_progress_counts_are_taken_again_only_when_cheap_enough_and_last_fresh(make):
    """Counting rows costs time in proportion to the rows left: the progress display takes
    them again only once 1/PROGRESS_COUNT_SHARE times their last cost has passed, and the
    last report of a run always shows the final counts."""
    h = make(n_rows=12)
    engine = h.engine()
    ticks = iter([0.0, 1.0, 10.0, 100.0, 101.0, 102.0, 103.0])  # a count "costs" 1 s: kept 50 s
    engine.progress_counts.clock = lambda: next(ticks)
    seen: list[dict[str, int]] = []
    engine.on_progress = lambda p: seen.append(p.counts)
    try:
        engine.ensure_rows()
        engine.report_progress()  # counted at 0 (cost 1)
        engine.build_pending()  # 12 rows pending → queued
        engine.report_progress()  # at 10: within 50 s, the last counts are shown again
        engine.report_progress()  # at 100: counted again
        engine.report_progress(fresh=True)  # counted whatever the clock says
    finally:
        engine.run.close()
    assert [c["pending"] for c in seen] == [12, 12, 0, 0]
    assert [c["queued"] for c in seen] == [0, 0, 12, 12]


def test_the_last_progress_report_of_a_run_shows_its_final_counts(make):
    h = make(n_rows=25)
    engine = h.engine()
    seen: list[dict[str, int]] = []
    engine.on_progress = lambda p: seen.append(p.counts)
    try:
        result = engine.execute()
    finally:
        engine.run.close()
    assert seen[-1] == result.counts and result.counts["succeeded"] == 25


def test_rerun_of_a_finished_run_sends_nothing(make):
    h = make()
    h.run()
    calls = h.emu.stats()["calls"]
    uploads = h.emu.stats()["files"]["uploaded"]
    h.run()
    assert h.emu.stats()["files"]["uploaded"] == uploads
    assert h.emu.stats()["calls"] == calls


def test_no_wait_then_resume_uploads_nothing_again(make):
    h = make()
    assert h.run(wait=False).stopped_because == StopReason.NO_WAIT
    uploads = h.emu.stats()["files"]["uploaded"]
    assert h.run().stopped_because is None
    assert h.emu.stats()["files"]["uploaded"] == uploads
    h.assert_all_answered_once()


# ---------------------------------------------------------------------- expiry


def test_expired_batch_keeps_finished_rows_and_resends_only_the_rest(make):
    h = make(options={"batch_size": 40}, knobs={"expire_first_n": 1, "expire_done_fraction": 0.5})
    h.run()
    h.assert_all_answered_once()
    assert h.emu.stats()["batches"]["by_status"] == {"expired": 1, "completed": 1}


def test_expired_rows_use_a_retry_and_fail_when_the_budget_is_spent(make):
    h = make(
        n_rows=10,
        options={"batch_size": 10, "max_retries": 1},
        knobs={"expire_first_n": 5, "expire_done_fraction": 0.0},
    )
    h.run()
    rows = h.rows()
    assert {r["status"] for r in rows} == {"failed"}
    assert {r["attempts"] for r in rows} == {2}
    assert all("expired" in r["error"] for r in rows)


def test_expired_rows_are_requeued_not_failed(make):
    h = make(
        n_rows=10,
        options={"batch_size": 10, "max_retries": 3},
        knobs={"expire_first_n": 2, "expire_done_fraction": 0.0},
    )
    h.run()
    h.assert_all_answered_once()
    assert {r["attempts"] for r in h.rows()} == {2}


# ---------------------------------------------------------------------- failover


def test_model_out_of_quota_at_create_fails_over_without_spending_retries(make):
    h = make(models=["gpt-4o-mini", "gpt-4o"], knobs={"model_quota": {"gpt-4o-mini": 0}})
    assert h.run().stopped_because is None
    h.assert_all_answered_once()
    assert {r["model"] for r in h.rows()} == {"gpt-4o"}
    assert {r["attempts"] for r in h.rows()} == {0}


def test_model_out_of_quota_mid_batch_fails_over(make):
    h = make(
        models=["gpt-4o-mini", "gpt-4o"],
        options={"batch_size": 20},
        knobs={"model_quota": {"gpt-4o-mini": 5}},
    )
    h.run()
    h.assert_all_answered_once()
    models = [r["model"] for r in h.rows()]
    assert models.count("gpt-4o-mini") == 5
    # quota refusals are the pool's problem: no row spent a retry on them
    assert {r["attempts"] for r in h.rows()} == {0}


def test_quota_refusals_never_fail_rows_even_with_no_retries(make):
    h = make(
        models=["gpt-4o-mini", "gpt-4o"],
        options={"batch_size": 40, "max_retries": 0},
        knobs={"model_quota": {"gpt-4o-mini": 3}},
    )
    h.run()
    h.assert_all_answered_once()


def test_key_out_of_quota_moves_to_the_next_key(make):
    h = make(keys=[KEY1, KEY2], knobs={"key_quota": {KEY1: 0}})
    h.run()
    h.assert_all_answered_once()
    assert set(h.emu.stats()["keys"]) == {"sk-…0002"}


def test_rejected_key_takes_every_model_of_that_key_out(make):
    h = make(models=["gpt-4o-mini", "gpt-4o"], keys=[KEY1, KEY2], knobs={"api_keys": [KEY2]})
    h.run()
    h.assert_all_answered_once()
    assert {r["model"] for r in h.rows()} == {"gpt-4o-mini"}  # first model, on the good key


def test_denied_model_fails_over(make):
    h = make(models=["gpt-4o-mini", "gpt-4o"], knobs={"denied_models": ["gpt-4o-mini"]})
    h.run()
    h.assert_all_answered_once()
    assert {r["model"] for r in h.rows()} == {"gpt-4o"}


def test_every_model_and_key_exhausted_stops_with_rows_pending(make):
    h = make(
        models=["gpt-4o-mini", "gpt-4o"], knobs={"model_quota": {"gpt-4o-mini": 0, "gpt-4o": 0}}
    )
    result = h.run()
    assert result.stopped_because == StopReason.POOL_EXHAUSTED
    assert result.counts["pending"] + result.counts["queued"] == h.n_rows
    assert h.executed() == {}


# ---------------------------------------------------------------------- token limits


def test_enqueued_token_limit_is_paced_without_switching_models(make):
    h = make(
        n_rows=50,
        models=["gpt-4o-mini", "gpt-4o"],
        knobs={"enqueued_token_limit": {"gpt-4o-mini": 60}},
    )
    h.run()
    h.assert_all_answered_once()
    assert {r["model"] for r in h.rows()} == {"gpt-4o-mini"}


def test_chunk_over_the_token_limit_on_its_own_is_split(make):
    h = make(
        n_rows=20, options={"batch_size": 20}, knobs={"enqueued_token_limit": {"gpt-4o-mini": 60}}
    )
    h.run()
    h.assert_all_answered_once()


def test_request_over_the_token_limit_alone_fails_saying_so(make):
    h = make(
        n_rows=2, options={"batch_size": 1}, knobs={"enqueued_token_limit": {"gpt-4o-mini": 1}}
    )
    h.run()
    rows = h.rows()
    assert {r["status"] for r in rows} == {"failed"}
    assert all("enqueued-token limit" in r["error"] for r in rows)
    assert h.executed() == {}


# ---------------------------------------------------------------------- failing requests


def test_requests_failing_once_are_retried_and_answered(make):
    h = make(knobs={"fail_once_fraction": 0.3, "seed": 3})
    h.run()
    rows = h.rows()
    assert {r["status"] for r in rows} == {"succeeded"}
    executed = h.executed()
    retried = {r["row_id"] for r in rows if r["attempts"] == 1}
    assert retried and {k for k, v in executed.items() if v == 2} == retried
    assert set(executed.values()) == {1, 2}


def test_rejected_requests_fail_for_good_after_one_execution(make):
    h = make(knobs={"reject_fraction": 0.25, "seed": 5})
    h.run()
    failed = [r for r in h.rows() if r["status"] == "failed"]
    assert failed and all(r["error_class"] == "invalid_request" for r in failed)
    assert set(h.executed().values()) == {1}


def test_every_third_call_answering_503_still_completes_exactly_once(make):
    h = make(knobs={"http_error_every": 3})
    assert h.run().stopped_because is None
    h.assert_all_answered_once()


def test_dropped_connections_after_processing_give_one_batch_per_chunk(make):
    h = make(
        knobs={"drop_connection_every": 3, "drop_after_processing": True},
        options={"keep_remote_files": True},  # live files then show any orphan upload
    )
    h.run()
    h.assert_all_answered_once()
    stats = h.emu.stats()
    assert stats["batches"]["created"] == 4
    assert stats["files"]["live"] == 4 + 4  # inputs + outputs: no orphan upload


def test_a_collected_batch_s_files_are_deleted_remotely_once_recorded(make):
    # Provider file stores are limited (Azure: 500 files a resource): inputs and result files
    # go once their outcomes are committed; the run dir keeps its copies.
    h = make(n_rows=25)
    h.run()
    h.assert_all_answered_once()
    files = h.emu.stats()["files"]
    assert (files["uploaded"], files["live"], files["deleted"]) == (3, 0, 3 + 3)
    assert len(list((h.run_dir / "outputs").glob("*.jsonl"))) == 3


def test_remote_files_are_kept_when_asked(make):
    h = make(n_rows=25, options={"keep_remote_files": True})
    h.run()
    h.assert_all_answered_once()
    files = h.emu.stats()["files"]
    assert (files["live"], files["deleted"]) == (3 + 3, 0)


def test_dropped_connections_before_processing(make):
    h = make(knobs={"drop_connection_every": 4})
    h.run()
    h.assert_all_answered_once()


def test_deleted_chunk_files_are_rebuilt(make):
    h2 = make()  # chunk files vanish between build and upload
    engine = h2.engine()
    engine.ensure_rows()
    engine.build_pending()
    for f in (h2.run_dir / "inputs").iterdir():
        f.unlink()
    engine.execute()
    engine.run.close()
    h2.assert_all_answered_once()


def test_budget_stops_submitting(make):
    h = make(options={"max_cost": 0.0000001})
    result = h.run()
    assert result.stopped_because == StopReason.BUDGET
    assert h.executed() == {}


# ---------------------------------------------------------------------- crash recovery


@pytest.mark.parametrize(
    "point",
    [
        {"upload": 1},
        {"upload": 3},
        {"create": 1},
        {"create": 2},
        {"create": 4},
        {"poll": 1},
        {"poll": 3},
        {"download": 1},
        {"download": 2},
    ],
    ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()),
)
def test_crash_at_each_step_then_resume_pays_once(make, point):
    h = make(crash_after=point)
    with pytest.raises(SimulatedCrash):
        h.run()
    h.run(crash=False)
    h.assert_all_answered_once()
    stats = h.emu.stats()
    assert stats["batches"]["created"] == 4  # one batch per chunk: none created twice
    assert stats["files"]["uploaded"] == 4


def test_cancel_keeps_finished_rows_and_requeues_the_rest(make):
    h = make(
        n_rows=20,
        options={"batch_size": 20},
        knobs={"in_progress_seconds": 3600, "cancelling_seconds": 0},
    )
    engine = h.engine(wait=False)
    engine.execute()
    engine.cancel_all()
    engine.run.close()
    rows = h.rows()
    assert {r["status"] for r in rows} <= {"pending", "succeeded"}
    assert h.emu.stats()["batches"]["by_status"] == {"cancelled": 1}


# ---------------------------------------------------------------------- state guards


def test_an_illegal_chunk_transition_raises(make):
    h = make()
    engine = h.engine()
    engine.ensure_rows()
    engine.build_pending()
    chunk = engine.store.chunks()[0]
    with pytest.raises(StateError, match="illegal chunk transition built → submitted"):
        engine.store.move_chunk(chunk.chunk_id, ChunkState.SUBMITTED)
    engine.run.close()


def test_a_chunk_moved_by_someone_else_is_refused(make):
    h = make()
    engine = h.engine()
    engine.ensure_rows()
    engine.build_pending()
    chunk = engine.store.chunks()[0]
    engine.store.move_chunk(chunk.chunk_id, ChunkState.UPLOADING)
    with pytest.raises(StateError):
        engine.store.move_chunk(chunk.chunk_id, ChunkState.SUBMITTED)
    engine.run.close()
