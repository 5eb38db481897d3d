"""Read the source table exactly as written: every cell a string, rows streamed in file order.

No dtype inference anywhere: `007` stays `007`, `19.90` stays `19.90`, an empty cell is "" (never
null). CSV is parsed by pyarrow's streaming reader (RFC 4180 quoting, embedded newlines, BOM and
CRLF handled, memory flat) and handed out as all-String polars frames. Row positions (`__row_idx`)
are 0-based over the file's data rows, the numbering used by --start-row/--end-row everywhere.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import difflib
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from batchops.errors import InputError
from batchops.spec import JobSpec

ROW_IDX = "__row_idx"
ROW_ID = "__row_id"
_RESERVED = (ROW_IDX, ROW_ID)

# pyarrow parses in blocks; a quoted cell longer than a block cannot be parsed, so open_source
# grows the block until the whole file parses and remembers the size for iter_frames.
_BLOCK_SIZE = 1 << 18
_MAX_BLOCK_SIZE = 1 << 30
_MAX_LISTED = 5
_THREADS = False  # on 2 cores, single-threaded parsing was faster and leaner


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
    if spec.source_format != "csv":
        raise InputError(
            f"{path}: source format {spec.source_format!r} is not supported yet (use csv)"
        )

    columns = _read_header(path)
    _check_header(path, columns)
    _check_column(path, columns, spec.id_column, "--id-column")
    _check_column(path, columns, spec.image_column, "--image-column")
    if spec.image_dir is not None and not Path(spec.image_dir).is_dir():
        raise InputError(f"--image-dir {spec.image_dir}: not a directory")

    total, block_size = _scan_csv(path, columns, spec.id_column)

    start = spec.start_row or 0
    end = total if spec.end_row is None else min(spec.end_row, total)
    if spec.end_row is not None and spec.end_row < start:
        raise InputError(f"--end-row {spec.end_row} is before --start-row {start}")
    if start > 0 and start >= total:
        raise InputError(f"--start-row {start} is past the end of {path} ({total} data rows)")

    st = path.stat()
    return Source(
        path=path,
        format="csv",
        columns=columns,
        n_rows=max(0, end - start),
        id_column=spec.id_column,
        start_row=start,
        end_row=end,
        total_rows=total,
        image_column=spec.image_column,
        _block_size=block_size,
        _fingerprint=(st.st_size, st.st_mtime_ns),
    )


def iter_frames(
    source: Source,
    *,
    columns: list[str] | None = None,
    batch_rows: int = 100_000,
    only_rows: Collection[int] | pl.Series | np.ndarray | None = None,
) -> Iterator[pl.DataFrame]:
    """Stream the slice as all-String frames of at most `batch_rows` rows, in file order.

    Each frame has the requested columns (default: all) plus `__row_idx` (Int64) and `__row_id`
    (the id column's value, or str(__row_idx)). `only_rows` keeps just those row positions
    (positions outside the slice are ignored).
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

    pending: list[pa.RecordBatch] = []
    n_pending = 0
    for idx, batch in _slice_batches(source, read_cols, wanted):
        pending.append(batch.append_column(ROW_IDX, pa.array(idx, pa.int64())))
        n_pending += batch.num_rows
        while n_pending >= batch_rows:
            table = pa.Table.from_batches(pending)
            yield _to_frame(table.slice(0, batch_rows), cols, source.id_column)
            rest = table.slice(batch_rows)
            pending, n_pending = rest.to_batches(), rest.num_rows
    if n_pending:
        yield _to_frame(pa.Table.from_batches(pending), cols, source.id_column)


# ---------------------------------------------------------------------------------------------
# Reading


def _read_options(block_size: int) -> pacsv.ReadOptions:
    return pacsv.ReadOptions(block_size=block_size, use_threads=_THREADS)


def _parse_options(invalid_row_handler=None) -> pacsv.ParseOptions:
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


def _open_reader(path: Path, columns: list[str], block_size: int, handler=None):
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
    block_size = _BLOCK_SIZE
    while True:
        ragged: list[str] = []

        def on_invalid(row, ragged=ragged) -> str:
            ragged.append(row.text)
            return "skip"  # located precisely below, once the pass is over

        ids = _IdCheck(path, id_column) if id_column is not None else None
        total = 0
        try:
            for batch in _open_reader(path, columns, block_size, on_invalid):
                if ids is not None:
                    ids.add(batch.column(id_column), total)
                total += batch.num_rows
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
        pa.default_memory_pool().release_unused()  # the build that follows needs the room
        return total, block_size


class _IdCheck:
    """Non-empty, unique ids in flat memory: 8 bytes of hash per row; the strings of suspected
    duplicates are fetched by a second pass only when two hashes collide."""

    def __init__(self, path: Path, column: str) -> None:
        self.path, self.column = path, column
        self.hashes: list[np.ndarray] = []
        self.empty_rows: list[int] = []
        self.n_empty = 0

    def add(self, values: pa.Array, first_row: int) -> None:
        ids = pl.Series(values)
        empty = (ids == "").arg_true()
        self.n_empty += len(empty)
        if len(self.empty_rows) < _MAX_LISTED:
            self.empty_rows += (empty.head(_MAX_LISTED) + first_row).to_list()
        self.hashes.append(ids.hash(seed=0).to_numpy())

    def finish(self, block_size: int) -> None:
        if self.n_empty:
            rows = ", ".join(map(str, self.empty_rows[:_MAX_LISTED]))
            more = f" and {self.n_empty - _MAX_LISTED} more" if self.n_empty > _MAX_LISTED else ""
            raise InputError(
                f'{self.path}: id column "{self.column}" is empty in data row(s) {rows}{more}'
            )
        hashes = np.sort(np.concatenate(self.hashes)) if self.hashes else np.empty(0, np.uint64)
        self.hashes = []
        suspects = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        if suspects.size:
            self._report_duplicates(suspects, block_size)

    def _report_duplicates(self, suspects: np.ndarray, block_size: int) -> None:
        found: dict[str, list[int]] = {}
        pos = 0
        for batch in _open_reader(self.path, [self.column], block_size):
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


def _wanted_rows(source: Source, only_rows) -> np.ndarray | None:
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
    source: Source, read_cols: list[str], wanted: np.ndarray | None
) -> Iterator[tuple[np.ndarray, pa.RecordBatch]]:
    """Record batches of the slice (or of the wanted rows) with their row positions."""
    start, end = source.start_row, source.end_row
    last = end if wanted is None else int(wanted[-1]) + 1
    pos = 0
    try:
        for batch in _open_reader(source.path, read_cols, source._block_size):
            n = batch.num_rows
            lo, hi = max(start, pos), min(last, pos + n)
            if lo < hi:
                if wanted is None:
                    yield np.arange(lo, hi, dtype=np.int64), batch.slice(lo - pos, hi - lo)
                else:
                    a, b = np.searchsorted(wanted, [lo, hi])
                    if b > a:
                        idx = wanted[a:b]
                        yield idx, batch.take(pa.array(idx - pos))
            pos += n
            if pos >= last:
                break  # no need to parse the rest of the file
    except pa.ArrowInvalid as exc:
        raise InputError(f"{source.path}: cannot read ({exc})") from None


def _to_frame(table: pa.Table, cols: list[str], id_column: str | None) -> pl.DataFrame:
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    row_id = pl.col(id_column) if id_column else pl.col(ROW_IDX).cast(pl.String)
    return df.select(*cols, pl.col(ROW_IDX), row_id.alias(ROW_ID))


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
def _csv_field_limit():
    # The csv module refuses cells over 128 KiB by default; our cells may be longer.
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


__all__ = [
    "ROW_ID",
    "ROW_IDX",
    "Source",
    "close_column",
    "iter_frames",
    "list_columns",
    "open_source",
]
