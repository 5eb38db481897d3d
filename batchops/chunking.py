"""Pack requests into JSONL batch files under the request-count and byte limits.

Text-only requests are built column-wise, one frame of rows at a time: the prompt is a polars
`concat_str` of the template's literals and columns, custom_id and text are JSON-escaped by
polars, and spliced between constant pieces taken from render.request_line. A frame's lines end
up in one contiguous Arrow buffer that is written to the chunk files by byte ranges, so no Python
object is made per row except the ids the caller asked for. Rows with images are built one by one
(reading and base64-encoding files dominates there).

A chunk covers up to spec.batch_size consecutive selected rows; rows that cannot be sent
(missing image, request over the file limit) are reported in its `skipped` instead of written.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Collection, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl

from batchops import pricing, render
from batchops.errors import InputError
from batchops.records import BuiltChunk, Skipped
from batchops.render import ImageProblem
from batchops.source import ROW_ID, ROW_IDX, Source, iter_frames
from batchops.spec import MAX_BYTES_PER_FILE, MAX_REQUESTS_PER_FILE, JobSpec

TokenEstimator = Callable[[pl.Series], pl.Series]
FrameFilter = Callable[[pl.DataFrame], pl.DataFrame]

# Rows rendered at once, sized so a frame's JSON stays near _FRAME_BYTES: the columnar pipeline
# holds a few copies of it, and wide rows must not blow the memory budget.
_FRAME_BYTES = 4 << 20  # measured: 4 MiB ≈ 246 MiB peak RSS at full speed; 6 MiB ≈ 265
_FRAME_ROWS = (500, 50_000)
_IMAGE_FRAME_ROWS = 1_000  # image rows are written one at a time anyway
_THREAD_WRITES = 1 << 16  # bytes from which a write goes to the write thread
TEXT_COL = "__text"  # a frame's rendered prompt (what a FrameFilter sees)
SYSTEM_COL = "__system"  # … and rendered system message (with placeholders)
# The frame column that fills each slot of render.line_template.
_SLOT_COLS = {render.CUSTOM_ID: ROW_ID, render.TEXT: TEXT_COL, render.SYSTEM: SYSTEM_COL}
Pieces = tuple[list[str], list[str]]  # render.line_template: literals, slots


def text_template(spec: JobSpec, model: str) -> tuple[str, str, str] | None:
    """The literals around custom_id and text that every line of a text-only job is made of
    (the file check's template), or None when lines are made otherwise (images, a per-row
    system message)."""
    if spec.image_column is not None:
        return None
    literals, slots = render.line_template(spec, model)
    if slots != [render.CUSTOM_ID, render.TEXT]:
        return None
    return literals[0], literals[1], literals[2]


def default_file_name(no: int) -> str:
    return f"chunk_{no:06d}.jsonl"


def build_chunks(
    source: Source,
    spec: JobSpec,
    *,
    model: str,
    out_dir: Path,
    first_chunk_no: int,
    only_rows: Collection[int] | None = None,
    file_name: Callable[[int], str] = default_file_name,
    estimate_tokens: TokenEstimator | None = None,
    max_bytes: int = MAX_BYTES_PER_FILE,
    fsync: bool = True,
    keep: FrameFilter | None = None,
    custom_ids: bool = True,
) -> Iterator[BuiltChunk]:
    """Write the slice's (or only_rows') requests in source order into chunk files; yield each
    file's BuiltChunk as soon as the file is in place (written to .tmp, then renamed).

    Image paths are relative to spec.image_dir, or to the source file's folder without one.
    max_bytes: a lower per-file byte limit than the Batch API's (tests, other providers).
    fsync: flush each file to disk before yielding it (costs ~3 ms per file on slow disks).
    keep: the rows of each frame to build, chosen once its texts are rendered (TEXT_COL,
    SYSTEM_COL); the rows it drops are neither written nor skipped (the dry run's dedup).
    custom_ids: False leaves each text chunk's custom_ids empty (a dry run only counts rows: a
    million ids as Python strings cost ~0.07 s).
    """
    render.check_template(spec.prompt, source.columns, source_name=source.path)
    if spec.system is not None:
        render.check_template(spec.system, source.columns, what="--system", source_name=source.path)
    # Also validates the body options before any work.
    pieces = render.line_template(spec, model)
    image_col = spec.image_column
    if image_col is not None and image_col not in source.columns:
        raise InputError(f"--image-column {image_col!r}: no such column in {source.path}")
    fields = render.template_fields(spec.prompt) + render.system_fields(spec)
    columns = list(dict.fromkeys(fields + ([image_col] if image_col else [])))

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ChunkWriter(
        out_dir,
        first_chunk_no,
        file_name,
        min(spec.batch_size, MAX_REQUESTS_PER_FILE),
        min(max_bytes, MAX_BYTES_PER_FILE),
        fsync,
    )
    tokens = _TokenCounter(spec, estimate_tokens)
    texts = [render.text_expr(spec.prompt).alias(TEXT_COL)]
    per_row_system = bool(render.system_fields(spec))
    if per_row_system:  # a system message per row, rendered like the prompt
        texts.append(render.text_expr(spec.system or "").alias(SYSTEM_COL))

    try:
        if image_col is None:
            rows = _text_frame_rows(source, pieces)
            # Only what the lines are made of is kept (the source columns are freed at once).
            kept = [ROW_IDX, ROW_ID, TEXT_COL] + ([SYSTEM_COL] if per_row_system else [])
            frames: Iterator[pl.DataFrame] = (
                frame.with_columns(texts).select(kept)
                for frame in iter_frames(
                    source, columns=columns, batch_rows=rows, only_rows=only_rows
                )
            )
            if keep is not None:
                frames = _refill(map(keep, frames), rows)
            for frame in frames:
                if spec.endpoint == render.EMBEDDINGS:
                    frame = yield from _skip_empty_inputs(frame, writer)
                yield from _pack_text(frame, pieces, tokens, writer, custom_ids)
        else:
            image_dir = Path(spec.image_dir) if spec.image_dir else source.path.parent
            for frame in iter_frames(
                source, columns=columns, batch_rows=_IMAGE_FRAME_ROWS, only_rows=only_rows
            ):
                frame = frame.with_columns(texts)
                yield from _pack_images(
                    keep(frame) if keep is not None else frame,
                    spec,
                    model,
                    image_col,
                    image_dir,
                    pieces,
                    tokens,
                    writer,
                )
        if writer.open:
            yield writer.close()
    finally:
        writer.abort()  # an abandoned generator leaves no half-written .tmp behind


# ---------------------------------------------------------------------------------------------


def _refill(frames: Iterator[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
    """Frames of `rows` rows (the last may be shorter) out of frames a filter thinned: the
    frames only_rows would have given (token estimates sample each frame: the same figures)."""
    pending: list[pl.DataFrame] = []
    n = 0
    for frame in frames:
        if not pending and frame.height == rows:
            yield frame
            continue
        pending.append(frame)
        n += frame.height
        while n >= rows:
            whole = pl.concat(pending) if len(pending) > 1 else pending[0]
            yield whole.slice(0, rows)
            rest = whole.slice(rows)
            pending, n = [rest], rest.height
    if n:
        yield pl.concat(pending) if len(pending) > 1 else pending[0]


def _skip_empty_inputs(
    frame: pl.DataFrame, writer: _ChunkWriter
) -> Generator[BuiltChunk, None, pl.DataFrame]:
    """Embeddings refuse an empty input (400 per request): such rows are skipped, not sent."""
    empty = frame.filter(pl.col(TEXT_COL) == "")
    for idx in empty[ROW_IDX].to_list():
        writer.skip(idx, "empty input: the embeddings endpoint refuses an empty text")
        if writer.full:
            yield writer.close()
    return frame.filter(pl.col(TEXT_COL) != "") if empty.height else frame


def _text_frame_rows(source: Source, pieces: Pieces) -> int:
    line_bytes = source.file_size / max(1, source.total_rows) + sum(map(len, pieces[0]))
    lo, hi = _FRAME_ROWS
    return int(min(hi, max(lo, _FRAME_BYTES // line_bytes)))


# What _json_str escapes: control characters, quote, backslash (polars' encoder) and
# render.LINE_BREAK_ESCAPES.
_ESCAPED = r'[\x00-\x1f"\\\x{2028}\x{2029}\x{85}]'


def _json_str(expr: pl.Expr, line_breaks: bool = True) -> pl.Expr:
    """A String column as JSON string literals (quotes included), escaped by polars' encoder,
    plus the same line-break escapes as render.dumps (line_breaks=False: the caller knows no
    value holds one; the pass that would find none cost ~0.06 s a million rows)."""
    encoded = pl.struct(expr.alias("s")).struct.json_encode()
    strings = encoded.str.strip_prefix('{"s":').str.strip_suffix("}")
    if not line_breaks:
        return strings
    return strings.str.replace_many(
        list(render.LINE_BREAK_ESCAPES), list(render.LINE_BREAK_ESCAPES.values())
    )


# The characters render.LINE_BREAK_ESCAPES escapes (JSON allows them raw, JavaScript does not).
_LINE_BREAKS = r"[\x{2028}\x{2029}\x{85}]"


def _pack_text(
    frame: pl.DataFrame,
    pieces: Pieces,
    tokens: _TokenCounter,
    writer: _ChunkWriter,
    custom_ids: bool = True,
) -> Iterator[BuiltChunk]:
    literals, slots = pieces
    # The token estimate (polars regexes, without the GIL) runs beside the lines' own select,
    # which keeps one core busy: the build thread waited ~3 ms a frame for it.
    per_row = _thread("tokens").submit(tokens.per_row, frame[TEXT_COL], _systems(frame))
    # Ids seldom hold a character JSON escapes: then the id between quotes is its JSON (the
    # encoder's pass over the ids cost ~0.05 s a million rows).
    plain_ids = not frame[ROW_ID].str.contains(_ESCAPED).any()
    parts: list[pl.Expr] = []
    for literal, slot in zip(literals, slots, strict=False):
        if slot == render.CUSTOM_ID and plain_ids:
            parts += [pl.lit(literal + '"'), pl.col(ROW_ID), pl.lit('"')]
        else:
            col = frame[_SLOT_COLS[slot]]
            breaks = bool(col.str.contains(_LINE_BREAKS).any())
            parts += [pl.lit(literal), _json_str(pl.col(_SLOT_COLS[slot]), breaks)]
    line = pl.concat_str(*parts, pl.lit(literals[-1] + "\n"))
    lines = frame.select(line).to_series().rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
    # large_string: one data buffer holding every line back to back, int64 offsets into it.
    _, off_buf, data = lines.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64, count=len(lines) + 1, offset=lines.offset * 8)
    data_view = memoryview(data)
    row_idx = frame[ROW_IDX].to_numpy()
    ids = frame[ROW_ID].to_list() if custom_ids else None
    cum_tokens = np.concatenate(([0], np.cumsum(per_row.result())))

    n, p = len(frame), 0
    while p < n:
        # The longest run of rows from p that fits the open chunk's remaining rows and bytes.
        fit_bytes = (
            int(np.searchsorted(offsets, offsets[p] + writer.room_bytes, side="right")) - 1 - p
        )
        k = min(writer.room_rows, n - p, fit_bytes)
        if k > 0:
            writer.add(
                data_view[offsets[p] : offsets[p + k]],
                row_idx[p : p + k].tolist(),
                ids[p : p + k] if ids is not None else [],
                int(cum_tokens[p + k] - cum_tokens[p]),
            )
            p += k
        elif writer.n_bytes == 0:  # this one request alone is over the file limit
            size = int(offsets[p + 1] - offsets[p])
            writer.skip(int(row_idx[p]), _too_big(size, writer.max_bytes))
            p += 1
        if writer.full or (k <= 0 and writer.n_bytes):
            yield writer.close()


@functools.cache
def _thread(name: str) -> ThreadPoolExecutor:
    """The process's one worker thread for `name` (token estimates, chunk writes)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batchops-{name}")


