"""End to end: the real CLI drives the real openai SDK against the emulator over localhost HTTP."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import openai
import polars as pl
import pytest
from cli_helpers import (
    AWKWARD_ROWS,
    PNG_1x1,
    awkward_table,
    calls,
    db_rows,
    executions,
    expected_answers,
    invoke,
    read_csv,
    run_args,
    write_csv,
)

from batchops.emulator.testing import DEFAULT_KEY

MERGED = [
    "response",
    "status",
    "error",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "batch_id",
]


def test_awkward_table_with_images_round_trips(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=30)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(
            emulator,
            src,
            run_dir,
            "--image-column",
            "image",
            "--image-dir",
            tmp_path / "images",
            "--batch-size",
            "8",
        )
    )
    assert res.exit_code == 0, res.output
    out = read_csv(run_dir / "final_output.csv")
    source = read_csv(src)
    assert len(out) == len(source)
    assert list(out[0]) == list(source[0]) + MERGED
    for s, o in zip(source, out, strict=True):  # source order, every cell byte-equal
        assert {k: o[k] for k in s} == s
    # Outputs come back shuffled: every answer must still sit on its own row.
    want = expected_answers(run_dir)
    assert {o["sku"]: o["response"] for o in out} == want
    assert all(o["status"] == "succeeded" and o["error"] == "" for o in out)
    assert all(int(o["prompt_tokens"]) > 0 and float(o["cost_usd"]) > 0 for o in out)
    # The image went as a base64 data URL of the unchanged bytes.
    body = json.loads(
        (run_dir / "inputs")
        .joinpath(sorted(p.name for p in (run_dir / "inputs").iterdir())[0])
        .read_text()
        .splitlines()[0]
    )["body"]
    parts = body["messages"][-1]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")
    stats = executions(emulator)
    assert len(stats) == len(source) and all(v["succeeded"] == 1 for v in stats.values())
    # Collected batches' inputs and result files are deleted remotely; the run dir keeps them.
    files = emulator.stats()["files"]
    assert files["live"] == 0 and files["deleted"] == 2 * files["uploaded"] > 0, files
    assert len(list((run_dir / "outputs").glob("*.jsonl"))) == files["uploaded"]


def test_missing_image_skips_that_row_and_exits_3(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    (tmp_path / "images" / "a.png").write_bytes(PNG_1x1)  # b.png stays missing
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(
            emulator, src, run_dir, "--image-column", "image", "--image-dir", tmp_path / "images"
        )
    )
    assert res.exit_code == 3, res.output
    out = {o["sku"]: o for o in read_csv(run_dir / "final_output.csv")}
    assert out["011"]["status"] == "skipped"
    assert "b.png" in out["011"]["error"]
    assert "011" not in executions(emulator)  # never sent
    assert sum(o["status"] == "succeeded" for o in out.values()) == len(AWKWARD_ROWS) - 1
    res = invoke("missing", "--run-dir", run_dir)
    assert res.exit_code == 0 and "skipped 1" in res.output
    assert "b.png" in (run_dir / "missing_rows.csv").read_text()
    # Fix the input and retry only what is missing.
    (tmp_path / "images" / "b.png").write_bytes((tmp_path / "images" / "a.png").read_bytes())
    res = invoke(
        "retry-missing",
        "--run-dir",
        run_dir,
        "--base-url",
        emulator.base_url,
        "--poll-interval",
        "0.05",
        "--log-dir",
        tmp_path / "logs",
    )
    assert res.exit_code == 0, res.output
    assert all(v["succeeded"] == 1 for v in executions(emulator).values())
    assert {o["status"] for o in read_csv(run_dir / "final_output.csv")} == {"succeeded"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id-column", "dup"], "duplicate"),
        (["--prompt", "Hello {colour}"], "{colour}"),
        (["--csv", "nope.csv"], "nope.csv"),
        (["--prompt", "{name!r}"], "{name!r}"),
        (["--id-column", "missing_col"], "missing_col"),
    ],
)
def test_bad_input_exits_2_and_uploads_nothing(
    emulator, tmp_path: Path, args: list[str], message: str
):
    src = write_csv(tmp_path / "t.csv", ["dup", "name"], [["1", "a"], ["2", "b"], ["1", "c"]])
    base = [
        "run",
        "--csv",
        src,
        "--prompt",
        "Hi {name}",
        "--model",
        "gpt-4o-mini",
        "--run-dir",
        tmp_path / "r",
        "--base-url",
        emulator.base_url,
        "--log-dir",
        tmp_path / "logs",
    ]
    for i in range(0, len(args), 2):  # later options override earlier ones
        if args[i] in base:
            j = base.index(args[i])
            base[j + 1] = args[i + 1]
        else:
            base += args[i : i + 2]
    res = invoke(*base)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert emulator.stats()["files"]["uploaded"] == 0


def test_no_wait_then_resume_and_merge_to_parquet(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=10, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emulator, src, run_dir, "--no-wait", "--batch-size", "5"))
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1:] == [
        "0 succeeded, 0 failed, 0 skipped, 17 missing; spent $0.000000; stopped: no-wait",
        f"submitted; follow with: batchops status --run-dir {run_dir}",
    ]
    assert not (run_dir / "final_output.csv").exists()
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["rows"]["queued"] == 17
    # Running the same command again resumes: nothing is uploaded twice.
    uploads = calls(emulator, "POST /v1/files")
    res = invoke(*run_args(emulator, src, run_dir, "--batch-size", "5"))
    assert res.exit_code == 0, res.output
    assert calls(emulator, "POST /v1/files") == uploads
    assert all(v["succeeded"] == 1 and v["executed"] == 1 for v in executions(emulator).values())
    res = invoke("merge", "--run-dir", run_dir, "-o", tmp_path / "out.parquet")
    assert res.exit_code == 0
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert frame["sku"].to_list()[:3] == ["007", "0042", "010"]
    assert frame["price"].to_list()[0] == "19.90"
    assert frame.schema["prompt_tokens"] == pl.Int64


def test_rerun_of_a_finished_run_sends_nothing(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emulator, src, run_dir)).exit_code == 0
    before = emulator.stats()["calls"]
    res = invoke(*run_args(emulator, src, run_dir))
    assert res.exit_code == 0
    assert emulator.stats()["calls"].get("POST /v1/batches") == before.get("POST /v1/batches")


def test_changed_job_in_same_run_dir_is_refused(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emulator, src, run_dir)).exit_code == 0
    args = run_args(emulator, src, run_dir)
    args[args.index("--prompt") + 1] = "Another prompt {name}"
    res = invoke(*args)
    assert res.exit_code == 2
    assert res.stderr == (
        f"batchops: error: {run_dir}: holds a run of a different job (prompt differ); use "
        "--cleanup or --keep-latest to start over, or another --run-dir\n"
    )
    res = invoke(*args, "--keep-latest")
    assert res.exit_code == 0
    assert list(tmp_path.glob("run.backup-*"))


def test_slice_and_row_number_ids(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=20, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emulator, src, run_dir, "--start-row", "5", "--end-row", "15")
    i = args.index("--id-column")
    del args[i : i + 2]
    assert invoke(*args).exit_code == 0
    out = read_csv(run_dir / "final_output.csv")
    assert len(out) == 10 and out[0]["sku"] == "013"  # row 5, 0-based
    assert set(executions(emulator)) == {str(i) for i in range(5, 15)}


def test_dry_run_uploads_nothing_and_prints_estimate(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=5, images=False)
    res = invoke(
        *run_args(emulator, src, tmp_path / "run", "--dry-run"), env={"OPENAI_API_KEY": ""}
    )
    assert res.exit_code == 0, res.output
    assert "estimate:" in res.output and "nothing uploaded" in res.output
    assert emulator.stats()["calls"] == {}
    assert list((tmp_path / "run" / "dry-run").glob("*.jsonl"))
    assert not (tmp_path / "run" / "state.db").exists()  # a dry run leaves no run behind
    # Its estimate is the one a real run prints before its first upload.
    dry = next(line for line in res.output.splitlines() if line.startswith("estimate:"))
    real = invoke(*run_args(emulator, src, tmp_path / "run"))
    assert real.exit_code == 0
    assert dry in real.output


def test_status_cost_cancel_commands(emulator_factory, tmp_path: Path):
    emu = emulator_factory(in_progress_seconds=30)
    src = awkward_table(tmp_path, n_plain=5, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emu, src, run_dir, "--no-wait")).exit_code == 0
    res = invoke("status", "--run-dir", run_dir)
    assert res.exit_code == 0 and "batchops watch" in res.output
    assert re.search(r"queued\s+│\s+12 ", res.output)  # the rows table (counts shown once)
    res = invoke(
        "cancel", "--run-dir", run_dir, "--base-url", emu.base_url, "--log-dir", tmp_path / "logs"
    )
    assert res.exit_code == 0, res.output
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["batches_by_status"] == {"cancelled": 1}
    assert st["rows"]["pending"] == 12  # nothing finished: every row goes back to the queue
    res = invoke("cost", "--run-dir", run_dir)
    assert res.exit_code == 0
    ((batch_id, est),) = db_rows(run_dir, "SELECT c.batch_id, c.est_cost FROM chunks c")
    # nothing ran: the batch's cost is unknown ("-"), the total spent is zero (a per-model line
    # comes before these when the batch was cancelled after validation: its cancelled lines)
    assert res.output.splitlines()[-3:] == [
        f"  {batch_id} chunk 1 cancelled: - (estimate ${est:.6f})",
        "total: $0.000000",
        f"estimate: ${est:.6f}",
    ]


def test_cost_of_a_cancelled_batch_names_its_model(emulator_factory, tmp_path):
    emu = emulator_factory(in_progress_seconds=30)
    src = awkward_table(tmp_path, n_plain=5, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emu, src, run_dir, "--no-wait")).exit_code == 0
    # Cancel once it runs (an event, not a delay): its 12 requests end as batch_cancelled lines.
    client = openai.OpenAI(base_url=emu.base_url, api_key=DEFAULT_KEY, max_retries=0)
    ((batch_id,),) = db_rows(run_dir, "SELECT batch_id FROM batches")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch_id).status == "validating":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    res = invoke(
        "cancel", "--run-dir", run_dir, "--base-url", emu.base_url, "--log-dir", tmp_path / "logs"
    )
    assert res.exit_code == 0, res.output
    by_model = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)["by_model"]
    assert [(m["model"], m["calls"]) for m in by_model] == [("gpt-4o-mini", 12)]


def test_status_of_unknown_run_dir_is_one_line(tmp_path: Path):
    res = invoke("status", "--run-dir", tmp_path / "nothing")
    assert res.exit_code == 2 and "no batchops run" in res.stderr
