"""Structured outputs end to end: --schema → response_format, every answer validated, invalid or
truncated answers retried (or reported), valid ones expanded into typed columns."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import polars as pl
import pydantic
import pytest
from cli_helpers import awkward_table, executions, invoke, read_csv, run_args, sent_bodies

from batchops import render, structured
from batchops.chunking import build_chunks
from batchops.records import RowOutcome
from batchops.source import open_source
from batchops.spec import JobSpec, ModelEntry

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

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},  # clashes with the source column "name"
        "score": {"type": "number"},
        "count": {"type": "integer"},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "dims": {
            "type": "object",
            "properties": {"w": {"type": "number"}},
            "required": ["w"],
            "additionalProperties": False,
        },
        "note": {"type": ["string", "null"]},
    },
    "required": ["name", "score", "count", "in_stock", "tags", "dims", "note"],
    "additionalProperties": False,
}
FIELDS = ["batchops_name", "score", "count", "in_stock", "tags", "dims", "note"]


def schema_file(tmp: Path, schema: dict = SCHEMA, name: str = "product.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(schema), encoding="utf-8")
    return path


def test_schema_job_yields_typed_columns_for_every_row(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emulator, src, run_dir, "--schema", schema_file(tmp_path), "--batch-size", "8")
    res = invoke(*args)
    assert res.exit_code == 0, res.output

    # Every request asked for the schema, strict, under the file's name.
    for body in sent_bodies(run_dir).values():
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "product", "schema": SCHEMA, "strict": True},
        }
    out = read_csv(run_dir / "final_output.csv")
    source = read_csv(src)
    assert list(out[0]) == list(source[0]) + MERGED + FIELDS
    for s, row in zip(source, out, strict=True):
        assert {k: row[k] for k in s} == s  # source cells untouched
        assert row["status"] == "succeeded" and row["error"] == ""
        answer = json.loads(row["response"])
        assert row["batchops_name"] == answer["name"]
        assert row["count"] == str(answer["count"])
        assert row["in_stock"] == ("true" if answer["in_stock"] else "false")
        assert json.loads(row["score"]) == answer["score"]
        assert json.loads(row["tags"]) == answer["tags"]
        assert row["dims"] == orjson.dumps(answer["dims"]).decode()  # nested: compact JSON
        assert row["note"] == (answer["note"] or "")

    # Parquet: the same fields, typed.
    assert invoke("merge", "--run-dir", run_dir, "-o", tmp_path / "o.parquet").exit_code == 0
    frame = pl.read_parquet(tmp_path / "o.parquet")
    assert {c: frame.schema[c] for c in FIELDS} == {
        "batchops_name": pl.String,
        "score": pl.Float64,
        "count": pl.Int64,
        "in_stock": pl.Boolean,
        "tags": pl.List(pl.String),
        "dims": pl.String,
        "note": pl.String,
    }
    for row in frame.iter_rows(named=True):
        answer = json.loads(row["response"])
        assert row["count"] == answer["count"] and row["tags"] == answer["tags"]
        assert row["in_stock"] is answer["in_stock"] and row["score"] == answer["score"]


def test_schema_violations_are_reported_with_the_reason(emulator_factory, tmp_path: Path):
    emu = emulator_factory(invalid_json_fraction=1.0)  # every first answer breaks the schema
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--schema", schema_file(tmp_path), "--max-retries", "0")
    res = invoke(*args)
    assert res.exit_code == 3, res.output
    out = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in out} == {"failed"}
    for r in out:
        assert (
            "answer violates the schema" in r["error"] and "is not of type 'object'" in r["error"]
        )
        assert r["count"] == "" and r["tags"] == ""  # no valid answer: no values
        assert int(r["completion_tokens"]) > 0  # the bad answer was billed and is accounted
    assert all(v["executed"] == 1 for v in executions(emu).values())  # not retried
    missing = invoke("missing", "--run-dir", run_dir)
    assert missing.exit_code == 0 and "failed 7" in missing.output
    assert "answer violates the schema" in (run_dir / "missing_rows.csv").read_text()


def test_schema_violations_are_retried_then_succeed(emulator_factory, tmp_path: Path):
    emu = emulator_factory(invalid_json_fraction=0.5, seed=3)
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emu, src, run_dir, "--schema", schema_file(tmp_path)))
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    retried = [cid for cid, v in stats.items() if v["executed"] == 2]
    assert retried and len(retried) < len(stats)  # some rows needed a second answer, once
    assert all(v["executed"] <= 2 for v in stats.values())
    out = read_csv(run_dir / "final_output.csv")
    assert all(r["status"] == "succeeded" and r["count"] != "" for r in out)
    assert all(json.loads(r["response"])["count"] == int(r["count"]) for r in out)


def test_schema_violations_are_retried_in_online_mode_too(emulator_factory, tmp_path: Path):
    emu = emulator_factory(invalid_json_fraction=0.5, seed=3)
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--schema", schema_file(tmp_path), "--mode", "online")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    stats = executions(emu)
    assert any(v["executed"] == 2 for v in stats.values())
    assert all(v["succeeded"] <= 2 and v["executed"] <= 2 for v in stats.values())
    out = read_csv(run_dir / "final_output.csv")
    assert all(json.loads(r["response"])["count"] == int(r["count"]) for r in out)


@pytest.mark.parametrize(
    ("retries", "exit_code", "status"), [("0", 3, "failed"), ("2", 0, "succeeded")]
)
def test_truncated_structured_answers(emulator_factory, tmp_path: Path, retries, exit_code, status):
    emu = emulator_factory(truncate_fraction=1.0)  # first answer cut (finish_reason length)
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--schema", schema_file(tmp_path), "--max-retries", retries)
    res = invoke(*args)
    assert res.exit_code == exit_code, res.output
    out = read_csv(run_dir / "final_output.csv")
    assert {r["status"] for r in out} == {status}
    if status == "failed":
        assert all("truncated" in r["error"] and "length" in r["error"] for r in out)
    else:
        assert all(json.loads(r["response"])["count"] == int(r["count"]) for r in out)


def test_retry_on_without_format_error_stops_paying_for_bad_answers(emulator_factory, tmp_path):
    emu = emulator_factory(invalid_json_fraction=1.0)
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--schema", schema_file(tmp_path), "--retry-on", "api_error")
    assert invoke(*args).exit_code == 3
    assert all(v["executed"] == 1 for v in executions(emu).values())


def test_responses_endpoint_sends_text_format_and_validates(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    args = run_args(
        emulator,
        src,
        run_dir,
        "--schema",
        schema_file(tmp_path),
        "--schema-name",
        "item info",
        "--schema-prefix",
        "ans_",
        "--endpoint",
        "/v1/responses",
    )
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    body = next(iter(sent_bodies(run_dir).values()))
    assert body["text"] == {
        "format": {"type": "json_schema", "name": "item_info", "schema": SCHEMA, "strict": True}
    }
    out = read_csv(run_dir / "final_output.csv")
    assert list(out[0])[-7:] == ["ans_" + f for f in SCHEMA["properties"]]  # prefix: no clash
    assert all(r["ans_name"] == json.loads(r["response"])["name"] for r in out)


@pytest.mark.parametrize(
    ("schema", "extra", "message"),
    [
        ("not json", [], "--schema"),
        (
            {"type": "object", "properties": {"a": {"type": "nonsense"}}},
            [],
            "not a valid JSON Schema",
        ),
        ({"type": "array", "items": {"type": "string"}}, [], "root must be an object"),
        ({"type": "object", "properties": {"a": {"type": "string"}}}, [], "--no-schema-strict"),
        (SCHEMA, ["--endpoint", "/v1/embeddings"], "/v1/embeddings"),
        (
            SCHEMA,
            ["--body-extra", '{"response_format": {"type": "json_object"}}'],
            "response_format",
        ),
    ],
)
def test_unusable_schema_exits_2_before_uploading(emulator, tmp_path: Path, schema, extra, message):
    path = tmp_path / "s.json"
    path.write_text(schema if isinstance(schema, str) else json.dumps(schema), encoding="utf-8")
    src = awkward_table(tmp_path, images=False)
    res = invoke(*run_args(emulator, src, tmp_path / "run", "--schema", path, *extra))
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert emulator.stats()["files"]["uploaded"] == 0


def test_non_strict_schema_is_sent_non_strict(emulator, tmp_path: Path):
    loose = {"type": "object", "properties": {"label": {"type": "string"}}}
    src = awkward_table(tmp_path, images=False)
    run_dir = tmp_path / "run"
    args = run_args(
        emulator, src, run_dir, "--schema", schema_file(tmp_path, loose), "--no-schema-strict"
    )
    assert invoke(*args).exit_code == 0
    body = next(iter(sent_bodies(run_dir).values()))
    assert body["response_format"]["json_schema"]["strict"] is False
    assert all(r["label"] for r in read_csv(run_dir / "final_output.csv"))


# ------------------------------------------------------------------ units


def spec_with(tmp_path: Path, **kw) -> JobSpec:
    src = awkward_table(tmp_path, n_plain=30, images=False)
    base = {
        "source": str(src),
        "prompt": "Describe {name}: {description}",
        "models": [ModelEntry(name="gpt-4o-mini")],
        "schema_": SCHEMA,
        "schema_name": "product",
        "id_column": "sku",
        "batch_size": 16,
    }
    return JobSpec(**{**base, **kw})


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses"])
def test_columnar_builder_carries_the_schema_on_every_line(tmp_path: Path, endpoint):
    spec = spec_with(tmp_path, endpoint=endpoint, system="Be brief.", max_tokens=50)
    src = open_source(spec)
    rows = {r["sku"]: r for r in read_csv(Path(spec.source))}
    n = 0
    for chunk in build_chunks(
        src, spec, model="gpt-4o-mini", out_dir=tmp_path / "in", first_chunk_no=1, fsync=False
    ):
        for line in chunk.path.read_bytes().splitlines():
            req = orjson.loads(line)
            text = render.render_text(spec.prompt, rows[req["custom_id"]])
            assert req == render.request_line(spec, "gpt-4o-mini", req["custom_id"], text)
            n += 1
    assert n == len(rows)


class Item(pydantic.BaseModel):
    title: str
    price: float
    qty: int | None = None
    tags: list[str] = []


def test_pydantic_model_becomes_a_strict_schema():
    schema, name = structured.resolve_schema(Item)
    assert name == "Item"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["title", "price", "qty", "tags"]
    assert "default" not in schema["properties"]["qty"]  # default None dropped, still nullable
    assert structured._strict_problem(schema) is None
    cols = structured.SchemaColumns(schema, "", ["title"])
    assert [(f.column, f.kind) for f in cols.fields] == [
        ("batchops_title", "string"),
        ("price", "number"),
        ("qty", "integer"),
        ("tags", "list:string"),
    ]


def test_check_outcome_rules(tmp_path: Path):
    spec = spec_with(tmp_path)
    good = orjson.dumps(
        {
            "name": "a",
            "score": 1,
            "count": 3.0,
            "in_stock": True,
            "tags": [],
            "dims": {"w": 1},
            "note": None,
        }
    ).decode()
    ok = RowOutcome("r1", True, response=good)
    assert structured.check_outcome(ok, spec) is ok
    bad = structured.check_outcome(RowOutcome("r1", True, response='{"name": "a"}'), spec)
    assert not bad.ok and bad.retryable and bad.error_class == "format_error"
    assert bad.error_message.startswith("answer violates the schema: ")
    assert "is a required property" in bad.error_message
    nested = json.loads(good)
    nested["dims"] = {"w": "wide"}
    msg = structured.check_outcome(RowOutcome("r1", True, response=json.dumps(nested)), spec)
    assert "['dims']['w']" in msg.error_message
    not_json = structured.check_outcome(RowOutcome("r1", True, response="Sure! {"), spec)
    assert not_json.error_code == "invalid_json" and not not_json.ok
    failed = RowOutcome("r1", False, error_class="format_error", error_code="length")
    assert structured.check_outcome(failed, spec) is failed
    plain = spec.model_copy(update={"schema_": None})
    assert structured.check_outcome(RowOutcome("r1", True, response="hi"), plain).ok
    # Parquet cells: 3.0 is a valid integer in JSON Schema and comes back as 3.
    cols = structured.SchemaColumns(SCHEMA, "", [])
    values = cols.values([good, None], [True, False])
    assert cols.arrow("count", values["count"]).to_pylist() == [3, None]
    assert cols.csv_text("in_stock", values["in_stock"]) == ["true", None]
