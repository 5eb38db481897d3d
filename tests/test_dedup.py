"""Identical requests are sent once (issue 18, batchops/dedup.py).

End to end: the real CLI against the emulator over HTTP (the emulator's stats count what it
received); the crash test drives the engine on the memory backend's `crash_after` knob like
tests/test_engine.py. Unit tests of the pairing itself at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from cli_helpers import db_rows, executions, invoke, read_csv, run_args, write_csv

from batchops import dedup
from batchops.api import build_spec
from batchops.backends.memory import MemoryBackend, SimulatedCrash, memory_emulator
from batchops.engine import BatchEngine
from batchops.providers import Key, Pool
from batchops.rundir import create_or_resume
from batchops.source import ROW_IDX, iter_frames, open_source

N_UNIQUE = 70
N_ROWS = 100  # 30 of them repeat an earlier row's request: 30% fewer requests
# Columns whose values a follower does not share: what it was billed (nothing).
BILLED = ("cost_usd", "prompt_tokens", "completion_tokens")


def dup_rows(n_unique: int = N_UNIQUE, n_rows: int = N_ROWS) -> list[list[str]]:
    """n_rows rows, each with its own sku; rows n_unique.. repeat earlier rows' cells (the
    repeats spread over the table, some repeated twice)."""
    rows = [[f"s{i:04d}", f"item {i}", f"{i}.5", f"about {i}"] for i in range(n_unique)]
    for j in range(n_rows - n_unique):
        src = (j * 7) % n_unique
        rows.append([f"s{n_unique + j:04d}", *rows[src][1:]])
    # Interleave: a repeat may come before other unique rows, but never before its original.
    order = (
        list(range(0, n_unique, 2)) + list(range(n_unique, n_rows)) + list(range(1, n_unique, 2))
    )
    out = [rows[i] for i in order]
    first = {tuple(r[1:]): k for k, r in reversed(list(enumerate(out)))}
    assert len(first) == n_unique
    return out


def table(tmp: Path, rows: list[list[str]] | None = None) -> Path:
    return write_csv(tmp / "table.csv", ["sku", "name", "price", "description"], rows or dup_rows())


def followers_of(rows: list[list[str]]) -> dict[int, int]:
    """follower row index → its leader (the first row with the same cells)."""
    first: dict[tuple[str, ...], int] = {}
    out = {}
    for i, r in enumerate(rows):
        key = tuple(r[1:])
        if key in first:
            out[i] = first[key]
        else:
            first[key] = i
    return out


def strip_billed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The merged rows without the billed columns, and without batch_id (another run's ids)."""
    return [{k: v for k, v in r.items() if k not in (*BILLED, "batch_id")} for r in rows]


# ---------------------------------------------------------------------- end to end


