"""Helpers for end-to-end tests: run the real CLI against a real emulator over HTTP."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
from click.testing import CliRunner, Result

from batchops.cli import cli
from batchops.emulator.answers import expected_answer
from batchops.emulator.testing import DEFAULT_KEY

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c63000100000500010d0a2db40000000049454e44ae426082"
)

AWKWARD_ROWS = [
    ["007", "Red mug", "19.90", 'Says "hi", then, bye', "a.png"],
    ["0042", "Lamp", "5", "line one\nline two\r\nline three", ""],
    ["010", "", "", "", ""],
    ["011", "茶碗 tea bowl", "1e3", "emoji 🎉 and tab\there", "b.png"],
    ["012", "comma, inside", "-0", " leading and trailing spaces ", ""],
    ["013", "{braces}", "NaN", "null", ""],
    ["014", "back\\slash", "TRUE", "</script>", ""],
]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def awkward_table(tmp: Path, *, n_plain: int = 0, images: bool = True) -> Path:
    """The awkward rows plus `n_plain` simple ones; a.png and b.png in tmp/images."""
    img = tmp / "images"
    img.mkdir(exist_ok=True)
    if images:
        (img / "a.png").write_bytes(PNG_1x1)
        (img / "b.png").write_bytes(PNG_1x1)
    rows = [list(r) for r in AWKWARD_ROWS]
    rows += [[f"p{i:05d}", f"item {i}", f"{i}.50", f"plain row {i}", ""] for i in range(n_plain)]
    return write_csv(tmp / "table.csv", ["sku", "name", "price", "description", "image"], rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def invoke(*args: Any, env: dict[str, str] | None = None) -> Result:
    """The real CLI, in process (click's runner): exit code, stdout and stderr."""
    full_env = {
        "OPENAI_API_KEY": DEFAULT_KEY,
        "OPENAI_API_KEYS": "",
        "NO_COLOR": "1",
        **(env or {}),
    }
    return CliRunner().invoke(cli, [str(a) for a in args], env=full_env, catch_exceptions=False)


def run_args(
    emu: Any, csv_path: Path, run_dir: Path, *extra: Any, model: str = "gpt-4o-mini"
) -> list[Any]:
    return [
        "run",
        "--csv",
        csv_path,
        "--id-column",
        "sku",
        "--prompt",
        "Describe {name} ({price}): {description}",
        "--model",
        model,
        "--run-dir",
        run_dir,
        "--base-url",
        emu.base_url,
        "--poll-interval",
        "0.05",
        "--log-dir",
        run_dir.parent / "logs",
        *extra,
    ]


def subprocess_run(
    args: list[Any], *, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.Popen:
    full_env = {**os.environ, "OPENAI_API_KEY": DEFAULT_KEY, "NO_COLOR": "1", **(env or {})}
    full_env.pop("OPENAI_API_KEYS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "batchops.cli", *map(str, args)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def kill_after_calls(
    emu: Any, args: list[Any], route: str, k: int, *, then_wait: float = 0.0, label: str = ""
) -> None:
    """Start the CLI, SIGKILL it `then_wait` seconds after its k-th call of `route` (counted by
    the emulator from now). The process must still be running then: a fixed schedule of kill
    points, never "as many kills as fit in N seconds", which would depend on the machine."""
    before = calls(emu, route)
    proc = subprocess_run(args)
    deadline = time.monotonic() + 60
    while calls(emu, route) < before + k and proc.poll() is None:
        assert time.monotonic() < deadline, f"{label}: no call of {route}"
        time.sleep(0.002)
    time.sleep(then_wait)
    if proc.poll() is not None:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise AssertionError(
            f"{label}: the process ended ({proc.returncode}) before it ({route} #{k}): {err[-800:]}"
        )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def sent_bodies(run_dir: Path, folder: str = "inputs") -> dict[str, dict[str, Any]]:
    """custom_id → request body, from the chunk files the run uploaded (or a dry run built)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted((run_dir / folder).glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                req = json.loads(line)
                out[req["custom_id"]] = req["body"]
    return out


def expected_answers(run_dir: Path) -> dict[str, str]:
    return {cid: expected_answer(b["model"], b) for cid, b in sent_bodies(run_dir).items()}


def executions(emu: Any) -> dict[str, dict[str, int]]:
    return emu.stats()["requests"]


def calls(emu: Any, route: str) -> int:
    return emu.stats()["calls"].get(route, 0)


def all_logs(log_dir: Path) -> str:
    """Every log file of the folder, joined: each invocation (a dry run too) may write its own,
    and glob order is arbitrary, so no test may pick "the" log file by position."""
    return "".join(p.read_text(encoding="utf-8") for p in sorted(log_dir.glob("*.log")))


def db_rows(run_dir: Path, sql: str, *args: Any) -> list[tuple]:
    """Rows of a query on a run's state.db, opened read-only (a test never writes the state)."""
    db = sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def assert_one_batch_per_chunk_and_attempt(emu: Any, known: set[tuple[int, int]]) -> None:
    """Remotely: one batch per (chunk, attempt), each one the run knows; every live input file
    is some batch's input (an upload a crash orphaned was reused or deleted; a collected
    batch's files are deleted too)."""
    client = openai.OpenAI(base_url=emu.base_url, api_key=DEFAULT_KEY, max_retries=0)
    batches = list(client.batches.list(limit=100))
    assert len(batches) == emu.stats()["batches"]["created"]
    keys = [
        (int(b.metadata["batchops_chunk"]), int(b.metadata["batchops_attempt"])) for b in batches
    ]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert set(keys) == known
    inputs = {f.id for f in client.files.list(purpose="batch")}
    assert inputs <= {b.input_file_id for b in batches}


# Answers paid for: failed calls and online answers are attempts rows of their own, a batch's
# answers are summed per recorded slice in attempt_totals (schema 6).
PAID_ANSWERS_SQL = (
    "SELECT (SELECT COUNT(*) FROM attempts WHERE ok = 1)"
    " + (SELECT COALESCE(SUM(n), 0) FROM attempt_totals)"
)
