"""Regenerate the bundled sample: products.csv, prompt.txt and images/ (PNG and JPEG).

Pure Python, deterministic, no imaging library: `python data/sample/make_sample.py`.
The committed files are its output; run it only to change the sample.
"""

from __future__ import annotations

import csv
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
Pixel = tuple[int, int, int]
Painter = Callable[[int, int], Pixel]


# --------------------------------------------------------------------------------------- PNG


def png_bytes(width: int, height: int, paint: Painter) -> bytes:
    """8-bit RGB PNG, filter 0 on every scanline."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in paint(x, y)) for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


# -------------------------------------------------------------------------------------- JPEG
# Baseline JPEG, 4:4:4 YCbCr, one flat quantisation table and simple fixed-length Huffman codes
# (every DC category a 4-bit code, every AC symbol an 8-bit code): valid, if not the smallest.

_ZIGZAG = [
    r * 8 + (s - r)
    for s in range(15)
    for r in (range(8) if s % 2 else reversed(range(8)))
    if 0 <= s - r < 8
]
_DC_SYMBOLS = list(range(12))
_AC_SYMBOLS = [0x00, 0xF0] + [(run << 4) | size for run in range(16) for size in range(1, 11)]
_Q = 6  # flat quantiser: good quality for tiny images


class _Bits:
    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def put(self, value: int, length: int) -> None:
        for i in range(length - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0x00)  # byte stuffing
                self.acc = self.n = 0

    def flush(self) -> bytes:
        while self.n:
            self.put(1, 1)  # pad with 1-bits
        return bytes(self.out)


def _category(v: int) -> tuple[int, int]:
    size = abs(v).bit_length()
    return size, (v if v >= 0 else v + (1 << size) - 1)


def _fdct(block: list[float]) -> list[float]:
    out = [0.0] * 64
    for v in range(8):
        for u in range(8):
            s = 0.0
            for y in range(8):
                cy = math.cos((2 * y + 1) * v * math.pi / 16)
                for x in range(8):
                    s += block[y * 8 + x] * math.cos((2 * x + 1) * u * math.pi / 16) * cy
            cu = 1 / math.sqrt(2) if u == 0 else 1.0
            cv = 1 / math.sqrt(2) if v == 0 else 1.0
            out[v * 8 + u] = 0.25 * cu * cv * s
    return out


def jpeg_bytes(width: int, height: int, paint: Painter) -> bytes:
    assert width % 8 == 0 and height % 8 == 0
    pixels = [[paint(x, y) for x in range(width)] for y in range(height)]

    def ycc(p: Pixel) -> tuple[float, float, float]:
        r, g, b = p
        return (
            0.299 * r + 0.587 * g + 0.114 * b,
            -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
            0.5 * r - 0.418688 * g - 0.081312 * b + 128,
        )

    bits, prev_dc = _Bits(), [0, 0, 0]
    for by in range(0, height, 8):
        for bx in range(0, width, 8):
            comps = [ycc(pixels[by + y][bx + x]) for y in range(8) for x in range(8)]
            for c in range(3):
                coef = _fdct([p[c] - 128 for p in comps])
                q = [round(coef[i] / _Q) for i in _ZIGZAG]
                size, val = _category(q[0] - prev_dc[c])
                prev_dc[c] = q[0]
                bits.put(_DC_SYMBOLS.index(size), 4)
                bits.put(val, size)
                run = 0
                for a in q[1:]:
                    if a == 0:
                        run += 1
                        continue
                    while run > 15:
                        bits.put(_AC_SYMBOLS.index(0xF0), 8)
                        run -= 16
                    size, val = _category(a)
                    bits.put(_AC_SYMBOLS.index((run << 4) | size), 8)
                    bits.put(val, size)
                    run = 0
                if run:
                    bits.put(_AC_SYMBOLS.index(0x00), 8)  # end of block

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    def dht(cls_id: int, length: int, symbols: list[int]) -> bytes:
        counts = [0] * 16
        counts[length - 1] = len(symbols)
        return bytes([cls_id, *counts, *symbols])

    return b"".join(
        (
            b"\xff\xd8",
            segment(0xFFE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            segment(0xFFDB, bytes([0] + [_Q] * 64)),
            segment(
                0xFFC0,
                struct.pack(">BHHB", 8, height, width, 3)
                + bytes([1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0]),
            ),
            segment(0xFFC4, dht(0x00, 4, _DC_SYMBOLS) + dht(0x10, 8, _AC_SYMBOLS)),
            segment(0xFFDA, bytes([3, 1, 0x00, 2, 0x00, 3, 0x00, 0, 63, 0])),
            bits.flush(),
            b"\xff\xd9",
        )
    )


# ------------------------------------------------------------------------------------ images


def _mug(x: int, y: int) -> Pixel:
    inside = 16 <= x < 44 and 12 <= y < 52
    handle = 44 <= x < 54 and 20 <= y < 40 and not (47 <= x < 51 and 24 <= y < 36)
    return (200, 40, 40) if inside or handle else (245, 240, 230)


def _lamp(x: int, y: int) -> Pixel:
    shade = y < 28 and abs(x - 32) < 6 + y // 2
    pole = abs(x - 32) < 2 and 28 <= y < 54
    base = 54 <= y < 60 and abs(x - 32) < 14
    return (250, 210, 60) if shade else (60, 60, 60) if pole or base else (30, 40, 80)


def _plant(x: int, y: int) -> Pixel:
    pot = y >= 40 and abs(x - 32) < 14 - (y - 40) // 4
    leaf = y < 40 and (x - 32) ** 2 / 400 + (y - 24) ** 2 / 200 < 1
    return (170, 90, 40) if pot else (40, 150, 60) if leaf else (235, 245, 250)


def _chair(x: int, y: int) -> Pixel:
    wood = (
        (20 <= x < 26 and 6 <= y < 58)
        or (20 <= x < 48 and 32 <= y < 37)
        or (42 <= x < 48 and 32 <= y < 58)
    )
    return (120, 80, 40) if wood else (220, 220, 215)


def _gradient(x: int, y: int) -> Pixel:
    return (x * 4, y * 5, 255 - x * 2)


def _checker(x: int, y: int) -> Pixel:
    return (20, 20, 20) if (x // 8 + y // 8) % 2 else (240, 240, 240)


IMAGES: dict[str, bytes] = {
    "mug.png": png_bytes(64, 64, _mug),
    "lamp.png": png_bytes(64, 64, _lamp),
    "plant.png": png_bytes(64, 64, _plant),
    "chair.png": png_bytes(64, 64, _chair),
    "scarf.jpg": jpeg_bytes(64, 48, _gradient),
    "board.jpeg": jpeg_bytes(48, 48, _checker),
}

# -------------------------------------------------------------------------------------- rows

HEADER = ["sku", "name", "price", "description", "image"]
ROWS = [
    ["007", "Red mug", "19.90", 'Stoneware mug, 350 ml. "Dishwasher safe", they say.', "mug.png"],
    ["0042", "Desk lamp", "5", "Adjustable arm.\nWarm light, 2700 K.", "lamp.png"],
    ["010", "Fern in pot", "", "Easy to keep; likes shade, hates direct sun.", "plant.png"],
    ["011", "Oak chair", "149.00", "", "chair.png"],
    ["012", "Wool scarf", "24.5", "Soft merino — 180 × 30 cm", "scarf.jpg"],
    ["013", "Chess board", "0.99", "Folding board, 8×8 squares", "board.jpeg"],
    ["014", "茶碗 (tea bowl)", "12", "手作りの茶碗。釉薬は青。", "mug.png"],
    ["015", "Party lamp 🎉", "7.50", "RGB bulb 💡, app-controlled 📱", "lamp.png"],
    ["016", "Plant mister", "3", "Fine spray\r\nfor ferns", "plant.png"],
    ["017", "Chair pad", "9.90", 'Cushion with ties; fits "standard" chairs, 40×40', "chair.png"],
    ["018", "Braces {not a field}", "1.00", "Literal {braces} in a cell stay as they are", ""],
    ["019", "Backslash box", "2", r"Path C:\temp\new and a tab:	end", ""],
    ["020", "Script tag", "3", "</script><script>alert(1)</script>", ""],
    ["021", "Zero-width", "4", "a\u200bb\u00a0c", ""],
    ["022", "Quote only", "5", '"', ""],
    ["023", "Commas", "6", ",,,", ""],
    ["024", "Leading space", "7", "  two spaces before, two after  ", ""],
    ["0001", "Tiny id", "0", "SKU with three leading zeros", ""],
    ["1e3", "Scientific-looking id", "1e3", "Must stay the text 1e3", ""],
    ["TRUE", "Boolean-looking id", "NaN", "Must stay the text TRUE and NaN", ""],
]
_NOUNS = ["bowl", "vase", "candle", "blanket", "frame", "clock", "basket", "jar", "tray", "stool"]
_ADJS = ["linen", "ceramic", "rattan", "walnut", "glass", "copper", "cotton", "marble"]
for i in range(30):
    noun, adj = _NOUNS[i % len(_NOUNS)], _ADJS[(i * 3) % len(_ADJS)]
    price = f"{(i * 7) % 50}.{(i * 13) % 100:02d}" if i % 4 else str((i * 3) % 40)
    ROWS.append(
        [
            f"{100 + i:04d}",
            f"{adj.title()} {noun}",
            price,
            f"A {adj} {noun}, item {i + 1} of the range.",
            "",
        ]
    )

PROMPT = (
    "Write a one-sentence shop blurb for the product below.\n"
    "Name: {name}\nPrice: {price}\nDetails: {description}"
)


def main() -> None:
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    for name, data in IMAGES.items():
        (images / name).write_bytes(data)
    with (HERE / "products.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(HEADER)
        writer.writerows(ROWS)
    (HERE / "prompt.txt").write_text(PROMPT, encoding="utf-8")


if __name__ == "__main__":
    main()
