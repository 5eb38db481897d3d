"""How close does `batchops run` come to the ideal schedule under an enqueued-token limit?

    python benchmarks/bench_drain.py                       # N = 12 chunks, K = 3 at a time
    python benchmarks/bench_drain.py --chunks 12 --k 3 --duration 2.0 --poll 0.05

The emulator (in this process, on a thread; localhost) allows K chunks' prompt tokens in flight
per model and runs every batch for a fixed time D (validating + in_progress + finalizing). With
instant resubmission the N chunks finish in ceil(N/K) × D: that is the ideal. The real CLI runs
in a subprocess, twice:

* with `--token-limit` = the same K chunks by batchops' own estimate (pacing from the start),
* without it: every chunk is sent, N - K fail with `token_limit_exceeded`, and batchops learns
  the limit from those failures.

Figures: drain time ÷ ideal, target ≤ 1.1, where drain = first batch created → last batch
collected (downloaded and recorded in state.db): the part of the run the ideal schedule models;
the whole process wall time (interpreter start, build and the final merge included: fixed costs of
~3 s that matter at this scale, not at real batch durations) ÷ ideal, for reference; the gaps
between a batch ending in the emulator and the next batch being created (where a slow poll
cadence or a badly ordered submission shows). Every timestamp is the same monotonic clock (emulator thread here, child
process spawn/exit here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_build import text_csv  # noqa: E402
from run_all import Figure, cores, markdown_table, write_json  # noqa: E402

from batchops.emulator import EmulatorServer  # noqa: E402
from batchops.emulator.answers import prompt_tokens  # noqa: E402

MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"
PROMPT = "Describe {name} ({category}), price {price}: {description}"
KEY = "sk-bench-0000000000000000dr41"
RUN_TIMEOUT = 120.0  # one CLI run; the ideal schedule is ~8 s
TARGET = 1.1


@dataclass
class Drain:
    """One timed CLI run against the emulator."""

    label: str
    exit_code: int
    process_s: float  # spawn → exit
    drain_s: float  # first batch created → last batch collected (downloaded and recorded)
    tail_s: float  # last batch collected → exit (merge, shutdown)
    ideal_s: float
    created: int  # batches created (failed attempts included)
    token_limit_failures: int
    completed: int
    max_concurrent: int  # batches running (validated, not failed) at once, at most
    gaps: list[float] = field(default_factory=list)  # batch ended → next batch created
    first_create_s: float = 0.0  # spawn → first batch created (startup + build + upload)

    @property
    def ratio(self) -> float:
        return self.drain_s / self.ideal_s


def cli_env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return {**env, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": base_url, "NO_COLOR": "1"}


def run_cli(
    csv_path: Path, run_dir: Path, base_url: str, batch_size: int, poll: float, *extra: str
) -> tuple[int, float, float]:
    """The real CLI in a subprocess: (exit code, spawn time, exit time) on time.monotonic()."""
    cmd = [
        sys.executable,
        "-m",
        "batchops.cli",
        "run",
        "--csv",
        str(csv_path),
        "--id-column",
        "id",
        "--prompt",
        PROMPT,
        "--model",
        MODEL,
        "--batch-size",
        str(batch_size),
        "--poll-interval",
        str(poll),
        "--run-dir",
        str(run_dir),
        "--log-dir",
        str(run_dir.parent / "logs"),
        "--base-url",
        base_url,
        "-q",
        *extra,
    ]
    t0 = time.monotonic()
    done = subprocess.run(
        cmd, env=cli_env(base_url), capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT
    )
    t1 = time.monotonic()
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
    return done.returncode, t0, t1


def last_collected(run_dir: Path) -> float:
    """When the run recorded its last batch, on time.monotonic() (state.db keeps time.time())."""
    con = sqlite3.connect(run_dir / "state.db")
    try:
        (ts,) = con.execute("SELECT max(collected_at) FROM batches").fetchone()
    finally:
        con.close()
    return float(ts) - (time.time() - time.monotonic())


def chunk_tokens(run_dir: Path) -> list[tuple[int, int]]:
    """Per chunk of a finished run: (batchops' estimate from state.db, the emulator's count)."""
    con = sqlite3.connect(run_dir / "state.db")
    try:
        rows = con.execute("SELECT est_tokens, path FROM chunks ORDER BY chunk_id").fetchall()
    finally:
        con.close()
    out = []
    for est, path in rows:
        p = Path(path) if Path(path).is_absolute() else run_dir / path
        with p.open("rb") as fh:
            emu = sum(
                prompt_tokens(json.loads(line)["body"], ENDPOINT) for line in fh if line.strip()
            )
        out.append((int(est), emu))
    return out


def scenario(duration: float, limit: int | None) -> dict[str, Any]:
    """A batch lasts `duration` from creation to completed; validation is short but not zero
    (the token check happens there, as in the real service)."""
    v = f = 0.05
    sc: dict[str, Any] = {
        "validating_seconds": v,
        "in_progress_seconds": duration - v - f,
        "finalizing_seconds": f,
        "shuffle_output": False,
    }
    if limit is not None:
        sc["enqueued_token_limit"] = {MODEL: limit}
    return sc


def calibrate(csv_path: Path, tmp: Path, batch_size: int, k: int) -> dict[str, Any]:
    """One quick unpaced run (time_scale 0) to get each chunk's token count both ways."""
    run_dir = tmp / "calibrate" / "run"
    with EmulatorServer(scenario={"time_scale": 0.0}) as emu:
        code, _, _ = run_cli(csv_path, run_dir, emu.base_url, batch_size, 0.05)
    if code:
        raise RuntimeError(f"calibration run failed with exit code {code}")
    tokens = chunk_tokens(run_dir)
    shutil.rmtree(run_dir.parent)
    est = sorted(t[0] for t in tokens)
    emu_counts = sorted(t[1] for t in tokens)
    # K of any chunks fit under a limit of the K largest; K + 1 must not (else more run at once).
    emu_limit, bo_limit = sum(emu_counts[-k:]), sum(est[-k:])
    return {
        "chunks": len(tokens),
        "emu_limit": emu_limit,
        "bo_limit": bo_limit,
        "k_plus_1_blocked": sum(emu_counts[: k + 1]) > emu_limit and sum(est[: k + 1]) > bo_limit,
        "est_over_emulator": sum(est) / sum(emu_counts),
    }


