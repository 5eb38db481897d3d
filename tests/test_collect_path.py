"""The collection hot path (issue 18): the fast chat-line parser gives exactly the general
path's outcome, a slice recorded out of row order (and again) applies once, and `spent()`
stays the full sum while it sums only new attempts."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchops import results
from batchops.records import AnswerRun, BadLine, RowOutcome
from batchops.results import _typed_chat
from batchops.store import PAGE_SIZE, SCHEMA_VERSION, Store
from tests.test_store import built, database_at, fail, frame, ok, submitted

BODY: dict[str, Any] = {
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi", "refusal": None},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 1},
    },
}


def _variants() -> list[dict[str, Any]]:
    """Chat lines around the fast path's edges: each must give the general path's outcome."""
    out = []
    for change in (
        {},
        {"finish_reason": "length"},
        {"finish_reason": "content_filter"},
        {"finish_reason": None},
        {"message": {"content": "", "refusal": None}},
        {"message": {"content": None, "refusal": "no"}},
        {"message": {"content": "x", "refusal": ""}},
        {"message": {"content": [{"type": "text", "text": "a"}]}},
        {"message": {"content": None, "tool_calls": [{"id": "c"}]}},
    ):
        body = json.loads(json.dumps(BODY))
        body["choices"][0].update(change)
        out.append(body)
    for usage in (None, {"prompt_tokens": True, "completion_tokens": 2.0}, {"x": 1}, []):
        body = json.loads(json.dumps(BODY))
        body["usage"] = usage
        out.append(body)
    for model in (None, 5):
        body = json.loads(json.dumps(BODY))
        body["model"] = model
        out.append(body)
    return out


@pytest.mark.parametrize("status", [200, 200.0, True, 400])
@pytest.mark.parametrize("body", _variants())
def test_typed_chat_line_equals_the_general_path(body: dict[str, Any], status: Any) -> None:
    """parse_line takes the typed shortcut itself, so comparing with it proves nothing for the
    lines it accepts: the shortcut is compared with the general path alone (orjson)."""
    obj = {"custom_id": "r1", "response": {"status_code": status, "request_id": "q", "body": body}}
    line = orjson.dumps(obj)
    general: Any
    try:
        general = results._parse_json(line, "chat", None)
    except results.ResultFormatError as exc:
        general = exc.reason
    typed = _typed_chat(line)  # None: the general path decides
    assert typed is None or typed == general
    if status == 200 and body is BODY:
        assert typed is not None  # the common line does take the shortcut


def _mixed_lines() -> list[bytes]:
    """A result file of every shape: common answers, the edge variants, HTTP and line
    failures, an error-file line, odd envelopes, broken JSON and counts beyond 64 bits."""
    lines = []
    for i, body in enumerate(_variants()):
        for status in (200, 400):
            obj = {"custom_id": f"r{i}", "response": {"status_code": status, "body": body}}
            lines.append(orjson.dumps(obj))
    big = orjson.dumps({"custom_id": "big", "response": {"status_code": 200, "body": BODY}})
    big = big.replace(b'"prompt_tokens":9', b'"prompt_tokens":%d' % 2**64)  # orjson: a float
    err = {"error": {"code": "rate_limit_exceeded", "message": "slow down"}}
    lines += [
        big,
        orjson.dumps({"custom_id": "e1", "response": {"status_code": 429, "body": err}}),
        orjson.dumps({"custom_id": "e2", "response": None, "error": {"code": "batch_expired"}}),
        orjson.dumps({"custom_id": 7, "response": {"status_code": 200, "body": BODY}}),
        orjson.dumps({"custom_id": "", "response": {"status_code": 200, "body": BODY}}),
        orjson.dumps({"custom_id": "n", "response": {"status_code": 200, "body": None}}),
        orjson.dumps({"custom_id": "x", "response": {"status_code": 200, "body": [1]}}),
        orjson.dumps({"response": {"status_code": 200, "body": BODY}}),
        orjson.dumps([1, 2]),
        b'{"custom_id": "dup", "custom_id": "dup2", "response": {"status_code": 200, "body": '
        + orjson.dumps(BODY)
        + b"}}",
        b'{"custom_id": "cut", "response": {"status_code": 200, "bo',
        b'{"custom_id": "sur\udc00", "response": {"status_code": 200, "body": {}}}',
        b'{"custom_id": "bad\xff"}'.replace(b"\\xff", b"\xff"),
    ]
    return lines


def test_mixed_file_reads_as_parse_line_gives_each_line(tmp_path: Path) -> None:
    """Collection's reader (typed fast path first) gives, line by line, exactly what
    `parse_line` does: the same outcome, or the same line named malformed."""
    lines = _mixed_lines()
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected: list[Any] = []
    for no, line in enumerate(lines, start=1):
        try:
            expected.append(results.parse_line(line + b"\n", line_no=no))  # as read
        except results.ResultFormatError as exc:
            expected.append((no, exc.reason))
    got = [
        (item.line_no, item.reason) if isinstance(item, BadLine) else item
        for item in results.read_file(path)
    ]
    assert got == expected
    assert sum(isinstance(g, RowOutcome) and g.ok for g in got) > 3
    assert any(isinstance(g, tuple) for g in got)


def test_shuffled_slice_is_recorded_once_and_spent_is_the_full_sum(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.add_rows([frame(200)])
    submitted(store, built(1, list(range(200))), "m", None)
    items = [(ok(i), 0.01 * (i % 7), True) for i in range(200)]
    random.Random(1).shuffle(items)
    order = store.queued_order(1)
    assert sorted(order.values()) == list(range(200))
    first = store.record_outcomes(1, "b", items[:120], max_retries=3, close_chunk=False)
    spent_half = store.spent()
    again = store.record_outcomes(1, "b", items, max_retries=3, close_chunk=False)
    assert (first.succeeded, again.succeeded, again.ignored) == (120, 80, 120)
    full = store.conn.execute("SELECT SUM(cost_usd), SUM(n) FROM attempt_totals").fetchone()
    assert full[1] == 200  # one call per row, none for the repeated lines
    per_row = dict(store.conn.execute("SELECT row_idx, billed_answers FROM rows"))
    assert per_row == {i: 1 for i in range(200)}
    assert spent_half < store.spent() == pytest.approx(full[0])
    assert store.counts()["succeeded"] == 200 and store.queued_order(1) == {}


def test_slice_with_a_row_no_longer_queued_takes_the_guarded_path(tmp_path: Path) -> None:
    """With the chunk's queued order from before the collection, a slice whose rows are all
    still queued skips the guard look-up; one row recorded meanwhile makes the whole slice fall
    back to it: that row is untouched (no second attempt), the others are recorded once."""
    store = Store.open(tmp_path)
    store.add_rows([frame(50)])
    submitted(store, built(1, list(range(50))), "m", None)
    order = store.queued_order(1)
    first = store.record_outcomes(
        1, "b", [(ok(7), 0.5, True)], max_retries=3, close_chunk=False, order=order
    )
    assert first.succeeded == 1
    items = [(ok(i), 0.01, True) for i in range(50)]  # row 7's line again, with the rest
    again = store.record_outcomes(1, "b", items, max_retries=3, close_chunk=False, order=order)
    assert (again.succeeded, again.ignored) == (49, 1)
    per_row = dict(store.conn.execute("SELECT row_idx, billed_answers FROM rows"))
    assert per_row == {i: 1 for i in range(50)}
    assert calls(store) == 50
    cost_7 = store.conn.execute("SELECT cost_usd FROM rows WHERE row_idx = 7").fetchone()[0]
    assert cost_7 == pytest.approx(0.5)  # its first answer's cost, not added to
    thrice = store.record_outcomes(1, "b", items, max_retries=3, close_chunk=False, order=order)
    assert (thrice.succeeded, thrice.ignored) == (0, 50)
    assert calls(store) == 50
    # A line whose id is not among the chunk's queued rows (another chunk's row 60, queued
    # there): ignored, and it does not keep the row beside it from its answer.
    store.add_rows([frame(70)])
    submitted(store, built(2, [50, 60]), "m", None)
    other = store.record_outcomes(
        2,
        "b2",
        [(ok(50), 0.1, True), (ok(60), 0.1, True)],
        max_retries=3,
        close_chunk=False,
        order={"id50": 50},
    )
    assert (other.succeeded, other.ignored) == (2, 0)  # row 60 is queued in chunk 2: recorded
    foreign = store.record_outcomes(
        1,
        "b",
        [(ok(60), 0.1, True), (ok(65), 0.1, True)],
        max_retries=3,
        close_chunk=False,
        order=order,
    )
    assert (foreign.succeeded, foreign.ignored) == (0, 2)
    assert calls(store) == 52


def calls(store: Store) -> int:
    """Every billed call recorded: attempts rows and the slices' totals."""
    return int(
        store.conn.execute(
            "SELECT (SELECT COUNT(*) FROM attempts) + (SELECT COALESCE(SUM(n), 0) FROM attempt_totals)"
        ).fetchone()[0]
    )


