"""One row → one request: the prompt template, the request body per endpoint, images as data URLs.

Templates use Python format syntax restricted to plain `{column}` placeholders (`{{`/`}}` are
literal braces); every cell is a string and an empty cell renders as "". The per-row functions here
are the reference; `text_expr` and `line_pieces` give the same result column-wise for the fast
builder in chunking.py, and are derived from the same parsed template and the same request_body.
"""

from __future__ import annotations

import base64
import errno
import functools
import os
import stat
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from batchops.errors import InputError
from batchops.source import close_column, list_columns
from batchops.spec import JobSpec
from batchops.structured import format_for as structured_format

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"

# Keys request_body sets itself from other options; body_extra may not override them.
_OWN_KEYS = {
    CHAT: ("model", "messages", "max_tokens", "temperature"),
    RESPONSES: ("model", "input", "instructions", "max_output_tokens", "temperature"),
    EMBEDDINGS: ("model", "input"),
}

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class ImageProblem(Exception):
    """A row's image cannot be sent; the row is skipped with `reason` (never fatal to the run)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Templates

Piece = tuple[str, str | None]  # (literal text, column name or None)


@functools.lru_cache(maxsize=64)
def _parse(template: str, what: str = "--prompt") -> tuple[Piece, ...]:
    """Split a template into (literal, column) pieces; reject anything but plain `{column}`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"{what}: {exc} (write {{{{ and }}}} for literal braces)") from None
    pieces: list[Piece] = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append((literal, None))
            continue
        shown = (
            "{"
            + name
            + (f"!{conversion}" if conversion else "")
            + (f":{spec}" if spec else "")
            + "}"
        )
        if name == "":  # {0} stays a column name: a table may well have a column "2020"
            raise InputError(
                f"{what}: placeholder {shown} is positional; name a column, e.g. {{description}}"
            )
        if conversion or spec:
            raise InputError(
                f"{what}: placeholder {shown} has a conversion or format spec; only plain "
                "{column} is supported (cells are inserted exactly as written)"
            )
        if "." in name or "[" in name:
            raise InputError(
                f"{what}: placeholder {shown} uses attribute or index access; only plain "
                "{column} is supported (column names with '.', '[', ':' or '!' cannot be used)"
            )
        pieces.append((literal, name))
    return tuple(pieces)


def template_fields(template: str) -> list[str]:
    """The columns a template uses, in order of first use, each once."""
    return list(dict.fromkeys(name for _, name in _parse(template) if name is not None))


def check_template(
    template: str,
    columns: list[str],
    *,
    what: str = "--prompt",
    source_name: str | Path | None = None,
) -> None:
    """Raise InputError if the template is empty, malformed, or names a column the source lacks."""
    if not template.strip():
        raise InputError(f"{what} is empty")
    _parse(template, what)
    for name in template_fields(template):
        if name not in columns:
            hint = close_column(name, columns)
            did_you_mean = f"; did you mean {{{hint}}}?" if hint else ""
            raise InputError(
                f"{what}: placeholder {{{name}}} names no column of {source_name or 'the source'} "
                f"(columns: {list_columns(columns)}){did_you_mean}"
            )


def render_text(template: str, row: Mapping[str, str | None]) -> str:
    """Per-row reference rendering: cells inserted exactly, an empty/None cell as ""."""
    out: list[str] = []
    for lit, name in _parse(template):
        out.append(lit)
        if name is not None:
            out.append(row[name] or "")
    return "".join(out)


def text_expr(template: str) -> pl.Expr:
    """The same rendering as render_text, as one polars expression over String columns."""
    parts: list[pl.Expr] = []
    for lit, name in _parse(template):
        if lit:
            parts.append(pl.lit(lit, dtype=pl.String))
        if name is not None:
            parts.append(pl.col(name).fill_null(""))
    if not parts:
        return pl.lit("", dtype=pl.String)
    return pl.concat_str(parts) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------------------------------
# Request bodies


def system_text(spec: JobSpec, row: Mapping[str, str | None] | None = None) -> str | None:
    """The row's system message: spec.system rendered like the prompt ({column} placeholders,
    {{ }} literal braces); None without --system."""
    if spec.system is None:
        return None
    return render_text(spec.system, row or {})


def system_fields(spec: JobSpec) -> list[str]:
    """The columns the system message uses (empty: one text for every row)."""
    return template_fields(spec.system) if spec.system is not None else []


