"""How fast is a whole `batchops run --dry-run` process, and how much memory does it take?

    python benchmarks/bench_run.py                        # 1,000,000 text rows, 10,000 image rows
    python benchmarks/bench_run.py --rows 200000 --image-rows 2000   # quicker

The tree's batchops is byte-compiled first (as an installed package is), then the real CLI
runs in a subprocess (`python -m batchops.cli run ... --dry-run`): wall clock from
spawn to exit (interpreter start, imports, validation pass, build, the dry run's file check) and
the child's own peak RSS (`ru_maxrss` from `wait4`; this process stays small because a child's
ru_maxrss includes the memory of the process that spawned it). A dry run writes its chunk files
without fsync and keeps no state database, so the real run's build is measured too: `batchops
run --no-wait` against the emulator (its own process), timed from spawn to the log line "chunk
file(s) built" (rows registered in state.db, chunk files written with fsync), then to exit
(upload + create of every file). Beside them, in the same run, the baselines of bench_build.py
(its functions), all measured on the full row count: the floor (copy the CSV), the seed scripts'
per-row builder (pandas iterrows + json.dumps), a plain Python per-row builder (csv module +
json.dumps) and the library build alone (open_source + build_chunks). Data: bench_build's seeded
tables under benchmarks/_data/.

Targets (issue 18; issue 9 asked 250,000 rows/s): ≥ 400,000 rows/s whole process on 2 cores,
≥ 5× the naive builder, peak RSS ≤ 300 MiB. The whole-process dry run is run --repeat times: the
median wall, that run's CPU (user+sys of the child, from wait4) and the load average before it,
and the highest peak RSS of all; on a machine shared with other work the wall time says little
(the CPU does). The naive builder of the target is the seed scripts' (pandas iterrows); the plain
Python builder is shown beside it because it is the fair per-row reference (issue 22).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# Only stdlib modules at import time: this process must stay small (see the docstring).
import bench_build  # noqa: E402
from run_all import Figure, cores, markdown_table, write_json  # noqa: E402

TARGET_ROWS_S = 400_000
TARGET_VS_NAIVE = 5.0
TARGET_RSS_MIB = 300.0
CLI_TIMEOUT = 300.0
QUICK: dict[str, int] = {"rows": 200_000, "image_rows": 2_000, "repeat": 1}
KEY = "sk-bench-00000000000000000000"


def compile_tree(root: Path = ROOT) -> None:
    """Byte-compile the tree's batchops once, as `pip install` does: with PYTHONDONTWRITEBYTECODE
    set (as in some sandboxes) every child would otherwise compile all of batchops' modules
    from source (~0.07 s of CPU a command), which an installed batchops never does."""
    compileall.compile_dir(str(root / "batchops"), quiet=1)


def run_measured(
    cmd: list[str],
    timeout: float = CLI_TIMEOUT,
    env_extra: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> dict[str, Any]:
    """Run cmd in cwd; its wall seconds, exit code, output, own CPU and peak RSS (MiB), from
    wait4. cwd is the code's own tree: `python -m` puts the cwd first on sys.path, ahead of
    PYTHONPATH (a baseline tree run from this one would run this one's code)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env_extra or {}),
    }
    env.pop("OPENAI_API_KEYS", None)  # the run's key is the one given, not the caller's pool
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        watchdog = threading.Timer(timeout, proc.kill)  # a benchmark must stop by itself
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
        out.seek(0)
        err.seek(0)
        return {
            "seconds": seconds,
            "exit_code": proc.returncode,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "stdout": out.read().decode("utf-8", "replace"),
            "stderr": err.read().decode("utf-8", "replace"),
        }


# Diagnostic only: the same CLI with the dry run's per-line file check stubbed out, to show
# what that check costs the whole process (time and memory).
NO_CHECK = (
    "import sys\n"
    "from batchops import validate\n"
    "validate.check_files = lambda paths, endpoint, *template: []\n"
    "validate.summary = lambda checks: 'file check skipped (benchmark diagnostic)'\n"
    "from batchops.cli import main\n"
    "sys.argv[0] = 'batchops'\n"
    "main()\n"
)


def run_command(
    csv_path: Path,
    run_dir: Path,
    prompt: str,
    *extra: str,
    log_dir: Path | None = None,
    head: tuple[str, ...] = (),
) -> list[str]:
    """`batchops run` on a benchmark table (id column `id`, batch size 50,000, quiet, its log in
    log_dir, default run_dir/logs) as the benchmarks type it; `head` replaces `-m batchops.cli`."""
    return [
        sys.executable,
        *(head or ("-m", "batchops.cli")),
        "run",
        "--csv",
        str(csv_path),
        "--id-column",
        "id",
        "--prompt",
        prompt,
        "--model",
        bench_build.MODEL,
        "--batch-size",
        "50000",
        "--run-dir",
        str(run_dir),
        "-q",
        "--log-dir",
        str(log_dir or run_dir / "logs"),
        *extra,
    ]


