"""Join per-row outcomes onto the source table, streamed, and write CSV or Parquet atomically.

Contract (DESIGN.md "Merged output"): every source column unchanged, in source order and row
order, then the `MERGED_COLUMNS`; an added column whose name a source column already uses is
prefixed ``batchops_`` (``batchops_2_`` … if that is taken too). With an answer schema, one
column per top-level property follows (structured.SchemaColumns).

CSV formula injection: a spreadsheet runs a cell that starts with ``=``, ``+``, ``-``, ``@``, tab
or CR as a formula (``=HYPERLINK(…)`` in a model's answer). In CSV output only, such cells of the
*added* columns (response, error, model, … and schema columns) get a leading ``'`` by default;
source columns are the user's own data and are never changed; Parquet and JSONL are never
escaped. `csv_escape=False` (``--no-csv-escape``) writes them verbatim. ``cost_usd`` is written
in plain decimal notation, never ``7.5e-6``.

Formats: CSV (every cell text), Parquet (source columns as strings, or with the source file's
own Arrow types when `source_schema` is given; embeddings as a list<double> column; schema
properties typed) and JSONL (each source object, unchanged when `raw` frames are given, with the
added keys appended; embeddings and schema properties as native JSON values).

How it stays fast and flat on 1,000,000 rows:

* The outcomes table is never sorted or copied as a whole: only its ``row_idx`` column is
  arg-sorted once; each source frame then gathers just the outcome rows in its ``row_idx``
  range (two binary searches) and hash-joins that small slice. Joining on ``row_idx`` (never on
  position) makes the outcome order irrelevant.
* Each merged frame is written and dropped before the next one is read, so peak memory is the
  outcomes table plus one frame, not the source plus a merged copy.
* Written to a temporary file next to the target, fsynced, then ``os.replace``d: readers see
  the old file or the complete new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchops.atomic import atomic_write
from batchops.errors import InputError, StateError
from batchops.store import OUTCOME_TYPES
from batchops.structured import SchemaColumns

__all__ = [
    "MERGED_COLUMNS",
    "MergeSummary",
    "merge_frames",
    "merged_column_names",
    "read_merged",
]

MERGED_COLUMNS: list[str] = [
    "response",
    "status",
    "error",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "batch_id",
]
STATUSES = ("succeeded", "failed", "skipped", "missing")
MISSING_ERROR = "no result recorded"

_ARROW_TYPES: dict[str, pa.DataType] = {
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "cost_usd": pa.float64(),
}
_MIN_FRAME_ROWS = 50_000  # frames smaller than this are merged in groups
_MAX_FRAME_ROWS = 200_000  # larger frames are merged slice by slice
_READER_FRAME_ROWS = 8_192  # rows per frame read from the store (32,768: ~45 MB more peak RSS)
_IDX = "__row_idx"  # join key, as the source module names it
_RAW = "__raw"  # native JSONL frames: the source object's text, as the source module names it
_NO_EXTRA: dict[str, list[Any]] = {}
_HIT = "__batchops_hit"  # marks joined outcome rows, to count outcomes that matched no row
# First characters a spreadsheet takes as the start of a formula (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The CLI's --no-csv-escape for the merges of one command (api.merge_run takes no flag yet).
CSV_ESCAPE: contextvars.ContextVar[bool] = contextvars.ContextVar("csv_escape", default=True)


def escape_formula(text: str | None) -> str | None:
    """The cell as a spreadsheet shows it but never runs it."""
    return "'" + text if text and text.startswith(FORMULA_START) else text


@dataclass
class MergeSummary:
    path: Path
    rows: int
    by_status: dict[str, int]
    # Outcomes whose row_idx is not in the source (e.g. a --start-row slice): written nowhere.
    unmatched_outcomes: int = 0
    columns: list[str] = field(default_factory=list)


def merged_column_names(source_columns: list[str]) -> dict[str, str]:
    """Added column → final column name, avoiding every source column name."""
    taken = set(source_columns)
    names: dict[str, str] = {}
    for name in MERGED_COLUMNS:
        final = name
        k = 1
        while final in taken:
            final = f"batchops_{name}" if k == 1 else f"batchops_{k}_{name}"
            k += 1
        taken.add(final)
        names[name] = final
    return names


def merge_frames(
    frames: Iterable[pl.DataFrame],
    source_columns: list[str],
    outcomes: pl.DataFrame | OutcomeReader,
    out_path: Path | str,
    *,
    fmt: str | None = None,
    source_schema: pa.Schema | None = None,
    raw: bool = False,
    answer_schema: dict[str, Any] | None = None,
    schema_prefix: str = "",
    embeddings: bool = False,
    csv_escape: bool | None = None,
) -> MergeSummary:
    """Write source frames (in row order) joined with `outcomes` to `out_path`.

    `frames`: all-String frames holding `source_columns` plus ``__row_idx`` (Int64) and
    ``__row_id``. `outcomes`: a frame, or an `OutcomeReader` (the run's store: read one
    source frame's row range at a time, so memory does not grow with the table); at most one
    row per ``row_idx``; columns as in
    `MERGED_COLUMNS` (a missing one is treated as all-null). Rows without an outcome get status
    ``missing`` and error ``no result recorded``.

    `source_schema`: the frames hold the source columns with their own types (a Parquet
    source); Parquet output keeps those types where Arrow can. `raw` (JSONL output only): the
    frames hold ``__raw``, each source object's JSON text, instead of the columns.
    `answer_schema`: expand succeeded answers into one column per top-level property, named
    `schema_prefix` + property. `embeddings`: responses are JSON vectors (list column in
    Parquet, native list in JSONL). `csv_escape` (CSV only; default: `CSV_ESCAPE`, on):
    neutralise formula-like cells of the added columns (see the module doc).
    """
    out_path = Path(out_path)
    if csv_escape is None:
        csv_escape = CSV_ESCAPE.get()
    fmt = _resolve_fmt(out_path, fmt)
    if raw and fmt != "jsonl":
        raise InputError("raw source objects can only be merged into JSONL")
    names = merged_column_names(list(source_columns))
    index: _OutcomeIndex | _ReaderIndex = (
        _OutcomeIndex(outcomes, names)
        if isinstance(outcomes, pl.DataFrame)
        else _ReaderIndex(outcomes, names)
    )
    expand = (
        SchemaColumns(answer_schema, schema_prefix, [*source_columns, *names.values()])
        if answer_schema is not None
        else None
    )
    extra_columns = expand.columns if expand is not None else []
    out_columns = [*source_columns, *names.values(), *extra_columns]

    by_status: dict[str, int] = dict.fromkeys(STATUSES, 0)
    rows = matched = 0
    with atomic_write(out_path) as fh:
        sink: _Sink
        if fmt == "csv":
            text_added = [names[n] for n in MERGED_COLUMNS if OUTCOME_TYPES[n] == pl.String]
            escaped = [*text_added, *extra_columns] if csv_escape else []
            sink = _CsvSink(fh, expand, escaped, [names["cost_usd"]])
        elif fmt == "jsonl":
            sink = _JsonlSink(fh, source_columns, names, raw=raw, embeddings=embeddings)
        else:
            sink = _ParquetSink(
                fh, source_columns, names, source_schema, expand, embeddings=embeddings
            )
        try:
            # Outcomes read from the store per frame are Python rows on the way in: smaller
            # frames keep that transient copy small.
            lo_rows, hi_rows = (
                (_MIN_FRAME_ROWS, _MAX_FRAME_ROWS)
                if isinstance(index, _OutcomeIndex)
                else (_READER_FRAME_ROWS // 2, _READER_FRAME_ROWS)
            )
            for frame in _coalesce(frames, lo_rows, hi_rows):
                part, n_matched = _merge_one(
                    frame,
                    source_columns,
                    index,
                    names,
                    keep_types=source_schema is not None,
                    raw=raw,
                )
                rows += part.height
                matched += n_matched
                for status, n in part.get_column(names["status"]).value_counts().iter_rows():
                    by_status[status] = by_status.get(status, 0) + n
                extra = _NO_EXTRA
                if expand is not None:
                    extra = expand.values(
                        part.get_column(names["response"]).to_list(),
                        part.get_column(names["status"]).eq("succeeded").to_list(),
                    )
                sink.write(part, extra)
                del part, extra  # drop this frame's merged copy before pulling the next frame
        except BaseException:
            with contextlib.suppress(Exception):  # release the writer; the temp file is deleted
                sink.close(out_columns, source_columns, names)
            raise
        sink.close(out_columns, source_columns, names)
    return MergeSummary(
        path=out_path,
        rows=rows,
        by_status=by_status,
        unmatched_outcomes=index.height - matched,
        columns=out_columns,
    )


def format_of(path: Path | str) -> str:
    """csv / parquet / jsonl, from the output path's extension (CSV unless it says otherwise)."""
    return _resolve_fmt(Path(path), None)


def read_merged(path: Path | str) -> pl.DataFrame:
    """Read a merged CSV or Parquet back with every column as String, exactly as written.

    Empty cells are ``""`` (never null); in Parquet, nulls become ``""`` and numbers are
    formatted the way the CSV writer formats them, so both formats read back identically.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        df = pl.read_parquet(path)
        return df.select(
            (
                _plain_decimal(pl.col(c))
                if c.endswith("cost_usd") and df.schema[c] == pl.Float64
                else pl.col(c).cast(pl.String)
            )
            .fill_null("")
            .alias(c)
            for c in df.columns
        )
    return pl.read_csv(
        path,
        infer_schema=False,
        empty_string_is_null=False,
        quote_char='"',
        raise_if_empty=False,
    )


# --------------------------------------------------------------------------- internals


def _resolve_fmt(out_path: Path, fmt: str | None) -> str:
    if fmt is None:
        suffix = out_path.suffix.lower()
        return {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix, "csv")
    fmt = fmt.lower()
    if fmt not in ("csv", "parquet", "jsonl"):
        raise InputError(f"unknown merge format {fmt!r}: use csv, parquet or jsonl")
    return fmt


class OutcomeReader(Protocol):
    """Outcomes read by row range (the run's store): the merge never holds them all."""

    def outcome_count(self) -> int: ...

    def outcomes_between(self, lo: int, hi: int) -> pl.DataFrame: ...


class _ReaderIndex:
    """An `OutcomeReader` seen as an index: each source frame reads its own range."""

    def __init__(self, reader: OutcomeReader, names: dict[str, str]) -> None:
        self.reader = reader
        self.names = names
        self.height = reader.outcome_count()
        self.empty = self._shape(pl.DataFrame(schema={"row_idx": pl.Int64(), **OUTCOME_TYPES}))
        self.table = self.empty

    def _shape(self, outcomes: pl.DataFrame) -> pl.DataFrame:
        cols = [pl.col("row_idx").cast(pl.Int64).alias(_IDX), pl.lit(True).alias(_HIT)]
        cols += [pl.col(n).cast(t).alias(self.names[n]) for n, t in OUTCOME_TYPES.items()]
        return outcomes.select(cols)

    def slice_for(self, lo: int, hi: int) -> pl.DataFrame:
        return self._shape(self.reader.outcomes_between(lo, hi))


class _OutcomeIndex:
    """The outcomes table plus a sorted view of its row_idx, to slice it by row range."""

    def __init__(self, outcomes: pl.DataFrame, names: dict[str, str]) -> None:
        if "row_idx" not in outcomes.columns:
            raise StateError("outcomes table has no row_idx column")
        cols = [pl.col("row_idx").cast(pl.Int64).alias(_IDX), pl.lit(True).alias(_HIT)]
        for name, dtype in OUTCOME_TYPES.items():
            expr = pl.col(name).cast(dtype) if name in outcomes.columns else pl.lit(None, dtype)
            cols.append(expr.alias(names[name]))
        # select/cast/rename share the caller's buffers: no copy of the response text.
        self.table = outcomes.select(cols)
        self.height = self.table.height
        idx = self.table.get_column(_IDX)
        if idx.null_count():
            raise StateError(f"outcomes table has {idx.null_count()} rows without row_idx")
        self.order = idx.arg_sort()
        self.sorted_idx = idx.gather(self.order)
        dup = self.sorted_idx.filter(self.sorted_idx.diff() == 0)
        if dup.len():
            raise StateError(
                f"more than one outcome for row_idx {dup[0]} (and {dup.len() - 1} more)"
            )

    def slice_for(self, lo: int, hi: int) -> pl.DataFrame:
        """Outcome rows with lo <= row_idx <= hi (unordered)."""
        start = int(self.sorted_idx.search_sorted(lo, side="left"))
        stop = int(self.sorted_idx.search_sorted(hi, side="right"))
        return self.table[self.order.slice(start, stop - start)]


def _merge_one(
    frame: pl.DataFrame,
    source_columns: list[str],
    index: _OutcomeIndex | _ReaderIndex,
    names: dict[str, str],
    *,
    keep_types: bool = False,
    raw: bool = False,
) -> tuple[pl.DataFrame, int]:
    if raw:
        source_columns = [_RAW]
    if _IDX not in frame.schema or any(c not in frame.schema for c in source_columns):
        lacking = [c for c in (_IDX, *source_columns) if c not in frame.schema]
        raise StateError(f"source frame lacks column(s) {lacking}")
    idx = frame.get_column(_IDX).cast(pl.Int64)
    lo, hi = idx.min(), idx.max()
    sub = index.slice_for(int(lo), int(hi)) if lo is not None else index.table.clear()  # type: ignore[arg-type]
    # Source cells stay the strings they were; only non-String (e.g. all-null) columns are cast,
    # unless the frames carry the source's own types (keep_types).
    left = frame.select(
        idx.alias(_IDX),
        *(
            pl.col(c) if keep_types or frame.schema[c] == pl.String else pl.col(c).cast(pl.String)
            for c in source_columns
        ),
    )
    joined = left.join(sub, on=_IDX, how="left", maintain_order="left")
    status, error = names["status"], names["error"]
    n_matched = joined.height - joined.get_column(_HIT).null_count()
    added = {final: pl.col(final) for final in names.values()}
    added[status] = pl.col(status).fill_null("missing")
    # Also covers outcome rows the store already marks "missing" (never answered).
    added[error] = (
        pl.when(added[status].eq("missing") & pl.col(error).is_null())
        .then(pl.lit(MISSING_ERROR))
        .otherwise(pl.col(error))
    )
    out = joined.select(*source_columns, *(e.alias(c) for c, e in added.items()))
    return out, n_matched


def _coalesce(
    frames: Iterable[pl.DataFrame], min_rows: int, max_rows: int
) -> Iterator[pl.DataFrame]:
    """Even out frame sizes: glue small frames (per-frame overhead is ~1-2 ms) and cut huge
    ones into zero-copy slices (the merged copy of a frame is what costs memory)."""
    pending: list[pl.DataFrame] = []
    n = 0
    for frame in frames:
        if frame.height == 0:
            continue
        pending.append(frame)
        n += frame.height
        if n >= min_rows:
            glued = pending[0] if len(pending) == 1 else pl.concat(pending, how="vertical_relaxed")
            pending, n = [], 0
            for start in range(0, glued.height, max_rows):
                yield glued.slice(start, max_rows)
    if pending:
        yield pl.concat(pending, how="vertical_relaxed")


class _Sink(Protocol):
    def write(self, part: pl.DataFrame, extra: dict[str, list[Any]]) -> None: ...

    def close(
        self, out_columns: list[str], source_columns: list[str], names: dict[str, str]
    ) -> None: ...


class _CsvSink:
    """UTF-8, header, RFC 4180 minimal quoting; empty strings written as empty cells."""

    def __init__(
        self,
        fh: IO[bytes],
        expand: SchemaColumns | None = None,
        escaped: list[str] | None = None,
        decimal: list[str] | None = None,
    ) -> None:
        self.fh = fh
        self.expand = expand
        self.escaped = escaped or []
        self.decimal = decimal or []
        self.wrote_header = False

    def write(self, part: pl.DataFrame, extra: dict[str, list[Any]]) -> None:
        if self.expand is not None:
            part = part.with_columns(
                pl.Series(c, self.expand.csv_text(c, v), dtype=pl.String) for c, v in extra.items()
            )
        # polars quotes "" to tell it from null; the source wrote empty cells bare, so turn ""
        # into null (written as nothing) to give back the same bytes.
        part = part.with_columns(
            pl.when(pl.col(c) != "").then(pl.col(c)).alias(c)
            for c, t in part.schema.items()
            if t == pl.String
        )
        if self.escaped:
            starts = "^[" + "".join(FORMULA_START).replace("-", "\\-") + "]"
            part = part.with_columns(
                pl.when(pl.col(c).str.contains(starts))
                .then(pl.lit("'") + pl.col(c))
                .otherwise(pl.col(c))
                .alias(c)
                for c in self.escaped
                if part.schema.get(c) == pl.String
            )
        if self.decimal:
            part = part.with_columns(_plain_decimal(pl.col(c)).alias(c) for c in self.decimal)
        part.write_csv(
            self.fh, include_header=not self.wrote_header, null_value="", quote_style="necessary"
        )
        self.wrote_header = True

    def close(
        self, out_columns: list[str], source_columns: list[str], names: dict[str, str]
    ) -> None:
        if not self.wrote_header:  # empty source: still a valid file with the header
            schema = _empty_schema(source_columns, names)
            schema.update(dict.fromkeys(self.expand.columns if self.expand else [], pl.String()))
            pl.DataFrame(schema=schema).write_csv(self.fh)


def _plain_decimal(value: pl.Expr) -> pl.Expr:
    """A float as text, shortest round-trip digits as before, but 0.0000075 where polars would
    write 7.5e-6 (a spreadsheet or a strict parser may misread the exponent)."""
    text = value.cast(pl.String)
    negative = text.str.starts_with("-")
    parts = text.str.strip_prefix("-").str.split_exact("e", 1)
    digits = parts.struct.field("field_0").str.replace(".", "", literal=True)
    exponent = parts.struct.field("field_1").cast(pl.Int64, strict=False)
    positional = pl.lit("0.") + digits.str.pad_start(
        (digits.str.len_chars() - exponent - 1).clip(lower_bound=0), "0"
    )
    signed = pl.when(negative).then(pl.lit("-") + positional).otherwise(positional)
    return pl.when(text.str.contains("e-", literal=True)).then(signed).otherwise(text)


class _ParquetSink:
    """Source and text columns as strings (or the source's own types), tokens int64, cost
    float64, embeddings list<double>, schema properties typed; one row group per frame."""

    def __init__(
        self,
        fh: IO[bytes],
        source_columns: list[str],
        names: dict[str, str],
        source_schema: pa.Schema | None = None,
        expand: SchemaColumns | None = None,
        *,
        embeddings: bool = False,
    ) -> None:
        fields = [_source_field(c, source_schema) for c in source_columns]
        types = dict(_ARROW_TYPES, response=_EMBEDDING if embeddings else pa.large_string())
        fields += [
            pa.field(final, types.get(name, pa.large_string())) for name, final in names.items()
        ]
        self.n_part = len(fields)
        if expand is not None:
            fields += [pa.field(f.column, f.arrow_type) for f in expand.fields]
        self.schema = pa.schema(fields)
        self.expand = expand
        self.response = names["response"] if embeddings else None
        self.writer = pq.ParquetWriter(fh, self.schema, compression="zstd")

    def write(self, part: pl.DataFrame, extra: dict[str, list[Any]]) -> None:
        if self.response is not None:  # the vector's JSON text → a list column
            part = part.with_columns(pl.col(self.response).str.json_decode(pl.List(pl.Float64)))
        table = part.to_arrow()
        arrays = [table.column(i).cast(self.schema.field(i).type) for i in range(self.n_part)]
        if self.expand is not None:
            arrays += [self.expand.arrow(c, v) for c, v in extra.items()]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def close(
        self, out_columns: list[str], source_columns: list[str], names: dict[str, str]
    ) -> None:
        self.writer.close()  # writes the footer; an empty source gives a 0-row file with schema


_EMBEDDING = pa.large_list(pa.float64())


def _source_field(column: str, source_schema: pa.Schema | None) -> pa.Field:
    """The Parquet field of a source column: its own type when the frames carry it and the
    values come back from polars castable to it; otherwise the type polars gives it."""
    if source_schema is None:
        return pa.field(column, pa.large_string())
    original = source_schema.field(column)
    t = original.type
    plain = t.value_type if pa.types.is_dictionary(t) else t
    try:
        probe = pl.from_arrow(pa.array([None], plain)).to_arrow()
    except Exception:
        return original.with_type(plain)
    try:
        probe.cast(t)
        return original
    except (pa.ArrowException, NotImplementedError):
        return original.with_type(probe.type)


class _JsonlSink:
    """One JSON object per line: the source object (its own text when `raw`, else its string
    cells) with the added columns as further keys; numbers and nulls native."""

    def __init__(
        self,
        fh: IO[bytes],
        source_columns: list[str],
        names: dict[str, str],
        *,
        raw: bool,
        embeddings: bool,
    ) -> None:
        self.fh = fh
        self.source_columns = source_columns
        self.added = list(names.values())
        self.raw = raw
        self.response = names["response"] if embeddings else None

    def write(self, part: pl.DataFrame, extra: dict[str, list[Any]]) -> None:
        if self.raw:
            sources = part.get_column(_RAW).to_list()
        elif self.source_columns:
            sources = (
                part.select(pl.struct(self.source_columns).struct.json_encode())
                .to_series()
                .to_list()
            )
        else:
            sources = ["{}"] * part.height
        keys = [*self.added, *extra]
        columns = [part.get_column(c).to_list() for c in self.added] + list(extra.values())
        if self.response is not None:  # embeddings: the vector's JSON text, spliced as is
            i = self.added.index(self.response)
            columns[i] = [None if v is None else orjson.Fragment(v) for v in columns[i]]
        out = bytearray()
        for src, *values in zip(sources, *columns, strict=True):
            head = src.rstrip().encode()[:-1].rstrip()  # the object without its closing brace
            tail = orjson.dumps(dict(zip(keys, values, strict=True)))
            out += head
            if not head.endswith(b"{"):
                out += b","
            out += tail[1:]
            out += b"\n"
        self.fh.write(out)

    def close(
        self, out_columns: list[str], source_columns: list[str], names: dict[str, str]
    ) -> None:
        pass  # an empty source gives an empty file


def _empty_schema(source_columns: list[str], names: dict[str, str]) -> dict[str, pl.DataType]:
    schema: dict[str, pl.DataType] = dict.fromkeys(source_columns, pl.String())
    for name, final in names.items():
        schema[final] = OUTCOME_TYPES[name]
    return schema


class _CallableModule(types.ModuleType):
    """`batchops.merge` is both this module and the API function (`batchops.merge(run_dir)`):
    a package attribute cannot be both, so the module is made callable."""

    def __call__(self, run_dir: Path | str, out: Path | str | None = None) -> Path:
        from batchops.api import merge

        return merge(Path(run_dir), Path(out) if out is not None else None)


sys.modules[__name__].__class__ = _CallableModule
