"""Read the source table exactly as written: every cell a string, rows streamed in file order.

No dtype inference anywhere: `007` stays `007`, `19.90` stays `19.90`, an empty cell is "" (never
null). CSV is parsed by pyarrow's streaming reader (RFC 4180 quoting, embedded newlines, BOM and
CRLF handled, memory flat) and handed out as all-String polars frames. Row positions (`__row_idx`)
are 0-based over the file's data rows, the numbering used by --start-row/--end-row everywhere.

Parquet and JSONL (one JSON object per line) are read by the same streaming layer: only the reader
(`_string_batches`) differs; slicing, only_rows and frames work on any stream of Arrow record
batches. Their typed values are rendered as the text a user would write (`render_arrow` /
`render_value`; the rules are in docs/inputs.md):

* null / missing key → ""; strings unchanged;
* integers → `7` (never `7.0`, nulls or not); floats → the shortest text that reads back the same
  float (`1.5`, `7.0`, `0.1`); decimals keep their scale (`19.90`);
* booleans → `true` / `false` (JSON's spelling, as the value is written in a JSONL file);
* dates `2024-01-02`, timestamps ISO 8601 `2024-01-02T03:04:05[.ffffff][+00:00]`;
* lists, structs, maps and JSON objects/arrays → compact JSON (`[1,2]`, `{"a":1}`).

`iter_frames(..., native=True)` hands out what merge needs to give a table back in its own format:
Parquet columns with their original types, JSONL rows as the original line text (`__raw`).
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import csv
import difflib
import json
import queue
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from batchops.errors import InputError
from batchops.spec import JobSpec

ROW_IDX = "__row_idx"
ROW_ID = "__row_id"
RAW = "__raw"  # native JSONL frames: the row's original JSON object text
_RESERVED = (ROW_IDX, ROW_ID, RAW)

# pyarrow parses in blocks; a quoted cell longer than a block cannot be parsed, so open_source
# grows the block until the whole file parses and remembers the size for iter_frames.
_BLOCK_SIZE = 1 << 18
_MAX_BLOCK_SIZE = 1 << 30
_MAX_LISTED = 5
_THREADS = False  # on 2 cores, single-threaded parsing was faster and leaner
_ID_ROWS = 1 << 16  # ids checked at once by the validation pass (polars calls cost ~0.3 ms)
_BATCH_ROWS = 1 << 15  # rows per record batch from the Parquet and JSONL readers
# Above this, a float parsed by orjson may be an integer it could not hold: re-read exactly.
_EXACT_FLOAT = float(2**53)


@dataclass(frozen=True)
class Source:
    """A validated source table and the slice [start_row, end_row) of it that a run uses."""

    path: Path
    format: str
    columns: list[str]  # source columns in file order
    n_rows: int  # rows in the selected slice
    id_column: str | None
    start_row: int = 0
    end_row: int = 0  # exclusive
    total_rows: int = 0  # data rows in the whole file
    image_column: str | None = None
    # Parquet: the file's Arrow schema (merge gives the columns back with these types).
    arrow_schema: pa.Schema | None = field(default=None, compare=False, repr=False)
    # Private: how to re-read the file, and what it looked like when it was validated.
    _block_size: int = field(default=_BLOCK_SIZE, repr=False)
    _fingerprint: tuple[int, int] = field(default=(0, 0), repr=False)

    @property
    def file_size(self) -> int:
        """Bytes of the file when it was validated."""
        return self._fingerprint[0]


def open_source(spec: JobSpec) -> Source:
    """Validate the source named by `spec` (readable, well-formed, ids, columns, slice); build nothing."""
    path = Path(spec.source)
    _check_readable(path)
    fmt = spec.source_format
    block_size = _BLOCK_SIZE
    schema: pa.Schema | None = None
    if fmt == "csv":
        columns = _read_header(path)
        _check_header(path, columns)
        _check_columns(path, columns, spec)
        total, block_size = _scan_csv(path, columns, spec.id_column)
    elif fmt == "parquet":
        schema, total = _parquet_meta(path)
        columns = list(schema.names)
        _check_header(path, columns)
        _check_columns(path, columns, spec)
        if spec.id_column is not None:
            ids = _IdCheck(path, spec.id_column, fmt)
            for batch in _string_batches(path, fmt, [spec.id_column]):
                ids.add(batch.column(0), ids.rows)
            ids.finish(block_size)
    elif fmt == "jsonl":
        columns, total = _scan_jsonl(path, spec)
    else:
        raise InputError(f"{path}: unknown source format {fmt!r} (csv, parquet or jsonl)")

    start = spec.start_row or 0
    end = total if spec.end_row is None else min(spec.end_row, total)
    if spec.end_row is not None and spec.end_row < start:
        raise InputError(f"--end-row {spec.end_row} is before --start-row {start}")
    if start > 0 and start >= total:
        raise InputError(f"--start-row {start} is past the end of {path} ({total} data rows)")

    st = path.stat()
    return Source(
        path=path,
        format=fmt,
        columns=columns,
        n_rows=max(0, end - start),
        id_column=spec.id_column,
        start_row=start,
        end_row=end,
        total_rows=total,
        image_column=spec.image_column,
        arrow_schema=schema,
        _block_size=block_size,
        _fingerprint=(st.st_size, st.st_mtime_ns),
    )


def iter_frames(
    source: Source,
    *,
    columns: list[str] | None = None,
    batch_rows: int = 100_000,
    only_rows: Collection[int] | pl.Series | np.ndarray | None = None,
    native: bool = False,
    ahead: bool = True,
) -> Iterator[pl.DataFrame]:
    """Stream the slice as all-String frames of at most `batch_rows` rows, in file order.

    Each frame has the requested columns (default: all) plus `__row_idx` (Int64) and `__row_id`
    (the id column's value, or str(__row_idx)). `only_rows` keeps just those row positions
    (positions outside the slice are ignored).

    native: Parquet columns keep their own types; a JSONL frame holds `__raw` (each row's JSON
    object text, unchanged) instead of the columns; CSV is the same either way.
    ahead: a CSV's next blocks are parsed in a thread while a frame is used (False: the caller
    makes the frames ahead itself, with read_ahead).
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    cols = list(source.columns if columns is None else columns)
    unknown = [c for c in cols if c not in source.columns]
    if unknown:
        raise InputError(_no_such_column(source.path, source.columns, unknown[0], "column"))
    _check_unchanged(source)

    # Parse only what is needed; pyarrow reads every column when given none, so keep one.
    read_cols = list(dict.fromkeys(cols + ([source.id_column] if source.id_column else [])))
    if not read_cols:
        read_cols = source.columns[:1]
    wanted = _wanted_rows(source, only_rows)
    if source.n_rows == 0 or (wanted is not None and wanted.size == 0):
        return
    if native and source.format == "jsonl":
        cols = [RAW]

    pending: list[pa.RecordBatch] = []
    n_pending = 0
    for idx, batch in _slice_batches(source, read_cols, wanted, native, ahead):
        pending.append(batch.append_column(ROW_IDX, int64_array(idx)))
        n_pending += batch.num_rows
        while n_pending >= batch_rows:
            table = pa.Table.from_batches(pending)
            yield _to_frame(table.slice(0, batch_rows), cols, source.id_column)
            rest = table.slice(batch_rows)
            pending, n_pending = rest.to_batches(), rest.num_rows
    if n_pending:
        yield _to_frame(pa.Table.from_batches(pending), cols, source.id_column)


