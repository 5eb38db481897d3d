"""The Python API: batchops.run(df, …) against the emulator — the input frame comes back as itself
plus the merged columns, structured answers as typed columns, and a notebook kernel restart (a
new Python process, same arguments) resumes without uploading anything again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydantic
import pytest
from cli_helpers import calls, executions, expected_answers, sent_bodies

import batchops
from batchops.emulator.answers import expected_answer
from batchops.emulator.testing import DEFAULT_KEY

ADDED = [
    "response",
    "status",
    "error",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "batch_id",
]


def sample_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sku": ["007", "0042", "010", "011", "012"],
            "qty": pd.array([7, None, 0, -3, 12], dtype="Int64"),
            "price": [19.9, 7.0, float("nan"), 0.1, 2.5],
            "in_stock": [True, False, True, True, False],
            "colour": pd.Categorical(["red", "blue", "red", None, "blue"]),
            "status": ["draft", "live", "live", "draft", "live"],  # clashes with a merged column
        },
        index=pd.Index([40, 10, 30, 20, 50], name="row"),
    )


@pytest.fixture
def api_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", DEFAULT_KEY)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)


def test_run_returns_the_input_frame_plus_merged_columns(emulator, tmp_path: Path, api_env):
    df = sample_frame()
    before = df.copy()
    out = batchops.run(
        df,
        prompt="{sku}: {qty} at {price}, in stock {in_stock}, {colour}",
        model="gpt-4o-mini",
        run_dir=tmp_path / "run",
        id_column="sku",
        base_url=emulator.base_url,
        poll_interval=0.05,
        batch_size=2,
    )
    pd.testing.assert_frame_equal(df, before)  # the caller's frame is not touched
    pd.testing.assert_frame_equal(out[list(df.columns)], df)  # index, dtypes, values
    names = ["batchops_status" if c == "status" else c for c in ADDED]
    assert list(out.columns) == [*df.columns, *names]
    assert (out["batchops_status"] == "succeeded").all()
    assert out["prompt_tokens"].dtype == "Int64" and out["cost_usd"].dtype == "float64"
    assert out["response"].to_dict() == {
        i: expected_answers(tmp_path / "run")[sku]
        for i, sku in zip(df.index, df["sku"], strict=True)
    }
    texts = {cid: b["messages"][-1]["content"] for cid, b in sent_bodies(tmp_path / "run").items()}
    assert texts["007"] == "007: 7 at 19.9, in stock true, red"
    assert texts["0042"] == "0042:  at 7.0, in stock false, blue"  # <NA> → ""
    assert texts["010"] == "010: 0 at , in stock true, red"  # NaN → ""
    assert (tmp_path / "run" / "source.parquet").exists()


class Verdict(pydantic.BaseModel):
    label: str
    confidence: float
    votes: int
    flags: list[str]
    reviewer: str | None = None


def test_schema_model_gives_typed_columns(emulator_factory, tmp_path: Path, api_env):
    emu = emulator_factory(invalid_json_fraction=0.3, seed=5)  # some answers retried
    df = sample_frame().drop(columns=["status"])
    out = batchops.run(
        df,
        prompt="Judge {sku}",
        model="gpt-4o-mini",
        run_dir=tmp_path / "run",
        schema=Verdict,
        base_url=emu.base_url,
        poll_interval=0.05,
    )
    assert list(out.columns[-5:]) == ["label", "confidence", "votes", "flags", "reviewer"]
    assert (out["status"] == "succeeded").all()
    assert out["votes"].dtype == "Int64" and out["confidence"].dtype == "float64"
    for _, row in out.iterrows():
        answer = Verdict.model_validate_json(row["response"])
        assert row["label"] == answer.label and row["votes"] == answer.votes
        assert list(row["flags"]) == answer.flags and row["confidence"] == answer.confidence
    body = next(iter(sent_bodies(tmp_path / "run").values()))
    assert body["response_format"]["json_schema"]["name"] == "Verdict"
    assert any(v["executed"] == 2 for v in executions(emu).values())


def restart_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {"sku": [f"s{i:03d}" for i in range(12)], "n": list(range(12))},
        index=[f"k{i}" for i in range(12)],
    )


RESTART_ARGS = "prompt='Item {sku} #{n}', model='gpt-4o-mini', id_column='sku', batch_size=4"

# The restarted kernel: a new Python process running the same cell again.
SCRIPT = f"""
import sys
import pandas as pd
import batchops