def test_duplicates_sent_once_and_merged_like_without_dedup(emulator_factory, tmp_path: Path):
    rows = dup_rows()
    csv_path = table(tmp_path, rows)
    emu_on, emu_off = emulator_factory(), emulator_factory()
    on, off = tmp_path / "on", tmp_path / "off"
    r_on = invoke(*run_args(emu_on, csv_path, on, "--batch-size", "30"))
    assert r_on.exit_code == 0, r_on.output
    r_off = invoke(*run_args(emu_off, csv_path, off, "--batch-size", "30", "--no-dedup"))
    assert r_off.exit_code == 0, r_off.output

    # 30% fewer requests: the emulator received one line per distinct body.
    sent_on = executions(emu_on)
    assert len(sent_on) == N_UNIQUE and all(v["executed"] == 1 for v in sent_on.values())
    assert len(executions(emu_off)) == N_ROWS
    followers = followers_of(rows)
    assert not {rows[i][0] for i in followers} & set(sent_on)  # no follower was sent

    merged_on = read_csv(on / "final_output.csv")
    merged_off = read_csv(off / "final_output.csv")
    assert len(merged_on) == N_ROWS
    # Equal apart from what each row was billed ...
    assert strip_billed(merged_on) == strip_billed(merged_off)
    for i, r in enumerate(merged_on):
        if i in followers:  # ... which is 0 for a follower,
            assert float(r["cost_usd"]) == 0 and (r["prompt_tokens"], r["completion_tokens"]) == (
                "0",
                "0",
            )
            leader = merged_on[followers[i]]
            assert (r["response"], r["batch_id"]) == (leader["response"], leader["batch_id"])
        else:  # and the same as without dedup for the row that was sent.
            assert {k: r[k] for k in BILLED} == {k: merged_off[i][k] for k in BILLED}
    assert "dedup: 30 row(s) shared an identical row's request: 30 request(s)" in r_on.output

    # status and the report say what it saved: 30 requests and their leaders' cost.
    saved = sum(float(merged_on[followers[i]]["cost_usd"]) for i in followers)
    assert saved > 0
    status = invoke("status", "--run-dir", on)
    assert status.exit_code == 0, status.output
    assert "dedup: 30 row(s) shared an identical row's request: 30 request(s)" in status.output
    rep = invoke("report", "--run-dir", on)
    assert rep.exit_code == 0, rep.output
    data = json.loads((on / "report.json").read_text())
    assert data["dedup"]["rows"] == 30 and data["dedup"]["requests"] == 30
    assert data["dedup"]["cost_usd"] == pytest.approx(saved, rel=1e-6)
    html = (on / "report.html").read_text()
    assert "Identical requests" in html
    # Without dedup nothing is claimed.
    assert "dedup:" not in invoke("status", "--run-dir", off).output


def test_failed_leader_fails_its_followers_and_retry_missing_sends_each_once(
    emulator_factory, tmp_path: Path
):
    rows = dup_rows()
    followers = followers_of(rows)
    emu = emulator_factory(reject_fraction=0.3, seed=3)
    run_dir = tmp_path / "run"
    first = invoke(*run_args(emu, table(tmp_path, rows), run_dir, "--batch-size", "25"))
    assert first.exit_code == 3, first.output
    state = {
        r[0]: r[1:]
        for r in db_rows(run_dir, "SELECT row_idx, status, error, error_class FROM rows")
    }
    failed_leaders = {f: ld for f, ld in followers.items() if state[ld][0] == "failed"}
    assert failed_leaders, "the seed must reject at least one leader with followers"
    for f, leader in followers.items():
        assert state[f] == state[leader]  # same status, same reason
    before = {k: v["executed"] for k, v in executions(emu).items()}
    assert len(before) == N_UNIQUE

    emu.update_scenario(reject_fraction=0.0)
    again = invoke("retry-missing", "--run-dir", run_dir, "--base-url", emu.base_url)
    assert again.exit_code == 0, again.output
    after = {k: v["executed"] for k, v in executions(emu).items()}
    resent = {k for k in after if after[k] != before.get(k)}
    failed_rows = {rows[i][0] for i, s in state.items() if s[0] == "failed"}
    # One request for each failed leader, none for its followers.
    assert resent == {r for r in failed_rows if rows_index(rows, r) not in followers}
    assert all(after[k] == before[k] + 1 for k in resent)
    merged = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in merged} == {"succeeded"}
    for f, leader in followers.items():
        assert merged[f]["response"] == merged[leader]["response"]


def rows_index(rows: list[list[str]], sku: str) -> int:
    return next(i for i, r in enumerate(rows) if r[0] == sku)