def timed_run(
    label: str,
    csv_path: Path,
    tmp: Path,
    *,
    batch_size: int,
    poll: float,
    duration: float,
    emu_limit: int,
    ideal: float,
    extra: list[str],
) -> Drain:
    run_dir = tmp / label.replace(" ", "_") / "run"
    with EmulatorServer(scenario=scenario(duration, emu_limit)) as emu:
        code, t0, t1 = run_cli(csv_path, run_dir, emu.base_url, batch_size, poll, *extra)
        # Monotonic timelines straight from the emulator's batch objects: created, ended.
        batches = sorted(emu.emulator.batches.values(), key=lambda b: b.created_mono)
        timeline = [(b.created_mono, b.phase_started, b.status, b.errors) for b in batches]
    collected = last_collected(run_dir) if code == 0 else t1
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    failures = sum(
        1
        for _, _, st, err in timeline
        if st == "failed" and err and err[0]["code"] == "token_limit_exceeded"
    )
    ran = [(c, e) for c, e, st, _ in timeline if st == "completed"]
    creates = sorted(c for c, _ in ran)
    # For each completed batch: how long until the next batch that went on to run was created.
    gaps = []
    for _, end in ran:
        later = [c for c in creates if c >= end]
        if later:
            gaps.append(later[0] - end)
    events = sorted([(c, 1) for c, _ in ran] + [(e, -1) for _, e in ran])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    first = timeline[0][0] if timeline else t1
    return Drain(
        label,
        code,
        t1 - t0,
        collected - first,
        t1 - collected,
        ideal,
        len(timeline),
        failures,
        len(ran),
        peak,
        gaps,
        first - t0,
    )


