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

import orjson
import polars as pl

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


def check_files(paths: Iterable[Path], endpoint: str) -> list[FileCheck]:
    out = []
    for p in paths:
        p = Path(p)
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
