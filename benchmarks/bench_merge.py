"""Benchmark batchops.merge.merge_frames against a naive per-row merge.

    python benchmarks/bench_merge.py [--rows 1000000] [--frame-rows 100000] [--seed 7]

Each method runs in its own subprocess on identical seeded data: a source of N all-String rows
(zero-padded ids, prices like ``19.90``, empty cells, quotes, commas, newlines, CJK, emoji)
streamed as polars frames with ``__row_idx`` / ``__row_id``, and N outcomes in shuffled order
(96% succeeded, 2% failed, 1% skipped, 1% missing). Data generation is not timed. Measured:
wall seconds of the merge call and the peak RSS while it runs (VmHWM, reset just before the
call; "inputs" is the RSS already held by the generated source + outcomes at that moment).

The naive baseline is what the seed scripts do: a Python dict custom_id → outcome, then one
``csv.writer.writerow`` per source row.

Targets: merge_frames ≤ 5 s for 1,000,000 rows and ≥ 3× the naive loop.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchops.merge import MERGED_COLUMNS, merge_frames, read_merged  # noqa: E402

SOURCE_COLUMNS = ["sku", "title", "price", "notes"]
WORDS = np.array(
    [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
        "mike",
        "november",
        "oscar",
        "papa",
        "quebec",
        "romeo",
        "sierra",
        "tango",
        "uniform",
        "victor",
        "whiskey",
        "xray",
        "yankee",
        "zulu",
        "red",
        "green",
        "blue",
        "steel",
        "cotton",
        "linen",
        "wool",
        "oak",
        "pine",
        "maple",
        "large",
        "small",
        "medium",
        "compact",
        "deluxe",
    ]
)
NOTES = np.array(
    [
        "",
        "",
        "",
        "fragile",
        "ships in 2-3 days",
        'customer said "urgent"',
        "size S, M, L",
        "line one\nline two",
        "windows\r\nnewline",
        "中文备注：易碎",
        "gift 🎁 wrap",
        "007",
    ]
)


# --------------------------------------------------------------------------- data


def make_source(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    cents = rng.integers(100, 100_000, n)
    raw = pl.DataFrame(
        {
            "id": rng.permutation(n),
            **{f"w{k}": WORDS[rng.integers(0, len(WORDS), n)] for k in range(4)},
            "units": cents // 100,
            "cents": cents % 100,
            "notes": NOTES[rng.integers(0, len(NOTES), n)],
        }
    )
    return raw.select(
        pl.col("id").cast(pl.String).str.zfill(8).alias("sku"),  # leading zeros must survive
        pl.concat_str([pl.col(f"w{k}") for k in range(4)], separator=" ").alias("title"),
        pl.concat_str(
            [pl.col("units").cast(pl.String), pl.col("cents").cast(pl.String).str.zfill(2)],
            separator=".",
        ).alias("price"),  # "19.90", never 19.9
        pl.col("notes"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("__row_idx"),
        pl.format("row-{}", pl.int_range(pl.len(), dtype=pl.Int64)).alias("__row_id"),
    )


def make_outcomes(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed + 1)
    roll = rng.random(n)
    raw = pl.DataFrame(
        {
            "row_idx": rng.permutation(n).astype(np.int64),  # results come back in any order
            "status": np.where(
                roll < 0.96,
                "succeeded",
                np.where(roll < 0.98, "failed", np.where(roll < 0.99, "skipped", "missing")),
            ),
            "word": WORDS[rng.integers(0, len(WORDS), n)],
            "pt": rng.integers(40, 400, n),
            "ct": rng.integers(5, 120, n),
        }
    )
    ok = pl.col("status") == "succeeded"
    return raw.select(
        pl.col("row_idx"),
        pl.when(ok)
        .then(
            pl.format(
                "The answer for row {} is {}, with a short justification of about eighty chars.",
                "row_idx",
                "word",
            )
        )
        .alias("response"),
        pl.col("status"),
        pl.when(pl.col("status") == "failed")
        .then(pl.lit("invalid_request: max_tokens is too large"))
        .when(pl.col("status") == "skipped")
        .then(pl.lit("image not found: images/x.png"))
        .alias("error"),
        pl.when(ok).then(pl.lit("gpt-4o-mini-2024-07-18")).alias("model"),
        pl.when(ok).then(pl.col("pt")).alias("prompt_tokens"),
        pl.when(ok).then(pl.col("ct")).alias("completion_tokens"),
        pl.when(ok).then(pl.col("pt") * 0.075e-6 + pl.col("ct") * 0.3e-6).alias("cost_usd"),
        pl.when(pl.col("status") != "skipped")
        .then(pl.format("batch_{}", pl.col("row_idx") // 20_000))
        .alias("batch_id"),
        pl.format("row-{}", "row_idx").alias("custom_id"),  # only the naive loop uses it
    )


# --------------------------------------------------------------------------- methods


def naive_merge(
    frames: Iterator[pl.DataFrame], source_columns: list[str], outcomes: pl.DataFrame, out: Path
) -> int:
    """The seed scripts' way: dict custom_id → outcome tuple, csv.writer per row."""
    lookup = {
        row[-1]: row[:-1] for row in outcomes.select(*MERGED_COLUMNS, "custom_id").iter_rows()
    }
    missing = ("", "missing", "no result recorded", "", "", "", "", "")
    n = 0
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([*source_columns, *MERGED_COLUMNS])
        for frame in frames:
            for row in frame.select(*source_columns, "__row_id").iter_rows():
                o = lookup.get(row[-1])
                if o is None:
                    w.writerow([*row[:-1], *missing])
                    continue
                vals = ["" if v is None else v for v in o]
                if vals[1] == "missing" and not vals[2]:
                    vals[2] = "no result recorded"
                w.writerow([*row[:-1], *vals])
                n += 1
    return n


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+)", fh.read()).group(1)) / 1024