def _check_utf8(data: bytes) -> None:
    """Raise pa.ArrowInvalid unless `data` is UTF-8: Arrow's validator on the bytes as one
    string value, zero-copy (no str is built; a cast would import pyarrow.compute, ~30 ms)."""
    offsets = np.array([0, len(data)], dtype=np.int64)
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    pa.Array.from_buffers(pa.large_string(), 1, buffers).validate(full=True)


def int64_array(values: np.ndarray) -> pa.Array:
    """A numpy integer array as an Arrow int64 array, zero-copy. (`pa.array(ndarray)` imports
    pandas, ~0.2 s of every command that reads a source.)"""
    data = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])


# ---------------------------------------------------------------------------------------------
# Reading


def _read_options(block_size: int) -> pacsv.ReadOptions:
    return pacsv.ReadOptions(block_size=block_size, use_threads=_THREADS)


def _parse_options(invalid_row_handler: Callable[[Any], str] | None = None) -> pacsv.ParseOptions:
    # newlines_in_values: quoted cells may hold line breaks; blank lines are not rows (as pandas).
    return pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid_row_handler)


def _convert_options(columns: list[str]) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns},
        include_columns=columns,
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )


def _open_reader(
    path: Path, columns: list[str], block_size: int, handler: Callable[[Any], str] | None = None
) -> Any:
    return pacsv.open_csv(
        path,
        read_options=_read_options(block_size),
        parse_options=_parse_options(handler),
        convert_options=_convert_options(columns),
    )


