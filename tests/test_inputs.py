"""Inputs: Parquet and JSONL sources through the real CLI and the emulator — prompts rendered
from typed values the way a user expects, merged output in the source's own format with every
source value unchanged."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import executions, expected_answers, invoke, read_csv, sent_bodies

from batchops.merge import MERGED_COLUMNS
from batchops.source import iter_frames, open_source, render_arrow, render_value
from batchops.spec import JobSpec, ModelEntry


def run_cmd(emu, src: Path, run_dir: Path, prompt: str, *extra) -> list:
    return [
        "run",
        "--input",
        src,
        "--prompt",
        prompt,
        "--model",
        "gpt-4o-mini",
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


def typed_table() -> pa.Table:
    return pa.table(
        {
            "sku": ["007", "0042", "010", "011"],
            "qty": pa.array([7, None, 0, -3], pa.int64()),
            "price": [19.9, 7.0, None, 0.1],
            "small": pa.array([1, 2, None, 4], pa.int8()),
            "ok": [True, False, None, True],
            "cost": pa.array(
                [Decimal("19.90"), Decimal("1.00"), None, Decimal("0.05")], pa.decimal128(6, 2)
            ),
            "when": pa.array(
                [datetime(2024, 1, 2, 3, 4, 5), None, datetime(2024, 1, 2, 3, 4, 5, 120), None],
                pa.timestamp("us"),
            ),
            "day": pa.array([date(2024, 1, 2), None, None, date(1999, 12, 31)], pa.date32()),
            "tags": [["a", "b"], [], None, ["c"]],
            "dims": [{"w": 1.5, "h": 2}, None, {"w": None, "h": 3}, {"w": 0.0, "h": 0}],
            "colour": pa.array(["red", "blue", "red", None]).dictionary_encode(),
            "text": ["Hello", "", None, 'line\nbreak, "quoted"'],
        }
    )


PROMPT = "{sku}|{qty}|{price}|{small}|{ok}|{cost}|{when}|{day}|{tags}|{dims}|{colour}|{text}"
RENDERED = {
    "007": '007|7|19.9|1|true|19.90|2024-01-02T03:04:05|2024-01-02|["a","b"]|{"w":1.5,"h":2}|red|Hello',
    "0042": "0042||7.0|2|false|1.00|||[]||blue|",
    "010": '010|0|||||2024-01-02T03:04:05.000120|||{"w":null,"h":3}|red|',
    "011": '011|-3|0.1|4|true|0.05||1999-12-31|["c"]|{"w":0.0,"h":0}||line\nbreak, "quoted"',
}


def test_parquet_source_round_trips_with_its_types(emulator, tmp_path: Path):
    original = typed_table()
    src = tmp_path / "items.parquet"
    pq.write_table(original, src)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_cmd(emulator, src, run_dir, PROMPT, "--id-column", "sku", "--batch-size", "3")
    )
    assert res.exit_code == 0, res.output

    # Prompts: ints without ".0" (nulls or not), floats shortest, bools true/false, decimals
    # with their scale, ISO dates, nested values as compact JSON, null as "".
    texts = {cid: b["messages"][-1]["content"] for cid, b in sent_bodies(run_dir).items()}
    assert texts == RENDERED

    # final_output.parquet: the source columns exactly as they were, types included.
    merged = pq.read_table(run_dir / "final_output.parquet")
    assert merged.column_names == original.column_names + MERGED_COLUMNS
    assert merged.select(original.column_names).equals(original)
    want = expected_answers(run_dir)
    assert dict(zip(merged["sku"].to_pylist(), merged["response"].to_pylist(), strict=True)) == want
    assert set(merged["status"].to_pylist()) == {"succeeded"}

    # The same run merged to CSV: the cells are the rendered texts.
    assert invoke("merge", "--run-dir", run_dir, "-o", tmp_path / "o.csv").exit_code == 0
    for row in read_csv(tmp_path / "o.csv"):
        cells = [row[c] for c in original.column_names]
        assert "|".join(cells) == RENDERED[row["sku"]]


JSONL_LINES = [
    '{"id": "a1", "n": 7, "x": 1.50, "flag": true, "tags": ["x", 1], "meta": {"k": null}, '
    '"note": "h\\u00e9llo \\u2028 sep"}',
    '  {"id":"a2","n":12345678901234567890123,"x":1e-7}  ',
    "",
    '{"id": "a3", "extra": "only here", "n": null}',
]
JSONL_RENDERED = {
    "a1": 'a1:7:1.5:true:["x",1]:{"k":null}:',
    "a2": "a2:12345678901234567890123:1e-07::::",
    "a3": "a3::::::only here",
}


@pytest.mark.parametrize("ext", [".jsonl", ".ndjson"])
def test_jsonl_source_round_trips_unchanged(emulator, tmp_path: Path, ext: str):
    src = tmp_path / f"rows{ext}"
    src.write_bytes(("\r\n".join(JSONL_LINES) + "\n").encode())
    run_dir = tmp_path / "run"
    prompt = "{id}:{n}:{x}:{flag}:{tags}:{meta}:{extra}"
    res = invoke(*run_cmd(emulator, src, run_dir, prompt, "--id-column", "id"))
    assert res.exit_code == 0, res.output
    texts = {cid: b["messages"][-1]["content"] for cid, b in sent_bodies(run_dir).items()}
    assert texts == JSONL_RENDERED

    # final_output.jsonl: each source object's own text, then the added keys.
    lines = (run_dir / "final_output.jsonl").read_text(encoding="utf-8").splitlines()
    originals = [x.strip() for x in JSONL_LINES if x.strip()]
    assert len(lines) == len(originals)
    want = expected_answers(run_dir)
    for line, orig in zip(lines, originals, strict=True):
        assert line.startswith(orig[:-1].rstrip())  # source bytes untouched (1.50, \u escapes)
        obj = json.loads(line)
        added = {k: obj.pop(k) for k in MERGED_COLUMNS}
        assert obj == json.loads(orig)  # every source value, big ints included
        assert added["status"] == "succeeded" and added["response"] == want[obj["id"]]
        assert isinstance(added["prompt_tokens"], int) and added["error"] is None


def test_jsonl_without_ids_and_clashing_keys(emulator, tmp_path: Path):
    src = tmp_path / "r.jsonl"
    src.write_text('{"status": "draft", "t": "x"}\n{}\n', encoding="utf-8")
    run_dir = tmp_path / "run"
    assert invoke(*run_cmd(emulator, src, run_dir, "T={t}")).exit_code == 0
    rows = [json.loads(x) for x in (run_dir / "final_output.jsonl").read_text().splitlines()]
    assert rows[0]["status"] == "draft" and rows[0]["batchops_status"] == "succeeded"
    assert rows[1]["batchops_status"] == "succeeded" and "status" not in rows[1]
    assert set(executions(emulator)) == {"0", "1"}


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    [
        ("bad.jsonl", '{"a": 1}\n{"a": 2,}\n', [], "line 2 is not valid JSON"),
        ("arr.jsonl", '{"a": 1}\n\n[1, 2]\n', [], "line 3 is an array, not a JSON object"),
        ("dup.jsonl", '{"a": 1}\n{"a": 1.0}\n{"a": 1}\n', ["--id-column", "a"], "duplicate"),
        ("noid.jsonl", '{"a": 1}\n', ["--id-column", "b"], "no such column"),
        ("empty.jsonl", "\n\n", [], "no data rows"),
        ("x.parquet", "not parquet", [], "not a readable Parquet file"),
    ],
)
def test_bad_inputs_exit_2_before_uploading(emulator, tmp_path, name, content, extra, message):
    src = tmp_path / name
    src.write_text(content, encoding="utf-8")
    res = invoke(*run_cmd(emulator, src, tmp_path / "run", "{a}", *extra))
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert emulator.stats()["files"]["uploaded"] == 0


def test_parquet_duplicate_ids_are_named(emulator, tmp_path: Path):
    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [5, 6, 5], "t": ["a", "b", "c"]}), src)
    res = invoke(*run_cmd(emulator, src, tmp_path / "run", "{t}", "--id-column", "id"))
    assert res.exit_code == 2 and '"5" (rows 0, 2)' in res.stderr


# ------------------------------------------------------------------ units


def spec_for(path: Path, fmt: str, **kw) -> JobSpec:
    return JobSpec(
        source=str(path),
        source_format=fmt,
        prompt="{t}",
        models=[ModelEntry(name="m")],
        **kw,
    )


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_slices_and_only_rows_stream_like_csv(tmp_path: Path, fmt: str):
    n = 1000
    path = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        pq.write_table(
            pa.table({"t": [f"r{i}" for i in range(n)], "i": range(n)}), path, row_group_size=77
        )
    else:
        path.write_text("".join(f'{{"t": "r{i}", "i": {i}}}\n' for i in range(n)), encoding="utf-8")
    src = open_source(spec_for(path, fmt, start_row=100, end_row=900))
    assert src.total_rows == n and src.n_rows == 800
    frames = list(iter_frames(src, batch_rows=64))
    assert all(f.height <= 64 for f in frames)
    got = [r for f in frames for r in f.select("t", "i", "__row_idx").iter_rows()]
    assert got == [(f"r{i}", str(i), i) for i in range(100, 900)]
    wanted = [5, 150, 151, 599, 899, 900, 950]
    rows = [r for f in iter_frames(src, only_rows=wanted) for r in f["__row_idx"].to_list()]
    assert rows == [150, 151, 599, 899]  # positions outside the slice are ignored


def test_render_rules():
    assert render_value(None) == "" and render_value("007") == "007"
    assert render_value(True) == "true" and render_value(False) == "false"
    assert render_value(7) == "7" and render_value(7.0) == "7.0" and render_value(0.1) == "0.1"
    assert render_value(2**70) == str(2**70)
    assert render_value({"a": [1, None]}) == '{"a":[1,null]}'
    assert render_value([2**70]) == f"[{2**70}]"
    arrow = pa.array
    assert render_arrow(arrow([1, None, 2**63 - 1])).to_pylist() == ["1", "", str(2**63 - 1)]
    assert render_arrow(arrow([2**64 - 1], pa.uint64())).to_pylist() == [str(2**64 - 1)]
    assert render_arrow(arrow([0.1, None], pa.float32())).to_pylist() == ["0.1", ""]
    assert render_arrow(arrow([1 / 3, 1e20, float("inf")])).to_pylist() == [
        "0.3333333333333333",
        "1e+20",
        "inf",
    ]
    ts = arrow([datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)], pa.timestamp("ms", tz="UTC"))
    assert render_arrow(ts).to_pylist() == ["2024-05-06T07:08:09+00:00"]
    assert render_arrow(arrow([None, None], pa.null())).to_pylist() == ["", ""]
    assert render_arrow(arrow([b"\x00\xff"])).to_pylist() == ["AP8="]
    cat = arrow(["x", None, "y"]).dictionary_encode()
    assert render_arrow(cat).to_pylist() == ["x", "", "y"]
    nested = arrow([[{"a": 1}], None], pa.list_(pa.struct([("a", pa.int64())])))
    assert render_arrow(nested).to_pylist() == ['[{"a":1}]', ""]
    big = np.arange(3, dtype=np.int16)
    assert render_arrow(pa.array(big)).to_pylist() == ["0", "1", "2"]