def dry_run(
    csv_path: Path, work: Path, prompt: str, *extra: str, check: bool = True
) -> dict[str, Any]:
    """`batchops run --dry-run` as a user would type it; the chunk files stay in work/dry-run."""
    head = () if check else ("-c", NO_CHECK)
    cmd = run_command(csv_path, work, prompt, "--dry-run", *extra, head=head)
    result = run_measured(cmd)
    if result["exit_code"]:
        raise RuntimeError(f"dry run failed ({result['exit_code']}): {result['stderr'][-2000:]}")
    return result


def start_emulator(
    work: Path, knobs: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`batchops emulator` in its own process (fast timings unless `knobs` says otherwise;
    --no-wait never waits for them), with `env` as its environment when given."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scenario = work / "scenario.json"
    scenario.write_text(
        json.dumps(knobs or {"validating_seconds": 0.05, "in_progress_seconds": 0.2})
    )
    cmd = [sys.executable, "-m", "batchops.cli", "emulator", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--scenario", str(scenario)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    root = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            with urllib.request.urlopen(root + "/_emulator/health", timeout=5):
                return proc, root
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("emulator did not start")


def _log_time(line: str) -> float:
    """Epoch seconds of a loguru file line ("2026-11-30 12:54:08.195 | INFO | ...", local time)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def real_run(csv_path: Path, work: Path, prompt: str) -> dict[str, Any]:
    """`batchops run --no-wait` against the emulator: the real run's build (state database,
    fsync) up to the "chunk file(s) built" log line, and the whole process (+ upload, create)."""
    emu, root = start_emulator(work)
    try:
        cmd = run_command(
            csv_path,
            work / "run",
            prompt,
            "--no-wait",
            "--base-url",
            root + "/v1",
            log_dir=work / "logs",
        )
        spawned = time.time()
        result = run_measured(cmd, env_extra={"OPENAI_API_KEY": KEY, "NO_COLOR": "1"})
    finally:
        emu.terminate()
        emu.wait()
    if result["exit_code"]:
        raise RuntimeError(f"real run failed ({result['exit_code']}): {result['stderr'][-2000:]}")
    (log,) = (work / "logs").glob("*.log")
    lines = log.read_text(encoding="utf-8").splitlines()
    registered = next(ln for ln in lines if "source row(s) registered" in ln)
    built = next(ln for ln in lines if "chunk file(s) built for" in ln)
    result["registered_s"] = _log_time(registered) - spawned
    result["built_s"] = _log_time(built) - spawned
    return result


def time_check_files(folder: Path) -> float | None:
    """Seconds of the dry run's own file check (batchops.validate) on its files, in a child."""
    code = (
        "import json, sys, time, pathlib\n"
        "try:\n    from batchops import validate\n"
        "except ImportError:\n    print('null'); sys.exit()\n"
        "template = ()\n"
        "try:  # the template the dry run gives the check (trees before it: none)\n"
        "    from batchops.chunking import text_template\n"
        "    from batchops.spec import JobSpec\n"
        "    spec = JobSpec(source='x.csv', prompt=sys.argv[2], models=[{'name': sys.argv[3]}])\n"
        "    template = (text_template(spec, sys.argv[3]),)\n"
        "except ImportError:\n    pass\n"
        "paths = sorted(pathlib.Path(sys.argv[1]).glob('*.jsonl'))\n"
        "t = time.perf_counter(); validate.check_files(paths, '/v1/chat/completions', *template)\n"
        "print(json.dumps(time.perf_counter() - t))\n"
    )
    cmd = [sys.executable, "-c", code, str(folder), bench_build.PROMPT, bench_build.MODEL]
    result = run_measured(cmd)
    if result["exit_code"]:
        return None
    return json.loads(result["stdout"].strip().splitlines()[-1])


def import_seconds() -> float:
    """Interpreter start + `import batchops.cli`: paid by every command."""
    best = min(
        run_measured([sys.executable, "-c", "import batchops.cli"])["seconds"] for _ in range(2)
    )
    return best


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f} rows/s ({seconds:.2f} s)"


