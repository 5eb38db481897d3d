"""Every benchmark of issues 9 and 22 in one go: one table of figures, each the median of
`--repeat` runs (default 3) with its min–max, beside the baselines measured in the same runs,
the calculated ideals (labelled as such, never measured) and its target; written to
docs/benchmarks.md.

    python benchmarks/run_all.py                 # everything, 3 runs each (~20 min on 2 cores)
    python benchmarks/run_all.py --quick         # smaller inputs, for a smoke test
    python benchmarks/run_all.py --only drain,api --repeat 5 --no-write

Each run of a part is its own interpreter (`--part NAME --json FILE`), so this process stays
small: a child's peak RSS (ru_maxrss) would otherwise include the memory of whoever spawned it.
Generated data stays under benchmarks/_data/ (git-ignored); temporary run dirs are removed.
Everything needs only batchops' own dependencies (a fresh `pip install .` venv runs it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
PARTS = ("build", "merge", "drain", "api", "online", "dedup", "e2e")
# Per run of a part, so one hung run cannot hold the whole benchmark (everything, 3 runs each,
# takes ~20 min on 2 busy cores: the pandas baseline alone is ~2 min a run on 1M rows).
PART_TIMEOUT = 900.0
# The end-to-end part runs 200k, 1M and 5M rows (and main's CLI at 200k and 1M) in one go.
PART_TIMEOUTS = {"e2e": 3600.0}
TOTAL_BUDGET = 3600.0
BASELINE_ENV = "BENCH_BASELINE_REF"  # read by bench_e2e (its children inherit it)
REPEAT = 3
COMMAND = "python benchmarks/run_all.py"


@dataclass
class Figure:
    """One measured figure and what it is judged against."""

    part: str
    name: str
    value: str
    baseline: str = ""  # measured in the same run, formatted
    target: str = ""
    met: bool | None = None  # None: no target
    note: str = ""
    ideal: str = ""  # calculated, never measured (e.g. ceil(N/K) × duration, 1 call per batch)


def cores() -> int:
    """CPUs this process may use (what the figures depend on), not the host's total."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def markdown_table(figures: list[Figure], *, with_part: bool = True) -> str:
    head = [
        "figure",
        "value",
        "baseline (measured, same runs)",
        "ideal (calculated)",
        "target",
        "met",
        "note",
    ]
    if with_part:
        head.insert(0, "part")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in figures:
        met = {True: "yes", False: "**NO**", None: "–"}[f.met]
        cells = [f.name, f.value, f.baseline, f.ideal, f.target, met, f.note]
        if with_part:
            cells.insert(0, f.part)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_json(figures: list[Figure], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps([asdict(f) for f in figures]), encoding="utf-8")


# ------------------------------------------------------------------- medians of repeated runs

# A number standing on its own: not the digits inside a name such as "main@09df25e".
_NUMBER = re.compile(r"(?<![\w@.])(?:-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?)(?![\w.])")


def first_number(text: str) -> tuple[float, str] | None:
    """The first number in a formatted figure ("157,442 rows/s (6.35 s)" → 157442.0)."""
    m = _NUMBER.search(text)
    return (float(m.group().replace(",", "")), m.group()) if m else None