def _pack_images(
    frame: pl.DataFrame,
    spec: JobSpec,
    model: str,
    image_col: str,
    image_dir: Path,
    pieces: Pieces,
    tokens: _TokenCounter,
    writer: _ChunkWriter,
) -> Iterator[BuiltChunk]:
    literals = [piece.encode() for piece in pieces[0]]
    systems = _systems(frame)
    per_row = tokens.per_row(frame[TEXT_COL], systems)
    system_cells = systems if systems is not None else [None] * frame.height
    for text, cell, idx, cid, est, system in zip(
        frame[TEXT_COL],
        frame[image_col],
        frame[ROW_IDX],
        frame[ROW_ID],
        per_row,
        system_cells,
        strict=True,
    ):
        if cell == "" and system is None:  # no image for this row: a plain text request
            before, between, after = literals
            line = b"".join((before, render.dumps(cid), between, render.dumps(text), after, b"\n"))
        elif cell == "":
            line = render.dumps(render.request_line(spec, model, cid, text, None, system)) + b"\n"
        else:
            try:
                url = render.image_data_url(image_dir, cell)
            except ImageProblem as exc:
                writer.skip(idx, exc.reason)
                if writer.full:
                    yield writer.close()
                continue
            line = render.dumps(render.request_line(spec, model, cid, text, url, system)) + b"\n"
            est += _image_tokens(url, spec.image_detail, model)
        if len(line) > writer.max_bytes:
            writer.skip(idx, _too_big(len(line), writer.max_bytes))
        else:
            if len(line) > writer.room_bytes:
                yield writer.close()
            writer.add(line, [idx], [cid], int(est))
        if writer.full:
            yield writer.close()