def figures(rows: int = 1_000_000, image_rows: int = 10_000, repeat: int = 3) -> list[Figure]:
    path = bench_build.text_csv(rows)
    img_path, img_dir = bench_build.image_csv(image_rows)
    compile_tree()
    out: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp_s:
        tmp = Path(tmp_s)
        # The CLI first, while this process is at its smallest.
        runs = []
        for _ in range(max(1, repeat)):
            load = os.getloadavg()[0]
            runs.append({**dry_run(path, tmp / "text", bench_build.PROMPT), "load": load})
        text = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run
        text_rss = max(r["peak_rss_mib"] for r in runs)
        check_s = time_check_files(tmp / "text" / "dry-run")
        shutil.rmtree(tmp / "text")
        no_check = dry_run(path, tmp / "text", bench_build.PROMPT, check=False)
        shutil.rmtree(tmp / "text")
        (tmp / "real").mkdir()
        real = real_run(path, tmp / "real", bench_build.PROMPT)
        shutil.rmtree(tmp / "real")
        image = dry_run(
            img_path,
            tmp / "image",
            "What is in the picture of {name}?",
            "--image-column",
            "image",
            "--image-dir",
            str(img_dir),
        )
        shutil.rmtree(tmp / "image")
    start_s = import_seconds()
    floor = bench_build.measure_floor(path, rows)
    naive = bench_build.run_isolated("naive", path=str(path))
    plain = bench_build.run_isolated("plain", path=str(path))
    for base in (naive, plain):
        if base["rows"] != rows:
            raise RuntimeError(f"a baseline built {base['rows']:,} rows of {rows:,}")
    lib = bench_build.run_isolated("build", path=str(path), fsync=False)
    lib_img = bench_build.run_isolated(
        "build",
        path=str(img_path),
        prompt="What is in the picture of {name}?",
        image_column="image",
        image_dir=str(img_dir),
        fsync=False,
    )
    parent_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    naive_rate = rows / naive["seconds"]
    plain_rate = rows / plain["seconds"]
    whole_rate = rows / text["seconds"]
    lib_s = lib["open_seconds"] + lib["seconds"]
    naive_s = f"pandas iterrows {_rate(rows, naive['seconds'])}"
    plain_s = f"plain csv + json.dumps {_rate(rows, plain['seconds'])}"
    # The file check runs in a thread while the next file builds, so its standalone time is
    # not additive: what it costs the whole process is the diagnostic row's difference.
    breakdown = (
        f"of its {text['seconds']:.1f} s: interpreter + imports {start_s:.1f} s, "
        f"open_source + build_chunks {lib_s:.1f} s (library alone)"
        + (
            f"; the dry run's file check takes {check_s:.1f} s alone but overlaps the build"
            if check_s is not None
            else ""
        )
    )
    dry = "dry run: fsync off, no state database"
    cpu = (
        f"median of {len(runs)}; its CPU (user+sys) {text['cpu_s']:.2f} s "
        f"({text['cpu_s'] / rows * 1e6:.2f} µs a row), load average {text['load']:.1f} before it"
    )
    out += [
        Figure(
            "build",
            f"whole process `run --dry-run` ({dry}), {rows:,} text rows",
            _rate(rows, text["seconds"]),
            f"{plain_s}; {naive_s}",
            f"≥ {TARGET_ROWS_S:,} rows/s",
            whole_rate >= TARGET_ROWS_S,
            f"{cpu}; {breakdown}",
            ideal=f"floor (copy the file) {_rate(rows, floor['seconds'])}",
        ),
        Figure(
            "build",
            f"real run `run --no-wait`, {rows:,} text rows: spawn → every chunk file built",
            _rate(rows, real["built_s"]),
            f"dry run {_rate(rows, text['seconds'])} (spawn → exit)",
            "",
            None,
            f"rows registered in state.db {real['registered_s']:.2f} s after spawn; chunk files "
            f"written with fsync; whole process incl. upload + create of every file "
            f"{real['seconds']:.2f} s, peak RSS {real['peak_rss_mib']:,.0f} MiB",
        ),
        Figure(
            "build",
            "dry run vs the seed scripts' builder (pandas iterrows)",
            f"{whole_rate / naive_rate:.1f}×",
            naive_s,
            f"≥ {TARGET_VS_NAIVE:.0f}×",
            whole_rate / naive_rate >= TARGET_VS_NAIVE,
            f"both on all {rows:,} rows; peak RSS {naive['peak_rss_mib']:,.0f} MiB",
        ),
        Figure(
            "build",
            "dry run vs a plain Python builder (csv module + json.dumps)",
            f"{whole_rate / plain_rate:.1f}×",
            plain_s,
            "",
            None,
            f"the fair per-row reference; both on all {rows:,} rows; peak RSS "
            f"{plain['peak_rss_mib']:,.0f} MiB",
        ),
        Figure(
            "build",
            "whole process peak RSS (text, dry run)",
            f"{text_rss:,.0f} MiB",
            f"pandas iterrows {naive['peak_rss_mib']:,.0f} MiB; "
            f"library build {lib['peak_rss_mib']:,.0f} MiB",
            f"≤ {TARGET_RSS_MIB:.0f} MiB",
            text_rss <= TARGET_RSS_MIB,
            f"ru_maxrss of the child, the highest of {len(runs)} run(s); this process peaked at "
            f"{parent_mib:,.0f} MiB",
        ),
        Figure(
            "build",
            "diagnostic: dry run with its file check stubbed out",
            f"{_rate(rows, no_check['seconds'])}, {no_check['peak_rss_mib']:,.0f} MiB",
            f"with the check {_rate(rows, text['seconds'])}, {text['peak_rss_mib']:,.0f} MiB",
            "",
            None,
            "what batchops.validate.check_files costs; not a supported mode",
        ),
        Figure(
            "build",
            f"library open_source + build_chunks, {rows:,} text rows",
            _rate(rows, lib_s),
            "",
            "",
            None,
            f"fsync off (as the dry run); peak RSS {lib['peak_rss_mib']:,.0f} MiB; "
            f"{lib['files']} files, {lib['bytes'] / 1e6:,.0f} MB",
            ideal=f"floor (copy the file) {_rate(rows, floor['seconds'])}",
        ),
        Figure(
            "build",
            f"whole process `run --dry-run`, {image_rows:,} rows with a ~3 KB PNG each",
            _rate(image_rows, image["seconds"]),
            f"library build {_rate(image_rows, lib_img['open_seconds'] + lib_img['seconds'])}",
            "",
            None,
            "images are base64 of files: I/O-bound, per row by design",
        ),
        Figure(
            "build",
            "whole process peak RSS (images)",
            f"{image['peak_rss_mib']:,.0f} MiB",
            f"library build {lib_img['peak_rss_mib']:,.0f} MiB",
            f"≤ {TARGET_RSS_MIB:.0f} MiB",
            image["peak_rss_mib"] <= TARGET_RSS_MIB,
        ),
    ]
    return out