def test_a_schema_4_database_opens_and_keeps_its_answers(tmp_path: Path) -> None:
    """Schema 5 drops two indexes of `attempts` in place: a run recorded by schema 4 opens
    with its rows, answers and attempts, and every reader of attempts still answers."""
    conn = database_at(tmp_path, 4)
    conn.execute(
        "INSERT INTO chunks(chunk_id, model, path, n_rows, n_bytes, est_tokens, state,"
        " created_at, updated_at) VALUES (1, 'm', 'c.jsonl', 2, 9, 9, 'collected', 0, 0)"
    )
    conn.execute(
        "INSERT INTO batches(batch_id, chunk_id, attempt, model, status, created_at, updated_at)"
        " VALUES ('batch_1', 1, 1, 'm', 'completed', 0, 0)"
    )
    for i, cost in ((0, 0.5), (1, None)):
        conn.execute(
            "INSERT INTO rows(row_idx, row_id, status, chunk_id, response, prompt_tokens,"
            " cost_usd, batch_id) VALUES (?, ?, 'succeeded', 1, ?, 10, ?, 'batch_1')",
            (i, f"id{i}", f"answer {i}", cost),
        )
        conn.execute(
            "INSERT INTO attempts(row_idx, chunk_id, batch_id, mode, ok, model, prompt_tokens,"
            " completion_tokens, cost_usd, ts, key_id) VALUES (?, 1, 'batch_1', 'batch', 1, 'm',"
            " 10, 5, ?, 0, NULL)",
            (i, cost),
        )
    conn.close()
    store = Store.open(tmp_path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"attempts_batch", "attempts_model_key"}.isdisjoint(names)
    assert "attempts_unpriced" in names and "attempts_row" in names
    (chunk_index,) = store.conn.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'rows_chunk'"
    ).fetchone()
    assert "WHERE chunk_id IS NOT NULL" in chunk_index  # queued rows only
    f = store.outcomes_frame()
    assert f["response"].to_list() == ["answer 0", "answer 1"]
    assert f["status"].to_list() == ["succeeded", "succeeded"]
    (b,) = store.cost_by_batch()
    assert (b["batch_id"], b["cost_usd"], b["prompt_tokens"], b["completion_tokens"]) == (
        "batch_1",
        0.5,
        20,
        10,
    )
    assert store.unpriced_count() == 1  # row 1: billed tokens, no price
    assert store.usage_by_pair()[("m", "")]["calls"] == 2
    store.close()
    assert Store.open(tmp_path).spent() == pytest.approx(0.5)  # reopened: nothing to migrate


