"""Endpoints end to end: /v1/embeddings and /v1/responses round-trip in batch mode, usage is
priced per endpoint, and --body-extra passes further body parameters through."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import awkward_table, invoke, read_csv, run_args, sent_bodies

from batchops import render
from batchops.emulator.answers import expected_embedding

# Our own prices (USD per 1M tokens), so the expected cost is plain arithmetic.
CONFIG = """
[prices."emb-test"]
input = 0.02
output = 0.0

[prices."resp-test"]
input = 1.0
output = 4.0
cached_input = 0.25
"""


def config(tmp: Path) -> Path:
    path = tmp / "batchops.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def output_usage(run_dir: Path) -> dict[str, dict]:
    """custom_id → usage, from the downloaded output files."""
    out = {}
    for f in (run_dir / "outputs").glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            out[rec["custom_id"]] = rec["response"]["body"]["usage"]
    return out


def test_embeddings_round_trip_with_body_extra(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=9, images=False)
    run_dir = tmp_path / "run"
    args = run_args(
        emulator,
        src,
        run_dir,
        "--endpoint",
        "/v1/embeddings",
        "--body-extra",
        '{"dimensions": 8, "user": "batchops-test"}',
        "--config",
        config(tmp_path),
        model="emb-test",
    )
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    bodies = sent_bodies(run_dir)
    prompts = {
        r["sku"]: render.render_text("Describe {name} ({price}): {description}", r)
        for r in read_csv(src)
    }
    for cid, body in bodies.items():
        assert body == {
            "model": "emb-test",
            "input": prompts[cid],
            "dimensions": 8,
            "user": "batchops-test",
        }

    # CSV: the vector as JSON text; cost = prompt tokens at the batch price (half of 0.02/M).
    out = read_csv(run_dir / "final_output.csv")
    for row in out:
        assert json.loads(row["response"]) == expected_embedding("emb-test", prompts[row["sku"]], 8)
        assert row["status"] == "succeeded" and row["completion_tokens"] == "0"
        assert float(row["cost_usd"]) == pytest.approx(int(row["prompt_tokens"]) * 0.01 / 1e6)
        assert int(row["prompt_tokens"]) > 0

    # Parquet: a list<double> column.
    assert invoke("merge", "--run-dir", run_dir, "-o", tmp_path / "o.parquet").exit_code == 0
    table = pq.read_table(tmp_path / "o.parquet")
    assert pa.types.is_list(table.schema.field("response").type) or pa.types.is_large_list(
        table.schema.field("response").type
    )
    assert table.schema.field("response").type.value_type == pa.float64()
    vectors = dict(zip(table["sku"].to_pylist(), table["response"].to_pylist(), strict=True))
    assert all(vectors[s] == expected_embedding("emb-test", p, 8) for s, p in prompts.items())

    # JSONL: a native list.
    assert invoke("merge", "--run-dir", run_dir, "-o", tmp_path / "o.jsonl").exit_code == 0
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["sku"] for x in lines] == list(prompts)
    assert all(x["response"] == vectors[x["sku"]] for x in lines)


def test_responses_round_trip_and_usage_priced(emulator_factory, tmp_path: Path):
    emu = emulator_factory(cached_tokens_fraction=0.5)
    src = awkward_table(tmp_path, n_plain=9, images=False)
    run_dir = tmp_path / "run"
    args = run_args(
        emu,
        src,
        run_dir,
        "--endpoint",
        "/v1/responses",
        "--system",
        "Answer briefly.",
        "--max-tokens",
        "60",
        "--config",
        config(tmp_path),
        model="resp-test",
    )
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    body = next(iter(sent_bodies(run_dir).values()))
    assert body["instructions"] == "Answer briefly." and body["max_output_tokens"] == 60
    assert body["input"][0]["content"][0]["type"] == "input_text"

    usage = output_usage(run_dir)
    out = read_csv(run_dir / "final_output.csv")
    assert len(out) == len(usage) == 16
    cached_seen = 0
    for row in out:
        u = usage[row["sku"]]
        cached = u["input_tokens_details"]["cached_tokens"]
        cached_seen += cached > 0
        assert row["response"].startswith("resp-test says:")
        assert int(row["prompt_tokens"]) == u["input_tokens"]
        assert int(row["completion_tokens"]) == u["output_tokens"]
        # batch price = half the override: uncached input 1.0, cached 0.25, output 4.0 per 1M
        want = (
            0.5
            * ((u["input_tokens"] - cached) * 1.0 + cached * 0.25 + u["output_tokens"] * 4.0)
            / 1e6
        )
        assert float(row["cost_usd"]) == pytest.approx(want, rel=1e-9)
    assert cached_seen  # the cached-token path was exercised
    cost = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)
    assert cost["total_usd"] == pytest.approx(sum(float(r["cost_usd"]) for r in out))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("{not json", "--body-extra: not valid JSON"),
        ("[1, 2]", "--body-extra: expected a JSON object"),
        ('{"model": "other"}', "'model'"),
        ('{"stream": true}', "stream"),
        ('{"n": 3}', "sets 'n' to 3: each row gets one answer"),  # choices 2..3 were dropped
    ],
)
def test_bad_body_extra_exits_2_naming_it(emulator, tmp_path: Path, extra, message):
    src = awkward_table(tmp_path, images=False)
    res = invoke(*run_args(emulator, src, tmp_path / "run", "--body-extra", extra))
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output + res.stderr
    assert emulator.stats()["files"]["uploaded"] == 0


def test_body_extra_reaches_chat_requests(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emulator, src, run_dir, "--body-extra", '{"top_p": 0.5, "seed": 7}')
    assert invoke(*args).exit_code == 0
    assert all(b["top_p"] == 0.5 and b["seed"] == 7 for b in sent_bodies(run_dir).values())
    assert {r["status"] for r in read_csv(run_dir / "final_output.csv")} == {"succeeded"}


def test_embeddings_from_a_parquet_source_land_as_a_list_column(emulator, tmp_path: Path):
    src = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": [3, 1, 2], "text": ["alpha", "beta", "gamma"]}), src)
    run_dir = tmp_path / "run"
    res = invoke(
        "run",
        "--input",
        src,
        "--id-column",
        "id",
        "--prompt",
        "{text}",
        "--endpoint",
        "/v1/embeddings",
        "--model",
        "text-embedding-3-small",
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
    frame = pl.read_parquet(run_dir / "final_output.parquet")
    assert frame.schema["id"] == pl.Int64 and frame.schema["response"] == pl.List(pl.Float64)
    assert frame["id"].to_list() == [3, 1, 2]
    for text, vec in zip(frame["text"], frame["response"], strict=True):
        assert vec.to_list() == expected_embedding("text-embedding-3-small", text)
    assert (frame["cost_usd"] > 0).all()  # priced from the library
