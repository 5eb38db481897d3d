"""Every benchmark of issue 9 in one go: one table of figures, each beside the baseline measured in
the same run and its target, written to docs/benchmarks.md.

    python benchmarks/run_all.py                 # everything (~4 min on the 2-core dev machine)
    python benchmarks/run_all.py --quick         # smaller inputs, for a smoke test (~1 min)
    python benchmarks/run_all.py --only drain,api --no-write

Each part runs in its own interpreter (`--part NAME --json FILE`), so this process stays small:
a child's peak RSS (ru_maxrss) would otherwise include the memory of whoever spawned it.
Generated data stays under benchmarks/_data/ (git-ignored); temporary run dirs are removed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
PARTS = ("build", "merge", "drain", "api", "online")
# Per part, so one hung part cannot hold the whole run (everything takes ~4 min).
PART_TIMEOUT = 420.0
TOTAL_BUDGET = 600.0
COMMAND = "python benchmarks/run_all.py"


@dataclass
class Figure:
    """One measured figure and what it is judged against."""

    part: str
    name: str
    value: str
    baseline: str = ""  # measured in the same run (or what the ideal is), formatted
    target: str = ""
    met: bool | None = None  # None: no target
    note: str = ""


def cores() -> int:
    """CPUs this process may use (what the figures depend on), not the host's total."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def markdown_table(figures: list[Figure], *, with_part: bool = True) -> str:
    head = ["figure", "value", "baseline (same run)", "target", "met", "note"]
    if with_part:
        head.insert(0, "part")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in figures:
        met = {True: "yes", False: "**NO**", None: "–"}[f.met]
        cells = [f.name, f.value, f.baseline, f.target, met, f.note]
        if with_part:
            cells.insert(0, f.part)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_json(figures: list[Figure], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps([asdict(f) for f in figures]), encoding="utf-8")


# ------------------------------------------------------------------------- parts (children)


def part_figures(part: str, quick: bool) -> list[Figure]:
    """Run one part in this process; only ever called in a child (see module docstring)."""
    sys.path.insert(0, str(HERE))
    if part == "build":
        import bench_run

        return bench_run.figures(**(bench_run.QUICK if quick else {}))
    if part == "merge":
        return merge_figures(200_000 if quick else 1_000_000)
    if part == "drain":
        import bench_drain

        return bench_drain.figures()
    if part == "api":
        import bench_api_economy

        return bench_api_economy.figures(batches=8 if quick else 20)
    raise ValueError(part)


def merge_figures(rows: int) -> list[Figure]:
    """bench_merge's own functions: merge_frames → CSV against the naive dict + csv.writer."""
    import bench_merge

    args = argparse.Namespace(rows=rows, frame_rows=100_000, seed=7)
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        out_fast, out_naive = Path(tmp) / "merge_frames.csv", Path(tmp) / "naive.csv"
        fast = bench_merge.run_one("merge_frames", args, out_fast)
        naive = bench_merge.run_one("naive", args, out_naive)
        bench_merge.check_same(out_fast, out_naive)  # a fast wrong merge would be no result
    speedup = naive["seconds"] / fast["seconds"]
    naive_s = f"naive dict + csv.writer {naive['seconds']:.2f} s"
    return [
        Figure(
            "merge",
            f"merge_frames → CSV, {rows:,} rows",
            f"{fast['seconds']:.2f} s ({fast['rows'] / fast['seconds']:,.0f} rows/s)",
            naive_s,
            "≤ 5 s for 1M rows" if rows >= 1_000_000 else "(quick run: no target)",
            fast["seconds"] <= 5 if rows >= 1_000_000 else None,
        ),
        Figure(
            "merge",
            "merge_frames vs naive",
            f"{speedup:.1f}×",
            naive_s,
            "≥ 3×",
            speedup >= 3,
            "same cells checked",
        ),
        Figure(
            "merge",
            "merge peak RSS",
            f"{fast['peak_rss_mb']:,.0f} MB (+{fast['peak_rss_mb'] - fast['inputs_rss_mb']:,.0f} MB over its inputs)",
            f"naive {naive['peak_rss_mb']:,.0f} MB (+{naive['peak_rss_mb'] - naive['inputs_rss_mb']:,.0f})",
            "",
            None,
            "inputs = generated source + outcomes held in memory",
        ),
    ]


def online_part(timeout: float, quick: bool) -> tuple[list[Figure], str]:
    """benchmarks/bench_online.py is another engineer's: run it as a script if it exists, once
    rather than its default three repeats (~4 min) so that everything fits in 10 minutes."""
    script = HERE / "bench_online.py"
    if not script.exists():
        return [
            Figure("online", "online throughput", "not available", note="no bench_online.py")
        ], ""
    try:
        text = script.read_text(encoding="utf-8")
        args = ["--repeat", "1"] if "--repeat" in text else []
        args += ["--requests", "1000"] if quick and "--requests" in text else []
        done = subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return [Figure("online", "online throughput", "timed out", note=f"> {timeout:.0f} s")], ""
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return [Figure("online", "online throughput", "failed", note=tail[:200])], done.stdout
    return [Figure("online", "online throughput", "see its own table below")], done.stdout


# ----------------------------------------------------------------------------- the driver


