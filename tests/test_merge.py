"""batchops.merge: outcomes joined onto the source, streamed, written exactly and atomically."""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchops.merge as merge_mod
from batchops.errors import BatchopsError, InputError
from batchops.merge import (
    MERGED_COLUMNS,
    merge_frames,
    merged_column_names,
    read_merged,
)

AWKWARD = [
    "007",
    "19.90",
    "",
    "-0",
    "1e5",
    "null",
    "NA",
    "None",
    "nan",
    "TRUE",
    " padded ",
    'she said "hi"',
    '"',
    "a,b",
    "line1\nline2",
    "crlf1\r\ncrlf2",
    "trailing newline\n",
    "中文字符",
    "emoji 😀👍🏽",
    "tab\tinside",
    "#not a comment",
    "=1+2",
    "0x1F",
]


def write_source_csv(path: Path, header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(data)
    return data


def source_frames(
    path: Path, chunk: int, *, id_col: str | None = None, offset: int = 0
) -> Iterator[pl.DataFrame]:
    """What batchops.source produces: all-String frames + __row_idx / __row_id, in row order."""
    df = pl.read_csv(path, infer_schema=False, empty_string_is_null=False)
    df = df.with_columns(
        (pl.int_range(pl.len(), dtype=pl.Int64) + offset).alias("__row_idx"),
    ).with_columns(
        (pl.col(id_col) if id_col else pl.col("__row_idx").cast(pl.String)).alias("__row_id")
    )
    for start in range(0, df.height, chunk):
        yield df.slice(start, chunk)


def outcomes_frame(rows: list[dict]) -> pl.DataFrame:
    schema = {
        "row_idx": pl.Int64,
        "response": pl.String,
        "status": pl.String,
        "error": pl.String,
        "model": pl.String,
        "prompt_tokens": pl.Int64,
        "completion_tokens": pl.Int64,
        "cost_usd": pl.Float64,
        "batch_id": pl.String,
    }
    full = [{k: r.get(k) for k in schema} for r in rows]
    return pl.DataFrame(full, schema=schema, orient="row")


def ok(i: int, response: str, cost: float | None = 0.5) -> dict:
    return {
        "row_idx": i,
        "response": response,
        "status": "succeeded",
        "model": "gpt-4o-mini",
        "prompt_tokens": 10 + i,
        "completion_tokens": i,
        "cost_usd": cost,
        "batch_id": "batch_abc",
    }


# --------------------------------------------------------------------------- exact cells


def test_awkward_cells_round_trip_byte_equal(tmp_path: Path) -> None:
    header = ["id", "text", "price"]
    rows = [[f"{i:03d}", cell, AWKWARD[-1 - i]] for i, cell in enumerate(AWKWARD)]
    src = tmp_path / "src.csv"
    write_source_csv(src, header, rows)
    answers = [f"answer, {c}" for c in reversed(AWKWARD)]  # responses are awkward too
    costs = [0.1 + 0.2, 0.0012345678901234, None, 2.0]
    outcomes = outcomes_frame(
        [ok(i, answers[i], costs[i % len(costs)]) for i in range(len(rows)) if i != 5]
    )

    out = tmp_path / "merged.csv"
    summary = merge_frames(source_frames(src, 4), header, outcomes, out)

    # Expected file written by the csv module: source cells verbatim, the same minimal quoting.
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header + MERGED_COLUMNS)
    for i, r in enumerate(rows):
        if i == 5:
            w.writerow([*r, "", "missing", "no result recorded", "", "", "", "", ""])
            continue
        cost = costs[i % len(costs)]
        w.writerow(
            [
                *r,
                answers[i],
                "succeeded",
                "",
                "gpt-4o-mini",
                10 + i,
                i,
                "" if cost is None else repr(cost),
                "batch_abc",
            ]
        )
    assert out.read_bytes() == buf.getvalue().encode()
    assert summary.rows == len(rows)
    assert summary.by_status == {
        "succeeded": len(rows) - 1,
        "failed": 0,
        "skipped": 0,
        "missing": 1,
    }

    back = read_merged(out)
    assert back.columns == header + MERGED_COLUMNS
    assert back.select(header).rows() == [tuple(r) for r in rows]
    assert back["cost_usd"][0] == "0.30000000000000004"  # full precision, not 0.30