def _median_of(texts: list[str]) -> tuple[int, str]:
    """Index of the text whose first number is the median (the lower one for an even count)
    and a "median of n, min–max a–b" suffix; no suffix when there is nothing to compare."""
    if len(texts) > 1 and len(set(texts)) == 1:
        return 0, f" · the same in all {len(texts)} runs"
    nums = [(first_number(t), i) for i, t in enumerate(texts)]
    valued = sorted(((n[0], n[1], i) for n, i in nums if n is not None), key=lambda x: x[0])
    if len(valued) < 2:
        return 0, ""
    mid = valued[(len(valued) - 1) // 2]
    return mid[2], f" · median of {len(valued)}, min–max {valued[0][1]}–{valued[-1][1]}"


def _median_text(texts: list[str]) -> str:
    """A formatted value over the runs: its median with the min–max. Several measured values
    in one cell ("a 1 rows/s; b 2 rows/s") are each given their own median and min–max."""
    parts = [t.split("; ") for t in texts]
    if len({len(p) for p in parts}) != 1:  # not the same shape in every run: the first alone
        i, suffix = _median_of(texts)
        return texts[i] + suffix
    out = []
    for k in range(len(parts[0])):
        column = [p[k] for p in parts]
        i, suffix = _median_of(column)
        out.append(column[i] + suffix)
    return "; ".join(out)


def combine(runs: list[list[Figure]]) -> list[Figure]:
    """One figure per name from several runs of a part: the median run's figure (by its first
    number) with the min–max over the runs; the baseline likewise, on its own numbers. The
    target verdict is the median run's, and says so when the runs disagree."""
    order: list[tuple[str, str]] = []
    by_key: dict[tuple[str, str], list[Figure]] = {}
    for figs in runs:
        for f in figs:
            key = (f.part, f.name)
            if key not in by_key:
                order.append(key)
                by_key[key] = []
            by_key[key].append(f)
    out = []
    for key in order:
        figs = by_key[key]
        i, suffix = _median_of([f.value for f in figs])
        med = figs[i]
        baseline = _median_text([f.baseline for f in figs]) if med.baseline else ""
        note = med.note
        verdicts = [f.met for f in figs if f.met is not None]
        if verdicts and len(set(verdicts)) > 1:
            note = (
                note + "; " if note else ""
            ) + f"target met in {sum(verdicts)}/{len(verdicts)} runs"
        if len(figs) < len(runs):
            note = (note + "; " if note else "") + f"only {len(figs)} of {len(runs)} runs gave it"
        out.append(
            Figure(
                med.part,
                med.name,
                med.value + suffix,
                baseline,
                med.target,
                med.met,
                note,
                med.ideal,
            )
        )
    return out


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
    if part == "dedup":
        import bench_dedup

        return bench_dedup.figures(2_000 if quick else 10_000)
    if part == "e2e":
        import bench_e2e

        return bench_e2e.figures(**(bench_e2e.QUICK if quick else {}))
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
    naive_s = f"naive dict + csv.writer {naive['seconds']:.2f} s"  # measured, same cells
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


def online_part(timeout: float, quick: bool, repeat: int) -> tuple[list[Figure], str]:
    """benchmarks/bench_online.py as a script: it runs its clients `repeat` times, alternating,
    and prints medians with min–max itself."""
    script = HERE / "bench_online.py"
    if not script.exists():
        return [
            Figure("online", "online throughput", "not available", note="no bench_online.py")
        ], ""
    try:
        args = ["--repeat", str(repeat)]
        args += ["--requests", "1000"] if quick else []
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
        return [Figure("online", "online throughput", "failed", note=tail[:200])], (
            done.stdout + done.stderr
        )
    return online_verdicts(done.stdout, repeat), done.stdout


def online_verdicts(out: str, repeat: int) -> list[Figure]:
    """bench_online's closing "targets" lines ("<scenario>: <figure> (<target>): met|MISSED")
    as figures of the table; its own tables follow in full below."""
    figures: list[Figure] = []
    lines = out.split("targets (issue 21):", 1)[-1].splitlines()
    for line in (ln.strip() for ln in lines):
        at, _, rest = line.partition(": ")
        what, _, verdict = rest.rpartition(": ")
        if not what or verdict not in ("met", "MISSED", "True", "False"):
            continue
        met = verdict in ("met", "True")
        figures.append(
            Figure("online", at, what, met=met, note=f"median of {repeat}; tables below")
        )
    return figures or [
        Figure("online", "online throughput", f"see its own table below ({repeat} runs)")
    ]


# ----------------------------------------------------------------------------- the driver


def run_part(part: str, quick: bool, timeout: float) -> tuple[list[Figure], str]:
    """One run of one part in a child interpreter."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    cmd = [sys.executable, __file__, "--part", part, "--json", str(out)]
    cmd += ["--quick"] if quick else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if done.returncode:  # keep the child's error where it can be read, not only its last line
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            sys.stderr.write(done.stderr[-5000:])
            return [Figure(part, f"{part} benchmark", "failed", note=tail[:300])], done.stderr
        figures = [Figure(**d) for d in json.loads(out.read_text(encoding="utf-8"))]
        return figures, done.stdout
    except subprocess.TimeoutExpired:
        return [Figure(part, f"{part} benchmark", "timed out", note=f"> {timeout:.0f} s")], ""
    finally:
        out.unlink(missing_ok=True)


RAW = HERE / "_data" / "last_runs.json"  # every run's own figures (git-ignored)


def save_raw(part: str, runs: list[list[Figure]]) -> None:
    RAW.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RAW.read_text(encoding="utf-8")) if RAW.exists() else {}
    data[part] = [[asdict(f) for f in figs] for figs in runs]
    RAW.write_text(json.dumps(data, indent=1), encoding="utf-8")


def repeated(part: str, quick: bool, repeat: int, start: float) -> list[Figure]:
    """`repeat` runs of a part, each in a fresh child, combined into medians with min–max.
    Runs that fail are reported, and the ones that finished are kept."""
    runs: list[list[Figure]] = []
    failed: list[Figure] = []
    for i in range(repeat):
        left = TOTAL_BUDGET - (time.monotonic() - start)
        if left < 10:
            failed.append(Figure(part, f"{part} benchmark", "skipped", note="time budget spent"))
            break
        figs, _ = run_part(part, quick, min(PART_TIMEOUTS.get(part, PART_TIMEOUT), left))
        ok = not any(f.name == f"{part} benchmark" for f in figs)
        if ok:
            runs.append(figs)
        else:
            failed.extend(figs)
        print(f"   run {i + 1}: {'ok' if ok else f'{figs[0].value}: {figs[0].note}'}", flush=True)
    if not runs:
        return failed[:1]
    save_raw(part, runs)
    got = combine(runs)
    if failed:
        got.append(
            Figure(
                part,
                f"{part}: runs without figures",
                f"{len(failed)} of {repeat}",
                note="; ".join(f"{f.value}: {f.note}" for f in failed)[:300],
            )
        )
    return got


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
    figures: list[Figure],
    extra: dict[str, str],
    seconds: float,
    quick: bool,
    start: list[str],
    repeat: int,
) -> str:
    missed = [f for f in figures if f.met is False]
    lines = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/run_all.py`; the numbers of its latest run on the machine below. "
        f"Each part ran {repeat} times, each time in a fresh interpreter: a value is the median "
        "run's, followed by the min–max over the runs. A **baseline** is measured in the same "
        "runs as the figure (and is a median with min–max as well); an **ideal** is calculated "
        "(e.g. ceil(N/K) × batch duration, one upload per batch), never measured.",
        "",
        "Reproduce (from the repository root; a fresh venv with `pip install .` is enough):",
        "",
        "```",
        COMMAND
        + (" --quick" if quick else "")
        + (f" --repeat {repeat}" if repeat != REPEAT else "")
        + (f" --baseline-ref {os.environ[BASELINE_ENV]}" if os.environ.get(BASELINE_ENV) else ""),
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
        "`bench_build.text_csv` and on 10,000 rows with small PNGs. A dry run writes its files "
        "without fsync and keeps no state database, so the real run's build is measured as well: "
        "`batchops run --no-wait` against the emulator in its own process, from spawn to the log "
        'line "chunk file(s) built" (rows registered in state.db, files fsynced). Baselines, '
        "measured on all 1,000,000 rows (nothing extrapolated): the seed scripts' per-row builder "
        "(pandas `iterrows` + `json.dumps`) and a plain Python one (`csv` module + `json.dumps`), "
        "the fair per-row reference. The floor (copying the file) is listed as an ideal.",
        "- **merge**: `bench_merge`'s functions: `merge_frames` to CSV against a dict + "
        "`csv.writer` loop on the same seeded data, outputs compared cell by cell.",
        "- **drain**: the real CLI against the emulator (in-process thread, localhost) with an "
        "enqueued-token limit of K chunks and a fixed batch duration; ideal (calculated) = ceil(N/K) × "
        "duration. Once with `--token-limit` (same K chunks by batchops' own estimate), once "
        "without (batchops learns the limit from `token_limit_exceeded`).",
        "- **api**: calls per batch counted by the emulator (`/_emulator/stats`) for 20 batches "
        "of 10 minutes at the default 30 s poll interval, time-scaled by 1/100; the ideals are "
        'calculated; "met" also needs the CLI\'s exit code 0.',
        "- **online**: `bench_online.py` (its own table below): the clients alternate in each "
        "of its runs; every number is the median with min–max. Two reference clients bound "
        "what is possible: `floor` (raw asyncio sockets against the emulator) and `floor-min` "
        "(the same against a minimal asyncio server); the per-request breakdown is taken "
        "from them.",
        "- **e2e**: `bench_e2e.py`: `batchops run` to final_output.csv against the emulator in "
        "its own process, on 200,000, 1,000,000 and 5,000,000 rows of `bench_build.text_csv` "
        "(batch size 50,000, poll 0.5 s): wall, the batchops child's CPU (user+sys) and peak "
        "RSS from `wait4`, the RSS slope between sizes; the baseline (`--baseline-ref`, else the "
        "merge base with main) from a git worktree of it at 200,000 and 1,000,000 rows, in the "
        "same runs.",
        "- **dedup**: `bench_dedup.py`: the real CLI against the emulator (in-process thread) "
        "on 10,000 rows of which 30% repeat an earlier row's cells under ids of their own, "
        "once as is and once with `--no-dedup`; the emulator counts the request lines it "
        "received, and the two merged outputs are compared cell by cell apart from the billed "
        "columns.",
        "",
        "Not a benchmark but kept beside them: `python benchmarks/mutants.py` applies one-line "
        "bugs (join by line order, expired rows not re-queued, reconcile without lookup, …) one "
        "at a time to a temporary copy of the repository and shows which tests catch each "
        "(every one must be caught by at least two). `python benchmarks/compare_readers.py "
        "<ref>` runs one emulator scenario (failed-then-answered, rejected, cached and duplicate "
        "rows; a batch and an online run) through `<ref>`'s batchops and this tree's and "
        "compares what every reader shows (status, cost, pool status, maintain, report.json, "
        "the merged output): written for schema 6, for any change of what the store holds.",
        "",
    ]
    for name, text in extra.items():
        if text.strip():
            lines += [f"## Output of the {name} part", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, whole block) of each `## ` section of a markdown text, in order."""
    blocks = re.split(r"(?m)^(?=## )", text)[1:]
    return [(block.splitlines()[0][3:].strip(), block) for block in blocks]


def keep_hand_written(new: str, old: str) -> str:
    """The new report with the old doc's hand-written sections (any `## ` section this script
    does not write, e.g. a profile's breakdown) put back after its Figures section: a full
    run must not erase what was measured by hand."""
    generated = {heading for heading, _ in _sections(new)}
    kept = [
        block.rstrip() + "\n"
        for heading, block in _sections(old)
        if heading not in generated and not heading.startswith("Output of the ")
    ]
    if not kept:
        return new
    head, *rest = re.split(r"(?m)^(?=## )", new)
    out, placed = [head], False
    for block in rest:
        out.append(block)
        if not placed and block.startswith("## Figures"):
            out += [k + "\n" for k in kept]
            placed = True
    if not placed:
        out += ["\n"] + [k + "\n" for k in kept]
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke test)")
    ap.add_argument("--only", help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--no-write", action="store_true", help=f"don't write {DOC.relative_to(ROOT)}")
    ap.add_argument(
        "--repeat", type=int, default=REPEAT, help=f"runs of each part, ≥ 3 for a median [{REPEAT}]"
    )
    ap.add_argument(
        "--baseline-ref",
        help="git ref the e2e part measures beside this tree [merge base with main]",
    )
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        write_json(part_figures(args.part, args.quick), args.json)
        return

    if args.baseline_ref:  # read by bench_e2e in the part's children
        os.environ[BASELINE_ENV] = args.baseline_ref
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
        print(f"\n== {part} ({args.repeat} runs) ...", flush=True)
        if part == "online":
            got, text = online_part(min(PART_TIMEOUT * args.repeat, left), args.quick, args.repeat)
            extra["online"] = text
            print(text, flush=True)
        else:
            got = repeated(part, args.quick, args.repeat, start)
        figures += got
        print(markdown_table(got, with_part=False), flush=True)
        print(f"({time.monotonic() - t0:.0f} s)", flush=True)
    seconds = time.monotonic() - start
    print(f"\n== all figures ({seconds:.0f} s, {cores()} cores)\n")
    print(markdown_table(figures))
    if not args.no_write:
        text = report(figures, extra, seconds, args.quick, start_info, args.repeat)
        old_doc = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        DOC.write_text(keep_hand_written(text, old_doc), encoding="utf-8")
        print(f"\nwritten: {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