def _systems(frame: pl.DataFrame) -> pl.Series | None:
    """The rendered system message per row, when it has {column} placeholders."""
    return frame[SYSTEM_COL] if SYSTEM_COL in frame.columns else None


def _image_tokens(url: str, detail: str, model: str) -> int:
    """Tokens of one image by the model's own formula and the image's real size."""
    size = pricing.data_url_image_size(url) or pricing.DEFAULT_IMAGE_SIZE
    return pricing.image_tokens(size[0], size[1], detail, model)


def _too_big(size: int, limit: int) -> str:
    return f"request is {size:,} bytes, over the {limit:,}-byte limit of a batch file"


class _TokenCounter:
    """Prompt-token estimate per row: the row's text (by the caller's estimator, or ceil(utf-8
    bytes / 4)) plus a fixed per-request overhead (message framing and the system prompt)."""

    def __init__(self, spec: JobSpec, estimate: TokenEstimator | None) -> None:
        self.estimate = estimate
        overhead = 0
        self.system_framing = 0
        if spec.endpoint != render.EMBEDDINGS:
            overhead = 3 + 4  # reply priming + the user message's framing
            if render.system_fields(spec):  # counted per row (its own text each time)
                self.system_framing = 4
            elif spec.system is not None:
                system = render.system_text(spec) or ""
                overhead += 4 + int(self._count(pl.Series([system]))[0])
        self.overhead = overhead

    def _count(self, texts: pl.Series) -> np.ndarray:
        if self.estimate is not None:
            return self.estimate(texts).cast(pl.Int64).to_numpy()
        return ((texts.str.len_bytes().cast(pl.Int64) + 3) // 4).to_numpy()

    def per_row(self, texts: pl.Series, systems: pl.Series | None = None) -> np.ndarray:
        counts = self._count(texts) + self.overhead
        if systems is not None:
            counts = counts + self._count(systems) + self.system_framing
        return counts


class _ChunkWriter:
    """The chunk file being filled; knows its limits and publishes it atomically on close."""

    def __init__(
        self,
        out_dir: Path,
        first_no: int,
        file_name: Callable[[int], str],
        max_rows: int,
        max_bytes: int,
        fsync: bool,
    ) -> None:
        self.out_dir, self.next_no, self.file_name = out_dir, first_no, file_name
        self.max_rows, self.max_bytes, self.fsync = max_rows, max_bytes, fsync
        self.fh: BinaryIO | None = None
        self._writes: list[Future[int]] = []  # in the write thread, in order
        self._reset()

    def _reset(self) -> None:
        self.row_idxs: list[int] = []
        self.custom_ids: list[str] = []
        self.skipped: list[Skipped] = []
        self.n_bytes = 0
        self.tokens = 0
        self.consumed = 0  # rows written or skipped: a chunk covers at most max_rows of them

    @property
    def open(self) -> bool:
        return self.consumed > 0

    @property
    def full(self) -> bool:
        return self.consumed >= self.max_rows

    @property
    def room_rows(self) -> int:
        return self.max_rows - self.consumed

    @property
    def room_bytes(self) -> int:
        return self.max_bytes - self.n_bytes

    def _path(self) -> Path:
        return self.out_dir / self.file_name(self.next_no)

    def _tmp(self) -> Path:
        path = self._path()
        return path.with_name(path.name + ".tmp")

    def add(
        self, data: bytes | memoryview, row_idxs: list[int], custom_ids: list[str], tokens: int
    ) -> None:
        if self.fh is None:
            self.fh = open(self._tmp(), "wb")  # noqa: SIM115 (closed in close/abort)
        if len(data) < _THREAD_WRITES:  # one request (images): at once, after those queued
            self._wait_writes()
            self.fh.write(data)
        else:
            # Written by a thread of its own (the page-cache copy, ~0.4 s of a 1M-row build,
            # runs beside the next frame's work); at most two wait, holding their frames' bytes.
            while len(self._writes) >= 2:
                self._writes.pop(0).result()
            self._writes.append(_thread("write").submit(self.fh.write, data))
        self.n_bytes += len(data)
        self.row_idxs += row_idxs
        self.custom_ids += custom_ids
        self.tokens += tokens
        self.consumed += len(row_idxs)

    def skip(self, row_idx: int, reason: str) -> None:
        self.skipped.append(Skipped(row_idx, reason))
        self.consumed += 1

    def close(self) -> BuiltChunk:
        """Publish the chunk file (an empty one if every row was skipped) and start the next."""
        self._wait_writes()
        fh = self.fh if self.fh is not None else open(self._tmp(), "wb")  # noqa: SIM115
        fh.flush()
        if self.fsync:  # the caller records the chunk as built: its bytes must survive a crash
            os.fsync(fh.fileno())
        fh.close()
        self.fh = None
        path = self._path()
        os.replace(self._tmp(), path)
        chunk = BuiltChunk(
            chunk_no=self.next_no,
            path=path,
            row_idxs=self.row_idxs,
            custom_ids=self.custom_ids,
            n_bytes=self.n_bytes,
            est_prompt_tokens=self.tokens,
            skipped=self.skipped,
        )
        self.next_no += 1
        self._reset()
        return chunk

    def _wait_writes(self) -> None:
        writes, self._writes = self._writes, []
        for w in writes:
            w.result()  # a failed write (disk full) raises here

    def abort(self) -> None:
        with suppress(OSError, ValueError):  # already failing: the first error is raised
            self._wait_writes()
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            self._tmp().unlink(missing_ok=True)