def test_lone_cr_and_quotes_survive_value_round_trip(tmp_path: Path) -> None:
    cells = ["a\rb", "\r", '""', "'", "\\n", " ", "\u2028", "\x00nul"]
    src = tmp_path / "src.csv"
    write_source_csv(src, ["c"], [[c] for c in cells])
    frames = [
        pl.DataFrame(
            {
                "c": cells,
                "__row_idx": list(range(len(cells))),
                "__row_id": [str(i) for i in range(len(cells))],
            }
        )
    ]
    out = tmp_path / "m.csv"
    merge_frames(frames, ["c"], outcomes_frame([]), out)
    assert read_merged(out)["c"].to_list() == cells
    # an independent reader agrees
    with out.open(newline="", encoding="utf-8") as fh:
        assert [r[0] for r in list(csv.reader(fh))[1:]] == cells


def test_cost_full_precision_and_tokens_integers(tmp_path: Path) -> None:
    rng = random.Random(3)
    costs = [rng.random() * 10 ** rng.randint(-9, 2) for _ in range(500)]
    n = len(costs)
    frames = [
        pl.DataFrame(
            {"x": ["v"] * n, "__row_idx": list(range(n)), "__row_id": [str(i) for i in range(n)]}
        )
    ]
    outcomes = outcomes_frame([ok(i, "r", costs[i]) for i in range(n)])
    out = tmp_path / "m.csv"
    merge_frames(frames, ["x"], outcomes, out)
    back = read_merged(out)
    assert [float(c) for c in back["cost_usd"]] == costs
    assert back["prompt_tokens"].to_list() == [str(10 + i) for i in range(n)]


# --------------------------------------------------------------------------- join


@pytest.mark.parametrize("chunk", [1, 7, 100, 10_000])
@pytest.mark.parametrize("sizing", ["glued", "each", "sliced"])
def test_shuffled_outcomes_land_on_their_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, sizing: str
) -> None:
    if sizing != "glued":  # merge each frame on its own, as large sources do
        monkeypatch.setattr(merge_mod, "_MIN_FRAME_ROWS", 1)
    if sizing == "sliced":  # and cut frames into slices, as a huge frame is
        monkeypatch.setattr(merge_mod, "_MAX_FRAME_ROWS", 3)
    n = 203
    src = tmp_path / "src.csv"
    write_source_csv(src, ["key", "val"], [[f"k{i:05d}", str(i * 3)] for i in range(n)])
    offset = 1000  # e.g. --start-row 1000: row_idx is not the position in the output
    items = [ok(offset + i, f"answer for k{i:05d}") for i in range(n) if i % 10 != 3]
    random.Random(chunk).shuffle(items)
    out = tmp_path / "m.csv"
    summary = merge_frames(
        source_frames(src, chunk, id_col="key", offset=offset),
        ["key", "val"],
        outcomes_frame(items),
        out,
    )
    back = read_merged(out)
    assert back["key"].to_list() == [f"k{i:05d}" for i in range(n)]  # source order kept
    for key, resp, status in back.select("key", "response", "status").iter_rows():
        i = int(key[1:])
        if i % 10 == 3:
            assert (resp, status) == ("", "missing")
        else:
            assert (resp, status) == (f"answer for {key}", "succeeded")
    assert summary.by_status["missing"] == sum(1 for i in range(n) if i % 10 == 3)
    assert summary.unmatched_outcomes == 0


