"""Identical requests are sent once (issue 18).

Rows whose request bodies are byte-identical apart from `custom_id` share ONE request: the
lowest row of each group (the *leader*) is sent; the others (its *followers*) never enter a
chunk file, and take the leader's state and answer in the same transaction as the leader
(`Store._mirror`), with 0 tokens and 0 cost. A job's model and parameters are the same for every
row, so two bodies are identical exactly when the row's varying parts are: the rendered prompt,
the rendered system message (when it has placeholders) and the image cell (the same path: the
same bytes; two different paths to identical files are not paired).

Finding the pairs is one columnar pass over the slice, no Python per row: the parts are joined
into one string without ambiguity (each part prefixed with its byte length when there are
several) and hashed by polars with two different seeds (xxh3, seeded: two independent 64-bit
hashes, one 128-bit key). Rows are grouped by the key; the leader is the group's lowest row.
Memory: 24 bytes a row (index and key) for up to PART_ROWS rows; a larger slice spills its
keys to files (in the run dir), one per partition of the key space, and pairs one partition at
a time, so memory stays flat (a few MB of keys) whatever the row count.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from loguru import logger

from batchops import render
from batchops.source import ROW_IDX, Source, arrow_column, iter_frames
from batchops.spec import JobSpec
from batchops.store import Store

_FRAME_BYTES = 4 << 20
_FRAME_ROWS = (500, 50_000)
PART_ROWS = 1 << 18  # rows of one partition of keys (24 bytes each), on average
_KEY = np.dtype([("idx", "<i8"), ("h1", "<u8"), ("h2", "<u8")])
_SEEDS = (0x9E3779B97F4A7C15, 0x2545F4914F6CDD1D)  # two xxh3 seeds: a 128-bit key
LEADER = "leader_idx"
META = "dedup_slice"  # the row slice whose rows were paired (or "off")


@dataclass(frozen=True, slots=True)
class Pairs:
    """Followers and their leaders (row_idx, sorted by follower), from `find_pairs`."""

    followers: np.ndarray
    leaders: np.ndarray

    def __len__(self) -> int:
        return int(self.followers.size)


NO_PAIRS = Pairs(np.empty(0, np.int64), np.empty(0, np.int64))


def columns(spec: JobSpec) -> list[str]:
    """The source columns a row's request body depends on."""
    fields = render.template_fields(spec.prompt) + render.system_fields(spec)
    return list(dict.fromkeys(fields + ([spec.image_column] if spec.image_column else [])))


def body_expr(spec: JobSpec) -> pl.Expr:
    """What varies between two rows' request bodies, as one string per row: equal strings,
    equal bodies (and the other way round)."""
    system = render.text_expr(spec.system or "") if render.system_fields(spec) else None
    return _framed(spec, render.text_expr(spec.prompt), system)


def rendered_body_expr(spec: JobSpec, text_col: str, system_col: str) -> pl.Expr:
    """body_expr over a frame whose prompt (and per-row system message) are rendered already,
    in the columns text_col (and system_col)."""
    system = pl.col(system_col) if render.system_fields(spec) else None
    return _framed(spec, pl.col(text_col), system)


def _framed(spec: JobSpec, text: pl.Expr, system: pl.Expr | None) -> pl.Expr:
    parts = [text] + ([system] if system is not None else [])
    if spec.image_column:
        parts.append(pl.col(spec.image_column).fill_null(""))
    if len(parts) == 1:
        return parts[0]
    # Length-prefixed parts: ("a:b", "") and ("a", ":b") stay different.
    framed: list[pl.Expr] = []
    for part in parts:
        framed += [part.str.len_bytes().cast(pl.String), pl.lit(":"), part]
    return pl.concat_str(framed)


def keys(frame: pl.DataFrame, spec: JobSpec) -> pl.DataFrame:
    """row_idx and the 128-bit key (two UInt64 columns) of each row of a source frame."""
    body = body_expr(spec)
    return frame.select(
        pl.col(ROW_IDX), body.hash(_SEEDS[0]).alias("h1"), body.hash(_SEEDS[1]).alias("h2")
    )


def find_pairs(
    src: Source, spec: JobSpec, scratch: Path | None = None, *, part_rows: int = PART_ROWS
) -> Pairs:
    """Every follower of the slice and its leader (the lowest row with the same body).
    scratch: the folder for the key files of a slice over `part_rows` rows (default: the
    system's temp folder)."""
    found = [_pairs_of(keys) for keys in _key_parts(src, spec, scratch, part_rows)]
    found = [p for p in found if len(p)]
    if not found:
        return NO_PAIRS
    followers = np.concatenate([p.followers for p in found])
    leaders = np.concatenate([p.leaders for p in found])
    order = np.argsort(followers, kind="stable")
    return Pairs(followers[order], leaders[order])


