"""Check batch input files the way the Batch API does, before anything is uploaded (`--dry-run`).

The API accepts a batch and only later fails it (`errors.data[{code, message, line, param}]`)
when a line is bad; these checks find the same problems locally, with the same codes: valid JSON
per line, the four required fields, `url` equal to the batch endpoint, unique `custom_id`, one
model per file, no `stream: true`, at most 50,000 requests and 200 MB per file.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
from numpy.lib.stride_tricks import sliding_window_view

from batchops.spec import MAX_BYTES_PER_FILE, MAX_REQUESTS_PER_FILE

REQUIRED = ("custom_id", "method", "url", "body")
# Past this many problems in one file the rest are counted, not listed (a broken 50k-line file).
MAX_LISTED = 20


@dataclass(slots=True)
class Problem:
    file: str
    line: int | None  # 1-based, None for whole-file problems
    code: str  # the Batch API's error code for the same problem
    message: str

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" if self.line else self.file
        return f"{where}: {self.code}: {self.message}"


@dataclass(slots=True)
class FileCheck:
    path: Path
    requests: int = 0
    n_bytes: int = 0
    model: str | None = None
    problems: list[Problem] = field(default_factory=list)
    unlisted: int = 0  # problems beyond MAX_LISTED

    @property
    def ok(self) -> bool:
        return not self.problems


def check_file(
    path: Path,
    endpoint: str,
    *,
    max_requests: int = MAX_REQUESTS_PER_FILE,
    max_bytes: int = MAX_BYTES_PER_FILE,
) -> FileCheck:
    """Every line of one JSONL batch file checked; its problems listed (up to MAX_LISTED)."""
    path = Path(path)
    out = FileCheck(path, n_bytes=path.stat().st_size)
    name = path.name
    seen: set[str] = set()

    def add(line: int | None, code: str, message: str) -> None:
        if len(out.problems) < MAX_LISTED:
            out.problems.append(Problem(name, line, code, message))
        else:
            out.unlisted += 1

    if out.n_bytes > max_bytes:
        add(None, "file_too_large", f"{out.n_bytes:,} bytes, more than the {max_bytes:,} allowed")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            out.requests += 1
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                add(lineno, "invalid_json_line", "this line is not parseable as a JSON object")
                continue
            missing = next((k for k in REQUIRED if k not in obj), None)
            if missing:
                add(lineno, "missing_required_parameter", f"missing required field {missing!r}")
                continue
            cid, body = obj["custom_id"], obj["body"]
            if not isinstance(cid, str) or not cid:
                add(lineno, "invalid_request", "custom_id must be a non-empty string")
                continue
            if obj["method"] != "POST":
                add(lineno, "invalid_request", f"method {obj['method']!r}: only 'POST' is allowed")
                continue
            if obj["url"] != endpoint:
                add(
                    lineno,
                    "invalid_url",
                    f"url {obj['url']!r} is not the batch endpoint {endpoint}",
                )
                continue
            if not isinstance(body, dict):
                add(lineno, "invalid_request", "body must be a JSON object")
                continue
            if body.get("stream") is True:
                add(lineno, "streaming_unsupported", "stream: true is not allowed in a batch")
                continue
            model = body.get("model")
            if not isinstance(model, str) or not model:
                add(lineno, "invalid_request", "body.model is required")
                continue
            if cid in seen:
                add(lineno, "duplicate_custom_id", f"custom_id {cid!r} is used more than once")
                continue
            seen.add(cid)
            if out.model is None:
                out.model = model
            elif model != out.model:
                add(
                    lineno,
                    "mismatched_model",
                    f"model {model!r} differs from {out.model!r} (one model per file)",
                )
    if out.requests == 0:
        add(None, "empty_file", "the file has no requests")
    elif out.requests > max_requests:
        add(
            None,
            "too_many_requests",
            f"{out.requests:,} requests, more than the {max_requests:,} allowed per batch",
        )
    return out


# A line that does not open with a string custom_id (or a blank line) sends the file to the
# per-line check; batchops writes every line in this canonical form.
_NOT_CANONICAL = re.compile(rb'\n(?!\{"custom_id":"|\Z)')
# polars' reader takes a lone surrogate escape ("\ud800") that JSON refuses: a file with any
# surrogate escape goes to the per-line check (batchops writes non-ASCII text unescaped).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_FIELDS = {
    "custom_id": pl.String,
    "method": pl.String,
    "url": pl.String,
    "body": pl.Struct({"model": pl.String, "stream": pl.Boolean}),
}


def _fast_check(path: Path, endpoint: str, max_requests: int, max_bytes: int) -> FileCheck | None:
    """The same checks, columnar (polars' NDJSON reader in Rust, only the fields checked):
    ~20x faster than a Python loop on a million lines. None when anything looks off, so the
    per-line check finds the problem and its line number."""
    size = path.stat().st_size
    if size == 0 or size > max_bytes:
        return None
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:14] != b'{"custom_id":"' or mm[-1:] != b"\n" or _NOT_CANONICAL.search(mm):
            return None
        if _SURROGATE_ESCAPE.search(mm):
            return None
    try:
        frame = pl.read_ndjson(path, schema=_FIELDS)  # type: ignore[arg-type]
    except (pl.exceptions.PolarsError, OSError):
        return None  # not JSON, or a field of the wrong type
    if not 0 < frame.height <= max_requests:
        return None
    model = frame["body"].struct.field("model")
    cid = frame["custom_id"]
    ok = (
        cid.null_count() == 0
        and (cid.str.len_bytes() > 0).all()
        and cid.n_unique() == frame.height
        and (frame["method"] == "POST").all()
        and (frame["url"] == endpoint).all()
        and model.null_count() == 0
        and (model.str.len_bytes() > 0).all()
        and model.n_unique() == 1
        and not frame["body"].struct.field("stream").fill_null(False).any()
    )
    if not ok:
        return None
    return FileCheck(path, requests=frame.height, n_bytes=size, model=model[0])


# A text request line as batchops writes it: before + json(custom_id) + between + json(text) +
# after + "\n" (render.line_template's literals when its slots are custom_id, then text).
Template = tuple[str, str, str]
_ID_WINDOW = 64  # custom_ids up to 63 bytes are found in one window; longer: the general path
_ESCAPES = np.frombuffer(b'"\\/bfnrtu', np.uint8)
_HEX = np.frombuffer(b"0123456789abcdefABCDEF", np.uint8)
_LOW_DIGITS = np.frombuffer(b"01234567", np.uint8)  # \uD0xx-\uD7xx: not surrogates


def _template_check(
    path: Path, endpoint: str, template: Template, max_requests: int, max_bytes: int
) -> FileCheck | None:
    """The same checks for a file of lines made from one template, without parsing every line:
    each line must be the template's bytes exactly, around two JSON strings (the custom_id and
    the text) that are proved well-formed by byte counts over the whole file (no raw control
    byte but the line breaks, valid UTF-8, every backslash a valid escape, no quote but the
    template's and the escaped ones). The template itself is checked by parsing it. ~4x less
    CPU than the columnar parse (which parses every line in full). None when anything differs:
    the columnar or per-line check then finds the problem."""
    before, between, after = template_bytes = (
        template[0].encode(),
        template[1].encode(),
        template[2].encode(),
    )
    model = _template_model(before, between, after, endpoint)
    size = path.stat().st_size
    if model is None or size == 0 or size > max_bytes:
        return None
    a = _read(path, size)
    if a is None or a[-1] != 0x0A:
        return None
    # One pass, a block of the file at a time: its bytes counted, then its lines compared to
    # the template while they are in the cache (comparing after a whole-file pass fetched
    # every line from memory again).
    scan = _Scan(a, template_bytes)
    for i in range(0, size, _BLOCK):
        if not scan.block(i):
            return None
    ends = np.concatenate(scan.ends)
    n = int(ends.size)
    if n > max_requests:
        return None
    try:  # UTF-8 (Arrow's validator, no str built); also refuses encoded surrogates
        offsets = pa.py_buffer(np.array([0, size], np.int64))
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(a)]).validate(
            full=True
        )
    except pa.ArrowInvalid:
        return None
    # Each backslash must be a valid escape (the id has none; the template's are whole
    # escapes, as it parsed), and no text's closing quote may be escaped.
    escapes = _escapes(a, np.concatenate(scan.slashes))
    if escapes is None or _escaped(escapes, ends - len(after) - 2):
        return None
    hashes, quotes = scan.hashes, scan.quotes
    h = np.sort(np.concatenate(hashes))
    if not (h[1:] != h[:-1]).all():
        return None  # a repeated hash: maybe a repeated id (the general path tells)
    # Every byte is now the template's or inside one of the two strings; the quotes other than
    # the template's and the strings' own must all be escaped ones.
    escaped_quotes = int(np.count_nonzero(a[escapes + 1] == 0x22))
    per_line = _unescaped_quotes(before + between + after) + 4
    if quotes != n * per_line + escaped_quotes:
        return None
    return FileCheck(path, requests=n, n_bytes=size, model=model)


_BLOCK = 1 << 20  # bytes scanned at once: the temporaries stay in the cache
_ROWS = 4096  # lines compared at once
_NARROW = 24  # bytes of the first look for the end of an id


def _read(path: Path, size: int) -> np.ndarray | None:
    """The file's bytes, mapped (no copy: the file was just written, its pages are cached);
    None if it is not `size` bytes long. The mapping goes when the last view of it does."""
    with path.open("rb") as fh:
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # e.g. emptied since its size was read
            return None
    a = np.frombuffer(mapped, np.uint8)
    return a if a.size == size else None


class _Scan:
    """_template_check's pass over a file: per block of bytes, the line breaks (the only raw
    control bytes allowed), quotes counted, backslashes found, and the lines that end in the
    block compared to the template (their custom_ids' hashes kept)."""

    def __init__(self, a: np.ndarray, template: tuple[bytes, bytes, bytes]) -> None:
        self.a, self.template = a, template
        before, between, after = template
        self.shortest = len(before) + 3 + len(between) + 2 + len(after)  # 1-byte id, no text
        self.hit = np.empty(min(a.size, _BLOCK), bool)
        self.ends: list[np.ndarray] = []
        self.slashes: list[np.ndarray] = []
        self.hashes: list[np.ndarray] = []
        self.quotes = 0
        self.start = 0  # where the next line starts

    def block(self, i: int) -> bool:
        """The block at byte i; False when anything differs from the template."""
        block = self.a[i : i + _BLOCK]
        h = self.hit[: block.size]
        found = np.flatnonzero(np.less(block, 0x20, out=h))
        if not (block[found] == 0x0A).all():
            return False  # a raw control byte inside a line (JSON strings must escape them)
        self.quotes += int(np.count_nonzero(np.equal(block, 0x22, out=h)))
        self.slashes.append(np.flatnonzero(np.equal(block, 0x5C, out=h)) + i)
        if not found.size:
            return True  # a long line: compared in the block where it ends
        ends = found + i
        starts = np.concatenate(([self.start], ends[:-1] + 1))
        self.start = int(ends[-1]) + 1
        self.ends.append(ends)
        if int((ends - starts).min()) < self.shortest:
            return False
        width = min(_ID_WINDOW, int((ends - starts).min()) - len(self.template[0]) - 1)
        for j in range(0, ends.size, _ROWS):
            hashes = _template_lines(
                self.a, starts[j : j + _ROWS], ends[j : j + _ROWS], self.template, width
            )
            if hashes is None:
                return False
            self.hashes.append(hashes)
        return True


def _template_lines(
    a: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    template: tuple[bytes, bytes, bytes],
    width: int,
) -> np.ndarray | None:
    """The hashes of the custom_ids of these lines, if each line is before + a plain id (1+
    ASCII bytes without escapes, its closing quote within `width` bytes) + between + a quoted
    text + after; else None."""
    before, between, after = template
    if not (_at(a, starts, before) and _at(a, ends - len(after), after)):
        return None
    open_id = starts + len(before)
    if not (a[open_id] == 0x22).all():
        return None
    found = _id_block(a, open_id + 1, min(width, _NARROW))  # most ids are short
    if found is None and width > _NARROW:
        found = _id_block(a, open_id + 1, width)
    if found is None:
        return None
    id_len, hashes = found
    close_id = open_id + 1 + id_len
    if ((close_id + 1 + len(between)) > ends).any() or not _at(a, close_id + 1, between):
        return None
    open_text, close_text = close_id + 1 + len(between), ends - len(after) - 1
    if not ((open_text < close_text) & (a[open_text] == 0x22) & (a[close_text] == 0x22)).all():
        return None
    return hashes


def _escaped(escapes: np.ndarray, positions: np.ndarray) -> bool:
    """Whether any of the positions holds an escaping backslash (escapes: sorted)."""
    if not escapes.size:
        return False
    at = np.searchsorted(escapes, positions)
    return bool((escapes[np.minimum(at, escapes.size - 1)] == positions).any())


def _id_block(a: np.ndarray, first: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The ids' lengths and hashes, 8 bytes at a time (SWAR on 64-bit words: a byte-wise
    pass over the windows cost ~3x as much)."""
    nw = -(-width // 8)
    window = np.zeros((first.size, nw * 8), np.uint8)  # zeros past `width`: never a quote
    window[:, :width] = sliding_window_view(a, width)[first]
    words = window.view("<u8")  # byte j of a row is bits 8j.. of its word j // 8
    n = np.full(first.size, -1, np.int64)
    for j in range(nw):
        quote = _zero_bytes(words[:, j] ^ _QUOTES)
        hit = (n < 0) & (quote != 0)
        n[hit] = 8 * j + _lowest_byte(quote[hit])
    if (n <= 0).any():
        return None  # an id longer than the window, or an empty one
    # Each row's bytes before its quote, word by word (all of a word: mask of 8 bytes).
    masks = _BYTE_MASKS[np.clip(n[:, None] - 8 * np.arange(nw), 0, 8)]
    if ((_zero_bytes(words ^ _BACKSLASHES) | words) & _HIGH & masks).any():
        return None  # a backslash or a non-ASCII byte in an id: the general path
    h = n.astype(np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
        for j in range(nw):
            used = masks[:, j] != 0  # only the id's own words: the hash is the id's, whatever nw
            mixed = (h ^ (words[:, j] & masks[:, j])) * _MIX
            h = np.where(used, mixed ^ (mixed >> np.uint64(29)), h)
    return n, h


_LOW = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_QUOTES = np.uint64(0x2222222222222222)
_BACKSLASHES = np.uint64(0x5C5C5C5C5C5C5C5C)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BYTE_MASKS = np.array([(1 << (8 * c)) - 1 for c in range(9)], np.uint64)  # the low c bytes


def _zero_bytes(x: np.ndarray) -> np.ndarray:
    """0x80 in the bytes of each word that are zero: exact up to and including its lowest zero
    byte (a byte above one may be flagged too), so the lowest flag is the first zero byte."""
    with np.errstate(over="ignore"):
        flags: np.ndarray = (x - _LOW) & ~x & _HIGH
    return flags


def _lowest_byte(flags: np.ndarray) -> np.ndarray:
    """The index (0-7) of the lowest flagged byte of each (non-zero) word."""
    with np.errstate(over="ignore"):
        below = (flags & (~flags + np.uint64(1))) - np.uint64(1)  # the bits under the lowest
    index: np.ndarray = np.bitwise_count(below).astype(np.int64) // 8
    return index


def _at(a: np.ndarray, positions: np.ndarray, literal: bytes) -> bool:
    """Whether `literal` is at every one of these positions of a."""
    if not literal:
        return True
    if int(positions.max()) + len(literal) > a.size:
        return False
    view, want = sliding_window_view(a, len(literal)), np.frombuffer(literal, np.uint8)
    return all(
        (view[positions[i : i + _ROWS]] == want).all() for i in range(0, positions.size, _ROWS)
    )


def _escapes(a: np.ndarray, slashes: np.ndarray) -> np.ndarray | None:
    """Where the escapes are (each backslash that escapes the byte after it), or None if one
    is not a valid JSON escape (or is a surrogate \\uD800-\\uDFFF: parsers disagree on them)."""
    if not slashes.size:
        return slashes
    # In a run of backslashes they pair up: the 1st, 3rd, … escape the byte after them.
    new_run = np.concatenate(([True], slashes[1:] != slashes[:-1] + 1))
    run_first = slashes[new_run][np.cumsum(new_run) - 1]
    escapes: np.ndarray = slashes[(slashes - run_first) % 2 == 0]
    if int(escapes[-1]) + 6 > a.size:
        return None  # too close to the end to be inside a line's string
    escaped = a[escapes + 1]
    if not np.isin(escaped, _ESCAPES).all():
        return None
    u = escapes[escaped == ord("u")]
    if u.size:
        digits = a[u[:, None] + np.arange(2, 6)]
        if not np.isin(digits, _HEX).all():
            return None
        surrogate = ((digits[:, 0] | 0x20) == ord("d")) & ~np.isin(digits[:, 1], _LOW_DIGITS)
        if surrogate.any():
            return None
    return escapes


def _unescaped_quotes(literal: bytes) -> int:
    """The quotes of a template literal that are not escaped (it is part of valid JSON)."""
    count = i = 0
    while i < len(literal):
        if literal[i] == 0x5C:
            i += 2
            continue
        count += literal[i] == 0x22
        i += 1
    return count


def _template_model(before: bytes, between: bytes, after: bytes, endpoint: str) -> str | None:
    """The model of every line made from this template, if such lines pass the per-line checks
    whatever the two strings hold (tried with two different pairs); else None."""
    models = set()
    for cid, text in (("a", ""), ("b", 'x"\\\n')):
        line = before + orjson.dumps(cid) + between + orjson.dumps(text) + after
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or any(k not in obj for k in REQUIRED):
            return None
        body = obj["body"]
        if obj["custom_id"] != cid or obj["method"] != "POST" or obj["url"] != endpoint:
            return None
        if not isinstance(body, dict) or body.get("stream") is True:
            return None
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return None
        models.add(model)
    return models.pop() if len(models) == 1 else None


def check_files(
    paths: Iterable[Path], endpoint: str, template: Template | None = None
) -> list[FileCheck]:
    """Every file checked: by its template when the caller gives the one it wrote the lines
    from, else columnar; the per-line check whenever a faster one is not sure."""
    out = []
    for p in paths:
        p = Path(p)
        fast = None
        if template is not None:
            fast = _template_check(p, endpoint, template, MAX_REQUESTS_PER_FILE, MAX_BYTES_PER_FILE)
        if fast is None:
            fast = _fast_check(p, endpoint, MAX_REQUESTS_PER_FILE, MAX_BYTES_PER_FILE)
        out.append(fast if fast is not None else check_file(p, endpoint))
    return out


def summary(checks: list[FileCheck]) -> str:
    """One line: files, requests, bytes, models — and the problem count when there are any."""
    models = sorted({c.model for c in checks if c.model})
    bad = sum(len(c.problems) + c.unlisted for c in checks)
    text = (
        f"checked {len(checks)} file(s): {sum(c.requests for c in checks):,} requests, "
        f"{sum(c.n_bytes for c in checks):,} bytes, model(s) {', '.join(models) or '-'}"
    )
    return text + (f"; {bad} problem(s)" if bad else "; all valid")


def problems(checks: list[FileCheck]) -> list[Problem]:
    return [p for c in checks for p in c.problems]