def test_missing_and_other_statuses(tmp_path: Path) -> None:
    n = 6
    frames = [
        pl.DataFrame(
            {
                "a": [str(i) for i in range(n)],
                "__row_idx": list(range(n)),
                "__row_id": [str(i) for i in range(n)],
            }
        )
    ]
    outcomes = outcomes_frame(
        [
            ok(0, "fine"),
            {
                "row_idx": 1,
                "status": "failed",
                "error": "HTTP 400: max_tokens is too large",
                "batch_id": "b1",
            },
            {"row_idx": 2, "status": "skipped", "error": "image not found: img/2.png"},
            {"row_idx": 3, "status": "missing"},  # the store's pending/queued rows
            {"row_idx": 99, "status": "succeeded", "response": "no such row"},
            # row 4 and 5: no outcome at all
        ]
    )
    out = tmp_path / "m.csv"
    summary = merge_frames(frames, ["a"], outcomes, out)
    back = read_merged(out)
    assert back["status"].to_list() == [
        "succeeded",
        "failed",
        "skipped",
        "missing",
        "missing",
        "missing",
    ]
    assert back["error"].to_list() == [
        "",
        "HTTP 400: max_tokens is too large",
        "image not found: img/2.png",
        "no result recorded",
        "no result recorded",
        "no result recorded",
    ]
    assert back["prompt_tokens"].to_list()[1:] == [""] * 5  # null → empty, never "null"
    assert summary.by_status == {"succeeded": 1, "failed": 1, "skipped": 1, "missing": 3}
    assert summary.unmatched_outcomes == 1


def test_duplicate_outcomes_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    out.write_text("previous\n")
    frames = [pl.DataFrame({"a": ["x"], "__row_idx": [0], "__row_id": ["0"]})]
    with pytest.raises(BatchopsError, match="row_idx 0"):
        merge_frames(frames, ["a"], outcomes_frame([ok(0, "a"), ok(0, "b")]), out)
    assert out.read_text() == "previous\n"


# --------------------------------------------------------------------------- names


def test_merged_column_names_prefix_on_clash() -> None:
    assert merged_column_names(["id", "text"]) == {c: c for c in MERGED_COLUMNS}
    names = merged_column_names(
        ["response", "status", "batchops_status", "model", "batchops_model", "batchops_2_model"]
    )
    assert names["response"] == "batchops_response"
    assert names["status"] == "batchops_2_status"
    assert names["model"] == "batchops_3_model"
    assert names["error"] == "error"
    assert len(set(names.values())) == len(MERGED_COLUMNS)


def test_clashing_source_columns_kept_unchanged(tmp_path: Path) -> None:
    header = ["status", "response", "cost_usd"]
    rows = [["draft", "old reply", "12.50"], ["final", "", "0"]]
    src = tmp_path / "src.csv"
    write_source_csv(src, header, rows)
    out = tmp_path / "m.csv"
    merge_frames(source_frames(src, 10), header, outcomes_frame([ok(0, "new reply", 0.25)]), out)
    back = read_merged(out)
    assert back.columns == [
        "status",
        "response",
        "cost_usd",
        "batchops_response",
        "batchops_status",
        "error",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "batchops_cost_usd",
        "batch_id",
    ]
    assert back.select(header).rows() == [tuple(r) for r in rows]
    assert back["batchops_status"].to_list() == ["succeeded", "missing"]
    assert back["batchops_response"].to_list() == ["new reply", ""]
    assert back["batchops_cost_usd"].to_list() == ["0.25", ""]


# --------------------------------------------------------------------------- parquet


def test_parquet_types_and_same_values_as_csv(tmp_path: Path) -> None:
    header = ["id", "text"]
    rows = [[f"{i:03d}", c] for i, c in enumerate(AWKWARD)]
    src = tmp_path / "src.csv"
    write_source_csv(src, header, rows)
    outcomes = outcomes_frame([ok(i, f"r{i}", 1e-06 * i) for i in range(0, len(rows), 2)])
    pq_out, csv_out = tmp_path / "m.parquet", tmp_path / "m.csv"
    merge_frames(source_frames(src, 5), header, outcomes, pq_out)
    merge_frames(source_frames(src, 5), header, outcomes, csv_out)

    schema = pq.read_schema(pq_out)
    assert schema.names == header + MERGED_COLUMNS
    for name in [*header, "response", "status", "error", "model", "batch_id"]:
        assert pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(
            schema.field(name).type
        )
    assert schema.field("prompt_tokens").type == pa.int64()
    assert schema.field("completion_tokens").type == pa.int64()
    assert schema.field("cost_usd").type == pa.float64()

    table = pl.read_parquet(pq_out)
    assert table.select(header).rows() == [tuple(r) for r in rows]
    assert table["cost_usd"][2] == 2e-06 and table["cost_usd"][1] is None
    assert read_merged(pq_out).equals(read_merged(csv_out))


