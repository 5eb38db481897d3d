"""The Gemini backend end to end: the real CLI and the real google-genai SDK against the
emulator's Gemini dialect over HTTP (a `batchops.toml` with a `provider = "gemini"` model)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    AWKWARD_ROWS,
    PAID_ANSWERS_SQL,
    all_logs,
    awkward_table,
    executions,
    expected_answers,
    invoke,
    read_csv,
    sent_bodies,
    subprocess_run,
)

from batchops.emulator.answers import prompt_tokens
from batchops.emulator.gemini_dialect import to_chat

genai = pytest.importorskip("google.genai")
from google.genai import types  # noqa: E402

from batchops.backends.gemini import CHAT, to_request  # noqa: E402

MODEL = "gemini-2.5-flash"
GKEY = "gk-test-00000000000abcd"
ENV = {"GEMINI_API_KEY": GKEY}
UPLOAD = "POST /upload/v1/files"
CREATE = "POST /v1/models/{model}:{action}"
HEADER = ["sku", "name", "price", "description", "image"]


def config(tmp: Path, emu: Any) -> Path:
    """A batchops.toml with the Gemini model on the emulator's root."""
    path = tmp / "batchops.toml"
    path.write_text(
        f'[[models]]\nname = "{MODEL}"\nprovider = "gemini"\n'
        f'api_key_env = "GEMINI_API_KEY"\nbase_url = "{emu.root_url}"\n',
        encoding="utf-8",
    )
    return path


def args(tmp: Path, emu: Any, src: Path, *extra: Any) -> list[Any]:
    return [
        "run",
        "--csv",
        src,
        "--id-column",
        "sku",
        "--prompt",
        "Describe {name} ({price}): {description}",
        "--config",
        config(tmp, emu),
        "--run-dir",
        tmp / "run",
        "--poll-interval",
        "0.05",
        "--log-dir",
        tmp / "logs",
        "--retry-delay",
        "0.01",
        "--retry-max-delay",
        "0.05",
        *extra,
    ]


def jobs(emu: Any) -> list[Any]:
    """Every Gemini job the key can see (only its creator's key sees a job)."""
    c = genai.Client(api_key=GKEY, http_options=types.HttpOptions(base_url=emu.root_url))
    return list(c.batches.list(config={"page_size": 100}))


def assert_each_row_answered_once(emu: Any, run_dir: Path, n: int) -> list[dict[str, str]]:
    stats = executions(emu)
    assert len(stats) == n
    assert all(v == {"executed": 1, "succeeded": 1} for v in stats.values()), {
        k: v for k, v in stats.items() if v != {"executed": 1, "succeeded": 1}
    }
    rows = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in rows} == {"succeeded"}
    assert {r["sku"]: r["response"] for r in rows} == expected_answers(run_dir)
    with sqlite3.connect(run_dir / "state.db") as db:
        (ok,) = db.execute(PAID_ANSWERS_SQL).fetchone()
    assert ok == n  # one paid answer per row
    return rows


def test_awkward_table_with_images_round_trips_exactly(emulator_factory, tmp_path: Path):
    emu = emulator_factory()
    src = awkward_table(tmp_path, n_plain=293)  # 300 rows, two with images
    res = invoke(
        *args(
            tmp_path,
            emu,
            src,
            "--image-column",
            "image",
            "--image-dir",
            tmp_path / "images",
            "--system",
            "Answer in one line.",
            "--max-tokens",
            "100",
            "--temperature",
            "0",
            "--batch-size",
            "50",
        ),
        env=ENV,
    )
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    rows = assert_each_row_answered_once(emu, run_dir, 300)
    # Source columns come back exactly as written, in source order.
    plain = [[f"p{i:05d}", f"item {i}", f"{i}.50", f"plain row {i}", ""] for i in range(293)]
    assert [[r[h] for h in HEADER] for r in rows] == [*AWKWARD_ROWS, *plain]
    by_sku = {r["sku"]: r for r in rows}
    assert "[1 image:" in by_sku["007"]["response"] and "[1 image:" in by_sku["011"]["response"]
    assert {r["model"] for r in rows} == {MODEL}
    assert all(int(r["prompt_tokens"]) > 0 and float(r["cost_usd"]) > 0 for r in rows)
    # One job per chunk, created once, its id in the batch_id column; each deleted once
    # collected (batches.delete).
    assert emu.stats()["dialects"]["gemini"]["created"] == 6 and jobs(emu) == []
    assert emu.stats()["calls"]["DELETE /v1/batches/{id} (gemini)"] == 6
    with sqlite3.connect(run_dir / "state.db") as db:
        made = {b for (b,) in db.execute("SELECT batch_id FROM batches")}
    assert len(made) == 6 and {r["batch_id"] for r in rows} == made
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["batches_by_status"] == {"BATCH_STATE_SUCCEEDED": 6}
    assert st["rows"]["succeeded"] == 300


