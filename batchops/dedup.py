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
Memory: 24 bytes a row (index and key) while the slice is paired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import polars as pl
from loguru import logger

from batchops import render
from batchops.source import ROW_IDX, Source, iter_frames
from batchops.spec import JobSpec
from batchops.store import Store

_FRAME_BYTES = 4 << 20
_FRAME_ROWS = (500, 50_000)
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
    parts = [render.text_expr(spec.prompt)]
    if render.system_fields(spec):
        parts.append(render.text_expr(spec.system or ""))
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


def find_pairs(src: Source, spec: JobSpec) -> Pairs:
    """Every follower of the slice and its leader (the lowest row with the same body)."""
    return _scan(src, spec)[1]


def _scan(src: Source, spec: JobSpec) -> tuple[np.ndarray, Pairs]:
    """The slice's row indexes, and its pairs."""
    # Frames of about _FRAME_BYTES of source each: memory stays flat however wide the rows.
    row_bytes = src.file_size / max(1, src.total_rows)
    rows = int(min(_FRAME_ROWS[1], max(_FRAME_ROWS[0], _FRAME_BYTES // max(1.0, row_bytes))))
    idx_parts, h1_parts, h2_parts = [], [], []
    for frame in iter_frames(src, columns=columns(spec), batch_rows=rows):
        k = keys(frame, spec)
        idx_parts.append(k[ROW_IDX].to_numpy())
        h1_parts.append(k["h1"].to_numpy())
        h2_parts.append(k["h2"].to_numpy())
    if not idx_parts:
        return np.empty(0, np.int64), NO_PAIRS
    idx, h1 = np.concatenate(idx_parts), np.concatenate(h1_parts)
    del idx_parts, h1_parts
    # Candidates: rows whose first 64 bits repeat (numpy sort: a few bytes a row, no hash table).
    order = np.argsort(h1, kind="stable")
    same = h1[order[1:]] == h1[order[:-1]]
    repeated = np.zeros(h1.size, dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    cand = np.sort(order[repeated])
    del order, same, repeated
    if cand.size == 0:
        return idx, NO_PAIRS
    h2 = np.concatenate(h2_parts)[cand]
    found = (  # the group is on all 128 bits
        pl.DataFrame({ROW_IDX: idx[cand], "h1": h1[cand], "h2": h2})
        .with_columns(pl.col(ROW_IDX).min().over("h1", "h2").alias(LEADER))
        .filter(pl.col(ROW_IDX) != pl.col(LEADER))
        .sort(ROW_IDX)
    )
    return idx, Pairs(found[ROW_IDX].to_numpy(), found[LEADER].to_numpy())


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
    pairs = find_pairs(src, spec)
    if len(pairs) and store.has_history():
        pairs = anchor(pairs, store.row_history())
    n = store.pair_rows(pairs.followers, pairs.leaders, meta=(META, wanted))
    if n:
        logger.info(
            "dedup: {} row(s) have the same request as an earlier row: each is sent once "
            "and its answer shared (--no-dedup to send every row)",
            n,
        )
    return n


def leaders_only(src: Source, spec: JobSpec) -> tuple[np.ndarray | None, int]:
    """For a dry run: the slice's rows to build (None: all of them) and how many rows were
    left out as followers."""
    if not spec.dedup:
        return None, 0
    every, pairs = _scan(src, spec)
    if not len(pairs):
        return None, 0
    return every[~np.isin(every, pairs.followers, assume_unique=True)], len(pairs)
