"""Helpers for tests that drive the emulator with the real openai SDK.

Nothing here is needed at runtime; these build input lines, tiny images and wait for batches.
"""

from __future__ import annotations

import base64
import struct
import time
import zlib
from collections.abc import Iterable
from typing import Any

import orjson

TERMINAL = ("completed", "failed", "expired", "cancelled")
DEFAULT_KEY = "sk-test-0000000000000000abcd"

# Scenario kwargs that make batches finish in well under a second.
FAST = {"validating_seconds": 0.05, "in_progress_seconds": 0.2, "finalizing_seconds": 0.05}


def chat_line(
    custom_id: str,
    text: str,
    model: str = "gpt-4o-mini",
    url: str = "/v1/chat/completions",
    **body: Any,
) -> dict[str, Any]:
    """One batch input line for the chat endpoint (extra body fields as keywords)."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def embedding_line(
    custom_id: str, text: str | list[str], model: str = "text-embedding-3-small", **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": model, "input": text, **body},
    }


def responses_line(
    custom_id: str, text: str, model: str = "gpt-4o-mini", **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": model, "input": text, **body},
    }


def jsonl(lines: Iterable[dict[str, Any] | str | bytes]) -> bytes:
    """JSONL bytes; str/bytes items are taken as raw lines (to write broken ones)."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(orjson.dumps(line))
    return b"\n".join(out) + b"\n"


def parse_jsonl(text: str | bytes) -> list[dict[str, Any]]:
    raw = text.encode() if isinstance(text, str) else text
    return [orjson.loads(x) for x in raw.splitlines() if x.strip()]


def wait_for_batch(
    client: Any, batch_id: str, timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll until the batch reaches a terminal status; returns the Batch (TimeoutError if not)."""
    end = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in TERMINAL:
            return b
        if time.monotonic() > end:
            raise TimeoutError(f"batch {batch_id} still {b.status} after {timeout}s")
        time.sleep(interval)


def run_batch(
    client: Any,
    lines: Iterable[dict[str, Any] | str | bytes],
    endpoint: str = "/v1/chat/completions",
    timeout: float = 10.0,
    **create: Any,
) -> Any:
    """Upload, create and wait: the finished Batch."""
    f = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint=endpoint, completion_window="24h", **create
    )
    return wait_for_batch(client, b.id, timeout)


def results(client: Any, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(output lines, error lines) of a finished batch."""
    out = (
        parse_jsonl(client.files.content(batch.output_file_id).content)
        if batch.output_file_id
        else []
    )
    err = (
        parse_jsonl(client.files.content(batch.error_file_id).content)
        if batch.error_file_id
        else []
    )
    return out, err


# --------------------------------------------------------------------------- tiny images


def png_bytes(width: int, height: int) -> bytes:
    """A valid PNG of the given size (one grey colour; small however large the size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x80" * width
    idat = zlib.compress(row * height, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif_header(width: int, height: int) -> bytes:
    """A minimal GIF (header + empty image): enough for size parsing."""
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00;"


def jpeg_header(width: int, height: int, exif_bytes: int = 0) -> bytes:
    """A JPEG prefix with optional APP1 (EXIF-like) segments before the SOF0 frame header."""
    out = b"\xff\xd8"
    while exif_bytes > 0:  # one segment holds at most 65,533 bytes
        n = min(exif_bytes, 60_000)
        payload = b"Exif\x00\x00" + b"\x00" * n
        out += b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
        exif_bytes -= n
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return out + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def webp_header(width: int, height: int, kind: str = "VP8X") -> bytes:
    """A WEBP prefix in one of its three layouts (VP8X, VP8L, VP8)."""
    if kind == "VP8X":
        body = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
        body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif kind == "VP8L":
        bits = (width - 1) | (height - 1) << 14
        body = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits)
    else:
        frame = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height)
        body = b"VP8 " + struct.pack("<I", len(frame)) + frame
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, url: str, detail: str = "auto") -> list[dict[str, Any]]:
    """Chat messages: one user message with a text part and an image part."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url, "detail": detail}},
            ],
        }
    ]