def test_shuffled_results_are_joined_by_key(emulator_factory, tmp_path: Path):
    emu = emulator_factory(seed=7)  # results come back shuffled (shuffle_output is on)
    src = awkward_table(tmp_path, n_plain=43, images=False)
    res = invoke(*args(tmp_path, emu, src, "--batch-size", "25"), env=ENV)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    assert_each_row_answered_once(emu, run_dir, 50)
    # The downloaded result files really are out of order with respect to the chunk files.
    shuffled = 0
    for out in (run_dir / "outputs").glob("*.jsonl"):
        keys = [json.loads(x)["key"] for x in out.read_text(encoding="utf-8").splitlines()]
        sent = {
            tuple(json.loads(x)["custom_id"] for x in f.read_text(encoding="utf-8").splitlines())
            for f in (run_dir / "inputs").glob("*.jsonl")
        }
        assert any(sorted(keys) == sorted(s) for s in sent)
        shuffled += tuple(keys) not in sent
    assert shuffled >= 1
    # Collected: the uploaded inputs and the result files are deleted remotely (the run dir
    # keeps copies), and no delete went wrong.
    files = emu.stats()["files"]
    assert files["uploaded"] == 2 and files["live"] == 0, files
    assert "could not delete" not in all_logs(tmp_path / "logs")
    assert jobs(emu) == []  # the collected jobs too (batches.delete)


def test_partial_expiry_keeps_finished_rows(emulator_factory, tmp_path: Path):
    emu = emulator_factory(expire_first_n=2, expire_done_fraction=0.5)
    src = awkward_table(tmp_path, n_plain=33, images=False)
    res = invoke(*args(tmp_path, emu, src, "--batch-size", "10"), env=ENV)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    # Every row ran exactly once: the finished half of an expired job was kept, not re-sent.
    assert_each_row_answered_once(emu, run_dir, 40)
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["batches_by_status"]["BATCH_STATE_EXPIRED"] == 2
    expired = [b for b in st["batches"] if b["status"] == "BATCH_STATE_EXPIRED"]
    assert all(0 < (b["request_completed"] or 0) < b["request_total"] for b in expired)


def docs_config(tmp: Path, emu: Any) -> Path:
    """The configuration docs/providers.md shows under "## Gemini", on the emulator."""
    text = (Path(__file__).parent.parent / "docs" / "providers.md").read_text(encoding="utf-8")
    section = text[text.index("## Gemini") :]
    block = section[
        section.index("```toml") + len("```toml") : section.index(
            "```", section.index("```toml") + 7
        )
    ]
    assert 'provider = "gemini"' in block and "# base_url" in block
    block = re.sub(r"^# base_url = .*$", f'base_url = "{emu.root_url}"', block, flags=re.M)
    path = tmp / "docs.toml"
    path.write_text(block, encoding="utf-8")
    return path


def test_docs_configuration_fails_over_from_openai_to_gemini(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-4o-mini": 0})  # OpenAI's quota is gone
    src = awkward_table(tmp_path, n_plain=33, images=False)
    run = args(tmp_path, emu, src, "--batch-size", "10", "--base-url", emu.base_url)
    run[run.index("--config") + 1] = docs_config(tmp_path, emu)
    res = invoke(*run, env=ENV)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    rows = assert_each_row_answered_once(emu, run_dir, 40)
    assert {r["model"] for r in rows} == {MODEL}
    assert emu.stats()["dialects"]["gemini"]["created"] == 4  # every chunk went to Gemini, once
    assert emu.stats()["batches"]["created"] == 0  # OpenAI refused at create: nothing ran there
    log = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "logs").glob("*.log"))
    assert "gk-…abcd" in log and GKEY not in log  # the key is masked, never written


def test_online_mode_goes_through_generate_content(emulator_factory, tmp_path: Path):
    emu = emulator_factory()
    src = awkward_table(tmp_path, n_plain=13)
    res = invoke(
        *args(
            tmp_path,
            emu,
            src,
            "--mode",
            "online",
            "--workers",
            "4",
            "--image-column",
            "image",
            "--image-dir",
            tmp_path / "images",
        ),
        env=ENV,
    )
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert len(stats) == 20 and all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    rows = read_csv(tmp_path / "run" / "final_output.csv")
    assert {r["status"] for r in rows} == {"succeeded"} and {r["batch_id"] for r in rows} == {""}
    assert "[1 image:" in {r["sku"]: r for r in rows}["011"]["response"]
    assert emu.stats()["calls"][CREATE] == 20  # generateContent, once per row


def test_quota_on_gemini_create_stops_with_exit_3(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={MODEL: 0})
    src = awkward_table(tmp_path, n_plain=3, images=False)
    res = invoke(*args(tmp_path, emu, src, "--batch-size", "5"), env=ENV)
    assert res.exit_code == 3, res.output
    assert executions(emu) == {}
    assert "quota" in res.output.lower()
    assert jobs(emu) == []


def _counter(emu: Any, what: str) -> int:
    s = emu.stats()
    if what == "created":
        return s.get("dialects", {}).get("gemini", {}).get("created", 0)
    if what == "uploaded":
        return s["files"]["uploaded"]
    return s["calls"].get(what, 0)