def _check_readable(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_header(path: Path) -> list[str]:
    """The header record, parsed like any other (it may be quoted); BOM stripped."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh, _csv_field_limit():
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError:
        raise InputError(_utf8_error(path)) from None
    if header is None:
        raise InputError(f"{path}: empty file (no header row)")
    return header


def _check_header(path: Path, columns: list[str]) -> None:
    for pos, name in enumerate(columns):
        if name == "":
            raise InputError(f"{path}: column {pos + 1} of the header has no name")
        if name in _RESERVED:
            raise InputError(f"{path}: column name {name!r} is reserved by batchops; rename it")
    seen: dict[str, int] = {}
    for pos, name in enumerate(columns):
        if name in seen:
            raise InputError(
                f"{path}: duplicate column name {name!r} (header columns {seen[name] + 1} and {pos + 1})"
            )
        seen[name] = pos


def _check_column(path: Path, columns: list[str], name: str | None, option: str) -> None:
    if name is not None and name not in columns:
        raise InputError(_no_such_column(path, columns, name, option))


def _check_columns(path: Path, columns: list[str], spec: JobSpec) -> None:
    _check_column(path, columns, spec.id_column, "--id-column")
    _check_column(path, columns, spec.image_column, "--image-column")
    if spec.image_dir is not None and not Path(spec.image_dir).is_dir():
        raise InputError(f"--image-dir {spec.image_dir}: not a directory")


def _no_such_column(path: Path, columns: list[str], name: str, what: str) -> str:
    hint = close_column(name, columns)
    did_you_mean = f"; did you mean {hint!r}?" if hint else ""
    return f"{what} {name!r}: no such column in {path} (columns: {list_columns(columns)}){did_you_mean}"


def close_column(name: str, columns: list[str]) -> str | None:
    """The column a misspelt name most likely meant (case-insensitive), if any."""
    lowered = {c.lower(): c for c in reversed(columns)}
    hint = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    return lowered[hint[0]] if hint else None


def list_columns(columns: list[str], limit: int = 20) -> str:
    """Column names for an error message, shortened when there are many."""
    shown = ", ".join(columns[:limit])
    return shown + (f", … ({len(columns)} in all)" if len(columns) > limit else "")


def _scan_csv(path: Path, columns: list[str], id_column: str | None) -> tuple[int, int]:
    """One streaming pass over the whole file: count rows, check every cell is UTF-8, every row has
    the header's number of fields, and (with an id column) ids are non-empty and unique.
    Returns (data rows, block size that parses the file)."""
    # The byte check (quotes, UTF-8) runs in a thread beside the parse (both mostly without the
    # GIL); its error comes first, as if it had run first.
    with ThreadPoolExecutor(max_workers=1) as pool:
        quotes = pool.submit(_check_quotes, path)
        try:
            found = _parse_csv(path, columns, id_column)
        except Exception:  # e.g. the ragged row's locator failing to decode a non-UTF-8 file
            quotes.result()
            raise
        quotes.result()
    pa.default_memory_pool().release_unused()  # the build that follows needs the room
    return found


def _parse_csv(path: Path, columns: list[str], id_column: str | None) -> tuple[int, int]:
    # Tokenizing checks every row's field count; only the converted columns are UTF-8-checked
    # by pyarrow, hence _check_quotes' byte check (converting every column cost ~0.3 s a million).
    read = [id_column] if id_column is not None else columns[:1]
    block_size = _BLOCK_SIZE
    while True:
        ragged: list[str] = []

        def on_invalid(row: Any, ragged: list[str] = ragged) -> str:
            ragged.append(row.text)
            return "skip"  # located precisely below, once the pass is over

        ids = _IdCheck(path, id_column, "csv") if id_column is not None else None
        total = 0
        held: list[pa.Array] = []  # ids checked _ID_ROWS at a time (a batch is ~2,500 rows)
        try:
            for batch in _open_reader(path, read, block_size, on_invalid):
                if ids is not None:
                    held.append(batch.column(id_column))
                    if total + batch.num_rows - ids.rows >= _ID_ROWS:
                        ids.add(pa.chunked_array(held), ids.rows)
                        held = []
                total += batch.num_rows
            if ids is not None and held:
                ids.add(pa.chunked_array(held), ids.rows)
        except pa.ArrowInvalid as exc:
            msg = str(exc)
            if "straddling" in msg and block_size < _MAX_BLOCK_SIZE:
                block_size *= 8  # a cell longer than a block: retry with bigger blocks
                continue
            if "Empty CSV file" in msg:  # a header without a line break, no data
                return 0, block_size
            if "UTF8" in msg or "UTF-8" in msg:
                raise InputError(_utf8_error(path)) from None
            raise InputError(f"{path}: not a readable CSV file ({msg})") from None
        if ragged:
            raise InputError(_ragged_error(path, len(columns), len(ragged)))
        if ids is not None:
            ids.finish(block_size)
        return total, block_size


def _check_quotes(path: Path) -> None:
    """A quote that is never closed makes its cell swallow every later row (pyarrow accepts it
    at the end of the file): refuse it, naming the line it opens on. Every well-formed quoted
    cell holds an even number of quote characters, so an even total is the fast common case;
    only an odd one is walked through. The same pass checks that the file is UTF-8."""
    odd = False
    rest = b""
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                odd ^= chunk.count(b'"') % 2 == 1
                # UTF-8 checked by arrow up to the last line break (no str is built: a big
                # str per block raised glibc's mmap threshold and the build's peak RSS).
                data = rest + chunk if rest else chunk
                cut = data.rfind(b"\n") + 1
                _check_utf8(data[:cut])
                rest = data[cut:]
        _check_utf8(rest)
    except pa.ArrowInvalid:
        raise InputError(_utf8_error(path)) from None
    if not odd:
        return
    line = _unclosed_quote_line(path.read_bytes())
    if line is not None:
        raise InputError(
            f"{path}: line {line}: a quoted cell is never closed (its opening quote takes in "
            'every row after it); close the quote or escape it as ""'
        )


def _unclosed_quote_line(data: bytes) -> int | None:
    """The physical line where a quoted cell opens that no quote closes, else None."""
    line = 1
    i, n = 0, len(data)
    field_start = True
    while i < n:
        c = data[i]
        if field_start and c == 0x22:  # an opening quote: find its closing one
            opened = line
            i += 1
            while True:
                j = data.find(b'"', i)
                if j < 0:
                    return opened
                line += data.count(b"\n", i, j)
                if data[j + 1 : j + 2] == b'"':  # an escaped quote inside the cell
                    i = j + 2
                    continue
                i = j + 1
                break
            field_start = False
            continue
        if c == 0x2C:  # ,
            field_start = True
        elif c == 0x0A:
            line += 1
            field_start = True
        else:
            field_start = False
        i += 1
    return None


class _IdCheck:
    """Non-empty, unique ids in flat memory: 8 bytes of hash per row; the strings of suspected
    duplicates are fetched by a second pass only when two hashes collide."""

    def __init__(self, path: Path, column: str, fmt: str) -> None:
        self.path, self.column, self.fmt = path, column, fmt
        self.hashes: list[pl.Series] = []
        self.empty_rows: list[int] = []
        self.n_empty = 0
        self.rows = 0

    def add(self, values: pa.Array | pa.ChunkedArray, first_row: int) -> None:
        # Through a table: pl.Series(arrow array) imports pyarrow.compute (~30 ms).
        ids = arrow_column(pa.Table.from_arrays([values], names=["id"]), "id")
        self.rows += len(ids)
        empty = (ids == "").arg_true()
        self.n_empty += len(empty)
        if len(self.empty_rows) < _MAX_LISTED:
            self.empty_rows += (empty.head(_MAX_LISTED) + first_row).to_list()
        self.hashes.append(ids.hash(seed=0))

    def finish(self, block_size: int) -> None:
        if self.n_empty:
            rows = ", ".join(map(str, self.empty_rows[:_MAX_LISTED]))
            more = f" and {self.n_empty - _MAX_LISTED} more" if self.n_empty > _MAX_LISTED else ""
            raise InputError(
                f'{self.path}: id column "{self.column}" is empty in data row(s) {rows}{more}'
            )
        # polars sorts a million hashes in ~25 ms (numpy ~60 ms, on the dry run's serial path)
        hashes = pl.concat(self.hashes).sort().to_numpy() if self.hashes else np.empty(0, np.uint64)
        self.hashes = []
        repeated = hashes[1:][hashes[1:] == hashes[:-1]]  # sorted (np.unique imports numpy.ma)
        suspects = repeated[:1]
        if repeated.size > 1:
            suspects = repeated[np.concatenate(([True], repeated[1:] != repeated[:-1]))]
        if suspects.size:
            self._report_duplicates(suspects, block_size)

    def _report_duplicates(self, suspects: np.ndarray, block_size: int) -> None:
        found: dict[str, list[int]] = {}
        pos = 0
        for batch in _string_batches(self.path, self.fmt, [self.column], block_size):
            ids = pl.Series(batch.column(0))
            hit = ids.hash(seed=0).is_in(pl.Series(suspects)).arg_true()
            for i, value in zip(hit.to_list(), ids.gather(hit).to_list(), strict=True):
                found.setdefault(value, []).append(pos + i)
            pos += batch.num_rows
        dups = [(v, rows) for v, rows in found.items() if len(rows) > 1]
        if not dups:
            return  # only a hash collision
        dups.sort(key=lambda d: d[1][0])
        shown = [
            f'"{v}" (rows {", ".join(map(str, r[:_MAX_LISTED]))}{", …" if len(r) > _MAX_LISTED else ""})'
            for v, r in dups[:_MAX_LISTED]
        ]
        more = f" and {len(dups) - _MAX_LISTED} more" if len(dups) > _MAX_LISTED else ""
        raise InputError(
            f'{self.path}: id column "{self.column}" has duplicate values: {"; ".join(shown)}{more} '
            "(rows are 0-based data rows)"
        )


def _check_unchanged(source: Source) -> None:
    try:
        st = source.path.stat()
    except OSError:
        raise InputError(f"{source.path}: file not found") from None
    if (st.st_size, st.st_mtime_ns) != source._fingerprint:
        raise InputError(f"{source.path}: the file changed after it was validated; start again")


def _wanted_rows(source: Source, only_rows: Any) -> np.ndarray | None:
    """Sorted unique row positions inside the slice, or None for the whole slice."""
    if only_rows is None:
        return None
    if isinstance(only_rows, pl.Series):
        arr = only_rows.cast(pl.Int64).to_numpy()
    else:
        arr = (
            np.fromiter(only_rows, dtype=np.int64)
            if not isinstance(only_rows, np.ndarray)
            else only_rows
        )
    arr = np.unique(arr.astype(np.int64, copy=False))
    lo, hi = np.searchsorted(arr, [source.start_row, source.end_row])
    return arr[lo:hi]


def _slice_batches(
    source: Source,
    read_cols: list[str],
    wanted: np.ndarray | None,
    native: bool = False,
    ahead: bool = True,
) -> Iterator[tuple[np.ndarray, pa.RecordBatch]]:
    """Record batches of the slice (or of the wanted rows) with their row positions."""
    start, end = source.start_row, source.end_row
    last = end if wanted is None else int(wanted[-1]) + 1
    pos = 0
    reader = _native_batches if native else _string_batches
    batches = reader(source.path, source.format, read_cols, source._block_size)
    if ahead and source.format == "csv":  # parsed without the GIL while this one is used
        batches = read_ahead(batches)
    try:
        for batch in batches:
            n = batch.num_rows
            lo, hi = max(start, pos), min(last, pos + n)
            if lo < hi:
                if wanted is None:
                    yield np.arange(lo, hi, dtype=np.int64), batch.slice(lo - pos, hi - lo)
                else:
                    a, b = np.searchsorted(wanted, [lo, hi])
                    if b > a:
                        idx = wanted[a:b]
                        yield idx, batch.take(int64_array(idx - pos))
            pos += n
            if pos >= last:
                break  # no need to parse the rest of the file
    except pa.ArrowInvalid as exc:
        raise InputError(f"{source.path}: cannot read ({exc})") from None


_AHEAD = 8  # record batches parsed ahead (~256 KiB of CSV each): a text frame takes ~7
T = TypeVar("T")


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def read_ahead(items: Iterator[T], depth: int = _AHEAD) -> Iterator[T]:
    """The items of `items`, in order, made by a thread of their own while the caller uses the
    ones before: at most depth + 1 made and not yet taken (0: only the next one). An exception
    is raised here, where it happened. Closing this generator stops the thread."""
    ready: queue.SimpleQueue[T | _Raised | None] = queue.SimpleQueue()
    room = threading.Semaphore(depth + 1)
    stop = threading.Event()

    def make() -> None:
        try:
            for item in items:
                ready.put(item)
                while not room.acquire(timeout=0.05):  # wait for the caller to take one
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
            ready.put(None)
        except BaseException as exc:  # handed over to the caller, whatever it is
            ready.put(_Raised(exc))

    room.acquire()  # the first item is made at once
    thread = threading.Thread(target=make, name="batchops-read-ahead", daemon=True)
    thread.start()
    try:
        while (got := ready.get()) is not None:
            if isinstance(got, _Raised):
                raise got.exc
            room.release()  # taken: the next one may be made
            yield got
    finally:
        stop.set()
        thread.join()


def _to_frame(table: pa.Table, cols: list[str], id_column: str | None) -> pl.DataFrame:
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    row_id = pl.col(id_column if id_column else ROW_IDX).cast(pl.String)
    return df.select(*cols, pl.col(ROW_IDX), row_id.alias(ROW_ID))


# ---------------------------------------------------------------------------------------------
# Readers: every format as a stream of record batches (strings, or native for merge)


def _string_batches(
    path: Path, fmt: str, columns: list[str], block_size: int = _BLOCK_SIZE
) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns`, every value rendered as a non-null string."""
    if fmt == "csv":
        yield from _open_reader(path, columns, block_size)
    elif fmt == "parquet":
        for batch in _parquet_batches(path, columns):
            yield pa.RecordBatch.from_arrays(
                [render_arrow(batch.column(i)) for i in range(batch.num_columns)], names=columns
            )
    else:
        yield from _jsonl_batches(path, columns, raw=False)


def _native_batches(
    path: Path, fmt: str, columns: list[str], block_size: int = _BLOCK_SIZE
) -> Iterator[pa.RecordBatch]:
    """Parquet: the columns with their own types; JSONL: `__raw` plus the rendered columns."""
    if fmt == "parquet":
        for batch in _parquet_batches(path, columns):
            yield pa.RecordBatch.from_arrays(
                [_plain(batch.column(i)) for i in range(batch.num_columns)], names=columns
            )
    elif fmt == "jsonl":
        yield from _jsonl_batches(path, columns, raw=True)
    else:
        yield from _string_batches(path, fmt, columns, block_size)


def _plain(arr: pa.Array) -> pa.Array:
    # Dictionary columns (pandas categoricals) as their values: polars would make them
    # Categorical, which does not concatenate across frames; merge restores the type on write.
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _parquet_meta(path: Path) -> tuple[pa.Schema, int]:
    import pyarrow.parquet as pq  # ~20 ms: only for Parquet sources

    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    # The pandas index/metadata describe a DataFrame, not this table: not carried along.
    return f.schema_arrow.remove_metadata(), f.metadata.num_rows


def _parquet_batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        # Select by position: a top-level name containing "." must not be taken as a path.
        names = f.schema_arrow.names
        yield from f.iter_batches(
            batch_size=_BATCH_ROWS,
            columns=[names[names.index(c)] for c in columns],
            use_threads=_THREADS,
        )
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """(line number, the line without its line break, the parsed object) of every data row;
    blank lines are not rows (as in CSV)."""
    with path.open("rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            if line_no == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            text = line.strip()
            if not text:
                continue
            yield line_no, text, _parse_json_line(path, line_no, text)


def _parse_json_line(path: Path, line_no: int, text: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        obj = _exact_json(path, line_no, text)  # e.g. 1e400, which orjson refuses
    if not isinstance(obj, dict):
        kind = "an array" if isinstance(obj, list) else f"a {type(obj).__name__}"
        raise InputError(
            f"{path}: line {line_no} is {kind}, not a JSON object (JSONL needs one object per line)"
        )
    # orjson reads integers beyond 64 bits as floats: read such a line again, exactly.
    for v in obj.values():
        if isinstance(v, float) and abs(v) >= _EXACT_FLOAT and v.is_integer():
            exact: dict[str, Any] = _exact_json(path, line_no, text)
            return exact
    return obj


def _exact_json(path: Path, line_no: int, text: bytes) -> Any:
    try:
        return json.loads(text)
    except UnicodeDecodeError:
        raise InputError(f"{path}: line {line_no} is not UTF-8; save it as UTF-8") from None
    except ValueError as exc:
        raise InputError(f"{path}: line {line_no} is not valid JSON ({exc})") from None


def _scan_jsonl(path: Path, spec: JobSpec) -> tuple[list[str], int]:
    """One pass: every line an object; columns = every key, in order of first appearance;
    ids non-empty and unique. Returns (columns, data rows)."""
    keys: dict[str, None] = {}
    id_col = spec.id_column
    ids = _IdCheck(path, id_col, "jsonl") if id_col is not None else None
    pending: list[str] = []
    total = 0
    for _, _, obj in _jsonl_rows(path):
        if len(obj) != len(keys) or any(k not in keys for k in obj):
            for k in obj:
                keys.setdefault(k, None)
        if ids is not None:
            pending.append(render_value(obj.get(id_col or "")))
            if len(pending) >= _BATCH_ROWS:
                ids.add(pa.array(pending, pa.string()), ids.rows)
                pending = []
        total += 1
    columns = list(keys)
    if total == 0:
        raise InputError(f"{path}: no data rows (an empty JSONL file)")
    _check_header(path, columns)
    _check_columns(path, columns, spec)
    if ids is not None:
        if pending:
            ids.add(pa.array(pending, pa.string()), ids.rows)
        ids.finish(_BLOCK_SIZE)
    return columns, total


def _jsonl_batches(path: Path, columns: list[str], *, raw: bool) -> Iterator[pa.RecordBatch]:
    names = ([RAW] if raw else []) + columns
    cells: list[list[str]] = [[] for _ in names]
    n = 0
    for _, text, obj in _jsonl_rows(path):
        if raw:
            cells[0].append(text.decode("utf-8"))
        for out, c in zip(cells[raw:], columns, strict=True):
            out.append(render_value(obj.get(c)))
        n += 1
        if n == _BATCH_ROWS:
            yield pa.RecordBatch.from_arrays([pa.array(c, pa.string()) for c in cells], names=names)
            cells, n = [[] for _ in names], 0
    if n:
        yield pa.RecordBatch.from_arrays([pa.array(c, pa.string()) for c in cells], names=names)


# ---------------------------------------------------------------------------------------------
# Rendering typed values as text (Parquet columns, JSONL values)


def render_value(v: Any) -> str:
    """One JSON value (as parsed from a JSONL line) as the text a user would expect."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back as the same float
    try:
        return orjson.dumps(v).decode()
    except TypeError:  # integers beyond 64 bits (exact re-read): the standard encoder
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def render_arrow(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An Arrow column of any type as non-null strings, by the rules in the module docstring."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        return render_arrow(arr.dictionary_decode())
    s = pl.Series(_render_series(arr, t))
    return s.fill_null("").to_arrow().cast(pa.string())


def _render_series(arr: pa.Array, t: pa.DataType) -> pl.Series | list[str | None]:
    if pa.types.is_null(t):
        return pl.Series([None] * len(arr), dtype=pl.String)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pl.Series(arr.cast(pa.large_string()))
    if pa.types.is_boolean(t):
        return pl.Series(arr).cast(pl.String)  # true / false
    if pa.types.is_integer(t) or pa.types.is_decimal(t) or pa.types.is_date(t):
        return pl.Series(arr).cast(pl.String)
    if pa.types.is_floating(t):
        # polars writes the shortest round-trip text; float16 is widened first.
        return pl.Series(arr.cast(pa.float64()) if pa.types.is_float16(t) else arr).cast(pl.String)
    if pa.types.is_timestamp(t):
        fmt = "%Y-%m-%dT%H:%M:%S%.f" + ("%:z" if t.tz else "")
        return pl.Series(arr).dt.to_string(fmt)
    if pa.types.is_time(t):
        return pl.Series(arr).cast(pl.String)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [None if b is None else base64.b64encode(b).decode() for b in arr.to_pylist()]
    if pa.types.is_nested(t):
        return _nested_json(arr)
    return [None if v is None else str(v) for v in arr.to_pylist()]  # durations, intervals …


def _nested_json(arr: pa.Array) -> pl.Series | list[str | None]:
    """Lists/structs/maps as compact JSON (polars' encoder, else the standard one)."""
    try:
        wrapped = pl.DataFrame({"v": pl.Series(arr)}).select(
            pl.struct("v").struct.json_encode().str.strip_prefix('{"v":').str.strip_suffix("}")
        )
        out = wrapped.to_series()
        return pl.Series([None if v == "null" else v for v in out.to_list()], dtype=pl.String)
    except Exception:  # a type polars cannot encode (e.g. maps with non-string keys)
        return [None if v is None else _json_text(v) for v in arr.to_pylist()]


def _json_text(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str)


# ---------------------------------------------------------------------------------------------
# Precise error messages (error paths only: these re-read the file slowly)


def _utf8_error(path: Path) -> str:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1  # offset: file position of the decoder's input (its pending bytes first)
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                data = exc.object
                line += data[: exc.start].count(b"\n")
                where = offset - pending + exc.start
                snippet = bytes(data[exc.start : exc.start + 4])
                return f"{path}: not UTF-8 at line {line} (byte {where}: {snippet!r}); save it as UTF-8"
            line += block.count(b"\n")
            offset += len(block)
    return f"{path}: not UTF-8; save it as UTF-8"


def _ragged_error(path: Path, n_cols: int, n_bad: int) -> str:
    with path.open(encoding="utf-8-sig", newline="") as fh, _csv_field_limit():
        reader = csv.reader(fh)
        next(reader, None)
        row = -1
        for rec in reader:
            if not rec:
                continue  # blank line, not a row
            row += 1
            if len(rec) != n_cols:
                also = f" ({n_bad} such rows in all)" if n_bad > 1 else ""
                return (
                    f"{path}: line {reader.line_num} (data row {row}) has {len(rec)} field(s), "
                    f"the header has {n_cols}{also}; quote cells that contain commas or line breaks"
                )
    return f"{path}: {n_bad} row(s) do not have the header's {n_cols} fields"


@contextlib.contextmanager
def _csv_field_limit() -> Iterator[None]:
    # The csv module refuses cells over 128 KiB by default; our cells may be longer.
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


__all__ = [
    "RAW",
    "ROW_ID",
    "ROW_IDX",
    "Source",
    "close_column",
    "iter_frames",
    "list_columns",
    "read_ahead",
    "open_source",
    "render_arrow",
    "render_value",
]


def arrow_column(table: pa.Table, name: str) -> pl.Series:
    """A column of an Arrow table as a polars Series (a Series built from an Arrow array
    directly imports pyarrow.compute, ~30 ms of a dry run)."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.get_column(name)
