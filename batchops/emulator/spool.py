"""Result lines of a running batch, on disk, in their final (shuffled) order by index only.

A line is written to the spool file as it is produced; memory holds its offset and its place
in the output order (12 bytes a line, for the batch's life only). When the batch ends the lines
are copied to the result file in that order, and the spool is removed.
"""

from __future__ import annotations

import mmap
import os
import random
from array import array
from pathlib import Path

COPY_BUFFER = 1 << 20


class Spool:
    __slots__ = ("path", "_fh", "_ends", "_order", "_rng", "_shuffle", "_pos")

    def __init__(self, path: Path, rng: random.Random | None, shuffle: bool) -> None:
        self.path = path
        self._fh = path.open("wb")
        self._ends = array("q")  # line i ends (before its newline) at _ends[i]
        self._order = array("l")  # output position -> line index
        self._rng = rng
        self._shuffle = shuffle
        self._pos = 0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, line: bytes) -> None:
        """Append `line` at a seeded random position (inside-out Fisher-Yates step, the same
        draws as shuffling the lines themselves)."""
        idx = len(self._ends)
        self._fh.write(line)
        self._fh.write(b"\n")
        self._pos += len(line) + 1
        self._ends.append(self._pos - 1)
        order = self._order
        if self._shuffle and self._rng is not None and order:
            j = int(self._rng.random() * (len(order) + 1))
            if j < len(order):
                order.append(order[j])
                order[j] = idx
                return
        order.append(idx)

    def write_to(self, dest: Path) -> int:
        """Copy the lines to `dest` in output order; the spool is gone afterwards. Its size."""
        self._fh.close()
        try:
            if not self._shuffle or self._rng is None:
                os.replace(self.path, dest)  # written in order already
                return self._pos
            ends = self._ends
            with self.path.open("rb") as src, dest.open("wb", buffering=COPY_BUFFER) as out:
                if self._pos:
                    with mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        write = out.write
                        for i in self._order:
                            start = ends[i - 1] + 1 if i else 0
                            write(mm[start : ends[i] + 1])  # the line and its newline
            return self._pos
        finally:
            self.discard()

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)
        self._ends = array("q")
        self._order = array("l")