def measure(
    *,
    chunks: int = 12,
    k: int = 3,
    rows_per_chunk: int = 100,
    duration: float = 2.0,
    poll: float = 0.05,
) -> tuple[dict[str, Any], list[Drain]]:
    csv_path = text_csv(chunks * rows_per_chunk)
    ideal = math.ceil(chunks / k) * duration
    with tempfile.TemporaryDirectory(prefix="bench_drain_") as tmp_s:
        tmp = Path(tmp_s)
        cal = calibrate(csv_path, tmp, rows_per_chunk, k)
        common = {
            "batch_size": rows_per_chunk,
            "poll": poll,
            "duration": duration,
            "emu_limit": cal["emu_limit"],
            "ideal": ideal,
        }
        runs = [
            timed_run(
                "with --token-limit",
                csv_path,
                tmp,
                extra=["--token-limit", str(cal["bo_limit"])],
                **common,
            ),
            timed_run("limit learned", csv_path, tmp, extra=[], **common),
        ]
    setup = {**cal, "N": chunks, "K": k, "duration": duration, "poll": poll, "ideal": ideal}
    return setup, runs


def describe(d: Drain) -> str:
    gaps = (
        f"gap batch end → next create: mean {statistics.mean(d.gaps) * 1000:.0f} ms, "
        f"max {max(d.gaps) * 1000:.0f} ms"
        if d.gaps
        else "no gaps"
    )
    return (
        f"{d.completed} batches ran ({d.created} created), ≤ {d.max_concurrent} at once; "
        f"{d.token_limit_failures} token_limit_exceeded; {gaps}"
    )


def figures(**kwargs: Any) -> list[Figure]:
    setup, runs = measure(**kwargs)
    ideal_s = f"ideal ceil({setup['N']}/{setup['K']}) × {setup['duration']:.1f} s = {setup['ideal']:.1f} s"
    out = []
    for d in runs:
        ok = d.exit_code == 0 and d.completed == setup["N"]
        note = describe(d) + ("" if ok else f"; exit code {d.exit_code}")
        out.append(
            Figure(
                "drain",
                f"drain ÷ ideal, {d.label}",
                f"{d.ratio:.3f} ({d.drain_s:.2f} s)",
                "",
                f"≤ {TARGET}",
                ok and d.ratio <= TARGET,
                note,
                ideal=ideal_s,
            )
        )
        out.append(
            Figure(
                "drain",
                f"whole process ÷ ideal, {d.label}",
                f"{d.process_s / d.ideal_s:.3f} ({d.process_s:.2f} s)",
                "",
                "",
                None,
                f"first batch created {d.first_create_s:.2f} s after spawn (start, build, "
                f"upload); exit {d.tail_s:.2f} s after the last batch was recorded (merge, exit)",
                ideal=ideal_s,
            )
        )
    out.append(
        Figure(
            "drain",
            "setup",
            f"N={setup['N']}, K={setup['K']}, poll {setup['poll']} s",
            "",
            "",
            None,
            f"emulator limit {setup['emu_limit']:,} tokens, --token-limit {setup['bo_limit']:,} "
            f"(batchops' estimate is {setup['est_over_emulator']:.2f}× the emulator's count); "
            f"K+1 chunks over the limit: {'yes' if setup['k_plus_1_blocked'] else 'NO'}",
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=12, help="N")
    ap.add_argument("--k", type=int, default=3, help="chunks allowed in flight by the token limit")
    ap.add_argument("--rows-per-chunk", type=int, default=100)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per batch")
    ap.add_argument("--poll", type=float, default=0.05, help="--poll-interval")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    figs = figures(
        chunks=args.chunks,
        k=args.k,
        rows_per_chunk=args.rows_per_chunk,
        duration=args.duration,
        poll=args.poll,
    )
    print(f"cores: {cores()}\n")
    print(markdown_table(figs, with_part=False))
    write_json(figs, args.json)


if __name__ == "__main__":
    main()
