"""Logs: a DEBUG file per invocation with the run/chunk/batch ids of each remote call, state
change, switch and cost line; API keys never in a log or any file of the run."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from cli_helpers import awkward_table, invoke, run_args
from loguru import logger

from batchops import logs

# Distinctive values: if any part of batchops writes a key, these greps find it.
KEY = "sk-ZQXdistinctive-secret-0001-wxyz"
KEY2 = "sk-ZQXdistinctive-secret-0002-vwxy"
LOG_NAME = re.compile(r"batch_execution_\d{8}_\d{6}\.log")
IDS = re.compile(r"\| \[run=(run_\w+)(?: chunk=(\d+))?(?: batch=(\w+))?\] ")


def every_file(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob("*") if p.is_file()]


def assert_no_key(*dirs: Path, keys: tuple[str, ...] = (KEY, KEY2)) -> None:
    files = every_file(*dirs)
    assert files
    for p in files:
        data = p.read_bytes()
        for k in keys:
            # the key's distinctive middle too: a key cut in two would still leak
            for needle in (k, k[5:-5]):
                assert needle.encode() not in data, f"{needle} found in {p}"


def test_log_file_has_ids_on_every_remote_call_and_no_key(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=8, images=False)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(emulator, src, run_dir, "--batch-size", "5"), env={"OPENAI_API_KEY": KEY}
    )
    assert res.exit_code == 0, res.output
    files = list((tmp_path / "logs").iterdir())
    assert len(files) == 1 and LOG_NAME.fullmatch(files[0].name)
    lines = files[0].read_text(encoding="utf-8").splitlines()
    (run_id,) = (
        sqlite3.connect(run_dir / "state.db")
        .execute("SELECT value FROM meta WHERE key = 'run_id'")
        .fetchone()
    )
    calls = [ln for ln in lines if "| DEBUG   |" in ln and "remote call: " in ln]
    for what in ("upload chunk", "create batch for chunk", "download file-"):
        hits = [ln for ln in calls if f"remote call: {what}" in ln]
        assert hits, f"no DEBUG line for {what}"
        for ln in hits:
            m = IDS.search(ln)
            assert m and m.group(1) == run_id and m.group(2), f"no run/chunk ids in: {ln}"
            if what == "download file-":
                assert m.group(3), f"no batch id in: {ln}"
    # Polls: 3 batches in flight on one account, so one list page answers for all of them; the
    # call carries the run id, and every batch's polled status its chunk and batch ids.
    polls = [ln for ln in calls if "remote call: poll " in ln]
    assert any("remote call: poll 3 batches (one list page)" in ln for ln in polls), polls
    assert all((m := IDS.search(ln)) and m.group(1) == run_id for ln in polls)
    statuses = [
        ln for ln in lines if "| DEBUG   |" in ln and re.search(r"batch \S+ \(chunk \d+\): ", ln)
    ]
    assert statuses and all((m := IDS.search(ln)) and m.group(2) and m.group(3) for ln in statuses)
    # One batch in flight: it is polled on its own, and that call carries all three ids.
    single = tmp_path / "single"
    res1 = invoke(
        *run_args(emulator, src, single, "--batch-size", "20", "--log-dir", tmp_path / "logs1"),
        env={"OPENAI_API_KEY": KEY},
    )
    assert res1.exit_code == 0, res1.output
    (log1,) = (tmp_path / "logs1").iterdir()
    polls1 = [
        ln for ln in log1.read_text(encoding="utf-8").splitlines() if "remote call: poll " in ln
    ]
    (batch_id,) = {
        b for (b,) in sqlite3.connect(single / "state.db").execute("SELECT batch_id FROM batches")
    }
    assert polls1 and all(f"remote call: poll batch {batch_id}" in ln for ln in polls1), polls1
    assert all((m := IDS.search(ln)) and m.group(3) == batch_id for ln in polls1)
    # state changes, collection and cost lines carry the ids too
    for marker in ("built → uploading", "uploaded → submitting", "submitted as batch", "cost: "):
        hit = next((ln for ln in lines if marker in ln), None)
        assert hit and IDS.search(hit), marker
    assert "sk-…wxyz" in "\n".join(lines)  # the key is shown masked, never in full
    assert_no_key(tmp_path / "logs", tmp_path / "logs1", run_dir, single)
    assert KEY not in res.output + res1.output


def test_key_switch_is_logged_recorded_and_shown_without_keys(emulator_factory, tmp_path: Path):
    emu = emulator_factory(key_quota={KEY: 4})
    src = awkward_table(tmp_path, n_plain=8, images=False)
    run_dir = tmp_path / "run"
    env = {"OPENAI_API_KEYS": f"{KEY},{KEY2}", "OPENAI_API_KEY": ""}
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "5"), env=env)
    assert res.exit_code == 0, res.output
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "exhausted" in log and "switching to model gpt-4o-mini on key sk-…vwxy" in log
    db = sqlite3.connect(run_dir / "state.db")
    switches = [m for (m,) in db.execute("SELECT message FROM events WHERE kind = 'switch'")]
    assert switches and "key sk-…wxyz exhausted" in switches[0]
    assert "switching to model gpt-4o-mini on key sk-…vwxy" in switches[0]
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert sorted(s["message"] for s in st["switches"]) == sorted(switches)
    states = {p["key"]: p["state"] for p in st["pool"]}
    assert states["sk-…wxyz"].startswith("exhausted") and states["sk-…vwxy"] == "in use"
    text = invoke("status", "--run-dir", run_dir).output
    assert "exhausted" in text and "switches" in text
    assert_no_key(tmp_path / "logs", run_dir)


def test_exception_text_and_locals_are_masked_in_the_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = logs.configure(tmp_path, 0, sink=open(tmp_path / "console.txt", "w"))  # noqa: SIM115
    assert path is not None
    api_key = KEY  # a local a traceback with variables would print
    try:
        raise ValueError(f"request failed for {api_key}")
    except ValueError:
        logger.exception("boom with {}", api_key)
    with logger.contextualize(run="run_x", chunk=3, batch="batch_y"):
        logger.debug("inside")
    logger.remove()
    text = path.read_text()
    assert KEY not in text and (tmp_path / "console.txt").read_text().count(KEY) == 0
    assert "request failed for sk-…wxyz" in text  # the exception's own text, masked
    assert "| [run=run_x chunk=3 batch=batch_y] inside" in text


def test_quiet_verbose_and_no_color(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    quiet = invoke(*run_args(emulator, src, tmp_path / "q", "-q"))
    assert quiet.exit_code == 0
    assert " INFO " not in quiet.stderr and "progress:" not in quiet.stderr
    # the result still prints: the estimate, the outcome line, where the merge went
    spent = json.loads(invoke("status", "--run-dir", tmp_path / "q", "--json").output)["spent_usd"]
    est, outcome, merged = quiet.stdout.splitlines()
    assert est.startswith("estimate: 7 rows in 1 chunk(s), ")
    assert outcome == f"7 succeeded, 0 failed, 0 skipped, 0 missing; spent ${spent:.6f}"
    assert merged == f"merged output: {tmp_path / 'q' / 'final_output.csv'}"
    loud = invoke(*run_args(emulator, src, tmp_path / "v", "-v"))
    assert " DEBUG " in loud.stderr and "remote call:" in loud.stderr
    assert "\x1b[" not in loud.stderr + loud.stdout  # NO_COLOR / not a terminal: no escapes
    plain = invoke(*run_args(emulator, src, tmp_path / "p"))
    # without a terminal, progress is plain lines through the log
    assert re.search(r"INFO +progress: rows \d+/7 done", plain.stderr)
