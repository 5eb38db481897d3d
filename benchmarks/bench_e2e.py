"""A real run end to end: the CLI against the emulator (its own process), for growing row counts.

    python benchmarks/bench_e2e.py                          # 200k, 1M, 5M rows; baseline 200k, 1M
    python benchmarks/bench_e2e.py --sizes 200000,1000000 --baseline-sizes 200000
    python benchmarks/bench_e2e.py --baseline-ref 4d0aff4   # the commit to compare against

Each size: `batchops run` (batch size 50,000, poll 0.5 s, text rows of bench_build's generator)
against `batchops emulator` with short timings, to the merged final_output.csv. Measured on the
batchops child only, from `wait4`: wall (spawn → exit), CPU (user + sys) per row, peak RSS; the
RSS slope between sizes (MiB per million rows) says whether memory depends on the row count.
Phase times come from the run's log (registered, built, last batch submitted, merged).

The emulator's peak RSS (its own `wait4`, when it is stopped) is shown too. Its batch state is
on disk (uploaded and result files, result lines being produced, per-custom-id counts; see
docs/emulator.md), so it is flat: 186 MB at 200k rows, 200 MB at 1M, 202 MB at 5M. (It used to
hold every request and answer in memory, ~5.4 KB of RSS a row, and was OOM-killed at 5M rows
on the 24 GB machine.)

Measured on 2026-11-30 (2 cores shared with 3 other agents, load 3-6): `--sizes
1000000,5000000 --baseline-sizes ''`: 1M rows 155 s, 48.9 µs a row, peak RSS 369 MB; 5M rows
626 s, 47.4 µs a row, peak RSS 373 MB: RSS(5M)/RSS(1M) = x1.01 (target <= 1.15).

Where the peak is (a sampler of /proc/<pid>/status every 5 ms, matched to the log's times): the
process holds ~290 MiB while it collects, flat in the row count (291 MiB when collection starts,
298 MiB before the merge of 5M rows), and the peak is the merge's transient on top of it. The
merge reads the store one frame of rows at a time; at 32,768 rows a frame (the answers as
Python tuples, then a polars frame) that transient was ~+90 MB and its height varied from run
to run (1M rows: 348, 378, 386 MiB in three runs; 2M 395; 5M 395), which is what had looked
like ~33 MB per million rows. At 8,192 rows a frame it is ~45 MB lower at no CPU cost (the
merge alone of a 1M-row run: 297-305 -> 255 MiB, 5.8 -> 5.5 s CPU; whole runs one after the
other: 399 MB at main@7c7f8e9, 369 MB). The spike had been placed "just before the merge"
because the log's "merged" line, which ends the merge, was read as its start.

The baseline is the same CLI of `--baseline-ref` (default: the commit this branch started from,
`git merge-base HEAD main`), exported with `git archive` into a temp dir and run with that dir
first on PYTHONPATH, in the same process run, one size after the other.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_build  # noqa: E402
from bench_run import KEY, _log_time, run_command, run_measured, start_emulator  # noqa: E402
from run_all import Figure, cores, markdown_table, write_json  # noqa: E402

SIZES = (200_000, 1_000_000, 5_000_000)
BASELINE_SIZES = (200_000, 1_000_000)  # main at 5M needs ~7 GB and ~10 min: on request only
QUICK: dict[str, tuple[int, ...]] = {"sizes": (50_000, 200_000), "baseline_sizes": (50_000,)}
TARGET_RSS_1M_MB = 400.0
TARGET_SLOPE = 1.15  # RSS(5M) / RSS(1M)
TARGET_CPU_US = 25.0
BASELINE_ENV = "BENCH_BASELINE_REF"  # set by run_all --baseline-ref
RUN_TIMEOUT = 3600.0
TOKEN_LIMIT = 6_000_000  # enqueued prompt tokens: ~3 chunks of 50,000 text rows in flight
PHASES = {
    "registered": "source row(s) registered",
    "built": "chunk file(s) built for",
    "merged": "merged ",
}


def baseline_tree(ref: str, into: Path) -> Path:
    """The batchops package of `ref`, exported (no worktree metadata is touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", ref, "batchops"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def default_ref() -> str:
    """The baseline: run_all's --baseline-ref (through the environment of its children), else
    the merge base with main."""
    if os.environ.get(BASELINE_ENV):
        return os.environ[BASELINE_ENV]
    out = subprocess.run(
        ["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or "HEAD"


def one_run(csv_path: Path, work: Path, code_root: Path, rows: int) -> dict[str, Any]:
    """`batchops run` to the end against a fresh emulator; the batchops child's figures."""
    emu, root = start_emulator(work)
    try:
        cmd = run_command(
            csv_path,
            work / "run",
            bench_build.PROMPT,
            "--poll-interval",
            "0.5",
            # At most ~3 batches of 50,000 rows in flight, as a real org limit paces them (the
            # emulator no longer needs it: its state is on disk, ~150-190 MB RSS at any size).
            "--token-limit",
            str(TOKEN_LIMIT),
            "--base-url",
            root + "/v1",
            log_dir=work / "logs",
        )
        env = {
            "OPENAI_API_KEY": KEY,
            "NO_COLOR": "1",
            "PYTHONPATH": str(code_root),
        }
        spawned = time.time()
        result = run_measured(cmd, timeout=RUN_TIMEOUT, env_extra=env, cwd=code_root)
    finally:
        emu.terminate()
        _, status, usage = os.wait4(emu.pid, 0)  # its peak RSS too: flat in the row count?
        emu.returncode = os.waitstatus_to_exitcode(status)
    emu_peak_mib = usage.ru_maxrss / 1024
    if result["exit_code"]:
        raise RuntimeError(f"run failed ({result['exit_code']}): {result['stderr'][-2000:]}")
    out = work / "run" / "final_output.csv"
    with out.open("rb") as fh:
        lines = sum(1 for _ in fh)
    result["rows"] = rows
    result["emulator_peak_rss_mib"] = emu_peak_mib
    result["output_bytes"] = out.stat().st_size
    result["output_lines"] = lines
    logs = list((work / "logs").glob("*.log"))
    text = logs[0].read_text(encoding="utf-8").splitlines() if logs else []
    for name, marker in PHASES.items():
        hit = [ln for ln in text if marker in ln]
        result[f"{name}_s"] = (_log_time(hit[-1]) - spawned) if hit else None
    return result


def measure(
    sizes: tuple[int, ...], baseline_sizes: tuple[int, ...], ref: str
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"head": [], "base": []}
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp_s:
        tmp = Path(tmp_s)
        base_root = baseline_tree(ref, tmp / "base_code") if baseline_sizes else None
        for rows in sorted(set(sizes) | set(baseline_sizes)):
            path = bench_build.text_csv(rows)
            for label, code_root, wanted in (
                ("head", ROOT, sizes),
                ("base", base_root, baseline_sizes),
            ):
                if rows not in wanted or code_root is None:
                    continue
                work = tmp / f"{label}_{rows}"
                work.mkdir()
                res = one_run(path, work, code_root, rows)
                res.pop("stdout", None)
                res.pop("stderr", None)
                res["ref"] = ref if label == "base" else "HEAD"
                print(f"{label} {rows:,}: {_summary(res)}", file=sys.stderr, flush=True)
                out[label].append(res)
                shutil.rmtree(work)
    return out


def _cpu(r: dict[str, Any]) -> float:
    return float(r["cpu_s"])


def _summary(r: dict[str, Any]) -> str:
    return (
        f"wall {r['seconds']:.1f} s, CPU {_cpu(r):.1f} s ({_cpu(r) / r['rows'] * 1e6:.1f} µs/row), "
        f"peak RSS {r['peak_rss_mib'] * 1.048576:,.0f} MB"
    )


def _phases(r: dict[str, Any]) -> str:
    parts = [f"{k} {r[k + '_s']:.1f} s" for k in PHASES if r.get(k + "_s") is not None]
    return "after spawn: " + ", ".join(parts) if parts else ""


def figures(
    sizes: tuple[int, ...] = SIZES,
    baseline_sizes: tuple[int, ...] = BASELINE_SIZES,
    ref: str | None = None,
) -> list[Figure]:
    ref = ref or default_ref()
    data = measure(sizes, baseline_sizes, ref)
    base = {r["rows"]: r for r in data["base"]}
    head = {r["rows"]: r for r in data["head"]}
    figs: list[Figure] = []
    mb = 1.048576  # MiB → MB
    for rows, r in sorted(head.items()):
        b = base.get(rows)
        cpu_us = _cpu(r) / rows * 1e6
        figs.append(
            Figure(
                "e2e",
                f"`run` to final_output.csv, {rows:,} text rows: wall",
                f"{r['seconds']:.1f} s ({rows / r['seconds']:,.0f} rows/s)",
                f"main@{ref[:8]} {b['seconds']:.1f} s" if b else "",
                "",
                None,
                _phases(r),
            )
        )
        figs.append(
            Figure(
                "e2e",
                f"batchops CPU (user+sys) a row, {rows:,} rows",
                f"{cpu_us:.1f} µs ({_cpu(r):.1f} s)",
                f"main@{ref[:8]} {_cpu(b) / rows * 1e6:.1f} µs ({_cpu(b):.1f} s)" if b else "",
                f"≤ {TARGET_CPU_US:.0f} µs at 1M" if rows == 1_000_000 else "",
                cpu_us <= TARGET_CPU_US if rows == 1_000_000 else None,
                "the batchops child only (the emulator is its own process)",
            )
        )
        figs.append(
            Figure(
                "e2e",
                f"batchops peak RSS, {rows:,} rows",
                f"{r['peak_rss_mib'] * mb:,.0f} MB",
                f"main@{ref[:8]} {b['peak_rss_mib'] * mb:,.0f} MB" if b else "",
                f"≤ {TARGET_RSS_1M_MB:.0f} MB at 1M" if rows == 1_000_000 else "",
                r["peak_rss_mib"] * mb <= TARGET_RSS_1M_MB if rows == 1_000_000 else None,
                "ru_maxrss of the batchops child (wait4)",
            )
        )
        if "emulator_peak_rss_mib" in r:
            eb = b.get("emulator_peak_rss_mib") if b else None
            figs.append(
                Figure(
                    "e2e",
                    f"emulator peak RSS, {rows:,} rows",
                    f"{r['emulator_peak_rss_mib'] * mb:,.0f} MB",
                    f"main@{ref[:8]} {eb * mb:,.0f} MB" if eb else "",
                    "",
                    None,
                    "ru_maxrss of the emulator process (wait4): its state is on disk",
                )
            )
    ordered = sorted(head)
    for lo, hi in zip(ordered, ordered[1:], strict=False):
        a, z = head[lo], head[hi]
        slope = (z["peak_rss_mib"] - a["peak_rss_mib"]) * mb / ((hi - lo) / 1e6)
        ratio = z["peak_rss_mib"] / a["peak_rss_mib"]
        bl = ""
        if lo in base and hi in base:
            ba, bz = base[lo], base[hi]
            bslope = (bz["peak_rss_mib"] - ba["peak_rss_mib"]) * mb / ((hi - lo) / 1e6)
            bl = f"main@{ref[:8]} {bslope:,.0f} MB per 1M rows (×{bz['peak_rss_mib'] / ba['peak_rss_mib']:.2f})"
        judged = lo == 1_000_000 and hi == 5_000_000
        figs.append(
            Figure(
                "e2e",
                f"RSS slope {lo:,} → {hi:,} rows",
                f"{slope:,.0f} MB per 1M rows (×{ratio:.2f})",
                bl,
                f"RSS(5M)/RSS(1M) ≤ {TARGET_SLOPE}" if judged else "",
                ratio <= TARGET_SLOPE if judged else None,
            )
        )
    return figs


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--baseline-sizes", default=",".join(map(str, BASELINE_SIZES)))
    ap.add_argument("--baseline-ref", default=None, help="git ref of the baseline [merge-base]")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    figs = figures(_sizes(args.sizes), _sizes(args.baseline_sizes), args.baseline_ref)
    print(f"cores: {cores()}\n")
    print(markdown_table(figs, with_part=False))
    write_json(figs, args.json)


if __name__ == "__main__":
    main()
