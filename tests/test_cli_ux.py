"""Operator experience: status (tables and --json) against the database, watch, dry run,
the progress display, help examples and the generated CLI reference."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path

import pytest
from cli_helpers import awkward_table, calls, invoke, run_args
from loguru import logger
from rich.console import Console

from batchops import clidoc, logs
from batchops.cli import cli
from batchops.engine import Progress
from batchops.progress import ProgressDisplay, fmt_duration

TERMINAL = {"completed", "failed", "expired", "cancelled"}
REPO = Path(__file__).resolve().parents[1]


def db(run_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(run_dir / "state.db")
    conn.row_factory = sqlite3.Row
    return conn


def status_json(run_dir: Path) -> dict:
    res = invoke("status", "--run-dir", run_dir, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def assert_status_matches_db(st: dict, run_dir: Path) -> None:
    conn = db(run_dir)
    counts = dict(conn.execute("SELECT status, COUNT(*) FROM rows GROUP BY status").fetchall())
    assert {k: v for k, v in st["rows"].items() if v} == counts
    batches = {r["batch_id"]: r["status"] for r in conn.execute("SELECT * FROM batches")}
    assert {b["batch_id"]: b["status"] for b in st["batches"]} == batches
    by_status: dict[str, int] = {}
    for s in batches.values():
        by_status[s] = by_status.get(s, 0) + 1
    assert st["batches_by_status"] == by_status
    assert {s: a["count"] for s, a in st["batch_ages"].items()} == by_status
    submitted = conn.execute("SELECT COUNT(*) FROM chunks WHERE state = 'submitted'").fetchone()[0]
    assert st["in_flight"] == submitted
    spent = conn.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM rows").fetchone()[0]
    assert st["spent_usd"] == pytest.approx(spent)
    retried = conn.execute("SELECT COUNT(*) FROM rows WHERE attempts > 0").fetchone()[0]
    assert st["retries"]["rows"] == retried
    assert st["models"] == ["gpt-4o-mini"]


def test_status_json_matches_the_database_in_flight_and_after(emulator_factory, tmp_path: Path):
    emu = emulator_factory(in_progress_seconds=0.6)
    src = awkward_table(tmp_path, n_plain=9, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--no-wait", "--batch-size", "5"))
    assert res.exit_code == 0, res.output
    st = status_json(run_dir)
    assert_status_matches_db(st, run_dir)
    assert st["in_flight"] == 4 and all(b["age_s"] >= 0 for b in st["batches"])
    assert st["pool"] == [{"model": "gpt-4o-mini", "key": "sk-…abcd", "state": "in use"}]
    assert "batchops watch --run-dir" in st["next"]
    text = invoke("status", "--run-dir", run_dir).stdout
    for piece in ("rows", "batches by remote status", "models and keys", "cost so far", "next"):
        assert piece in text
    assert re.search(r"queued\s+│\s+16 ", text) and "in use" in text  # once, in the table
    # watch follows the batches to their end, then the status says so
    res = invoke(
        "watch", "--run-dir", run_dir, "--base-url", emu.base_url, "--poll-interval", "0.05"
    )
    assert res.exit_code == 0, res.output
    st = status_json(run_dir)
    assert_status_matches_db(st, run_dir)
    assert st["in_flight"] == 0 and set(st["batches_by_status"]) <= TERMINAL
    assert st["next"].startswith("all rows answered")


def test_watch_ends_when_every_batch_is_terminal(emulator_factory, tmp_path: Path):
    emu = emulator_factory(in_progress_seconds=0.4)
    src = awkward_table(tmp_path, n_plain=5, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emu, src, run_dir, "--no-wait", "--batch-size", "4")).exit_code == 0
    creates = calls(emu, "POST /v1/batches")
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
    assert res.exit_code == 0, res.output
    assert "12 succeeded" in res.stdout and "merged output:" in res.stdout
    conn = db(run_dir)
    assert {r[0] for r in conn.execute("SELECT status FROM batches")} == {"completed"}
    assert (
        conn.execute("SELECT COUNT(*) FROM batches WHERE collected_at IS NULL").fetchone()[0] == 0
    )
    assert calls(emu, "POST /v1/batches") == creates  # watching submits nothing
    assert (run_dir / "final_output.csv").exists()
    assert re.search(r"progress: rows 12/12 done", res.stderr)


def test_watch_retry_resubmits_what_was_cancelled(emulator_factory, tmp_path: Path):
    emu = emulator_factory(in_progress_seconds=30, cancelling_seconds=0.05)
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    base = ["--run-dir", run_dir, "--base-url", emu.base_url, "--log-dir", tmp_path / "logs"]
    assert invoke(*run_args(emu, src, run_dir, "--no-wait")).exit_code == 0
    assert invoke("cancel", *base).exit_code == 0
    res = invoke("watch", *base, "--poll-interval", "0.05")  # nothing in flight: ends at once
    assert res.exit_code == 3 and "watch --retry" in res.stdout
    assert status_json(run_dir)["rows"]["pending"] == 10
    emu.update_scenario(in_progress_seconds=0.2)
    res = invoke("watch", *base, "--poll-interval", "0.05", "--retry")
    assert res.exit_code == 0, res.output
    st = status_json(run_dir)
    assert st["rows"]["succeeded"] == 10 and st["batches_by_status"] == {
        "cancelled": 1,
        "completed": 1,
    }


def test_dry_run_validates_uploads_nothing_and_matches_cost_estimate(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=20, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emulator, src, run_dir, "--dry-run", "--batch-size", "9"))
    assert res.exit_code == 0, res.output
    assert emulator.stats()["calls"] == {}
    assert "checked 3 file(s): 27 requests" in res.stdout and "all valid" in res.stdout
    tokens = re.search(r"tokens: ~([\d,]+) prompt \+ ≤([\d,]+) completion", res.stdout)
    assert tokens and int(tokens.group(2).replace(",", "")) == 27 * 256
    dry = re.search(r"cost ≈ (\$[\d.]+) at batch prices", res.stdout)
    assert dry
    # the real run's `batchops cost` shows the same figure as its estimate
    assert invoke(*run_args(emulator, src, run_dir, "--batch-size", "9")).exit_code == 0
    cost = invoke("cost", "--run-dir", run_dir)
    assert f"estimate: {dry.group(1)}" in cost.stdout
    assert (
        f"${json.loads(invoke('cost', '--run-dir', run_dir, '--json').stdout)['estimate_usd']:.6f}"
        == dry.group(1)
    )


def test_dry_run_refuses_a_chunk_file_the_api_would_fail(emulator, tmp_path: Path, monkeypatch):
    from batchops import validate

    real = validate.check_files

    def with_stream(paths, endpoint, *template):  # as if the builder had written `stream: true`
        for p in map(Path, paths):
            p.write_text(p.read_text().replace('"model":', '"stream":true,"model":', 1))
        return real(paths, endpoint, *template)

    monkeypatch.setattr(validate, "check_files", with_stream)
    src = awkward_table(tmp_path, images=False)
    res = invoke(*run_args(emulator, src, tmp_path / "run", "--dry-run"))
    assert res.exit_code == 2
    assert "streaming_unsupported" in res.stderr and "line 1" in res.stderr
    assert emulator.stats()["calls"] == {}


# ------------------------------------------------------------------ the progress display


def snapshot(done: int, total: int = 100, spent: float = 0.0) -> Progress:
    counts = {"pending": 0, "queued": total - done, "succeeded": done, "failed": 0, "skipped": 0}
    return Progress(counts, 2, {"in_progress": 2}, spent)


def test_live_display_keeps_log_lines_above_the_bar():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100, color_system=None)
    logs.configure(None, 0, console=console)
    clock = iter(range(0, 1000, 10))
    try:
        with ProgressDisplay(console, live=True, clock=lambda: float(next(clock))) as show:
            show(snapshot(0))
            logger.info("a log line while the bar is live")
            show(snapshot(50, spent=0.25))
    finally:
        logger.remove()
    text = buf.getvalue()
    assert "a log line while the bar is live" in text
    final = text[text.rindex("a log line") :]
    assert "50/100" in final and "$0.250000" in final and "in_progress 2" in final


def test_plain_progress_lines_and_eta():
    now = [0.0]
    lines: list[str] = []
    logs.configure(None, 0, sink=io.StringIO())
    logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        show = ProgressDisplay(Console(file=io.StringIO()), live=False, clock=lambda: now[0])
        with show:
            show(snapshot(10))
            now[0] = 10.0
            show(snapshot(10))  # nothing changed: no new line
            now[0] = 20.0
            show(snapshot(30))  # 20 rows in 20 s → 70 left ≈ 70 s
    finally:
        logger.remove()
    assert len(lines) == 2
    assert lines[-1].startswith("progress: rows 30/100 done") and "ETA 1m10s" in lines[-1]
    assert fmt_duration(3 * 3600 + 120) == "3h02m" and fmt_duration(None) == "-"


# ------------------------------------------------------------------ help and docs


def test_every_command_has_help_with_an_example():
    for name in cli.list_commands(None):  # type: ignore[arg-type]
        res = invoke(name, "--help")
        assert res.exit_code == 0, name
        assert "Example" in res.output and f"batchops {name}" in res.output, name


def test_docs_cli_md_is_in_sync_with_the_commands():
    want = clidoc.render()
    have = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert have == want, "docs/cli.md is stale: run `python -m batchops.clidoc > docs/cli.md`"