def test_fmt_argument_overrides_suffix(tmp_path: Path) -> None:
    frames = [pl.DataFrame({"a": ["1"], "__row_idx": [0], "__row_id": ["0"]})]
    out = tmp_path / "merged.out"
    merge_frames(frames, ["a"], outcomes_frame([ok(0, "x")]), out, fmt="parquet")
    assert pq.read_table(out).num_rows == 1
    with pytest.raises(InputError):
        merge_frames(frames, ["a"], outcomes_frame([]), tmp_path / "x.csv", fmt="xlsx")


# --------------------------------------------------------------------------- atomic, empty


@pytest.mark.parametrize("name", ["m.csv", "m.parquet"])
def test_atomic_write_leaves_no_partial_file(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    out.write_bytes(b"old complete file")

    def frames() -> Iterator[pl.DataFrame]:
        yield pl.DataFrame(
            {"a": ["1"] * 1000, "__row_idx": list(range(1000)), "__row_id": ["x"] * 1000}
        )
        raise OSError("source disappeared mid-read")

    with pytest.raises(OSError, match="mid-read"):
        merge_frames(frames(), ["a"], outcomes_frame([ok(0, "x")]), out)
    assert out.read_bytes() == b"old complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left behind

    fresh = tmp_path / "sub" / f"new_{name}"
    with pytest.raises(OSError):
        merge_frames(frames(), ["a"], outcomes_frame([]), fresh)
    assert not fresh.exists() and list(fresh.parent.iterdir()) == []


@pytest.mark.parametrize("name", ["m.csv", "m.parquet"])
def test_empty_source_writes_header_only(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    summary = merge_frames(iter([]), ["id", "status"], outcomes_frame([ok(0, "x")]), out)
    assert summary.rows == 0 and summary.unmatched_outcomes == 1
    back = read_merged(out)
    assert back.height == 0
    assert back.columns == ["id", "status", "response", "batchops_status", *MERGED_COLUMNS[2:]]


def test_frames_are_consumed_lazily(tmp_path: Path) -> None:
    """The writer pulls one frame at a time (it does not collect the source first)."""
    out = tmp_path / "m.csv"
    pulled: list[int] = []

    def frames() -> Iterator[pl.DataFrame]:
        for k in range(3):
            tmp_files = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            # from the second frame on, the previous frames are already in the temp file
            assert k == 0 or (tmp_files and tmp_files[0].stat().st_size > 0)
            pulled.append(k)
            yield pl.DataFrame(
                {
                    "a": [str(k)] * 50_000,
                    "__row_idx": range(k * 50_000, (k + 1) * 50_000),
                    "__row_id": ["i"] * 50_000,
                }
            )

    summary = merge_frames(frames(), ["a"], outcomes_frame([]), out)
    assert pulled == [0, 1, 2] and summary.rows == 150_000


def test_uneven_frames_are_glued_and_sliced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merge_mod, "_MIN_FRAME_ROWS", 10)
    monkeypatch.setattr(merge_mod, "_MAX_FRAME_ROWS", 25)
    sizes = [3, 100, 2, 0, 40, 1]
    frames, start = [], 0
    for size in sizes:
        idx = list(range(start, start + size))
        frames.append(
            pl.DataFrame(
                {"a": [f"v{i}" for i in idx], "__row_idx": idx, "__row_id": [str(i) for i in idx]},
                schema={"a": pl.String, "__row_idx": pl.Int64, "__row_id": pl.String},
            )
        )
        start += size
    got = [f.height for f in merge_mod._coalesce(iter(frames), 10, 25)]
    assert got == [25, 25, 25, 25, 3, 25, 17, 1] and sum(got) == sum(sizes)
    items = [ok(i, f"r{i}") for i in range(start)]
    random.Random(1).shuffle(items)
    out = tmp_path / "m.csv"
    merge_frames(frames, ["a"], outcomes_frame(items), out)
    back = read_merged(out)
    assert back["a"].to_list() == [f"v{i}" for i in range(start)]
    assert back["response"].to_list() == [f"r{i}" for i in range(start)]