def request_body(
    spec: JobSpec,
    model: str,
    text: str,
    image_data_url: str | None = None,
    system: str | None = None,
) -> dict[str, Any]:
    """The body of one request to spec.endpoint (what the synchronous endpoint would receive).

    `system`: the row's rendered system message (`system_text`); without it, spec.system is
    rendered with no row, which only holds for a template without placeholders."""
    if system is None and spec.system is not None:
        system = render_text(spec.system, {}) if not system_fields(spec) else spec.system
    extra = spec.body_extra or {}
    own = _OWN_KEYS[spec.endpoint]
    for key in extra:
        if key in own:
            raise InputError(
                f"body_extra sets {key!r}, which batchops sets itself for {spec.endpoint}"
            )
    if extra.get("stream"):
        raise InputError("body_extra sets 'stream': the Batch API rejects streaming requests")
    if extra.get("n", 1) != 1:  # the merge keeps one answer a row: choices 2..n were lost
        raise InputError(
            f"body_extra sets 'n' to {extra['n']!r}: each row gets one answer (the response "
            "column); to sample a prompt several times, repeat its row and run with --no-dedup"
        )

    if spec.endpoint == EMBEDDINGS:
        for option, value in (
            ("--system", spec.system),
            ("--image-column", image_data_url or spec.image_column),
            ("--max-tokens", spec.max_tokens),
            ("--temperature", spec.temperature),
            ("--schema", spec.schema_),
        ):
            if value is not None:
                raise InputError(f"{option} has no meaning for {EMBEDDINGS}")
        return {"model": model, "input": text, **extra}

    body: dict[str, Any] = {"model": model}
    if spec.endpoint == CHAT:
        content: str | list[dict[str, Any]] = text
        if image_data_url is not None:
            content = [
                {"type": "text", "text": text},
                {
                    "type": "image_url",
                    "image_url": {"url": image_data_url, "detail": spec.image_detail},
                },
            ]
        messages: list[dict[str, Any]] = (
            [{"role": "system", "content": system}] if system is not None else []
        )
        messages.append({"role": "user", "content": content})
        body["messages"] = messages
        if spec.max_tokens is not None:
            body["max_tokens"] = spec.max_tokens
    else:  # responses
        parts: list[dict[str, Any]] = [{"type": "input_text", "text": text}]
        if image_data_url is not None:
            parts.append(
                {"type": "input_image", "image_url": image_data_url, "detail": spec.image_detail}
            )
        body["input"] = [{"role": "user", "content": parts}]
        if system is not None:
            body["instructions"] = system
        if spec.max_tokens is not None:
            body["max_output_tokens"] = spec.max_tokens
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    structured = structured_format(spec)
    if structured is not None:
        if structured[0] in extra:
            raise InputError(f"body_extra sets {structured[0]!r}, which --schema sets")
        body[structured[0]] = structured[1]
    body.update(extra)
    return body


