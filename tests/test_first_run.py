"""Issue 15: what a new user trips over on a first run. One regression test (or more) per item;
each failed on 21f444b. Items 5 and 7 wait for an engine change (strict xfail)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import (
    PNG_1x1,
    all_logs,
    awkward_table,
    invoke,
    read_csv,
    run_args,
    sent_bodies,
    write_csv,
)

import batchops
from batchops import api
from batchops.emulator.testing import DEFAULT_KEY

REPO = Path(__file__).resolve().parents[1]
ONE_LINE = re.compile(r"\Abatchops: error: [^\n]+\n\Z")


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert ONE_LINE.match(res.stderr), res.stderr
    assert "Traceback" not in res.output
    return res.stderr


# ------------------------------------------------------------------- 1: file order in tests


def test_no_test_picks_a_file_by_its_place_in_a_directory_listing():
    """glob/iterdir order is arbitrary: a test takes every file (all_logs) or sorts them."""
    listing = re.compile(r"\.(?:r?glob|iterdir)\(")

    def picks_one(line: str) -> bool:
        if not listing.search(line):
            return False
        first = re.search(r"(?:r?glob|iterdir)\([^)]*\)\)?\[0\]", line)
        return "next(" in line or (first is not None and "sorted(" not in line)

    offenders = [
        f"{path.name}:{n}"
        for path in sorted((REPO / "tests").glob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if picks_one(line)
    ]
    assert not offenders, offenders


# ------------------------------------------------------------------- 2: the demo's sample


def test_demo_sample_is_package_data_found_from_any_directory(tmp_path: Path, monkeypatch):
    from batchops.cli import sample_dir

    sample = sample_dir()
    assert (sample / "products.csv").is_file() and (sample / "prompt.txt").is_file()
    assert sample.resolve().parent == Path(batchops.__file__).resolve().parent
    monkeypatch.chdir(tmp_path)  # not the repository root
    res = invoke("demo", "--run-dir", tmp_path / "runs" / "demo", "--log-dir", tmp_path / "logs")
    assert res.exit_code == 0, res.output
    assert len(read_csv(tmp_path / "runs" / "demo" / "final_output.csv")) == 50


def test_a_non_editable_build_ships_the_sample(tmp_path: Path):
    """What `pip install .` puts in the wheel: setuptools' build_py output (packages plus
    package data) holds the sample, so `batchops demo` works from an installed copy. Built from
    a copy of the project, so the test writes nothing into the repository."""
    project = tmp_path / "project"
    shutil.copytree(
        REPO / "batchops", project / "batchops", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    res = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()"]
        + ["-q", "build_py", "--build-lib", str(tmp_path / "lib")],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    built = tmp_path / "lib" / "batchops" / "sample"
    sample = REPO / "batchops" / "sample"
    images = [f"images/{p.name}" for p in (sample / "images").iterdir()]
    for name in ("products.csv", "prompt.txt", *images):
        assert (built / name).read_bytes() == (sample / name).read_bytes(), name


def test_demo_with_a_missing_sample_leaves_no_log_file(tmp_path: Path):
    logs = tmp_path / "logs"
    res = invoke("demo", "--data-dir", tmp_path / "nowhere", "--log-dir", logs)
    assert "sample not found" in one_line_error(res)
    assert not logs.exists() or not list(logs.iterdir())


def test_bad_input_leaves_no_empty_log_file(tmp_path: Path):
    logs = tmp_path / "logs"
    res = invoke("run", "--csv", tmp_path / "missing.csv", "--prompt", "x", "--log-dir", logs)
    one_line_error(res)
    assert not logs.exists() or not list(logs.iterdir())


# ------------------------------------------------------------------- 3: --system placeholders


def system_table(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "a.png").write_bytes(PNG_1x1)
    return write_csv(
        tmp_path / "t.csv",
        ["sku", "name", "category", "image"],
        [
            ["a1", "mug", "kitchen", "a.png"],
            ["a2", "lamp", "", ""],
            ["a3", 'say "hi"', "ünï {x}", ""],
        ],
    )


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize("image", [False, True])
def test_system_placeholders_are_rendered_per_row(tmp_path: Path, endpoint: str, image: bool):
    src = system_table(tmp_path)
    extra: list[str] = []
    if image:  # the row-by-row builder (image rows) renders the same way
        extra = ["--image-column", "image", "--image-dir", tmp_path / "img"]
    fake = type("E", (), {"base_url": "http://127.0.0.1:9/v1"})()
    args = run_args(fake, src, tmp_path / "run", "--dry-run", "--endpoint", endpoint, *extra)
    args[args.index("--prompt") + 1] = "Describe {name}"
    res = invoke(*args, "--system", "You sort {category} goods; {{braces}} stay.")
    assert res.exit_code == 0, res.output
    bodies = sent_bodies(tmp_path / "run", "dry-run")
    want = {
        "a1": "You sort kitchen goods; {braces} stay.",
        "a2": "You sort  goods; {braces} stay.",
        "a3": "You sort ünï {x} goods; {braces} stay.",
    }
    assert set(bodies) == set(want)
    for cid, body in bodies.items():
        if endpoint == "/v1/responses":
            got = body["instructions"]
        else:
            got = body["messages"][0]["content"]
            assert body["messages"][0]["role"] == "system"
        assert got == want[cid], cid


def test_system_without_placeholders_is_one_text_with_literal_braces(tmp_path: Path):
    fake = type("E", (), {"base_url": "http://127.0.0.1:9/v1"})()
    src = system_table(tmp_path)
    res = invoke(*run_args(fake, src, tmp_path / "run", "--dry-run"), "--system", "JSON {{}}")
    # the default prompt of run_args names columns this table lacks: use its own
    assert res.exit_code == 2
    args = run_args(fake, src, tmp_path / "run", "--dry-run")
    args[args.index("--prompt") + 1] = "{name}"
    res = invoke(*args, "--system", "Answer in JSON {{}}.")
    assert res.exit_code == 0, res.output
    systems = {
        b["messages"][0]["content"] for b in sent_bodies(tmp_path / "run", "dry-run").values()
    }
    assert systems == {"Answer in JSON {}."}


def test_system_unknown_placeholder_is_exit_2_before_anything_is_built(tmp_path: Path):
    fake = type("E", (), {"base_url": "http://127.0.0.1:9/v1"})()
    src = system_table(tmp_path)
    args = run_args(fake, src, tmp_path / "run", "--dry-run")
    args[args.index("--prompt") + 1] = "{name}"
    err = one_line_error(invoke(*args, "--system", "About {categry}"))
    assert "--system" in err and "{categry}" in err and "{category}" in err
    assert not (tmp_path / "run" / "dry-run").exists()


def test_request_body_takes_the_rendered_system_text():
    from batchops.render import request_body, system_text

    spec = api.build_spec(
        source_path="x.csv", prompt="{a}", models=["gpt-4o-mini"], system="Role: {b} {{ok}}"
    )
    row = {"a": "1", "b": "judge"}
    body = request_body(spec, "gpt-4o-mini", "1", system=system_text(spec, row))
    assert body["messages"][0] == {"role": "system", "content": "Role: judge {ok}"}


def test_online_mode_renders_system_placeholders_too(emulator, tmp_path: Path):
    """The same rows through synchronous calls get the same rendered system message as the
    batch files (seen through the prompt tokens the emulator counted for each row)."""
    from batchops.emulator.answers import prompt_tokens

    src = system_table(tmp_path)
    system = ["--system", "Sort {category} goods, long category names: {category} {category}"]
    args = run_args(emulator, src, tmp_path / "dry", "--dry-run")
    args[args.index("--prompt") + 1] = "Describe {name}"
    assert invoke(*args, *system).exit_code == 0
    want = {
        cid: prompt_tokens(b, "/v1/chat/completions")
        for cid, b in sent_bodies(tmp_path / "dry", "dry-run").items()
    }
    args = run_args(emulator, src, tmp_path / "run", "--mode", "online")
    args[args.index("--prompt") + 1] = "Describe {name}"
    res = invoke(*args, *system)
    assert res.exit_code == 0, res.output
    got = {
        o["sku"]: int(o["prompt_tokens"]) for o in read_csv(tmp_path / "run" / "final_output.csv")
    }
    assert got == want


# ------------------------------------------------------------------- 4: --csv and --input


def test_csv_and_input_together_are_refused(tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    err = one_line_error(
        invoke(
            "run",
            "--csv",
            src,
            "--input",
            src,
            "--prompt",
            "{name}",
            "--model",
            "m",
            "--log-dir",
            tmp_path / "logs",
        )
    )
    assert "--csv" in err and "--input" in err


# ------------------------------------------------------------------- 6: the Python API


@pytest.fixture
def api_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", DEFAULT_KEY)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)


def small_frame() -> pd.DataFrame:
    return pd.DataFrame({"sku": ["a", "b", "c"], "name": ["mug", "lamp", "desk"]})


def test_python_api_errors_name_keywords_and_leave_nothing_behind(tmp_path: Path, api_env):
    run_dir = tmp_path / "runs" / "nb"
    with pytest.raises(batchops.InputError) as err:
        batchops.run(small_frame(), prompt="Describe {nme}", model="gpt-4o-mini", run_dir=run_dir)
    text = str(err.value)
    assert "--" not in text and "prompt=" in text and "{name}" in text
    assert "the DataFrame" in text and "source.parquet" not in text
    assert not (run_dir / "source.parquet").exists() and not (tmp_path / "runs").exists()
    with pytest.raises(batchops.InputError, match=r"^batch_size=… must be ≥ 1$"):
        batchops.run(
            small_frame(), prompt="{name}", model="gpt-4o-mini", run_dir=run_dir, batch_size=0
        )
    assert not run_dir.exists()


def test_python_api_shows_progress_and_polls_often(
    emulator, tmp_path: Path, api_env, capsys: pytest.CaptureFixture[str]
):
    run_dir = tmp_path / "run"
    kw = {"prompt": "{name}", "model": "gpt-4o-mini", "base_url": emulator.base_url}
    # Submit only: the poll interval the API chose is saved with the run.
    with pytest.raises(batchops.RunIncomplete):
        batchops.run(small_frame(), run_dir=run_dir, wait=False, **kw)
    from batchops.rundir import open_existing

    run = open_existing(run_dir)
    assert run.spec.poll_interval == api.API_POLL_INTERVAL <= 5
    run.close()
    capsys.readouterr()
    out = batchops.run(
        small_frame(), run_dir=tmp_path / "run2", progress=True, poll_interval=0.05, **kw
    )
    assert (out["status"] == "succeeded").all()
    err = capsys.readouterr().err
    assert "batchops: estimate: 3 rows" in err
    assert "batchops: rows 3/3 done (3 succeeded" in err


def test_python_api_is_quiet_without_a_person_watching(
    emulator, tmp_path: Path, api_env, capsys: pytest.CaptureFixture[str]
):
    kw = {"prompt": "{name}", "model": "gpt-4o-mini", "base_url": emulator.base_url}
    batchops.run(small_frame(), run_dir=tmp_path / "run", poll_interval=0.05, **kw)
    captured = capsys.readouterr()  # not a terminal, not a notebook: no display of its own
    assert "batchops: " not in captured.err and captured.out == ""


# ------------------------------------------------------------------- 8: cost


def test_cost_of_an_online_run_is_the_online_estimate(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=10, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emulator, src, run_dir, "--mode", "online"))
    assert res.exit_code == 0, res.output
    printed = re.search(r"cost ≈ (\$[0-9.]+) at synchronous prices", res.output)
    assert printed is not None, res.output
    cost = invoke("cost", "--run-dir", run_dir)
    assert f"estimate: {printed.group(1)}" in cost.output
    data = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)
    assert data["estimate_usd"] > 0


def test_cost_of_a_model_without_a_price_is_unknown_not_zero(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=2, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emulator, src, run_dir, model="no-price-model-issue15"))
    assert res.exit_code == 0, res.output
    assert "spent unknown" in res.stdout and "spent $0.000000" not in res.stdout
    text = invoke("cost", "--run-dir", run_dir).output
    assert "total: unknown" in text and "$0.000000" not in text.split("total:")[1]
    data = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)
    assert data["total_usd"] is None and data["unpriced_requests"] == 9


# ------------------------------------------------------------------- 9: unknown model noise


def cli_process(args: list, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "OPENAI_API_KEY": DEFAULT_KEY, "NO_COLOR": "1", **(env or {})}
    full.pop("OPENAI_API_KEYS", None)
    return subprocess.run(
        [sys.executable, "-m", "batchops.cli", *map(str, args)],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unknown_model_warns_once_and_hints_retry_missing_model(emulator_factory, tmp_path: Path):
    emu = emulator_factory(models=["gpt-4o-mini"])
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    res = cli_process(run_args(emu, src, run_dir, model="gpt-nope-15"))
    assert res.returncode == 3, res.stderr
    assert res.stderr.count("No price known for model 'gpt-nope-15'") == 1, res.stderr
    assert "UnknownPriceWarning" not in res.stderr and "warnings.warn" not in res.stderr
    assert f"batchops retry-missing --run-dir {run_dir} --model" in res.stderr


def test_a_failed_batch_names_its_error_once(emulator_factory, tmp_path: Path):
    emu = emulator_factory(models=["gpt-4o-mini"])
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, model="gpt-nope-15b"))
    assert res.exit_code == 3
    cells = {o["error"] for o in read_csv(run_dir / "final_output.csv")}
    assert cells and all(c.count("model_not_found") == 1 for c in cells), cells
    assert all(line.count("model_not_found") <= 1 for line in res.output.splitlines())


# ------------------------------------------------------------------- 10: the emulator command


def test_emulator_on_a_busy_port_is_one_line_exit_2(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = cli_process(["emulator", "--port", port])
    assert res.returncode == 2, res.stderr
    assert (
        res.stderr
        == f"batchops: error: cannot listen on 127.0.0.1:{port}: already in use (give another --port)\n"
    )
    assert "http://" not in res.stderr + res.stdout


def test_emulator_stops_on_sigterm_without_resume_advice(tmp_path: Path):
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchops.cli", "emulator", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed once the port is bound
        assert first.startswith("emulator on http://127.0.0.1:"), first
        for line in proc.stderr:  # uvicorn says when it is serving
            if "startup complete" in line.lower():
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "state saved" not in rest and "run the same command" not in rest
    assert rest.rstrip().endswith("emulator stopped")


# ------------------------------------------------------------------- 11: contract and wording


def test_no_wait_exit_code_is_documented():
    from batchops.cli import cli

    text = invoke("run", "--help").output
    assert re.search(r"--no-wait\s+Submit and return with exit code 0", text), text
    assert "run --no-wait: every chunk submitted" in (cli.help or "")
    assert "Submit and return with exit code 0" in (REPO / "docs" / "cli.md").read_text()


def test_run_dir_and_data_dir_have_help():
    run_help = invoke("run", "--help").output
    assert re.search(r"--run-dir PATH\s+Folder of the run's state", run_help)
    demo_help = invoke("demo", "--help").output
    assert re.search(r"--data-dir PATH\s+Folder with products.csv", demo_help)


def test_batch_size_0_is_plain_words(tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    err = one_line_error(
        invoke(
            "run",
            "--csv",
            src,
            "--prompt",
            "{name}",
            "--model",
            "m",
            "--batch-size",
            "0",
            "--log-dir",
            tmp_path / "logs",
        )
    )
    assert err == "batchops: error: --batch-size must be ≥ 1\n"


def test_tiny_max_cost_is_printed_with_its_digits(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    res = invoke(*run_args(emulator, src, tmp_path / "run", "--max-cost", "0.0000001"))
    assert res.exit_code == 3, res.output
    assert "budget $0.0000001:" in res.stdout and "$0.0000001 left" in res.stdout


def test_cancel_status_and_resume_wording(emulator_factory, tmp_path: Path):
    emu = emulator_factory(in_progress_seconds=30)
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    first = invoke(*run_args(emu, src, run_dir, "--no-wait", "--batch-size", "10"))
    assert first.exit_code == 0 and "estimate:" in first.stdout, first.output
    # status: row counts once, and how old each remote state shown is
    text = invoke("status", "--run-dir", run_dir).stdout
    assert "rows:" not in text and len(re.findall(r"\bqueued\b", text)) == 1, text
    assert re.search(r"polled", text) and re.search(r"\d+s ago", text), text
    # resuming with nothing new to submit does not print the estimate again
    emu.update_scenario(in_progress_seconds=0.05)
    again = invoke(*run_args(emu, src, run_dir, "--batch-size", "10"))
    assert again.exit_code == 0, again.output
    assert "estimate:" not in again.stdout
    # cancel on a finished run: nothing was in flight
    res = invoke(
        "cancel", "--run-dir", run_dir, "--base-url", emu.base_url, "--log-dir", tmp_path / "logs"
    )
    assert res.exit_code == 0 and "nothing was in flight" in res.stdout, res.output
    assert "partial results" not in res.stdout


def test_after_a_cancel_status_says_requeued_not_retried(emulator_factory, tmp_path: Path):
    emu = emulator_factory(in_progress_seconds=30)
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emu, src, run_dir, "--no-wait")).exit_code == 0
    res = invoke(
        "cancel", "--run-dir", run_dir, "--base-url", emu.base_url, "--log-dir", tmp_path / "logs"
    )
    assert res.exit_code == 0 and "cancelled" in res.stdout, res.output
    text = invoke("status", "--run-dir", run_dir).stdout
    assert "20 row(s) re-queued after a cancel" in text, text
    assert not re.search(r"[1-9]\d* row\(s\) retried", text), text


def test_the_log_ends_with_a_summary_line(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    assert invoke(*run_args(emulator, src, tmp_path / "run")).exit_code == 0
    last = all_logs(tmp_path / "logs").strip().splitlines()[-1]
    assert re.search(
        r"finished: 10 succeeded, 0 failed, 0 skipped, 0 missing; spent \$[0-9.]+", last
    )
    assert re.search(r"elapsed \d+s$", last), last


# ------------------------------------------------------------------- 12: batchops.toml values


def test_bad_config_value_is_one_line_naming_file_key_and_choices(tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    cfg = tmp_path / "batchops.toml"
    cfg.write_text('[[models]]\nname = "gpt-4o-mini"\nprovider = "openia"\n', encoding="utf-8")
    err = one_line_error(
        invoke(
            "run",
            "--csv",
            src,
            "--prompt",
            "{name}",
            "--config",
            cfg,
            "--dry-run",
            "--log-dir",
            tmp_path / "logs",
        )
    )
    assert str(cfg) in err and "provider = 'openia'" in err and "'anthropic' or 'gemini'" in err
    cfg.write_text('mode = "fast"\nbatch_size = 0\n', encoding="utf-8")
    err = one_line_error(
        invoke(
            "run",
            "--csv",
            src,
            "--prompt",
            "{name}",
            "--config",
            cfg,
            "--log-dir",
            tmp_path / "logs",
        )
    )
    assert str(cfg) in err and "mode = 'fast'" in err and "'batch' or 'online'" in err


def test_every_config_example_in_the_docs_passes_the_check():
    blocks = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks += re.findall(r"```toml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert blocks
    import tomllib

    from batchops.config import check_config

    for block in blocks:
        check_config(tomllib.loads(block), "docs example")


# ------------------------------------------------------------------- 13: docs link inside


def test_docs_name_only_files_that_exist_in_the_repository():
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
                missing.append(f"{doc.name}: {target}")
        for path in re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:md|py|toml|json|csv|txt))`", text):
            if not path.startswith(("runs/", "logs/")) and not (REPO / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing


# ------------------------------------------------------------------- 5 and 7: engine fixes


def test_rows_missing_after_a_rejected_key_say_why(emulator_factory, tmp_path: Path):
    emu = emulator_factory(api_keys=["sk-the-only-key-the-server-takes-0000"])
    src = awkward_table(tmp_path, n_plain=23, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir))
    assert res.exit_code == 3
    # (the progress line's "30 in flight" with nothing uploaded is fixed: see the next test)
    assert not re.search(r"[1-9]\d* in flight, \d+ pending \| batches: none", res.output)
    invoke("missing", "--run-dir", run_dir)
    reasons = {r["error"] for r in read_csv(run_dir / "missing_rows.csv")}
    assert reasons and all("invalid_api_key" in r for r in reasons), reasons
    assert all(o["error"] != "no result recorded" for o in read_csv(run_dir / "final_output.csv"))


def test_rows_never_uploaded_are_not_called_in_flight():
    from batchops.engine import Progress
    from batchops.progress import ProgressDisplay, make_console

    display = ProgressDisplay(make_console(), live=False)
    display(Progress({"pending": 0, "queued": 30}, 0, {}, 0.0))
    assert "30 queued (not sent), 0 pending | batches: none" in display.line()
    display(Progress({"pending": 0, "queued": 30}, 2, {"in_progress": 2}, 0.0))
    assert "30 in flight" in display.line()


def test_rows_missing_after_an_unreachable_server_say_why(tmp_path: Path):
    fake = type("E", (), {"base_url": "http://127.0.0.1:9/v1"})()
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(fake, src, run_dir, "--retry-delay", "0.01", "--retry-max-delay", "0.02")
    )
    assert res.exit_code == 3
    assert "the server did not answer" in res.stderr and "OTHER-MODEL" not in res.stderr
    invoke("missing", "--run-dir", run_dir)
    missing = read_csv(run_dir / "missing_rows.csv")
    reasons = {r["error"] for r in missing}
    assert reasons and all(reasons), reasons
    # The class says what happened: the server did not answer (not "quota").
    assert {r["error_class"] for r in missing} == {"api_error"}


def test_a_server_that_refuses_connections_is_set_aside_without_lookups(tmp_path: Path):
    """A typo'd --base-url: nothing listens there, so no request ever left and nothing can
    exist remotely. Each failed upload used to be looked up (a `list files`, itself retried
    with backoff): ~3 minutes at the default delays before exit 3. Now: three tries with the
    job's backoff, no lookup, and the error says it could not connect."""
    fake = type("E", (), {"base_url": "http://127.0.0.1:9/v1"})()
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(fake, src, run_dir, "--retry-delay", "0.01", "--retry-max-delay", "0.02")
    )
    assert res.exit_code == 3, res.output
    assert "could not connect (http://127.0.0.1:9/v1)" in res.stderr
    log = all_logs(tmp_path / "logs")
    assert "remote call: list files" not in log  # never looked for what cannot exist
    assert log.count("nothing was sent; try") == 3
    assert "try 3 of 3" in log and "exhausted" in log