def test_a_new_database_has_large_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "new")
    assert store.conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    old = tmp_path / "old"
    old.mkdir()
    conn = sqlite3.connect(old / "state.db")  # an older batchops made it: default pages
    conn.execute("CREATE TABLE other (x)")
    conn.close()
    reopened = Store.open(old)  # pages of the default size already written: kept
    assert reopened.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    assert reopened.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_result_file_streams_to_disk_and_a_dropped_download_is_tried_again(
    emulator_factory: Any, tmp_path: Path
) -> None:
    """The SDK's streaming download writes the file byte for byte (no .tmp left); a
    connection the server drops is the SDK's connection error, tried again by `_call`."""
    from batchops.backends.openai import OpenAIBackend
    from batchops.emulator.testing import DEFAULT_KEY
    from batchops.spec import ModelEntry, RetryPolicy

    emu = emulator_factory(drop_connection_every=2)  # call 1 uploads, call 2 (download) drops
    backend = OpenAIBackend(
        ModelEntry(name="gpt-4o-mini"), DEFAULT_KEY, base_url=emu.base_url, policy=RetryPolicy()
    )
    lines = b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "x" * (i % 97) + "\u00e9"}],
                },
            }
        )
        + b"\n"
        for i in range(3000)
    )
    src = tmp_path / "chunk.jsonl"
    src.write_bytes(lines)
    file_id = backend.upload(src, "chunk.jsonl")
    dest = backend.download(file_id, tmp_path / "out" / "copy.jsonl")
    assert dest.read_bytes() == lines
    assert [p.name for p in dest.parent.iterdir()] == ["copy.jsonl"]
    assert emu.emulator.counters.api_calls == 3  # the dropped download, then its retry


