import sqlite3
from pathlib import Path

import polars as pl
import pytest

from batchops.errors import StateError
from batchops.records import BuiltChunk, RowOutcome, Skipped, Usage
from batchops.states import ChunkState
from batchops.store import MIGRATIONS, SCHEMA_VERSION, Store, _split_sql


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"__row_idx": list(range(n)), "__row_id": [f"id{i}" for i in range(n)]},
        schema={"__row_idx": pl.Int64, "__row_id": pl.String},
    )


def built(no: int, rows: list[int], skipped: list[Skipped] | None = None) -> BuiltChunk:
    return BuiltChunk(
        no,
        Path(f"/tmp/chunk_{no}.jsonl"),
        rows,
        [f"id{r}" for r in rows],
        100,
        10 * len(rows),
        skipped or [],
    )


def ok(i: int) -> RowOutcome:
    return RowOutcome(f"id{i}", True, response=f"answer {i}", usage=Usage(10, 2, 5, 0), model="m")


def fail(i: int, cls="api_error", retryable=True) -> RowOutcome:
    return RowOutcome(
        f"id{i}",
        False,
        status_code=500,
        error_code="server_error",
        error_message="boom",
        error_class=cls,
        retryable=retryable,
    )


def submitted(store: Store, chunk: BuiltChunk, model: str = "m", cost: float | None = None) -> int:
    """A chunk as the engine leaves it once its batch runs (outcomes are recorded from there)."""
    store.add_chunk(chunk, model, cost)
    for state in (ChunkState.UPLOADING, ChunkState.UPLOADED, ChunkState.SUBMITTING):
        store.move_chunk(chunk.chunk_no, state)
    store.move_chunk(chunk.chunk_no, ChunkState.SUBMITTED, batch_id=f"batch_{chunk.chunk_no}")
    return chunk.chunk_no


def database_at(run_dir: Path, version: int) -> sqlite3.Connection:
    """A state database as schema `version` left it (the released migrations up to it), for
    the tests that open an older run in place."""
    conn = sqlite3.connect(run_dir / "state.db", isolation_level=None)
    for i, script in enumerate(MIGRATIONS[:version]):
        for statement in _split_sql(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {i + 1}")
    return conn


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path)
    s.add_rows([frame(5)])
    return s


def test_schema_version_and_wal(store: Store):
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path: Path):
    Store.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StateError, match="newer batchops"):
        Store.open(tmp_path)


def test_open_missing_run_is_state_error(tmp_path: Path):
    with pytest.raises(StateError, match="no batchops run"):
        Store.open(tmp_path / "nope", create=False)


def test_chunk_queues_rows_and_records_skips(store: Store):
    store.add_chunk(built(1, [0, 1, 2], [Skipped(3, "image not found: x.png")]), "m", 0.01)
    assert store.counts() == {"pending": 1, "queued": 3, "succeeded": 0, "failed": 0, "skipped": 1}
    assert store.next_chunk_no() == 2


def test_outcomes_are_applied_once(store: Store):
    submitted(store, built(1, [0, 1, 2]), "m", None)
    outcomes = [(ok(0), 0.5, True), (fail(1), None, True)]
    a = store.record_outcomes(1, "batch_1", outcomes, max_retries=3)
    assert (a.succeeded, a.requeued) == (1, 2)  # row 2 had no line: lost → re-queued
    again = store.record_outcomes(1, "batch_1", outcomes, max_retries=3)
    assert again.ignored == 2 and again.succeeded == 0
    counts = store.counts()
    assert counts["succeeded"] == 1 and counts["pending"] == 4
    assert store.spent() == pytest.approx(0.5)


def test_retry_budget_then_failed(store: Store):
    for attempt in range(1, 4):
        submitted(store, built(attempt, [0]), "m", None)
        store.record_outcomes(attempt, f"b{attempt}", [(fail(0), None, True)], max_retries=2)
    row = store.conn.execute(
        "SELECT status, attempts, error FROM rows WHERE row_idx = 0"
    ).fetchone()
    assert row["status"] == "failed" and row["attempts"] == 3 and "boom" in row["error"]


def test_permanent_failure_and_exhausting_errors(store: Store):
    submitted(store, built(1, [0, 1]), "m", None)
    quota = RowOutcome(
        "id1",
        False,
        status_code=429,
        error_code="insufficient_quota",
        error_class="quota",
        retryable=True,
    )
    store.record_outcomes(
        1,
        "b",
        [(fail(0, "invalid_request", False), None, True), (quota, None, False)],
        max_retries=0,
    )
    rows = {r["row_idx"]: r for r in store.conn.execute("SELECT * FROM rows WHERE row_idx < 2")}
    assert rows[0]["status"] == "failed"
    assert rows[1]["status"] == "pending" and rows[1]["attempts"] == 0


