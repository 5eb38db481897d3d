"""source.py: the table is read exactly as written, sliced and streamed; bad input is a one-line InputError."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from batchops.errors import InputError
from batchops.source import ROW_ID, ROW_IDX, iter_frames, open_source, read_ahead
from batchops.spec import JobSpec

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"

AWKWARD_ROWS = [
    ["007", "a, b", "19.90", 'line1\nline2 "quoted"'],
    ["008", "", "5", ""],
    ["009", "  spaced  ", "", "tab\there"],
    ["010", "猫 café", "1e3", "😀 </script> \\ backslash"],
    ["011", "x", "NaN", "crlf\r\ninside"],
    ["012", '"', "TRUE", "{not a placeholder}"],
]
HEADER = ["sku", "name", "price", "desc"]


def spec_for(path: Path | str, **kw) -> JobSpec:
    kw.setdefault("prompt", "{name}")
    return JobSpec(source=str(path), models=[{"name": "m"}], **kw)


def write_csv(path: Path, header, rows, *, bom=False, eol="\r\n") -> Path:
    with path.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator=eol)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def all_rows(source, **kw) -> pl.DataFrame:
    frames = list(iter_frames(source, **kw))
    return pl.concat(frames) if frames else pl.DataFrame()


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("eol", ["\r\n", "\n"])
def test_cells_are_the_exact_strings_of_the_file(tmp_path, bom, eol):
    path = write_csv(tmp_path / "a.csv", HEADER, AWKWARD_ROWS, bom=bom, eol=eol)
    src = open_source(spec_for(path, id_column="sku"))
    assert src.columns == HEADER
    assert src.n_rows == src.total_rows == len(AWKWARD_ROWS)
    df = all_rows(src)
    assert df.columns == [*HEADER, ROW_IDX, ROW_ID]
    assert df.schema[ROW_IDX] == pl.Int64
    assert all(df.schema[c] == pl.String for c in [*HEADER, ROW_ID])
    # The stdlib csv module is the reference for "exactly as written".
    with path.open(encoding="utf-8-sig", newline="") as fh:
        expected = list(csv.reader(fh))[1:]
    assert (
        df.select(HEADER).rows() == [tuple(r) for r in expected] == [tuple(r) for r in AWKWARD_ROWS]
    )
    assert df[ROW_IDX].to_list() == list(range(len(AWKWARD_ROWS)))
    assert df[ROW_ID].to_list() == [r[0] for r in AWKWARD_ROWS]
    assert df["price"].null_count() == 0  # an empty cell is "", never null


def test_without_id_column_the_row_id_is_the_row_number(tmp_path):
    path = write_csv(tmp_path / "a.csv", HEADER, AWKWARD_ROWS)
    df = all_rows(open_source(spec_for(path)))
    assert df[ROW_ID].to_list() == [str(i) for i in range(len(AWKWARD_ROWS))]


def numbered(tmp_path: Path, n: int) -> Path:
    return write_csv(
        tmp_path / "n.csv", ["id", "v"], [[f"r{i:04d}", f"{i}\n{i}"] for i in range(n)]
    )


def test_frames_are_bounded_and_concatenate_to_the_slice(tmp_path):
    src = open_source(spec_for(numbered(tmp_path, 1000), id_column="id", start_row=95, end_row=905))
    assert (src.start_row, src.end_row, src.n_rows, src.total_rows) == (95, 905, 810, 1000)
    frames = list(iter_frames(src, batch_rows=100))
    assert [len(f) for f in frames] == [100] * 8 + [10]
    df = pl.concat(frames)
    assert df[ROW_IDX].to_list() == list(range(95, 905))
    assert df["v"].to_list() == [f"{i}\n{i}" for i in range(95, 905)]
    assert df[ROW_ID].to_list() == [f"r{i:04d}" for i in range(95, 905)]


def test_columns_subset_keeps_row_ids(tmp_path):
    src = open_source(spec_for(numbered(tmp_path, 10), id_column="id"))
    df = all_rows(src, columns=["v"])
    assert df.columns == ["v", ROW_IDX, ROW_ID]
    assert df[ROW_ID][3] == "r0003"
    assert all_rows(src, columns=[]).columns == [ROW_IDX, ROW_ID]
    with pytest.raises(InputError, match="'nope': no such column"):
        list(iter_frames(src, columns=["nope"]))


@pytest.mark.parametrize("kind", ["list", "series", "set"])
def test_only_rows_restricts_to_those_rows_inside_the_slice(tmp_path, kind):
    src = open_source(spec_for(numbered(tmp_path, 500), start_row=10, end_row=400))
    wanted = [399, 5, 10, 11, 250, 250, 400, 123]  # unsorted, a duplicate, two outside the slice
    only = {"list": wanted, "series": pl.Series(wanted), "set": set(wanted)}[kind]
    df = all_rows(src, only_rows=only, batch_rows=2)
    assert df[ROW_IDX].to_list() == [10, 11, 123, 250, 399]
    assert df["v"].to_list() == [f"{i}\n{i}" for i in [10, 11, 123, 250, 399]]
    assert list(iter_frames(src, only_rows=[])) == []


def test_a_cell_longer_than_a_parse_block_is_read_whole(tmp_path):
    big = ("x" * 999 + "\n") * 1200  # 1.2 MB with line breaks: larger than a parse block
    path = write_csv(tmp_path / "big.csv", ["id", "text"], [["a", "small"], ["b", big], ["c", ""]])
    df = all_rows(open_source(spec_for(path, id_column="id")))
    assert df["text"].to_list() == ["small", big, ""]


def test_the_bundled_sample_reads_as_text(tmp_path):
    src = open_source(spec_for(SAMPLE / "products.csv", id_column="sku", image_column="image"))
    df = all_rows(src)
    assert src.n_rows == len(df) >= 40
    row = df.row(0, named=True)
    assert row["sku"] == "007" and row["price"] == "19.90"
    assert "" in df["price"].to_list()
    assert any("\n" in d for d in df["description"])


# ----------------------------------------------------------------------------------- errors


def message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, "messages are one line"
    return text


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputError) as e:
        open_source(spec_for("data/x.csv"))
    assert message(e) == "data/x.csv: file not found"
    with pytest.raises(InputError, match="is a directory"):
        open_source(spec_for(tmp_path))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (["a", "b", "a"], "duplicate column name 'a' (header columns 1 and 3)"),
        (["a", "", "c"], "column 2 of the header has no name"),
        (["a", "__row_idx"], "'__row_idx' is reserved"),
    ],
)
def test_bad_headers(tmp_path, header, expected):
    path = write_csv(tmp_path / "h.csv", header, [["1"] * len(header)])
    with pytest.raises(InputError) as e:
        open_source(spec_for(path))
    assert expected in message(e)


def test_unknown_id_and_image_columns(tmp_path):
    path = write_csv(tmp_path / "a.csv", HEADER, AWKWARD_ROWS)
    with pytest.raises(InputError) as e:
        open_source(spec_for(path, id_column="SKU"))
    assert message(e) == (
        f"--id-column 'SKU': no such column in {path} (columns: sku, name, price, desc); did you mean 'sku'?"
    )
    with pytest.raises(InputError, match="--image-column 'img': no such column"):
        open_source(spec_for(path, image_column="img"))
    with pytest.raises(InputError, match="--image-dir .*: not a directory"):
        open_source(spec_for(path, image_column="desc", image_dir=str(tmp_path / "nope")))


def test_duplicate_ids_name_values_and_rows(tmp_path):
    ids = ["a", "b", "a", "c", "b", "a"] + [f"d{i}" for i in range(6) for _ in (0, 1)]
    path = write_csv(tmp_path / "d.csv", ["id"], [[i] for i in ids])
    with pytest.raises(InputError) as e:
        open_source(spec_for(path, id_column="id"))
    text = message(e)
    assert text.startswith(
        f'{path}: id column "id" has duplicate values: "a" (rows 0, 2, 5); "b" (rows 1, 4);'
    )
    assert '"d2" (rows 10, 11)' in text and '"d3"' not in text and "and 3 more" in text


def test_empty_ids_are_refused(tmp_path):
    path = write_csv(tmp_path / "e.csv", ["id", "v"], [["a", "1"], ["", "2"], ["c", "3"]])
    with pytest.raises(InputError) as e:
        open_source(spec_for(path, id_column="id"))
    assert message(e) == f'{path}: id column "id" is empty in data row(s) 1'


def test_ids_are_checked_across_the_groups_of_a_large_file(tmp_path):
    """The validation pass checks ids some 65,536 rows at a time: rows keep their numbers."""
    rows = [[f"id{i}", "v"] for i in range(150_000)]
    rows[70_001][0] = ""
    path = write_csv(tmp_path / "big.csv", ["id", "v"], rows)
    with pytest.raises(InputError) as e:
        open_source(spec_for(path, id_column="id"))
    assert message(e) == f'{path}: id column "id" is empty in data row(s) 70001'
    rows[70_001][0] = "id5"
    path = write_csv(tmp_path / "big.csv", ["id", "v"], rows)
    with pytest.raises(InputError) as e:
        open_source(spec_for(path, id_column="id"))
    assert '"id5" (rows 5, 70001)' in message(e)
    rows[70_001][0] = "fine"
    path = write_csv(tmp_path / "big.csv", ["id", "v"], rows)
    assert open_source(spec_for(path, id_column="id")).n_rows == 150_000


def test_a_row_with_the_wrong_number_of_fields_is_located(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('a,b\n1,"x\ny"\n2\n3,4\n', encoding="utf-8")
    with pytest.raises(InputError) as e:
        open_source(spec_for(path))
    assert message(e).startswith(f"{path}: line 4 (data row 1) has 1 field(s), the header has 2")


def test_non_utf8_is_located(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes("a,b\n1,ok\n2,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError) as e:
        open_source(spec_for(path))
    assert message(e) == f"{path}: not UTF-8 at line 3 (byte 14: b'\\xe9\\n'); save it as UTF-8"


@pytest.mark.parametrize(
    ("later", "expected"),
    [
        ("3\n", "not UTF-8 at line 3003"),  # + a ragged row: the byte check's error first
        ('4,"open\n', "not UTF-8 at line 3003"),  # + an unclosed quote
        ("dup,1\n", "not UTF-8 at line 3003"),  # + a repeated id
    ],
)
def test_the_byte_check_error_comes_first(tmp_path, later, expected):
    """The byte check (UTF-8, quotes) runs beside the parse; its error is the one reported,
    as when it ran before it."""
    path = tmp_path / "l.csv"
    ok = "".join(f"r{i},ok\n" for i in range(3000))  # past the header read's first block
    path.write_bytes(f"a,b\ndup,ok\n{ok}2,caf\xe9\n".encode("latin-1") + later.encode())
    with pytest.raises(InputError) as e:
        open_source(spec_for(path, id_column="a"))
    assert expected in message(e)


def test_read_ahead_hands_over_items_then_the_error_and_stops_when_closed():
    def items():
        yield from range(3)
        raise ValueError("block 4 is bad")

    got = []
    with pytest.raises(ValueError, match="block 4"):
        for item in read_ahead(items()):
            got.append(item)
    assert got == [0, 1, 2]
    before = threading.active_count()
    ahead = read_ahead(iter(range(1000)))
    assert next(ahead) == 0
    ahead.close()  # the thread waiting to hand over more ends
    assert threading.active_count() == before


@pytest.mark.parametrize("depth", [0, 2])
def test_read_ahead_makes_at_most_depth_plus_one_items_not_taken(depth: int):
    made: list[int] = []

    def items():
        for i in range(20):
            made.append(i)
            yield i

    ahead = read_ahead(items(), depth)
    for taken in range(1, 6):
        assert next(ahead) == taken - 1
        time.sleep(0.05)  # room for the thread to run ahead as far as it may
        assert len(made) <= taken + depth + 1
    assert list(ahead) == list(range(5, 20))


def test_empty_and_header_only_files(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        open_source(spec_for(tmp_path / "empty.csv"))
    for name, text in (("h1.csv", "a,b\r\n"), ("h2.csv", "a,b")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        src = open_source(spec_for(tmp_path / name, id_column="a"))
        assert (src.columns, src.n_rows) == (["a", "b"], 0)
        assert list(iter_frames(src)) == []


def test_slice_bounds(tmp_path):
    path = numbered(tmp_path, 10)
    assert open_source(spec_for(path, start_row=3, end_row=99)).n_rows == 7  # end clamped
    assert open_source(spec_for(path, start_row=3, end_row=3)).n_rows == 0
    with pytest.raises(InputError, match="--end-row 2 is before --start-row 3"):
        open_source(spec_for(path, start_row=3, end_row=2))
    with pytest.raises(InputError, match="--start-row 10 is past the end of .* \\(10 data rows\\)"):
        open_source(spec_for(path, start_row=10))


def test_a_csv_declared_as_parquet_is_one_clear_error(tmp_path):
    path = numbered(tmp_path, 3)
    with pytest.raises(InputError, match="not a readable Parquet file"):
        open_source(spec_for(path, source_format="parquet"))


def test_a_file_changed_after_validation_is_not_read(tmp_path):
    path = numbered(tmp_path, 3)
    src = open_source(spec_for(path))
    with path.open("a", encoding="utf-8") as fh:
        fh.write("r9,9\n")
    os.utime(path, ns=(0, src._fingerprint[1] + 10**9))
    with pytest.raises(InputError, match="changed after it was validated"):
        list(iter_frames(src))


def test_a_csv_dry_run_does_not_import_pandas(tmp_path: Path) -> None:
    """pyarrow's `pa.array` / `pa.scalar` import pandas (~0.2 s of every command); reading,
    checking and building from a CSV must not pay for it."""
    src = tmp_path / "t.csv"
    src.write_text("id,name\n007,Mug\n008,Lamp\n", encoding="utf-8")
    # Every import, as it happens, from -X importtime (a dry run ends with os._exit: nothing
    # can look at sys.modules after it).
    cmd = [sys.executable, "-X", "importtime", "-m", "batchops.cli", "run", "--csv", str(src)]
    cmd += ["--prompt", "Describe {name}", "--model", "gpt-4o-mini", "--id-column", "id"]
    cmd += ["--dry-run", "--run-dir", str(tmp_path / "run"), "--log-dir", str(tmp_path / "logs")]
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "NO_COLOR": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in done.stderr.splitlines() if "|" in ln]
    assert "polars" in imported and "pandas" not in imported