def _vm_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1)) / 1024


def worker(method: str, rows: int, frame_rows: int, seed: int, out: Path) -> dict:
    source = make_source(rows, seed)
    outcomes = make_outcomes(rows, seed)
    frames = deque(source.slice(s, frame_rows) for s in range(0, rows, frame_rows))
    del source  # the slices keep the data; the deque lets consumed frames be freed

    def stream() -> Iterator[pl.DataFrame]:
        while frames:
            yield frames.popleft()

    inputs = _vm_rss_mb()
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    t0 = time.perf_counter()
    if method == "naive":
        n = naive_merge(stream(), SOURCE_COLUMNS, outcomes, out)
    else:
        n = merge_frames(stream(), SOURCE_COLUMNS, outcomes, out).rows
    seconds = time.perf_counter() - t0
    return {
        "method": method,
        "rows": n,
        "seconds": seconds,
        "peak_rss_mb": _vm_hwm_mb(),
        "inputs_rss_mb": inputs,
        "out_mb": out.stat().st_size / 1e6,
    }


# --------------------------------------------------------------------------- driver


def run_one(method: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--rows",
        str(args.rows),
        "--frame-rows",
        str(args.frame_rows),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{method} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_same(a: Path, b: Path) -> None:
    """Both files must hold the same cells (number formatting aside)."""
    x, y = read_merged(a), read_merged(b)
    assert x.shape == y.shape, (x.shape, y.shape)
    cols = [*SOURCE_COLUMNS, "response", "status", "error", "model", "prompt_tokens", "batch_id"]
    assert x.select(cols).equals(y.select(cols)), "merged cells differ"
    cost_x = x["cost_usd"].replace("", None).cast(pl.Float64)
    cost_y = y["cost_usd"].replace("", None).cast(pl.Float64)
    assert cost_x.equals(cost_y), "cost_usd differs"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--frame-rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument(
        "--no-check", action="store_true", help="don't compare the outputs cell by cell"
    )
    ap.add_argument(
        "--worker",
        choices=["merge_frames", "merge_frames_parquet", "naive"],
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.frame_rows, args.seed, args.out)))
        return

    methods = ["merge_frames", "merge_frames_parquet"] + ([] if args.skip_naive else ["naive"])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        outs = {
            m: Path(tmp) / ("merged.parquet" if m.endswith("parquet") else f"{m}.csv")
            for m in methods
        }
        for m in methods:
            results.append(run_one(m, args, outs[m]))
        if not args.no_check and "naive" in outs:
            check_same(outs["merge_frames"], outs["naive"])
            check_same(outs["merge_frames"], outs["merge_frames_parquet"])

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    print(
        f"\nmerge benchmark: {args.rows:,} rows x {len(SOURCE_COLUMNS)} source columns, "
        f"frames of {args.frame_rows:,}, {args.rows:,} shuffled outcomes, "
        f"{cores} cores ({usable} usable), polars {pl.__version__} ({pl.thread_pool_size()} threads), "
        f"Python {sys.version.split()[0]}"
    )
    naive = next((r for r in results if r["method"] == "naive"), None)
    head = f"{'method':<24}{'seconds':>9}{'rows/s':>12}{'peak RSS MB':>13}{'inputs MB':>11}{'merge +MB':>11}{'output MB':>11}{'vs naive':>10}"
    print(head)
    print("-" * len(head))
    for r in results:
        label = {
            "merge_frames": "merge_frames -> CSV",
            "merge_frames_parquet": "merge_frames -> Parquet",
            "naive": "naive dict + csv.writer",
        }[r["method"]]
        speed = f"{naive['seconds'] / r['seconds']:.1f}x" if naive else "-"
        print(
            f"{label:<24}{r['seconds']:>9.2f}{r['rows'] / r['seconds']:>12,.0f}{r['peak_rss_mb']:>13,.0f}"
            f"{r['inputs_rss_mb']:>11,.0f}{r['peak_rss_mb'] - r['inputs_rss_mb']:>11,.0f}{r['out_mb']:>11,.1f}{speed:>10}"
        )
    csv_r = results[0]
    verdict = (
        "PASS"
        if csv_r["seconds"] <= 5 and (not naive or naive["seconds"] / csv_r["seconds"] >= 3)
        else "FAIL"
    )
    print(f"targets (CSV: <= 5 s, >= 3x naive): {verdict}")


if __name__ == "__main__":
    main()
