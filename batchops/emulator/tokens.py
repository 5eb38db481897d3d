"""Deterministic token counts: a documented approximation of BPE, and image token costs.

Rules of `count_tokens` (see docs/emulator.md):
  * each CJK ideograph, kana or hangul syllable: 1 token
  * a word (a run of letters, digits and underscores): 1 token up to 6 characters,
    else ceil(len / 4)
  * every other non-space character (punctuation, symbols, emoji): 1 token each
  * whitespace: free
The emulator counts every prompt of a 50,000-request batch, so ASCII text takes a fast path
built on bytes.translate/split (C speed); other text goes through one regex.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import struct

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")

# ASCII fast path: punctuation/control bytes (neither \w nor whitespace) become token breaks;
# \x1c-\x1f are whitespace to str (and the regex) but not to bytes.split, so map them too.
_ASCII_PUNCT = bytes(
    i for i in range(128) if not (chr(i).isalnum() or chr(i) == "_" or chr(i).isspace())
)
_ODD_SPACE = bytes(range(0x1C, 0x20))
_PUNCT_TO_SPACE = bytes.maketrans(
    _ASCII_PUNCT + _ODD_SPACE, b" " * (len(_ASCII_PUNCT) + len(_ODD_SPACE))
)
_MAX_TABLE = 4096
# Extra tokens of a word of length n beyond the first: ceil(n / 4) - 1 for n > 6.
_EXTRA = [(-(-n // 4) - 1) if n > 6 else 0 for n in range(_MAX_TABLE)]


def _word_tokens(n: int) -> int:
    return 1 if n <= 6 else -(-n // 4)


@functools.lru_cache(maxsize=4096)
def _count_cached(text: str) -> int:
    return _count(text)


def _count(text: str) -> int:
    if text.isascii():
        raw = text.encode("ascii")
        words = raw.translate(_PUNCT_TO_SPACE).split()
        n_punct = len(raw) - len(raw.translate(None, _ASCII_PUNCT))
        try:
            extra = sum(map(_EXTRA.__getitem__, map(len, words)))
        except IndexError:  # a word longer than the table
            extra = sum(_word_tokens(len(w)) - 1 for w in words)
        return n_punct + len(words) + extra
    return sum(_word_tokens(len(tok)) for tok in _TOKEN_RE.findall(text))


def count_tokens(text: str) -> int:
    """Approximate BPE token count of `text` (deterministic, documented rules above)."""
    if not text:
        return 0
    # Repeated texts (system prompts, model names) are common: cache the short ones.
    return _count_cached(text) if len(text) <= 2048 else _count(text)


# Assumed size of an image given by remote URL (its bytes are never fetched).
REMOTE_IMAGE_SIZE = (1024, 1024)


def _match_cost(m: re.Match[str]) -> tuple[int, int]:
    """(tokens, characters per token) of one regex match of _TOKEN_RE."""
    n = m.end() - m.start()
    return (1, n) if n <= 6 else (-(-n // 4), 4)


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
