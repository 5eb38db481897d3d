"""The dry run as its own process: it ends without the interpreter's teardown (os._exit) once
its files, its output and its log are written, and still fails as any command does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "products.csv"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "batchops.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_a_dry_run_process_writes_everything_before_it_ends(tmp_path: Path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = ["run", "--csv", str(SAMPLE), "--id-column", "sku", "--prompt", "Describe {name}"]
    args += ["--model", "gpt-4o-mini"]
    res = run_cli(*args, "--run-dir", str(run_dir), "--log-dir", str(logs), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].startswith("dry run: chunk files in")
    files = sorted((run_dir / "dry-run").glob("*.jsonl"))
    assert files and sum(len(f.read_bytes().splitlines()) for f in files) == 50
    (log,) = logs.glob("*.log")
    assert "checked 3 file(s): 50 requests" in log.read_text(encoding="utf-8").splitlines()[-1]


def test_a_failing_dry_run_process_still_exits_2_with_one_line(tmp_path: Path):
    res = run_cli(
        "run", "--csv", str(SAMPLE), "--id-column", "nope", "--prompt", "x {name}", "--dry-run",
        "--model", "gpt-4o-mini",
        "--run-dir", str(tmp_path / "run"), "--log-dir", str(tmp_path / "logs"),
    )  # fmt: skip
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "--id-column 'nope': no such column" in res.stderr.strip().splitlines()[-1]