@pytest.mark.slow
def test_kill_9_during_upload_and_create_never_duplicates_a_job(emulator_factory, tmp_path: Path):
    """12 fixed kill points, alternating: SIGKILL the moment the server has carried out an
    upload or a create (the client may not have its answer yet). Every 4th call is carried
    out and then its connection dropped, so some uploads and creates are never answered at
    all (the client is killed while it looks them up): only reconcile, by display name, can
    find them. Each run gets at most one chunk further, so every point is reached."""
    emu = emulator_factory(
        drop_connection_every=4,
        drop_after_processing=True,
        slow_response_seconds=0.05,
        in_progress_seconds=0.1,
        seed=3,
    )
    src = awkward_table(tmp_path, n_plain=113, images=False)
    # Jobs kept: the listing at the end shows none was created twice.
    run = args(tmp_path, emu, src, "--batch-size", "7", "--keep-remote-files")
    kinds = ["uploaded", "created"]  # one of each per chunk: 17 chunks hold 12 points
    kills = 0
    for point in range(12):
        what = kinds[point % len(kinds)]
        before = _counter(emu, what)
        proc = subprocess_run(run, env=ENV)
        deadline = time.monotonic() + 60
        while _counter(emu, what) == before and proc.poll() is None:
            assert time.monotonic() < deadline, f"the run never reached kill point {what}"
            time.sleep(0.002)
        if proc.poll() is not None:
            break  # the run ended before this point
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 10
    final = subprocess_run(run, env=ENV)
    _, err = final.communicate(timeout=180)
    assert final.returncode == 0, err.decode()
    run_dir = tmp_path / "run"
    assert_each_row_answered_once(emu, run_dir, 120)
    emu.update_scenario(drop_connection_every=0)  # the test's own listing below
    # No chunk attempt was ever created twice: display names (run/chunk/attempt) are unique.
    names = Counter(j.display_name for j in jobs(emu))
    assert names and max(names.values()) == 1, names
    assert emu.stats()["dialects"]["gemini"]["created"] == len(names)


def test_enqueued_token_limit_failure_is_paced_not_a_row_failure(emulator_factory, tmp_path: Path):
    """A job over the enqueued-token limit FAILS (its error names the limit): the chunk waits
    and is sent again, split when it cannot fit on its own; no retry is charged, nothing is
    set aside. (The emulator counts only OpenAI batches as enqueued, so a Gemini job fails
    when it is over the limit by itself: the limit here is under one chunk.)"""
    src = awkward_table(tmp_path, n_plain=53, images=False)
    # Size the limit from a dry run: a chunk of 10 rows is over it, half a chunk fits.
    dry = args(tmp_path, type("E", (), {"root_url": "http://127.0.0.1:9"})(), src)
    dry[dry.index("--run-dir") + 1] = tmp_path / "dry"
    assert invoke(*dry, "--batch-size", "10", "--dry-run", env=ENV).exit_code == 0
    bodies = list(sent_bodies(tmp_path / "dry", folder="dry-run").values())
    tokens = [prompt_tokens(to_chat(MODEL, to_request(b)), CHAT) for b in bodies]
    per_chunk = max(sum(tokens[i : i + 10]) for i in range(0, len(tokens), 10))
    emu = emulator_factory(
        enqueued_token_limit={MODEL: int(per_chunk * 0.75)}, in_progress_seconds=0.1
    )
    res = invoke(*args(tmp_path, emu, src, "--batch-size", "10"), env=ENV)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    assert_each_row_answered_once(emu, run_dir, 60)
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    failed = [b for b in st["batches"] if b["status"] == "BATCH_STATE_FAILED"]
    assert failed and all("nqueued token limit" in b["errors"] for b in failed)
    assert st["retries"]["failed_attempts_by_class"] == {}  # no row was charged a retry
    assert all("exhausted" not in str(p.get("state")) for p in st["pool"])  # nothing set aside


def test_cancel_stops_jobs_and_a_resume_answers_every_row_once(emulator_factory, tmp_path: Path):
    emu = emulator_factory(stuck_first_n=1, stuck_seconds=3600)  # the first job never starts
    src = awkward_table(tmp_path, n_plain=13, images=False)
    res = invoke(*args(tmp_path, emu, src, "--batch-size", "10", "--no-wait"), env=ENV)
    assert res.exit_code in (0, 3), res.output
    run_dir = tmp_path / "run"
    res = invoke("cancel", "--run-dir", run_dir, env=ENV)
    assert res.exit_code in (0, 3), res.output
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["in_flight"] == 0
    assert st["batches_by_status"].get("BATCH_STATE_CANCELLED", 0) >= 1
    # The cancelled job ran nothing: its rows wait; resuming answers every row exactly once.
    res = invoke(*args(tmp_path, emu, src, "--batch-size", "10"), env=ENV)
    assert res.exit_code == 0, res.output
    assert_each_row_answered_once(emu, run_dir, 20)