def _key_parts(
    src: Source, spec: JobSpec, scratch: Path | None, part_rows: int
) -> Iterator[np.ndarray]:
    """Every row's key (_KEY records) in partitions by the key's first bits: equal keys share a
    partition, and a partition holds about part_rows rows, so memory does not grow with the
    table. One partition is kept in memory; more are spilled to files, one per partition."""
    # Frames of about _FRAME_BYTES of source each: memory stays flat however wide the rows.
    row_bytes = src.file_size / max(1, src.total_rows)
    rows = int(min(_FRAME_ROWS[1], max(_FRAME_ROWS[0], _FRAME_BYTES // max(1.0, row_bytes))))
    frames = (
        _records(keys(frame, spec))
        for frame in iter_frames(src, columns=columns(spec), batch_rows=rows)
    )
    bits = max(0, math.ceil(math.log2(max(1, src.n_rows) / part_rows)))
    if bits == 0:
        parts = list(frames)
        if parts:
            yield np.concatenate(parts)
        return
    n_parts = 1 << bits
    with tempfile.TemporaryDirectory(dir=scratch, prefix="dedup-") as tmp:
        paths = [Path(tmp) / f"{i}.keys" for i in range(n_parts)]
        files = [path.open("wb") for path in paths]
        try:
            for rec in frames:
                part = (rec["h1"] >> np.uint64(64 - bits)).astype(np.int64)
                order = np.argsort(part, kind="stable")
                rec, bounds = rec[order], np.searchsorted(part[order], np.arange(n_parts + 1))
                for i in range(n_parts):
                    if bounds[i + 1] > bounds[i]:
                        rec[bounds[i] : bounds[i + 1]].tofile(files[i])
        finally:
            for fh in files:
                fh.close()
        for path in paths:
            yield np.fromfile(path, dtype=_KEY)
            path.unlink()


def _records(k: pl.DataFrame) -> np.ndarray:
    rec = np.empty(k.height, dtype=_KEY)
    rec["idx"], rec["h1"], rec["h2"] = k[ROW_IDX].to_numpy(), k["h1"], k["h2"]
    return rec


def _pairs_of(rec: np.ndarray) -> Pairs:
    """The pairs among one partition's keys."""
    if rec.size < 2:
        return NO_PAIRS
    h1 = rec["h1"]
    # Candidates: rows whose first 64 bits repeat (numpy sort: a few bytes a row, no hash table).
    order = np.argsort(h1, kind="stable")
    same = h1[order[1:]] == h1[order[:-1]]
    repeated = np.zeros(h1.size, dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    cand = rec[order[repeated]]
    del order, same, repeated
    if cand.size == 0:
        return NO_PAIRS
    found = (  # the group is on all 128 bits
        pl.DataFrame({ROW_IDX: cand["idx"], "h1": cand["h1"], "h2": cand["h2"]})
        .with_columns(pl.col(ROW_IDX).min().over("h1", "h2").alias(LEADER))
        .filter(pl.col(ROW_IDX) != pl.col(LEADER))
    )
    return Pairs(found[ROW_IDX].to_numpy(), found[LEADER].to_numpy())


def anchor(pairs: Pairs, history: pl.DataFrame) -> Pairs:
    """The pairs to make in a run whose rows already have a past (a widened slice, dedup
    turned on in a resumed run): a row that was queued or answered keeps its own request; a
    group with such rows, or with followers already, keeps its leader (the followers' leader,
    else its lowest such row), and only rows never sent become followers."""
    members = pl.concat(
        [
            pl.DataFrame({ROW_IDX: pairs.followers, "g": pairs.leaders}),
            pl.DataFrame({ROW_IDX: np.unique(pairs.leaders), "g": np.unique(pairs.leaders)}),
        ]
    ).join(history.rename({"row_idx": ROW_IDX}), on=ROW_IDX, how="left")
    members = members.with_columns(pl.col("fixed").fill_null(False))
    free = ~pl.col("fixed") & pl.col("old_leader").is_null()
    fixed_leader = pl.col(ROW_IDX).filter(pl.col("fixed") & pl.col("old_leader").is_null())
    found = (
        members.with_columns(
            pl.coalesce(
                pl.col("old_leader").min().over("g"),
                fixed_leader.min().over("g"),
                pl.col("g"),
            ).alias(LEADER)
        )
        .filter(free & (pl.col(ROW_IDX) != pl.col(LEADER)))
        .sort(ROW_IDX)
    )
    return Pairs(found[ROW_IDX].to_numpy(), found[LEADER].to_numpy())


def pair_run(store: Store, src: Source, spec: JobSpec) -> int:
    """Pair the run's identical rows once per row slice (before anything is built); with
    `dedup = false`, unpair the followers not sent yet. Returns the rows newly paired."""
    if not spec.dedup:
        n = store.unpair_pending()
        if n or store.get_meta(META) not in (None, "off"):
            store.set_meta(META, "off")
        if n:
            logger.info("--no-dedup: {} row(s) that shared a request are sent on their own", n)
        return 0
    wanted = json.dumps([spec.start_row, spec.end_row])
    if store.get_meta(META) == wanted:
        return 0
    pairs = find_pairs(src, spec, scratch=store.path.parent)
    history = bool(len(pairs)) and store.has_history()
    if history:
        pairs = anchor(pairs, store.row_history())
    n = store.pair_rows(pairs.followers, pairs.leaders, meta=(META, wanted), mirror=history)
    if n:
        logger.info(
            "dedup: {} row(s) have the same request as an earlier row: each is sent once "
            "and its answer shared (--no-dedup to send every row)",
            n,
        )
    return n


def leaders_only(
    src: Source, spec: JobSpec, scratch: Path | None = None
) -> tuple[np.ndarray | None, int]:
    """For a dry run: the slice's rows to build (None: all of them) and how many rows were
    left out as followers."""
    if not spec.dedup:
        return None, 0
    pairs = find_pairs(src, spec, scratch)
    if not len(pairs):
        return None, 0
    every = np.arange(src.start_row, src.end_row, dtype=np.int64)
    return np.setdiff1d(every, pairs.followers, assume_unique=True), len(pairs)


# Up to this many rows a dry run finds its followers while it builds (FirstSeen: ~13 bytes a
# row of table); a larger slice is paired beforehand (leaders_only, flat memory).
STREAM_ROWS = 2_000_000
_LOAD = 0.8  # FirstSeen's table is at most this full


class FirstSeen:
    """The dry run's dedup in the build's own pass: a frame filter that keeps each row whose
    request body was not seen in an earlier row. Frames come in row order, so the row kept is
    its group's lowest: the leader find_pairs would choose.

    The keys seen are held in an open-addressing table sized for n_rows (double hashing, a
    frame's distinct keys probed at once): 10 bytes a slot, the first 64 bits of the key and
    15 bits of the second hash (79 bits: a false repeat among 2 million rows has a chance of
    about 10^-12; memory is what the dry run is short of)."""

    def __init__(self, spec: JobSpec, n_rows: int, text_col: str, system_col: str) -> None:
        body = rendered_body_expr(spec, text_col, system_col)
        self._keys = [body.hash(_SEEDS[0]).alias("h1"), body.hash(_SEEDS[1]).alias("h2")]
        self._size = _prime_above(int(max(16, n_rows) / _LOAD))
        self._t1 = np.zeros(self._size, np.uint64)
        self._t2 = np.zeros(self._size, np.uint16)  # 0: an empty slot
        self._rows = n_rows
        self.followers = 0  # rows left out so far

    def __call__(self, frame: pl.DataFrame) -> pl.DataFrame:
        self._rows -= frame.height
        if self._rows < 0:  # a table fuller than sized would make the probing slow, then endless
            raise RuntimeError("FirstSeen was given more rows than it was sized for")
        k = frame.select(self._keys)
        # A key's first row in this frame (later ones repeat it, whatever the table holds);
        # when no first half repeats, no key does (the struct's pass costs twice as much).
        once = k.select(pl.col("h1").is_first_distinct()).to_series().to_numpy()
        if not once.all():
            once = k.select(pl.struct("h1", "h2").is_first_distinct()).to_series().to_numpy()
        first = np.zeros(frame.height, bool)
        rows = np.flatnonzero(once)
        first[rows] = self._new(k["h1"].to_numpy()[rows], k["h2"].to_numpy()[rows])
        n_out = first.size - int(np.count_nonzero(first))
        if not n_out:
            return frame
        self.followers += n_out
        # As an Arrow bit mask: pl.Series(numpy array) imports numpy.ma (~10 ms of a dry run).
        bits = pa.py_buffer(np.packbits(first, bitorder="little"))
        mask = pa.Array.from_buffers(pa.bool_(), first.size, [None, bits])
        return frame.filter(arrow_column(pa.Table.from_arrays([mask], names=["m"]), "m"))

    def _new(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Which of these keys (all different) are not in the table yet; those are added.
        Every pending key looks at its slot: itself there makes it a repeat, another key sends
        it one step on, an empty slot is taken by one of the keys aiming at it (the others look
        at that slot again: now taken, they move on)."""
        size = self._size
        k2 = ((h2 >> np.uint64(48)) | np.uint64(1)).astype(np.uint16)
        slot = (h1 % np.uint64(size)).astype(np.int64)
        step = (h2 % np.uint64(size - 1)).astype(np.int64) + 1  # size is prime: visits all
        new = np.zeros(h1.size, bool)
        pending = np.arange(h1.size)
        while pending.size:
            at = slot[pending]
            t2 = self._t2[at]
            used = t2 != 0
            busy, busy_at = pending[used], at[used]
            other = (self._t1[busy_at] != h1[busy]) | (t2[used] != k2[busy])
            moving = busy[other]
            nxt = busy_at[other] + step[moving]
            nxt[nxt >= size] -= size
            slot[moving] = nxt
            free, free_at = pending[~used], at[~used]
            # Several keys may aim at one empty slot: whichever write stays takes it (its 64
            # bits first, then the rest from the keys with those bits: the slot holds one key).
            self._t1[free_at] = h1[free]
            owner = self._t1[free_at] == h1[free]
            self._t2[free_at[owner]] = k2[free[owner]]
            took = owner & (self._t2[free_at] == k2[free])
            new[free[took]] = True
            pending = np.concatenate([moving, free[~took]])
        return new


def _prime_above(n: int) -> int:
    n |= 1
    while any(n % d == 0 for d in range(3, math.isqrt(n) + 1, 2)):
        n += 2
    return n