def dry_runs_only(rows: int, repeat: int) -> bool:
    """The whole-process dry run alone, `repeat` times: each run's wall, CPU (user+sys of the
    child, wait4), peak RSS and the load average before it; whether every run met both
    targets. Quicker than the full figures (no baselines, no real run)."""
    path = bench_build.text_csv(rows)
    compile_tree()
    print(f"cores: {cores()}; {rows:,} text rows, `run --dry-run`, {repeat} run(s)")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp_s:
        for i in range(max(1, repeat)):
            load = os.getloadavg()[0]
            r = dry_run(path, Path(tmp_s) / f"text{i}", bench_build.PROMPT)
            shutil.rmtree(Path(tmp_s) / f"text{i}")
            runs.append(r)
            ok = rows / r["seconds"] >= TARGET_ROWS_S and r["peak_rss_mib"] <= TARGET_RSS_MIB
            print(
                f"run {i + 1}: {_rate(rows, r['seconds'])}, CPU {r['cpu_s']:.2f} s, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB, load {load:.1f} before it"
                + ("" if ok else "  (a target missed)")
            )
    walls = sorted(r["seconds"] for r in runs)
    cpus = sorted(r["cpu_s"] for r in runs)
    slow = sum(rows / r["seconds"] < TARGET_ROWS_S for r in runs)
    every = not slow and all(r["peak_rss_mib"] <= TARGET_RSS_MIB for r in runs)
    print(
        f"median {_rate(rows, walls[len(walls) // 2])}, CPU median {cpus[len(cpus) // 2]:.2f} s "
        f"(min {cpus[0]:.2f}), peak RSS max {max(r['peak_rss_mib'] for r in runs):.0f} MiB; "
        f"{slow} of {len(runs)} run(s) under {TARGET_ROWS_S:,} rows/s; targets "
        f"≥ {TARGET_ROWS_S:,} rows/s and ≤ {TARGET_RSS_MIB:.0f} MiB in every run: "
        + ("yes" if every else "no")
    )
    return every


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--image-rows", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3, help="whole-process dry runs (median)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument(
        "--dry-run-only",
        action="store_true",
        help="only the whole-process text dry run, --repeat times, every run shown",
    )
    args = ap.parse_args()
    if args.dry_run_only:
        dry_runs_only(args.rows, args.repeat)
        return
    figs = figures(args.rows, args.image_rows, args.repeat)
    print(f"cores: {cores()}\n")
    print(markdown_table(figs, with_part=False))
    write_json(figs, args.json)


if __name__ == "__main__":
    main()
