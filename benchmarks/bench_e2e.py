"""A real run end to end: the CLI against the emulator (its own process), for growing row counts.

    python benchmarks/bench_e2e.py                          # 200k, 1M, 5M rows; baseline 200k, 1M
    python benchmarks/bench_e2e.py --sizes 200000,1000000 --baseline-sizes 200000
    python benchmarks/bench_e2e.py --baseline-ref 4d0aff4   # the commit to compare against

Each size: `batchops run` (batch size 50,000, poll 0.5 s, text rows of bench_build's generator)
against `batchops emulator` with short timings, to the merged final_output.csv. Measured on the
batchops child only, from `wait4`: wall (spawn → exit), CPU (user + sys) per row, peak RSS; the
RSS slope between sizes (MiB per million rows) says whether memory depends on the row count.
Phase times come from the run's log (registered, built, last batch submitted, merged).

The emulator keeps every request and answer in memory: at 5M rows it grew past the 24 GB of
the project machine and was OOM-killed (2026-11-30, twice: with every batch in flight, and again
with `--token-limit` keeping ~3 batches in flight). Measured at 200k rows it holds ~5.4 KB of RSS
a row (1.1 GB) although its live Python objects are ~1.3 KB a row (tracemalloc: the output and
input files and a counter per custom id); the rest is memory the allocator keeps after parsing
50,000-line files. So the 5M figure needs a bigger machine (~30 GB for the emulator alone);
`--sizes 1000000,2000000` gives the slope on this one.

The baseline is the same CLI of `--baseline-ref` (default: the commit this branch started from,
`git merge-base HEAD main`), exported with `git archive` into a temp dir and run with that dir
first on PYTHONPATH, in the same process run, one size after the other.
"""

from __future__ import annotations

import argparse
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
            # At most ~3 batches of 50,000 rows in flight: the emulator holds every in-flight
            # request parsed in memory (5 GB at 1M rows with all 20 batches at once; at 5M it
            # outgrew the machine's 24 GB), and a real org limit paces batches the same way.
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
        emu.wait()
    if result["exit_code"]:
        raise RuntimeError(f"run failed ({result['exit_code']}): {result['stderr'][-2000:]}")
    out = work / "run" / "final_output.csv"
    with out.open("rb") as fh:
        lines = sum(1 for _ in fh)
    result["rows"] = rows
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