# The billing readers as schema 5 answered them: every call an attempts row.
OLD_READERS = {
    "by_model": "SELECT model, mode, COUNT(*), SUM(ok), SUM(COALESCE(prompt_tokens, 0)),"
    " SUM(COALESCE(cached_tokens, 0)), SUM(COALESCE(completion_tokens, 0)), SUM(cost_usd),"
    " SUM(cost_usd IS NULL AND prompt_tokens IS NOT NULL) FROM attempts GROUP BY model, mode"
    " ORDER BY model",
    "by_batch": "SELECT batch_id, SUM(cost_usd), SUM(prompt_tokens), SUM(completion_tokens)"
    " FROM attempts WHERE batch_id IS NOT NULL GROUP BY batch_id ORDER BY batch_id",
    "spent": "SELECT COALESCE(SUM(cost_usd), 0) FROM attempts",
    "unpriced": "SELECT COUNT(*) FROM attempts WHERE cost_usd IS NULL AND prompt_tokens IS NOT NULL",
    "failed": "SELECT error_class, COUNT(*) FROM attempts WHERE ok = 0 GROUP BY error_class",
    "last": "SELECT row_idx, MAX(ts) FROM attempts GROUP BY row_idx",
    "savings": "SELECT COUNT(*), (SELECT COUNT(*) FROM attempts WHERE row_idx = 0),"
    " (SELECT SUM(cost_usd) FROM attempts WHERE row_idx = 0) FROM rows WHERE leader_idx = 0",
}