df = pd.DataFrame(
    {{"sku": [f"s{{i:03d}}" for i in range(12)], "n": list(range(12))}},
    index=[f"k{{i}}" for i in range(12)],
)
out = batchops.run(
    df, {RESTART_ARGS}, run_dir=sys.argv[1], base_url=sys.argv[2], poll_interval=0.05
)
out.to_pickle(sys.argv[3])
"""


def test_kernel_restart_resumes_without_new_uploads(emulator_factory, tmp_path: Path, api_env):
    emu = emulator_factory(in_progress_seconds=0.5)
    run_dir, result = tmp_path / "run", tmp_path / "out.pkl"
    kw = {
        "prompt": "Item {sku} #{n}",
        "model": "gpt-4o-mini",
        "id_column": "sku",
        "batch_size": 4,
        "run_dir": run_dir,
        "base_url": emu.base_url,
        "poll_interval": 0.05,
    }
    # First kernel: submits everything, then goes away before the batches finish.
    with pytest.raises(batchops.RunIncomplete):
        batchops.run(restart_frame(), wait=False, **kw)
    uploads, batches = calls(emu, "POST /v1/files"), calls(emu, "POST /v1/batches")
    assert uploads == 3 and batches == 3
    # Restarted kernel, same cell: picks the run up, uploads nothing, returns the frame.
    env = {**os.environ, "OPENAI_API_KEY": DEFAULT_KEY}
    env.pop("OPENAI_API_KEYS", None)
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(run_dir), emu.base_url, str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert calls(emu, "POST /v1/files") == uploads and calls(emu, "POST /v1/batches") == batches
    out = pd.read_pickle(result)
    assert list(out.index) == [f"k{i}" for i in range(12)]
    assert out["n"].tolist() == list(range(12)) and out["n"].dtype == "int64"
    assert (out["status"] == "succeeded").all()
    assert all(v["executed"] == 1 for v in executions(emu).values())
    # Run once more after the end: nothing is created remotely, the same frame comes back.
    before = {k: v for k, v in emu.stats()["calls"].items() if k.startswith("POST")}
    again = batchops.run(restart_frame(), **kw)
    assert {k: v for k, v in emu.stats()["calls"].items() if k.startswith("POST")} == before
    pd.testing.assert_frame_equal(again, out)


def test_a_different_frame_in_the_same_run_dir_is_refused(emulator, tmp_path: Path, api_env):
    kw = {
        "prompt": "{sku}",
        "model": "gpt-4o-mini",
        "run_dir": tmp_path / "run",
        "base_url": emulator.base_url,
        "poll_interval": 0.05,
    }
    df = sample_frame()
    batchops.run(df, **kw)
    changed = df.assign(sku=df["sku"] + "x")
    with pytest.raises(batchops.InputError, match="different DataFrame"):
        batchops.run(changed, **kw)
    out = batchops.run(changed, cleanup=True, **kw)  # start over on purpose
    # every answer is the one to its changed row's prompt, in the frame's order
    assert out["response"].tolist() == [
        expected_answer("gpt-4o-mini", {"messages": [{"role": "user", "content": f"{sku}"}]})
        for sku in changed["sku"]
    ]
    with pytest.raises(batchops.InputError, match="duplicate column names"):
        batchops.run(pd.DataFrame([[1, 2]], columns=["a", "a"]), **{**kw, "prompt": "{a}"})


def test_import_is_light_and_exports_the_api():
    code = (
        "import json, sys, batchops; "
        "heavy = [m for m in ('pandas', 'polars', 'openai', 'pyarrow') if m in sys.modules]; "
        "unresolved = [n for n in batchops.__all__ if getattr(batchops, n, None) is None]; "
        "print(json.dumps([heavy, unresolved, callable(batchops.merge), "
        "batchops.merge.merge_frames.__name__]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [[], [], True, "merge_frames"]
    for name in ("run", "status", "merge", "missing", "retry_missing", "cancel", "cost", "JobSpec"):
        assert name in batchops.__all__
