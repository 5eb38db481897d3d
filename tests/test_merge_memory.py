"""The merge's transient is the peak RSS of a whole run (issue 18): it reads the store in small
row ranges, whatever the table's size, so its memory is the same at 1M and 5M rows."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from batchops.merge import _READER_FRAME_ROWS, merge_frames
from batchops.store import OUTCOME_TYPES

ROWS = 100_000


class _RecordingReader:
    """An `OutcomeReader` over a frame that notes every row range asked for."""

    def __init__(self, outcomes: pl.DataFrame) -> None:
        self.outcomes = outcomes
        self.ranges: list[tuple[int, int]] = []

    def outcome_count(self) -> int:
        return self.outcomes.height

    def outcomes_between(self, lo: int, hi: int) -> pl.DataFrame:
        self.ranges.append((lo, hi))
        return self.outcomes.filter(pl.col("row_idx").is_between(lo, hi))


def test_the_merge_reads_the_store_in_small_slices_whatever_the_row_count(tmp_path: Path) -> None:
    idx = list(range(ROWS))
    source = pl.DataFrame(
        {"a": [f"v{i}" for i in idx], "__row_idx": idx, "__row_id": [str(i) for i in idx]},
        schema={"a": pl.String, "__row_idx": pl.Int64, "__row_id": pl.String},
    )
    outcomes = pl.DataFrame(
        {
            "row_idx": idx,
            "response": [f"answer {i}" for i in idx],
            "status": ["succeeded"] * ROWS,
            "error": [None] * ROWS,
            "model": ["m"] * ROWS,
            "prompt_tokens": [1] * ROWS,
            "completion_tokens": [2] * ROWS,
            "cost_usd": [0.5] * ROWS,
            "batch_id": ["b"] * ROWS,
        },
        schema={"row_idx": pl.Int64(), **OUTCOME_TYPES},
    )
    reader = _RecordingReader(outcomes)
    # the source arrives as one big frame: the merge still slices it
    summary = merge_frames([source], ["a"], reader, tmp_path / "out.csv")
    assert summary.rows == ROWS and summary.by_status["succeeded"] == ROWS
    assert _READER_FRAME_ROWS <= 8_192  # 32,768 rows a read cost ~45 MB of peak RSS at 1M
    assert max(hi - lo + 1 for lo, hi in reader.ranges) <= _READER_FRAME_ROWS
    covered = sorted(reader.ranges)
    assert covered[0][0] == 0 and covered[-1][1] == ROWS - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(covered, covered[1:], strict=False))