def readers(store: Store) -> dict[str, Any]:
    """The same figures through the store's readers."""
    by_model = [
        tuple(r[k] for k in ("model", "mode", "calls", "ok", "prompt_tokens", "cached_tokens"))
        + tuple(r[k] for k in ("completion_tokens", "cost_usd", "unpriced"))
        for r in store.cost_by_model()
    ]
    by_batch = sorted(
        (r["batch_id"], r["cost_usd"], r["prompt_tokens"], r["completion_tokens"])
        for r in store.cost_by_batch()
    )
    savings = store.dedup_savings()
    return {
        "by_model": by_model,
        "by_batch": by_batch,
        "spent": store.spent(),
        "unpriced": store.unpriced_count(),
        "failed": store.failed_attempts_by_class(),
        "last": store.last_attempts(list(range(6))),
        "savings": (savings["rows"], savings["requests"] // savings["rows"], savings["cost_usd"]),
        "pairs": {
            k: (v["calls"], v["failures"], v["tokens"]) for k, v in store.usage_by_pair().items()
        },
    }


def test_a_schema_5_database_with_answers_opens_and_reads_the_same(tmp_path: Path) -> None:
    """Schema 6 moves batch answers out of `attempts`: a run recorded by schema 5 (every answer
    an attempts row) opens in place, and every billing reader gives what schema 5's SQL gave;
    answers recorded after the upgrade add to them."""
    conn = database_at(tmp_path, 5)
    for no, state in ((1, "collected"), (2, "built")):
        conn.execute(
            "INSERT INTO chunks(chunk_id, model, path, n_rows, n_bytes, est_tokens, state,"
            " created_at, updated_at) VALUES (?, 'm', 'c.jsonl', 3, 9, 9, ?, 0, 0)",
            (no, state),
        )
    conn.execute(
        "INSERT INTO batches(batch_id, chunk_id, attempt, model, status, created_at, updated_at)"
        " VALUES ('batch_1', 1, 1, 'm', 'completed', 0, 0)"
    )
    # rows 0-2 answered in batch_1 (row 0 after a failed call; row 2 without a price), row 3
    # follows row 0, rows 4-5 not sent yet
    for i in range(6):
        done = i < 4
        conn.execute(
            "INSERT INTO rows(row_idx, row_id, status, chunk_id, response, prompt_tokens,"
            " cost_usd, batch_id, leader_idx, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                i,
                f"id{i}",
                "succeeded" if done else "pending",
                1 if done else None,
                f"answer {i}" if done else None,
                10 if done else None,
                (0.75, 0.5, None, 0)[i] if done else None,
                "batch_1" if done else None,
                0 if i == 3 else None,
                float(i),
            ),
        )
    attempts = [  # row, ok, error_class, cost, ts, key
        (0, 0, "api_error", 0.25, 1.0, "k1"),
        (0, 1, None, 0.5, 2.0, "k1"),
        (1, 1, None, 0.5, 2.0, "k2"),
        (2, 1, None, None, 2.0, "k2"),
    ]
    for row, ok_, cls, cost, ts, key in attempts:
        conn.execute(
            "INSERT INTO attempts(row_idx, chunk_id, batch_id, mode, ok, error_class, model,"
            " prompt_tokens, cached_tokens, completion_tokens, cost_usd, ts, key_id)"
            " VALUES (?, 1, 'batch_1', 'batch', ?, ?, 'm', 10, 2, 5, ?, ?, ?)",
            (row, ok_, cls, cost, ts, key),
        )
    old = {k: conn.execute(sql).fetchall() for k, sql in OLD_READERS.items()}
    conn.close()
    store = Store.open(tmp_path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    got = readers(store)
    assert got["by_model"] == [tuple(r) for r in old["by_model"]]
    assert got["by_batch"] == [tuple(r) for r in old["by_batch"]]
    assert got["spent"] == pytest.approx(old["spent"][0][0])
    assert got["unpriced"] == old["unpriced"][0][0] == 1
    assert got["failed"] == dict(old["failed"]) == {"api_error": 1}
    assert got["last"] == dict(old["last"])
    assert got["savings"] == tuple(old["savings"][0]) == (1, 2, 0.75)
    assert got["pairs"] == {("m", "k1"): (2, 1, 30), ("m", "k2"): (2, 0, 30)}
    assert store.outcomes_frame()["response"].to_list()[:3] == ["answer 0", "answer 1", "answer 2"]
    # Answers recorded by schema 6 (no attempts rows) add to the old figures.
    store.conn.execute("UPDATE chunks SET state = 'submitted' WHERE chunk_id = 2")
    store.conn.execute("UPDATE rows SET status = 'queued', chunk_id = 2 WHERE row_idx >= 4")
    store.conn.execute(
        "INSERT INTO batches(batch_id, chunk_id, attempt, model, status, created_at, updated_at)"
        " VALUES ('batch_2', 2, 1, 'm', 'completed', 1, 1)"
    )
    store.record_outcomes(2, "batch_2", [(ok(4), 0.5, True), (ok(5), None, True)], max_retries=3)
    new = readers(store)
    assert new["by_model"] == [("m", "batch", 6, 5, 60, 12, 30, 1.75, 2)]
    assert new["by_batch"][-1] == ("batch_2", 0.5, 20, 10)
    assert (new["spent"], new["unpriced"]) == (pytest.approx(1.75), 2)
    assert set(new["last"]) == {0, 1, 2, 4, 5}  # row 3 follows: never sent
    assert new["pairs"][("m", "")] == (2, 0, 30)
    store.close()
    assert Store.open(tmp_path).spent() == pytest.approx(1.75)


def test_counts_come_from_the_unanswered_index_and_see_every_row(tmp_path: Path) -> None:
    """Schema 7 indexes only rows without an answer: counts() (asked at every poll) counts
    those on the index and the succeeded ones as the rest, equal to counting every row, also
    after another connection added rows; the run loop's look-ups by status use the index."""
    store = Store.open(tmp_path)
    names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "rows_status" not in names and "rows_unanswered" in names
    store.add_rows([frame(40)])
    submitted(store, built(1, list(range(30))), "m", None)
    store.record_outcomes(
        1,
        "b",
        [(ok(i), 0.1, True) for i in range(20)]
        + [(fail(20, "invalid_request", False), None, True)],
        max_retries=0,
        close_chunk=False,
    )
    store.conn.execute("UPDATE rows SET status = 'skipped' WHERE row_idx = 39")

    def every_row() -> dict[str, int]:
        full = dict.fromkeys(("pending", "queued", "succeeded", "failed", "skipped"), 0)
        full.update(store.conn.execute("SELECT status, COUNT(*) FROM rows GROUP BY status"))
        return full

    assert (
        store.counts()
        == every_row()
        == {
            "pending": 9,
            "queued": 9,
            "succeeded": 20,
            "failed": 1,
            "skipped": 1,
        }
    )
    other = sqlite3.connect(tmp_path / "state.db")
    other.execute("INSERT INTO rows(row_idx, row_id) VALUES (40, 'id40')")
    other.commit()
    other.close()
    assert store.counts() == every_row() and store.counts()["pending"] == 10
    for sql in (
        "SELECT 1 FROM rows WHERE status = 'pending' LIMIT 1",
        "SELECT row_idx FROM rows WHERE status = 'pending' AND leader_idx IS NULL"
        " AND (not_before IS NULL OR not_before <= 0) ORDER BY row_idx",
        "SELECT COUNT(*) FROM rows WHERE (status = 'pending' OR status = 'queued') AND error IS NULL",
    ):
        plan = " ".join(r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "rows_unanswered" in plan, (sql, plan)


@pytest.mark.parametrize("order", [False, True])
def test_a_slice_records_its_constants_as_written(tmp_path: Path, order: bool) -> None:
    """A slice's chunk, batch and time are written into its UPDATE as literals: a batch id
    with quotes or a NUL is stored as it is, an answer's error class still reaches its row,
    and the online mode keeps no batch."""
    store = Store.open(tmp_path)
    store.add_rows([frame(6)])
    submitted(store, built(1, [0, 1, 2]), "m", None)
    odd = "b'1\x00x';--"
    marked = ok(1)
    marked.error_class = "odd_class"
    items = [(ok(0), 0.5, True), (marked, None, True), (ok(2), 0.25, True)]
    kw = {"order": store.queued_order(1)} if order else {}
    assert (
        store.record_outcomes(1, odd, items, max_retries=3, close_chunk=False, **kw).succeeded == 3
    )
    got = store.conn.execute(
        "SELECT row_idx, status, batch_id, error_class, cost_usd, response, chunk_id FROM rows"
        " WHERE row_idx < 3 ORDER BY row_idx"
    ).fetchall()
    assert [tuple(r) for r in got] == [
        (0, "succeeded", odd, None, 0.5, "answer 0", 1),
        (1, "succeeded", odd, "odd_class", None, "answer 1", 1),
        (2, "succeeded", odd, None, 0.25, "answer 2", 1),
    ]
    totals = store.conn.execute("SELECT batch_id, n, unpriced_n FROM attempt_totals")
    assert [tuple(r) for r in totals] == [(odd, 3, 1)]
    chunk, queued = store.add_online_chunk("m", [3, 4])
    online = store.record_outcomes(
        chunk, None, [(ok(3), 0.1, True)], mode="online", max_retries=3, close_chunk=False
    )
    assert online.succeeded == 1
    row = store.conn.execute("SELECT status, batch_id, billed_answers FROM rows WHERE row_idx = 3")
    assert tuple(row.fetchone()) == ("succeeded", None, 0)
    assert (
        store.conn.execute("SELECT COUNT(*) FROM attempts WHERE mode = 'online'").fetchone()[0] == 1
    )


def test_record_answers_takes_each_queued_row_once(tmp_path: Path) -> None:
    """The engine's priced success lines, with their rows from the chunk's queued order:
    recorded while still queued in this chunk, never twice (again, repeated in a slice, or
    already recorded), a line not in the order looked up, another chunk's row ignored."""
    store = Store.open(tmp_path)
    store.add_rows([frame(60)])
    submitted(store, built(1, list(range(40))), "m", None)
    submitted(store, built(2, [50]), "m", None)
    order = store.queued_order(1)
    first = store.record_answers(1, "b", [(order["id7"], ok(7), 0.5)])
    assert (first.succeeded, first.ignored) == (1, 0)
    answers = sorted((order.get(f"id{i}", -1), ok(i), 0.01) for i in (*range(40), 50))
    answers.append((order["id3"], ok(3), 0.01))  # the same row twice in one slice
    again = store.record_answers(1, "b", answers)
    assert (again.succeeded, again.ignored) == (39, 3)  # row 7 done, row 3's repeat, row 50
    assert calls(store) == 40
    per_row = dict(store.conn.execute("SELECT row_idx, billed_answers FROM rows"))
    assert {i: per_row[i] for i in range(40)} == {i: 1 for i in range(40)}
    assert per_row[50] is None and store.counts()["queued"] == 1  # chunk 2's row untouched
    cost_7 = store.conn.execute("SELECT cost_usd FROM rows WHERE row_idx = 7").fetchone()[0]
    assert cost_7 == pytest.approx(0.5)
    thrice = store.record_answers(1, "b", answers)
    assert (thrice.succeeded, thrice.ignored) == (0, 42) and calls(store) == 40
    assert store.spent() == pytest.approx(0.5 + 39 * 0.01)


def test_chat_file_read_in_blocks_equals_line_by_line(tmp_path: Path) -> None:
    """Chat result files are decoded a block of lines at a time: over many blocks, with lines
    of every decodable shape (failures, cut answers, error-file lines), a line longer than a
    block, a BOM, a blank line, CRLF ends, a malformed line and no final end of line, the
    outcomes (and malformed lines named by number) are those of reading line by line."""
    shapes = []
    for i, body in enumerate(_variants()):
        for status in (200, 400):
            obj = {"custom_id": f"v{i}_{status}", "response": {"status_code": status, "body": body}}
            shapes.append(orjson.dumps(obj))
    shapes.append(orjson.dumps({"custom_id": "e", "response": None, "error": {"code": "x"}}))
    long_body = json.loads(json.dumps(BODY))
    long_body["choices"][0]["message"]["content"] = "y" * (3 * results.READ_BLOCK)
    common = [
        orjson.dumps({"custom_id": f"r{i}", "response": {"status_code": 200, "body": BODY}})
        for i in range(4000)
    ]
    cut = json.loads(json.dumps(BODY))
    cut["choices"][0]["finish_reason"] = "length"
    decodable = [  # typed structs read them, but they are not the common line: one by one
        orjson.dumps({"custom_id": "f400", "response": {"status_code": 400, "body": BODY}}),
        orjson.dumps({"custom_id": "len", "response": {"status_code": 200, "body": cut}}),
        orjson.dumps({"custom_id": "err", "response": None, "error": {"code": "expired"}}),
    ]
    lines = common[:1500] + shapes + common[1500:2000] + decodable + common[2000:2500]
    lines.insert(
        700,
        orjson.dumps({"custom_id": "long", "response": {"status_code": 200, "body": long_body}}),
    )
    text = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"
    text += b"\n" + b"\r\n".join(common[2500:3000]) + b"\r\n"  # a blank line, then CRLF
    text += b'{"custom_id": "cut", "resp\n' + b"\n".join(common[3000:])  # no final newline
    path = tmp_path / "out.jsonl"
    path.write_bytes(text)

    def named(items: Any) -> list[Any]:
        return [(x.line_no, x.reason) if isinstance(x, BadLine) else x for x in items]

    with path.open("rb") as fh:
        by_line = named(results._read_lines(fh, path, "chat", 1, strip_bom=True))
    got = named(results.read_file(path))
    assert got == by_line
    assert len(got) == 4000 + len(shapes) + len(decodable) + 2
    assert sum(isinstance(g, tuple) for g in got) == 1  # the cut line, named
    assert {g.custom_id for g in got if isinstance(g, RowOutcome) and g.ok} >= {"r0", "long"}
    assert {g.custom_id for g in got if isinstance(g, RowOutcome) and not g.ok} >= {"f400", "err"}
    runs = [item for item in results.read_runs(path) if isinstance(item, AnswerRun)]
    in_runs = [row[0] for run in runs for row in run.rows]
    # Common lines in blocks that decode whole come in runs (once each); a block with a blank
    # or malformed line is read line by line (its lines are plain outcomes).
    assert len(in_runs) == len(set(in_runs)) > 3000 and "long" in in_runs
    assert not {"f400", "len", "err"} & set(in_runs)  # the other shapes come one by one


def _answer_params(
    order: dict[str, int], rows: list[int], cost: float
) -> tuple[list[tuple[Any, ...]], list[tuple[int, RowOutcome, float | None]]]:
    """The same answers as `record_answer_rows` and `record_answers` take them, in row order."""
    params, answers = [], []
    for i in rows:
        # Slices of one model and of two (billing totals are summed per model).
        model, cached = ("m", 2) if len(rows) == 1 or i % 3 else ("m2", i % 2)
        line = (f"id{i}", f"answer {i}", "stop", model, 10, cached, 5, 0, None)
        o = AnswerRun([line]).outcomes()[0]
        row_idx = order.get(o.custom_id, -1)
        assert o.usage is not None
        u = o.usage
        params.append(
            (
                o.response,
                "stop",
                o.model,
                u.prompt_tokens,
                u.cached_tokens,
                u.completion_tokens,
                u.reasoning_tokens,
                cost,
                1,
                row_idx,
            )
        )
        answers.append((row_idx, o, cost))
    params.sort(key=lambda p: p[9])
    answers.sort(key=lambda a: a[0])
    return params, answers


def test_record_answer_rows_takes_each_queued_row_once_as_record_answers_does(
    tmp_path: Path,
) -> None:
    """The fast path's parameters are recorded exactly as `record_answers` records the same
    answers (rows, billing totals), once per queued row: again, or for another chunk's row
    or one already answered, nothing changes."""
    stores = [Store.open(tmp_path / name) for name in ("rows", "outcomes")]
    for store in stores:
        store.add_rows([frame(60)])
        submitted(store, built(1, list(range(40))), "m", None)
        submitted(store, built(2, [50]), "m", None)
    fast, slow = stores
    order = fast.queued_order(1)
    first = _answer_params(order, [7], 0.5)
    assert fast.record_answer_rows(1, "b", first[0]).succeeded == 1
    slow.record_answers(1, "b", first[1])
    params, answers = _answer_params(order, [*range(40), 50], 0.01)
    again = fast.record_answer_rows(1, "b", params)
    slow.record_answers(1, "b", answers)
    assert (again.succeeded, again.ignored) == (39, 2)  # row 7 done, row 50 not in chunk 1
    thrice = fast.record_answer_rows(1, "b", params)
    assert (thrice.succeeded, thrice.ignored) == (0, 41)
    for sql in (
        "SELECT * FROM rows ORDER BY row_idx",
        "SELECT chunk_id, batch_id, mode, model, key_id, n, prompt_tokens, cached_tokens,"
        " completion_tokens, reasoning_tokens, cost_usd, unpriced_n FROM attempt_totals"
        " ORDER BY id",
    ):
        got = [tuple(r) for r in fast.conn.execute(sql)]
        want = [tuple(r) for r in slow.conn.execute(sql)]
        if "FROM rows" in sql:  # the time each row was recorded differs between the stores
            got = [r[:16] + r[17:] for r in got]
            want = [r[:16] + r[17:] for r in want]
        assert got == want
    assert fast.counts() == slow.counts() and fast.spent() == pytest.approx(0.5 + 39 * 0.01)
