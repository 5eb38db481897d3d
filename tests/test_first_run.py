"""Issue 15: what a new user trips over on a first run. One regression test (or more) per item;
each failed on 21f444b. Items 5 and 7 wait for an engine change (strict xfail)."""

from __future__ import annotations

import json
import os
import re
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
from batchops.config import check_config
from batchops.emulator.testing import DEFAULT_KEY

REPO = Path(__file__).resolve().parents[1]
ONE_LINE = re.compile(r"\Abatchops: error: [^\n]+\n\Z")


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert ONE_LINE.match(res.stderr), res.stderr
    assert "Traceback" not in res.output
    return res.stderr


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
    package data) holds the sample, so `batchops demo` works from an installed copy."""
    res = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()"]
        + ["-q", "build_py", "--build-lib", str(tmp_path / "lib")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    built = tmp_path / "lib" / "batchops" / "sample"
    sample = REPO / "batchops" / "sample"
    for name in (
        "products.csv",
        "prompt.txt",
        *(f"images/{p.name}" for p in (sample / "images").iterdir()),
    ):
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


# ------------------------------------------------------------------- 4: --csv and --input


def test_csv_and_input_together_are_refused(tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    err = one_line_error(
        invoke("run", "--csv", src, "--input", src, "--prompt", "{name}", "--model", "m")
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
    assert not (run_dir / "source.parquet").exists() and not run_dir.exists()
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
