"""Per-custom-id execution counts, kept on disk: a 5M-row run must not hold 5M dict entries.

Increments gather in a small dict and go to a SQLite table in the emulator's working dir in
batches (one `executemany` upsert), so a request costs a dict update, not a query. A count is
read back only when a fault knob needs "is this the first run/answer" or for the stats.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

FLUSH_AT = 10_000  # distinct ids waiting in memory before they go to disk

_UPSERT = (
    "INSERT INTO counts (cid, executed, succeeded) VALUES (?, ?, ?) "
    "ON CONFLICT(cid) DO UPDATE SET executed = executed + excluded.executed, "
    "succeeded = succeeded + excluded.succeeded"
)


class RequestCounts:
    """custom_id → (executed, succeeded); listed in the order ids were first counted."""

    def __init__(self, workdir: Callable[[], Path]) -> None:
        self._workdir = workdir  # created on first use (most test emulators never flush)
        self._pending: dict[str, list[int]] = {}
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            # The loop thread uses it, or the caller's once the server has stopped: one at a time.
            path = self._workdir() / "counts.sqlite"
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # Scratch data of one emulator process: no journal, no fsync.
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("PRAGMA synchronous = OFF")
            db.execute("PRAGMA cache_size = -8000")  # ~8 MB of page cache, whatever the rows
            db.execute(
                "CREATE TABLE IF NOT EXISTS counts (cid TEXT PRIMARY KEY, "
                "executed INTEGER NOT NULL, succeeded INTEGER NOT NULL)"
            )
            self._db = db
        return self._db

    def add(self, cid: str, executed: int, succeeded: int) -> None:
        entry = self._pending.get(cid)
        if entry is None:
            self._pending[cid] = [executed, succeeded]
            if len(self._pending) >= FLUSH_AT:
                self.flush()
        else:
            entry[0] += executed
            entry[1] += succeeded

    def get(self, cid: str) -> tuple[int, int]:
        executed = succeeded = 0
        if self._db is not None:
            row = self._db.execute(
                "SELECT executed, succeeded FROM counts WHERE cid = ?", (cid,)
            ).fetchone()
            if row is not None:
                executed, succeeded = row
        entry = self._pending.get(cid)
        if entry is not None:
            executed += entry[0]
            succeeded += entry[1]
        return executed, succeeded

    def flush(self) -> None:
        if not self._pending:
            return
        db = self._conn()
        db.execute("BEGIN")
        db.executemany(_UPSERT, ((k, v[0], v[1]) for k, v in self._pending.items()))
        db.execute("COMMIT")
        self._pending = {}

    def items(self) -> Iterator[tuple[str, int, int]]:
        self.flush()
        if self._db is None:
            return iter(())
        return iter(self._db.execute("SELECT cid, executed, succeeded FROM counts ORDER BY rowid"))

    def close(self) -> None:
        self._pending = {}
        if self._db is not None:
            self._db.close()
            self._db = None
