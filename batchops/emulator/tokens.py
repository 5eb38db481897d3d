"""Deterministic token counts: a documented approximation of BPE, and image token costs.

Rules of `count_tokens` (see docs/emulator.md):
  * each CJK ideograph, kana or hangul syllable: 1 token
  * a run of letters (a "word"): 1 token up to 6 characters, else ceil(len / 4)
  * a run of digits: ceil(len / 3) tokens
  * every other non-space character (punctuation, symbols, emoji): 1 token each
  * whitespace: free
The counts are computed with a few regex passes (C speed): the emulator counts 50,000 prompts
per batch, so a per-token Python loop would be too slow.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = rf"[^\W\d{_CJK}]"  # a word character that is neither a digit nor CJK
_TOKEN_RE = re.compile(rf"[{_CJK}]|{_WORD}+|\d+|[^\w\s]")
_LONG_WORD_RE = re.compile(rf"{_WORD}{{7,}}")
_LONG_NUM_RE = re.compile(r"\d{4,}")

IMAGE_LOW_TOKENS = 85
IMAGE_TILE_TOKENS = 170
# Assumed size of an image given by remote URL (its bytes are never fetched).
REMOTE_IMAGE_SIZE = (1024, 1024)


def count_tokens(text: str) -> int:
    """Approximate BPE token count of `text` (deterministic, documented rules above)."""
    if not text:
        return 0
    n = len(_TOKEN_RE.findall(text))
    for w in _LONG_WORD_RE.findall(text):
        n += -(-len(w) // 4) - 1
    for d in _LONG_NUM_RE.findall(text):
        n += -(-len(d) // 3) - 1
    return n


def _match_cost(m: re.Match[str]) -> tuple[int, int]:
    """(tokens, characters per token) of one regex match of _TOKEN_RE."""
    s = m.group()
    if s[0].isdigit():
        return (-(-len(s) // 3), 3)
    if len(s) > 6:
        return (-(-len(s) // 4), 4)
    return (1, len(s))


def cut_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of `text` whose count_tokens() is at most `max_tokens`."""
    if max_tokens <= 0:
        return ""
    used = 0
    for m in _TOKEN_RE.finditer(text):
        cost, per = _match_cost(m)
        if used + cost <= max_tokens:
            used += cost
            continue
        room = max_tokens - used
        if room > 0 and cost > 1:
            # Part of a long word/number: `room` whole chunks of it still fit.
            return text[: m.start() + room * per]
        return text[: m.start()].rstrip()
    return text


# --------------------------------------------------------------------------- images


class ImageError(ValueError):
    """An image part whose data cannot be decoded or whose format is unsupported."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header of a PNG, JPEG, GIF or WEBP file."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return w, h
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    raise ImageError("unsupported image format")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        b = data[21:25]
        w = 1 + (b[0] | (b[1] & 0x3F) << 8)
        h = 1 + (b[1] >> 6 | b[2] << 2 | (b[3] & 0x0F) << 10)
        return w, h
    if chunk == b"VP8X" and len(data) >= 30:
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return w, h
    raise ImageError("truncated WEBP header")


# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other segments.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in _SOF:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + seg_len
    raise ImageError("no JPEG frame header found")


def decode_data_url(url: str) -> tuple[int, tuple[int, int]]:
    """(byte count, (width, height)) of a base64 `data:` URL, decoding only what is needed."""
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise ImageError("not a base64 data URL")
    payload = payload.strip()
    if any(c in payload[:64] for c in " \n\r\t"):
        payload = re.sub(r"\s+", "", payload)
    n_bytes = len(payload) * 3 // 4 - payload[-2:].count("=")
    # Decode a growing prefix: the size sits in the first bytes (JPEG: after EXIF, maybe 64 KB+).
    chunk = 4096
    while True:
        prefix = payload[:chunk]
        try:
            data = base64.b64decode(prefix[: len(prefix) // 4 * 4], validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("invalid base64 image data") from None
        try:
            return n_bytes, image_size(data)
        except ImageError:
            if chunk >= len(payload):
                raise
            chunk *= 8


def image_tokens(width: int, height: int, detail: str = "auto") -> int:
    """OpenAI's classic tile formula (gpt-4o class): low = 85; high/auto tiles of 512 px."""
    if detail == "low":
        return IMAGE_LOW_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    tiles = math.ceil(int(w) / 512) * math.ceil(int(h) / 512) if w >= 1 and h >= 1 else 1
    return IMAGE_TILE_TOKENS * max(1, tiles) + IMAGE_LOW_TOKENS