def test_lost_leader_loses_its_followers_and_retry_missing_answers_them(
    emulator_factory, tmp_path: Path
):
    """A leader whose answer the result files lack is `lost` (not re-sent); its followers are
    not counted as lines missing, and take the same reason; retry-missing sends the leader once."""
    rows = dup_rows()
    followers = followers_of(rows)
    emu = emulator_factory(output_drop_fraction=0.25, result_fault_downloads=0, seed=5)
    run_dir = tmp_path / "run"
    first = invoke(*run_args(emu, table(tmp_path, rows), run_dir, "--batch-size", "50"))
    assert first.exit_code == 3, first.output
    state = dict(db_rows(run_dir, "SELECT row_idx, error_class FROM rows WHERE status = 'failed'"))
    lost_leaders = {ld for ld in followers.values() if state.get(ld) == "lost"}
    assert lost_leaders
    lost = {i for i, c in state.items() if c == "lost"}
    # Exactly the rows without a line and their followers: nobody else.
    assert lost == {i for i in range(N_ROWS) if followers.get(i, i) in lost_leaders or i in lost}
    for f, leader in followers.items():
        assert (f in lost) == (leader in lost)
    before = {k: v["executed"] for k, v in executions(emu).items()}

    emu.update_scenario(output_drop_fraction=0.0)
    again = invoke("retry-missing", "--run-dir", run_dir, "--base-url", emu.base_url)
    assert again.exit_code == 0, again.output
    after = {k: v["executed"] for k, v in executions(emu).items()}
    resent = {k for k in after if after[k] != before.get(k)}
    assert resent == {rows[i][0] for i in lost if i not in followers}
    assert {r["status"] for r in read_csv(run_dir / "final_output.csv")} == {"succeeded"}


def test_no_dedup_on_retry_missing_sends_followers_on_their_own(emulator_factory, tmp_path: Path):
    rows = dup_rows()
    emu = emulator_factory(reject_fraction=0.3, seed=3)
    run_dir = tmp_path / "run"
    invoke(*run_args(emu, table(tmp_path, rows), run_dir, "--batch-size", "25"))
    failed = {r[0] for r in db_rows(run_dir, "SELECT row_id FROM rows WHERE status = 'failed'")}
    emu.update_scenario(reject_fraction=0.0)
    before = set(executions(emu))
    again = invoke("retry-missing", "--run-dir", run_dir, "--base-url", emu.base_url, "--no-dedup")
    assert again.exit_code == 0, again.output
    # Every failed row, follower or not, was sent itself this time.
    assert failed - before and failed <= set(executions(emu))
    assert db_rows(run_dir, "SELECT COUNT(*) FROM rows WHERE status != 'succeeded'") == [(0,)]


def test_toml_dedup_false_sends_every_row(emulator, tmp_path: Path, monkeypatch):
    csv_path = table(tmp_path)
    (tmp_path / "batchops.toml").write_text("dedup = false\n")
    run_dir = tmp_path / "run"
    result = invoke(*run_args(emulator, csv_path, run_dir, "--config", tmp_path / "batchops.toml"))
    assert result.exit_code == 0, result.output
    assert len(executions(emulator)) == N_ROWS
    assert db_rows(run_dir, "SELECT COUNT(*) FROM rows WHERE leader_idx IS NOT NULL") == [(0,)]