def run_part(part: str, quick: bool, timeout: float) -> tuple[list[Figure], str]:
    if part == "online":
        return online_part(timeout, quick)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    cmd = [sys.executable, __file__, "--part", part, "--json", str(out)]
    cmd += ["--quick"] if quick else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            return [Figure(part, f"{part} benchmark", "failed", note=tail[:300])], done.stderr
        figures = [Figure(**d) for d in json.loads(out.read_text(encoding="utf-8"))]
        return figures, done.stdout
    except subprocess.TimeoutExpired:
        return [Figure(part, f"{part} benchmark", "timed out", note=f"> {timeout:.0f} s")], ""
    finally:
        out.unlink(missing_ok=True)


def machine() -> list[str]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    packages = ["batchops", "polars", "pyarrow", "pandas", "orjson", "openai", "uvicorn"]
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "batchops"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    return [
        f"cores usable: {cores()} (host: {os.cpu_count()}){f', {cpu}' if cpu else ''}",
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}",
        "packages: " + ", ".join(f"{p} {version(p)}" for p in packages),
        f"code: commit {commit}{' + uncommitted changes in batchops/' if dirty else ''}",
        "load average (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    ]


def report(
    figures: list[Figure], extra: dict[str, str], seconds: float, quick: bool, start: list[str]
) -> str:
    missed = [f for f in figures if f.met is False]
    lines = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/run_all.py`; the latest numbers of one run on the machine below. "
        "Every figure is measured in the same run as its baseline.",
        "",
        "Reproduce (from the repository root, in the project's venv):",
        "",
        "```",
        COMMAND + (" --quick" if quick else ""),
        "```",
        "",
        "Parts alone: `python benchmarks/bench_run.py` (build, whole process), "
        "`python benchmarks/bench_build.py` (library build), `python benchmarks/bench_merge.py`, "
        "`python benchmarks/bench_drain.py`, `python benchmarks/bench_api_economy.py`"
        + (
            ", `python benchmarks/bench_online.py`." if (HERE / "bench_online.py").exists() else "."
        ),
        "",
        "## Machine",
        "",
        "At the start of the run:",
        "",
        *[f"- {m}" for m in start],
        f"- at the end, load average: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (other "
        "work on the machine slows the figures down; compare runs on a quiet machine)",
        f"- run: {time.strftime('%Y-%m-%d %H:%M')}, {seconds:.0f} s in all"
        + (" (--quick: smaller inputs)" if quick else ""),
        "",
        "## Figures",
        "",
        markdown_table(figures),
        "",
        f"Targets missed: {len(missed)}"
        + ("" if not missed else " — " + "; ".join(f"{f.part}: {f.name}" for f in missed)),
        "",
        "## How each part is measured",
        "",
        "- **build**: `batchops run --dry-run` in a subprocess (wall clock from spawn to exit, peak "
        "RSS = the child's `ru_maxrss` from `wait4`) on the seeded 1,000,000-row text CSV of "
        "`bench_build.text_csv` and on 10,000 rows with small PNGs; the floor (copy the file) and "
        "the naive per-row builder (pandas `iterrows` + `json.dumps`, on 100,000 rows, "
        "extrapolated) are `bench_build`'s own functions, as are the library-only builds.",
        "- **merge**: `bench_merge`'s functions: `merge_frames` to CSV against a dict + "
        "`csv.writer` loop on the same seeded data, outputs compared cell by cell.",
        "- **drain**: the real CLI against the emulator (in-process thread, localhost) with an "
        "enqueued-token limit of K chunks and a fixed batch duration; ideal = ceil(N/K) × "
        "duration. Once with `--token-limit` (same K chunks by batchops' own estimate), once "
        "without (batchops learns the limit from `token_limit_exceeded`).",
        "- **api**: calls per batch counted by the emulator (`/_emulator/stats`) for 20 batches "
        "of 10 minutes at the default 30 s poll interval, time-scaled by 1/100.",
        "",
    ]
    for name, text in extra.items():
        if text.strip():
            lines += [f"## Output of the {name} part", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke test)")
    ap.add_argument("--only", help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--no-write", action="store_true", help=f"don't write {DOC.relative_to(ROOT)}")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        write_json(part_figures(args.part, args.quick), args.json)
        return

    parts = [p.strip() for p in args.only.split(",")] if args.only else list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    start_info = machine()
    print("\n".join(start_info), flush=True)
    start = time.monotonic()
    figures: list[Figure] = []
    extra: dict[str, str] = {}
    for part in parts:
        left = TOTAL_BUDGET - (time.monotonic() - start)
        if left < 10:
            figures.append(Figure(part, f"{part} benchmark", "skipped", note="time budget spent"))
            continue
        t0 = time.monotonic()
        print(f"\n== {part} ...", flush=True)
        got, text = run_part(part, args.quick, min(PART_TIMEOUT, left))
        figures += got
        print(markdown_table(got, with_part=False), flush=True)
        if part == "online":
            extra["online"] = text
            print(text, flush=True)
        print(f"({time.monotonic() - t0:.0f} s)", flush=True)
    seconds = time.monotonic() - start
    print(f"\n== all figures ({seconds:.0f} s, {cores()} cores)\n")
    print(markdown_table(figures))
    if not args.no_write:
        DOC.write_text(report(figures, extra, seconds, args.quick, start_info), encoding="utf-8")
        print(f"\nwritten: {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