def request_line(
    spec: JobSpec,
    model: str,
    custom_id: str,
    text: str,
    image_data_url: str | None = None,
    system: str | None = None,
) -> dict[str, Any]:
    """One line of a batch input file, as a dict."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": spec.batch_endpoint(model),
        "body": request_body(spec, model, text, image_data_url, system),
    }


# Characters JSON allows raw but that str.splitlines() and older JavaScript treat as line breaks:
# escaped, so every reader sees one request per "\n"-terminated line.
LINE_BREAK_ESCAPES = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
_LINE_BREAK_BYTES = [(k.encode(), v.encode()) for k, v in LINE_BREAK_ESCAPES.items()]


def dumps(obj: object) -> bytes:
    """Compact UTF-8 JSON (as orjson writes it) with LINE_BREAK_ESCAPES applied."""
    out = orjson.dumps(obj)
    for raw, escaped in _LINE_BREAK_BYTES:
        if raw in out:  # UTF-8 is self-synchronising: these bytes occur only as that character
            out = out.replace(raw, escaped)
    return out


# Stand-ins spliced out of a serialised line; plain ASCII so any JSON encoder writes them verbatim.
_ID_MARK = "@@batchops-custom-id-3f9a1c@@"
_TEXT_MARK = "@@batchops-text-3f9a1c@@"
_SYSTEM_MARK = "@@batchops-system-3f9a1c@@"
# What fills each gap between line_template's literals.
CUSTOM_ID, TEXT, SYSTEM = "custom_id", "text", "system"


def line_pieces(spec: JobSpec, model: str) -> tuple[str, str, str]:
    """(before id, between id and text, after text) of a text-only line, so that
    before + json(custom_id) + between + json(text) + after == the serialised request_line.

    The columnar builder fills the two JSON strings per row; everything else comes from
    request_body, so both paths share one definition of the body. For a system message with
    {column} placeholders (a third string per row), see line_template.
    """
    literals, slots = line_template(spec, model)
    if slots != [CUSTOM_ID, TEXT]:
        raise ValueError("the system message varies per row: use line_template")
    return literals[0], literals[1], literals[2]


def line_template(spec: JobSpec, model: str) -> tuple[list[str], list[str]]:
    """A text-only line as literals around slots: literals[0] + json(slot 0) + literals[1] + …
    == the serialised request_line. Slots are CUSTOM_ID, TEXT and, when the system message
    has {column} placeholders, SYSTEM (in the order the body has them)."""
    per_row_system = bool(system_fields(spec))
    line = dumps(
        request_line(
            spec, model, _ID_MARK, _TEXT_MARK, system=_SYSTEM_MARK if per_row_system else None
        )
    ).decode()
    marks = {f'"{_ID_MARK}"': CUSTOM_ID, f'"{_TEXT_MARK}"': TEXT}
    if per_row_system:
        marks[f'"{_SYSTEM_MARK}"'] = SYSTEM
    if any(line.count(m) != 1 for m in marks) or line.index(f'"{_ID_MARK}"') > line.index(
        f'"{_TEXT_MARK}"'
    ):
        raise InputError(
            "the request body repeats an internal marker; remove it from --system/body_extra"
        )
    order = sorted(marks, key=line.index)
    literals: list[str] = []
    rest = line
    for mark in order:
        head, rest = rest.split(mark)
        literals.append(head)
    literals.append(rest)
    return literals, [marks[m] for m in order]


# ---------------------------------------------------------------------------------------------
# Images


def image_data_url(image_dir: Path, cell: str) -> str:
    """`data:<mime>;base64,…` of the file `cell` names inside image_dir, bytes unchanged.

    The file is opened one path component at a time, each relative to its parent's open
    descriptor and without following links (`_open_inside`), so what is checked is what is
    read: a directory swapped for a link to elsewhere mid-build is caught, not followed. FIFOs,
    devices and other non-regular files are refused without blocking, and the bytes must be an
    image's (a text file named .png is not sent)."""
    shown = image_dir / cell
    try:
        fd = _open_inside(os.path.abspath(image_dir), cell)
    except _Escapes:
        raise ImageProblem(f"image path escapes the image dir {image_dir}: {cell}") from None
    except FileNotFoundError:
        raise ImageProblem(f"image not found: {shown}") from None
    except ValueError as exc:  # e.g. a NUL character in the cell
        raise ImageProblem(f"bad image path {cell!r}: {exc}") from None
    except OSError as exc:
        raise ImageProblem(f"cannot read image {shown}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageProblem(f"image is a directory, not a file: {shown}")
        if not stat.S_ISREG(st.st_mode):
            raise ImageProblem(f"image is not a regular file (a FIFO, socket or device): {shown}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageProblem(f"cannot read image {shown}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if not data:
        raise ImageProblem(f"image file is empty: {shown}")
    mime = image_mime(data)
    if mime is None:
        raise ImageProblem(f"not a PNG, JPEG, GIF or WEBP image (by its bytes): {shown}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class _Escapes(Exception):
    """The path (or a link on it) leads outside the image dir."""


_MAX_LINKS = 40  # like the kernel's own limit: a link loop ends as an error, not a hang
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_inside(root: str, cell: str) -> int:
    """An open descriptor of the file `cell` names under `root`. Every component is opened
    relative to the descriptor of the directory before it, with O_NOFOLLOW; a link is followed
    only by reading its target and walking that again the same way, and only while it stays
    inside `root`. Nothing outside `root` is ever opened, whatever is renamed meanwhile."""
    real_root = os.path.realpath(root)
    if os.path.isabs(cell):
        cell = _relative_to(cell, (real_root, root))
    parts = [p for p in cell.split(os.sep) if p not in ("", ".")]
    stack = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) == 1:
                    raise _Escapes
                os.close(stack.pop())
                continue
            try:
                fd = os.open(name, _FILE_FLAGS if not parts else _DIR_FLAGS, dir_fd=stack[-1])
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
                try:
                    target = os.readlink(name, dir_fd=stack[-1])
                except OSError:
                    raise exc from None  # not a link: the original error stands
                links += 1
                if links > _MAX_LINKS:
                    raise
                if os.path.isabs(target):  # walk it again from the root
                    target = _relative_to(target, (real_root, root))
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [p for p in target.split(os.sep) if p not in ("", ".")] + parts
                continue
            if not parts:
                return fd
            stack.append(fd)
        raise IsADirectoryError(errno.EISDIR, "is a directory")  # the cell named the dir itself
    finally:
        for fd in stack:
            os.close(fd)


def _relative_to(path: str, roots: tuple[str, ...]) -> str:
    for r in roots:
        if path.startswith(r.rstrip(os.sep) + os.sep):
            return path[len(r.rstrip(os.sep)) + 1 :]
    raise _Escapes


def image_mime(data: bytes) -> str | None:
    """MIME type from the file's magic bytes; None when they are not an image's (a file's
    extension proves nothing: a text file named .png is not sent)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
