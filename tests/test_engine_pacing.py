"""Token pacing of the batch loop: what a token_limit_exceeded refusal teaches, and refilling a
slot freed by a finished batch before that batch's results are downloaded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cli_helpers import awkward_table, executions, invoke, run_args

from batchops.engine import BatchEngine


def pacing_only() -> BatchEngine:
    """An engine with just the pacing state (learn_token_limit needs nothing else)."""
    eng = object.__new__(BatchEngine)
    eng.learned_limit, eng.refused_tokens = {}, {}
    return eng


def test_learned_limit_is_the_midpoint_of_accepted_and_refused() -> None:
    eng = pacing_only()
    # Three chunks (9,397 tokens) in flight were accepted; a fourth (3,124) was refused.
    eng.learn_token_limit("m", 9_397, 12_521)
    limit = eng.learned_limit["m"]
    assert limit == (9_397 + 12_521) // 2
    # Three chunks a little larger than the accepted three fit; four of the smallest never do.
    assert 3_124 + 3_188 + 3_126 <= limit < 4 * 3_102


def test_refusals_narrow_the_bounds_and_a_changed_limit_resets_them() -> None:
    eng = pacing_only()
    eng.learn_token_limit("m", 9_000, 13_000)
    eng.learn_token_limit("m", 9_000, 12_000)  # a tighter refusal lowers the upper bound
    assert (eng.refused_tokens["m"], eng.learned_limit["m"]) == (12_000, 10_500)
    eng.learn_token_limit("m", 9_000, 13_000)  # a looser one does not raise it
    assert eng.learned_limit["m"] == 10_500
    # More accepted than was refused before: the limit (or others' use of it) changed.
    eng.learn_token_limit("m", 12_500, 15_000)
    assert (eng.refused_tokens["m"], eng.learned_limit["m"]) == (15_000, 13_750)
    eng.learn_token_limit("other", 0, 5_000)  # refused with nothing else in flight
    assert eng.learned_limit["other"] == 2_500
    assert eng.learned_limit["m"] == 13_750  # per model


def event_order(run_dir: Path) -> list[tuple[str, int]]:
    """Submissions and collections (chunk ids), in the order the run's events recorded them."""
    conn = sqlite3.connect(run_dir / "state.db")
    try:
        rows = conn.execute(
            "SELECT kind, chunk_id FROM events WHERE kind IN ('submitted', 'collected') ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [("submit" if k == "submitted" else "collected", c) for k, c in rows]


def test_a_freed_slot_is_refilled_before_the_finished_batch_is_downloaded(
    emulator_factory, tmp_path: Path
) -> None:
    emu = emulator_factory()
    src = awkward_table(tmp_path, n_plain=23, images=False)  # 30 rows: 3 chunks of 10
    run_dir = tmp_path / "run"
    # A limit of 1 token: one batch at a time (a chunk goes alone when nothing is in flight).
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "10", "--token-limit", "1"))
    assert res.exit_code == 0, res.output
    assert all(v["succeeded"] == 1 for v in executions(emu).values())
    assert event_order(run_dir) == [
        ("submit", 1),
        ("submit", 2),
        ("collected", 1),
        ("submit", 3),
        ("collected", 2),
        ("collected", 3),
    ]


def test_a_batch_with_failed_requests_is_collected_before_the_next_submission(
    emulator_factory, tmp_path: Path
) -> None:
    # Its errors may exhaust the model or key, which decides where the next chunk goes.
    emu = emulator_factory(reject_fraction=0.5, seed=1)
    src = awkward_table(tmp_path, n_plain=23, images=False)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(
            emu, src, run_dir, "--batch-size", "10", "--token-limit", "1", "--max-retries", "0"
        )
    )
    assert res.exit_code == 3, res.output  # the rejected rows failed
    assert emu.stats()["calls"]["GET /v1/files/{id}/content"] == 6  # an error file per batch
    assert event_order(run_dir) == [
        ("submit", 1),
        ("collected", 1),
        ("submit", 2),
        ("collected", 2),
        ("submit", 3),
        ("collected", 3),
    ]