def test_a_base_url_that_is_no_batch_api_stops_with_a_hint(emulator, tmp_path: Path):
    """--base-url without its /v1 (or a server with no Batch API at all, like vLLM): every
    upload is a 404. It used to be tried again at every poll, for ever; now the endpoint is
    set aside (a retry cannot change a missing route): exit 3, each row says why, and the
    hint names --base-url and --mode online."""
    wrong = type("E", (), {"base_url": emulator.base_url.removesuffix("/v1") + "/api"})()
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(wrong, src, run_dir))
    assert res.exit_code == 3, res.output
    assert "--base-url" in res.stderr and "--mode online" in res.stderr
    invoke("missing", "--run-dir", run_dir)
    missing = read_csv(run_dir / "missing_rows.csv")
    assert missing and {r["error_class"] for r in missing} == {"invalid_request"}
    assert emulator.stats()["requests"] == {}  # nothing was ever executed


def test_a_trial_slice_can_be_extended_reusing_its_answers(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emulator, src, run_dir, "--end-row", "10")).exit_code == 0
    res = invoke(*run_args(emulator, src, run_dir))
    assert res.exit_code == 0, res.output
    assert len(read_csv(run_dir / "final_output.csv")) == 20
    assert all(v["executed"] == 1 for v in emulator.stats()["requests"].values())


def test_bad_input_exits_2_every_time_never_aborting_at_teardown(tmp_path: Path):
    """A bad placeholder after the source was read: exit 2 with one line, every time. Arrow
    readers left for the interpreter's teardown aborted ~1 exit in 10 with 134 ("terminate
    called without an active exception"); the CLI now collects them before it exits."""
    src = awkward_table(tmp_path, n_plain=20, images=False)
    env = {**os.environ, "OPENAI_API_KEY": DEFAULT_KEY, "NO_COLOR": "1"}
    args = [sys.executable, "-m", "batchops.cli", "run", "--csv", str(src)]
    args += ["--prompt", "Describe {nme}", "--model", "gpt-4o-mini", "--dry-run"]
    for i in range(12):
        args_i = [*args, "--run-dir", str(tmp_path / f"run{i}")]
        done = subprocess.run(args_i, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "did you mean {name}" in done.stderr