def test_abandon_and_requeue(store: Store):
    submitted(store, built(1, [0, 1]), "m", None)
    assert store.abandon_chunk(1, "model exhausted") == 2
    assert store.counts()["pending"] == 5
    submitted(store, built(2, [0, 1]), "m", None)
    store.requeue_chunk_rows(2, "batch failed", "api_error", counts=True, max_retries=3)
    assert store.counts()["pending"] == 5


def test_outcomes_frame_marks_unfinished_rows_missing(store: Store):
    submitted(store, built(1, [0]), "m", None)
    store.record_outcomes(1, "b", [(ok(0), 0.25, True)], max_retries=3)
    f = store.outcomes_frame()
    assert f["status"].to_list() == ["succeeded", "missing", "missing", "missing", "missing"]
    assert f["prompt_tokens"][0] == 10 and f["cost_usd"][0] == 0.25 and f["batch_id"][0] == "b"


def test_cost_by_model_counts_every_attempt_once(store: Store):
    submitted(store, built(1, [0, 1]), "m", None)
    store.record_outcomes(1, "b", [(ok(0), 0.1, True), (ok(1), 0.2, True)], max_retries=3)
    store.record_outcomes(
        1, "b", [(ok(0), 0.1, True)], max_retries=3
    )  # a repeated collect changes nothing
    (m,) = store.cost_by_model()
    assert m["calls"] == 2 and m["cost_usd"] == pytest.approx(0.3) and m["prompt_tokens"] == 20


def test_add_rows_registers_every_id_exactly_however_the_frame_comes(tmp_path: Path) -> None:
    """Consecutive rows go to SQLite as one JSON array, others (and ids with a NUL) row by
    row: either way each id is stored as written, and a row registered again keeps its state."""
    ids = ["007", "19.90", 'a"b', "back\\slash", "tab\there", "nl\nx", "é😀", "\u2028", " ", "x"]
    consecutive = pl.DataFrame(
        {"__row_idx": list(range(10)), "__row_id": ids},
        schema={"__row_idx": pl.Int64, "__row_id": pl.String},
    )
    gapped = pl.DataFrame(
        {"__row_idx": [20, 22, 21], "__row_id": ["g0", "g2", "g1"]},
        schema={"__row_idx": pl.Int64, "__row_id": pl.String},
    )
    with_nul = pl.DataFrame(
        {"__row_idx": [30, 31], "__row_id": ["nul\x00id", "n1"]},
        schema={"__row_idx": pl.Int64, "__row_id": pl.String},
    )
    store = Store.open(tmp_path)
    assert store.add_rows([consecutive, gapped, with_nul, consecutive.clear()]) == 15
    store.conn.execute("UPDATE rows SET status = 'failed' WHERE row_idx = 3")
    assert store.add_rows([consecutive]) == 0  # registered again (a widened slice)
    got = dict(store.conn.execute("SELECT row_idx, row_id FROM rows"))
    assert [got[i] for i in range(10)] == ids
    assert (got[20], got[21], got[22], got[30], got[31]) == ("g0", "g1", "g2", "nul\x00id", "n1")
    assert store.states_of(3, 3) == {3: "failed"} and store.row_count() == 15


def test_queued_order_names_every_queued_row_by_its_exact_id(tmp_path: Path) -> None:
    """The chunk's custom id → row_idx map comes from SQLite as JSON: awkward ids (a NUL,
    quotes, escapes, emoji) come back exactly; rows no longer queued are not in it."""
    ids = ["nul\x00id", 'q"uote', "back\\slash", "nl\nx", "😀", "007"]
    store = Store.open(tmp_path)
    store.add_rows(
        [
            pl.DataFrame(
                {"__row_idx": list(range(6)), "__row_id": ids},
                schema={"__row_idx": pl.Int64, "__row_id": pl.String},
            )
        ]
    )
    chunk = BuiltChunk(1, Path("/tmp/chunk_1.jsonl"), list(range(6)), ids, 100, 60, [])
    store.add_chunk(chunk, "m", None)
    store.conn.execute("UPDATE rows SET status = 'succeeded' WHERE row_idx = 5")
    assert store.queued_order(1) == {i: n for n, i in enumerate(ids[:5])}
    assert store.queued_order(2) == {}
