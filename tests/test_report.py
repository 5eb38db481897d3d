"""`batchops report`: one self-contained, escaped HTML page and report.json with the same data,
checked against the run database and rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cli_helpers import awkward_table, invoke, run_args

from batchops import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, emulator_factory_module) -> Path:
    """A run with answers holding markup, and some rows rejected for good (exit 3)."""
    tmp = tmp_path_factory.mktemp("report")
    emu = emulator_factory_module(reject_fraction=0.3, seed=5)
    src = awkward_table(tmp, n_plain=12, images=False)
    run_dir = tmp / "run"
    res = invoke(*run_args(emu, src, run_dir, "--batch-size", "6"))
    assert res.exit_code == 3, res.output  # the rejected rows are missing
    res = invoke("report", "--run-dir", run_dir)
    assert res.exit_code == 0, res.output
    return run_dir


@pytest.fixture(scope="module")
def emulator_factory_module():
    from batchops.emulator import EmulatorServer, Scenario
    from batchops.emulator.testing import FAST

    started: list[EmulatorServer] = []

    def make(**knobs):
        server = EmulatorServer(scenario=Scenario(**{**FAST, **knobs})).start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


def db(run_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(run_dir / "state.db")
    conn.row_factory = sqlite3.Row
    return conn


def test_report_json_matches_the_database(finished_run: Path):
    data = json.loads((finished_run / "report.json").read_text())
    conn = db(finished_run)
    counts = dict(conn.execute("SELECT status, COUNT(*) FROM rows GROUP BY status").fetchall())
    assert {k: v for k, v in data["rows"].items() if v} == counts
    assert counts.get("failed") and counts.get("succeeded")
    assert data["total_rows"] == sum(counts.values())
    spent = conn.execute("SELECT SUM(cost_usd) FROM rows").fetchone()[0]  # every call's cost
    assert data["cost"]["total_usd"] == pytest.approx(spent)
    batches = [r[0] for r in conn.execute("SELECT batch_id FROM batches ORDER BY created_at")]
    assert sorted(b["batch_id"] for b in data["cost"]["by_batch"]) == sorted(batches)
    assert sorted(t["batch_id"] for t in data["timeline"]) == sorted(batches)
    assert all(t["end_s"] >= t["start_s"] >= 0 for t in data["timeline"])
    classes = dict(
        conn.execute(
            "SELECT error_class, COUNT(*) FROM rows WHERE status = 'failed' GROUP BY 1"
        ).fetchall()
    )
    assert {c["error_class"]: c["rows"] for c in data["errors"]} == classes
    assert all(1 <= len(c["examples"]) <= report.ERROR_EXAMPLES for c in data["errors"])
    ok = {
        r[0]: r[1]
        for r in conn.execute("SELECT row_id, response FROM rows WHERE status='succeeded'")
    }
    assert data["sample"] and all(ok[a["row_id"]] == a["response"] for a in data["sample"])


def test_html_is_self_contained_and_escaped(finished_run: Path):
    page = (finished_run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    for external in ("<script", "<link", "src=", "@import", "url(", "<iframe"):
        assert external not in page.lower(), external
    # the only URL is the SVG namespace, which is a name, not a fetch
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    # an answer echoing the row "</script>" shows as text
    assert "&lt;/script&gt;" in page


def test_everything_from_the_run_is_escaped():
    evil = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
    data = {
        "run_id": evil,
        "run_dir": evil,
        "source": evil,
        "endpoint": evil,
        "models": [evil],
        "mode": evil,
        "generated_at": evil,
        "rows": {"succeeded": 1},
        "total_rows": 1,
        "cost": {
            "total_usd": 0.5,
            "estimate_usd": None,
            "by_model": [
                {
                    "model": evil,
                    "mode": evil,
                    "calls": 1,
                    "prompt_tokens": 1,
                    "cached_tokens": 0,
                    "completion_tokens": 1,
                    "cost_usd": 0.5,
                }
            ],
            "by_batch": [
                {
                    "batch_id": evil,
                    "chunk_id": 1,
                    "model": evil,
                    "status": evil,
                    "request_total": 1,
                    "est_cost": None,
                    "cost_usd": 0.5,
                }
            ],
        },
        "timeline": [
            {
                "batch_id": evil,
                "chunk_id": 1,
                "model": evil,
                "status": evil,
                "start_s": 0.0,
                "end_s": 2.0,
                "open": True,
            }
        ],
        "errors": [
            {
                "error_class": evil,
                "rows": 1,
                "examples": [{"row_id": evil, "status": evil, "attempts": 1, "error": evil}],
            }
        ],
        "failed_attempts_by_class": {evil: 1},
        "retries": {"rows": 0, "attempts": 0, "by_class": {}},
        "sample": [
            {
                "row_id": evil,
                "model": evil,
                "response": evil,
                "truncated": False,
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "cost_usd": 0.5,
            }
        ],
    }
    page = report.render_html(data)
    assert "<img" not in page and "<script" not in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") >= 10


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run tries)"
)
def test_report_renders_in_headless_chromium(finished_run: Path):
    data = json.loads((finished_run / "report.json").read_text())
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--dump-dom",
            (finished_run / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    dom = out.stdout
    assert "</html>" in dom, out.stderr[-2000:]
    for status, n in data["rows"].items():
        assert f'id="rows-{status}">{n}</b>' in dom
    assert f'id="rows-total">{data["total_rows"]}</b>' in dom
    assert f'id="cost-total">${data["cost"]["total_usd"]:.6f}</b>' in dom
    for t in data["timeline"]:
        assert t["batch_id"] in dom
    assert dom.count("<rect") == len(data["timeline"])  # the SVG timeline was parsed
    for c in data["errors"]:
        assert c["error_class"] in dom
    # answers are text nodes: Chromium parsed no element out of them
    assert "<script" not in dom and "&lt;/script&gt;" in dom