def test_dry_run_writes_one_line_per_distinct_request(tmp_path: Path):
    csv_path = table(tmp_path)

    def lines(*extra: str) -> tuple[int, str]:
        run_dir = tmp_path / f"run{len(extra)}"
        result = invoke(
            "run", "--csv", csv_path, "--id-column", "sku", "--prompt",
            "Describe {name} ({price}): {description}", "--model", "gpt-4o-mini",
            "--run-dir", run_dir, "--dry-run", "--log-dir", tmp_path / "logs", *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        files = (run_dir / "dry-run").glob("*.jsonl")
        return sum(len(f.read_text().splitlines()) for f in files), result.output

    n_on, out_on = lines()
    n_off, out_off = lines("--no-dedup")
    assert (n_on, n_off) == (N_UNIQUE, N_ROWS)
    assert "dedup: 30 row(s) repeat an earlier row's request" in out_on
    assert "dedup:" not in out_off


def test_widened_slice_reuses_an_answer_of_the_earlier_run(emulator, tmp_path: Path):
    """Rows added by a widened slice whose request was answered in the earlier run get that
    answer without a request."""
    rows = [[f"s{i}", f"item {i % 10}", "1", "x"] for i in range(30)]
    csv_path = table(tmp_path, rows)
    run_dir = tmp_path / "run"
    first = invoke(*run_args(emulator, csv_path, run_dir, "--end-row", "10"))
    assert first.exit_code == 0, first.output
    assert len(executions(emulator)) == 10
    wide = invoke(*run_args(emulator, csv_path, run_dir))
    assert wide.exit_code == 0, wide.output
    assert len(executions(emulator)) == 10  # nothing new to send
    merged = read_csv(run_dir / "final_output.csv")
    assert [r["response"] for r in merged] == [merged[i % 10]["response"] for i in range(30)]
    assert {r["status"] for r in merged} == {"succeeded"}


def test_online_mode_sends_each_distinct_request_once(emulator, tmp_path: Path):
    rows = dup_rows()
    run_dir = tmp_path / "run"
    result = invoke(*run_args(emulator, table(tmp_path, rows), run_dir, "--mode", "online"))
    assert result.exit_code == 0, result.output
    assert len(executions(emulator)) == N_UNIQUE
    merged = read_csv(run_dir / "final_output.csv")
    for f, leader in followers_of(rows).items():
        assert merged[f]["response"] == merged[leader]["response"]
        assert float(merged[f]["cost_usd"]) == 0


def test_python_api_dedup_keyword(emulator_factory, tmp_path: Path, monkeypatch):
    import pandas as pd

    import batchops
    from batchops.emulator.testing import DEFAULT_KEY

    monkeypatch.setenv("OPENAI_API_KEY", DEFAULT_KEY)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    df = pd.DataFrame({"sku": ["a", "b", "c", "d"], "name": ["x", "y", "x", "x"]})
    sent = {}
    for dedup_on in (True, False):
        emu = emulator_factory()
        out = batchops.run(
            df,
            prompt="Describe {name}",
            model="gpt-4o-mini",
            run_dir=tmp_path / f"run{dedup_on}",
            id_column="sku",
            base_url=emu.base_url,
            poll_interval=0.05,
            dedup=dedup_on,
        )
        sent[dedup_on] = len(executions(emu))
        assert (out["status"] == "succeeded").all()
        assert out["response"].tolist()[0] == out["response"].tolist()[2]
    assert sent == {True: 2, False: 4}


# ---------------------------------------------------------------------- crash and resume


@pytest.mark.parametrize("point", [{"create": 2}, {"poll": 2}, {"download": 1}, {"download": 2}])
def test_resume_after_a_crash_pays_once(tmp_path: Path, point: dict[str, int]):
    rows = dup_rows()
    csv_path = table(tmp_path, rows)
    emu = memory_emulator()
    spec = build_spec(
        source_path=str(csv_path),
        prompt="Describe {name} ({price}): {description}",
        models=["gpt-4o-mini"],
        id_column="sku",
        batch_size=20,
        poll_interval=0.001,
        retry_delay=0.0,
    )

    def run(crash_after: dict[str, int]) -> None:
        def factory(entry: Any, key: Any, base_url: Any) -> MemoryBackend:
            return MemoryBackend(emu, key, crash_after=crash_after)

        pool = Pool(spec, [Key("sk-test-key1-000000000001")], env={}, backend_factory=factory)
        pool.lane = "batch"
        run_dir, _ = create_or_resume(tmp_path / "run", spec)
        try:
            BatchEngine(run_dir, pool, sleep=lambda s: None).execute()
        finally:
            run_dir.close()

    with pytest.raises(SimulatedCrash):
        run(point)
    run({})
    executed = {k: v["executed"] for k, v in emu.stats()["requests"].items()}
    assert len(executed) == N_UNIQUE and set(executed.values()) == {1}
    state = db_rows(tmp_path / "run", "SELECT row_idx, status, response FROM rows")
    answers = {i: resp for i, status, resp in state if status == "succeeded"}
    assert len(answers) == N_ROWS
    for f, leader in followers_of(rows).items():
        assert answers[f] == answers[leader]


# ---------------------------------------------------------------------- pairing (unit)


def _spec(tmp: Path, rows: list[list[str]], header: list[str], **kw: Any):  # type: ignore[no-untyped-def]
    csv_path = write_csv(tmp / "t.csv", header, rows)
    spec = build_spec(source_path=str(csv_path), models=["gpt-4o-mini"], id_column="id", **kw)
    return spec, open_source(spec)


def test_pairs_lowest_row_leads_and_parts_are_framed(tmp_path: Path):
    rows = [
        ["a", "x", "y"],
        ["b", "x", "y"],  # same as a
        ["c", "x:", "y"],  # differs from a only by where ':' falls between the parts
        ["d", "x", ":y"],
        ["e", "x", "y"],  # same as a
        ["f", "x:", "y"],  # same as c
    ]
    spec, src = _spec(tmp_path, rows, ["id", "p", "s"], prompt="{p}", system="{s}")
    pairs = dedup.find_pairs(src, spec)
    assert pairs.followers.tolist() == [1, 4, 5]
    assert pairs.leaders.tolist() == [0, 0, 2]


def test_pairs_spilled_to_partition_files_are_the_same(tmp_path: Path):
    """A slice over part_rows rows pairs one partition of the key space at a time (its keys
    spilled to files): the same pairs, and no file left behind."""
    rows = dup_rows(n_unique=300, n_rows=500)
    spec, src = _spec(tmp_path, [[r[0], " ".join(r[1:])] for r in rows], ["id", "p"], prompt="{p}")
    whole = dedup.find_pairs(src, spec)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    parted = dedup.find_pairs(src, spec, scratch, part_rows=16)  # 32 partitions
    assert len(whole) == 200
    assert parted.followers.tolist() == whole.followers.tolist()
    assert parted.leaders.tolist() == whole.leaders.tolist()
    want = followers_of(rows)
    assert dict(zip(whole.followers.tolist(), whole.leaders.tolist(), strict=True)) == want
    assert list(scratch.iterdir()) == []


def test_pairs_compare_the_rendered_prompt_not_the_cells(tmp_path: Path):
    rows = [["a", "ab", "c"], ["b", "a", "bc"], ["c", "ab", "c"]]
    spec, src = _spec(tmp_path, rows, ["id", "u", "v"], prompt="{u}{v}")
    pairs = dedup.find_pairs(src, spec)  # "abc" three times: one request
    assert (pairs.followers.tolist(), pairs.leaders.tolist()) == ([1, 2], [0, 0])


def test_pairs_image_cell_is_part_of_the_body(tmp_path: Path):
    rows = [["a", "x", "1.png"], ["b", "x", "2.png"], ["c", "x", "1.png"], ["d", "x", ""]]
    spec, src = _spec(tmp_path, rows, ["id", "p", "img"], prompt="{p}", image_column="img")
    pairs = dedup.find_pairs(src, spec)
    assert (pairs.followers.tolist(), pairs.leaders.tolist()) == ([2], [0])


def test_no_pairs_without_repeats_and_none_when_off(tmp_path: Path):
    rows = [[str(i), f"v{i}"] for i in range(50)]
    spec, src = _spec(tmp_path, rows, ["id", "p"], prompt="{p}")
    assert len(dedup.find_pairs(src, spec)) == 0
    assert dedup.leaders_only(src, spec) == (None, 0)
    rows = [[str(i), "same"] for i in range(5)]
    spec, src = _spec(tmp_path, rows, ["id", "p"], prompt="{p}")
    keep, n = dedup.leaders_only(src, spec)
    assert keep is not None and (keep.tolist(), n) == ([0], 4)
    off = spec.model_copy(update={"dedup": False})
    assert dedup.leaders_only(src, off) == (None, 0)


def _first_seen_kept(src: Any, spec: Any, frame_rows: int) -> tuple[list[int], int]:
    """The rows FirstSeen keeps over the slice's frames (texts rendered as build_chunks does)."""
    from batchops import chunking, render

    keep = dedup.FirstSeen(spec, src.n_rows, chunking.TEXT_COL, chunking.SYSTEM_COL)
    texts = [render.text_expr(spec.prompt).alias(chunking.TEXT_COL)]
    if render.system_fields(spec):
        texts.append(render.text_expr(spec.system).alias(chunking.SYSTEM_COL))
    kept: list[int] = []
    for frame in iter_frames(src, columns=dedup.columns(spec), batch_rows=frame_rows):
        kept += keep(frame.with_columns(texts))[ROW_IDX].to_list()
    return kept, keep.followers


@pytest.mark.parametrize("frame_rows", [1, 7, 1000])
def test_first_seen_keeps_exactly_the_leaders_find_pairs_chooses(tmp_path: Path, frame_rows: int):
    """The dry run's one-pass dedup: repeats within a frame and across frames, the parts of
    the body framed (system message and image cell), the lowest row of each group kept."""
    rows = dup_rows(n_unique=300, n_rows=500)
    table_rows = [[r[0], r[1], r[2] if i % 3 else "x:", r[3]] for i, r in enumerate(rows)]
    spec, src = _spec(
        tmp_path, table_rows, ["id", "p", "s", "img"], prompt="{p}", system="{s}",
        image_column="img",
    )  # fmt: skip
    pairs = dedup.find_pairs(src, spec)
    kept, n_out = _first_seen_kept(src, spec, frame_rows)
    assert n_out == len(pairs) > 150
    assert kept == sorted(set(range(500)) - set(pairs.followers.tolist()))


def test_first_seen_on_a_slice_and_without_repeats(tmp_path: Path):
    rows = [[str(i), f"v{i % 40}"] for i in range(100)]
    spec, src = _spec(tmp_path, rows, ["id", "p"], prompt="{p}", start_row=30, end_row=90)
    kept, n_out = _first_seen_kept(src, spec, 16)
    assert (kept, n_out) == (list(range(30, 70)), 20)  # rows 70..89 repeat rows 30..49
    rows = [[str(i), f"v{i}"] for i in range(100)]
    spec, src = _spec(tmp_path, rows, ["id", "p"], prompt="{p}")
    assert _first_seen_kept(src, spec, 9) == (list(range(100)), 0)


def test_first_seen_refuses_more_rows_than_it_was_sized_for(tmp_path: Path):
    rows = [[str(i), "same"] for i in range(30)]
    spec, src = _spec(tmp_path, rows, ["id", "p"], prompt="{p}", end_row=10)
    from batchops import chunking

    keep = dedup.FirstSeen(spec, src.n_rows, chunking.TEXT_COL, chunking.SYSTEM_COL)
    frame = pl.DataFrame({chunking.TEXT_COL: ["a"] * 11})
    with pytest.raises(RuntimeError, match="more rows"):
        keep(frame)


def test_anchor_keeps_rows_with_a_past_and_their_leader(tmp_path: Path):
    """Group {0, 3, 5, 7}: row 3 was sent in an earlier run (fixed), row 0 never was: 3
    leads, 0, 5 and 7 follow it. Group {1, 4}: 4 follows 1 already; 1 stays its leader."""
    pairs = dedup.Pairs(np.array([3, 4, 5, 7]), np.array([0, 1, 0, 0]))
    history = pl.DataFrame(
        {"row_idx": [3, 4, 1], "fixed": [True, False, True], "old_leader": [None, 1, None]},
        schema={"row_idx": pl.Int64, "fixed": pl.Boolean, "old_leader": pl.Int64},
    )
    out = dedup.anchor(pairs, history)
    assert dict(zip(out.followers.tolist(), out.leaders.tolist(), strict=True)) == {
        0: 3,
        5: 3,
        7: 3,
    }
