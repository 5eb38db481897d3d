"""How many API calls does `batchops run` make per batch?

    python benchmarks/bench_api_economy.py              # 20 batches of 10 minutes, 30 s polls
    python benchmarks/bench_api_economy.py --batches 8  # quicker

Real life: 20 batches that each take 10 minutes, polled at the default 30 s. Here the same run
is time-scaled by 1/100 (the emulator's `time_scale` = 0.01, so a batch takes 6 s, and
`--poll-interval 0.3`); the emulator counts every call by route (`/_emulator/stats`). The real CLI
runs in a subprocess; the emulator is on a thread of this process (localhost).

The ideal per batch: 1 upload, 1 create, 1 download (2 if some requests failed). Polling one
batch at a time costs ~20 polls per batch (600 s / 30 s); with 3 or more batches in flight the
engine polls them all with one `GET /v1/batches?limit=100` per interval (a batch older than that
page is retrieved on its own), so polls per batch fall to ~20 / batches in flight.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_build import text_csv  # noqa: E402
from bench_drain import run_cli  # noqa: E402
from run_all import Figure, cores, markdown_table, write_json  # noqa: E402

from batchops.emulator import EmulatorServer  # noqa: E402

SCALE = 0.01
REAL_BATCH_SECONDS = 600.0
REAL_POLL_SECONDS = 30.0
ROWS_PER_BATCH = 50
ROUTES = {
    "uploads": "POST /v1/files",
    "creates": "POST /v1/batches",
    "polls": "GET /v1/batches/{id}",
    "downloads": "GET /v1/files/{id}/content",
    "batch lists": "GET /v1/batches",
    "file lists": "GET /v1/files",
}


def measure(batches: int = 20) -> dict[str, Any]:
    csv_path = text_csv(batches * ROWS_PER_BATCH)
    # 10 minutes: validating 20 s, in progress 570 s, finalizing 10 s, all × SCALE.
    scenario = {
        "time_scale": SCALE,
        "validating_seconds": 20.0,
        "in_progress_seconds": REAL_BATCH_SECONDS - 30.0,
        "finalizing_seconds": 10.0,
    }
    poll = REAL_POLL_SECONDS * SCALE
    with tempfile.TemporaryDirectory(prefix="bench_api_") as tmp:
        run_dir = Path(tmp) / "run"
        with EmulatorServer(scenario=scenario) as emu:
            code, t0, t1 = run_cli(csv_path, run_dir, emu.base_url, ROWS_PER_BATCH, poll)
            stats = emu.stats()
        shutil.rmtree(run_dir, ignore_errors=True)
    calls: dict[str, int] = dict(stats["calls"])
    return {
        "batches": batches,
        "created": stats["batches"]["created"],
        "exit_code": code,
        "seconds": t1 - t0,
        "calls": calls,
        "poll": poll,
        "batch_seconds": REAL_BATCH_SECONDS * SCALE,
    }


def figures(batches: int = 20) -> list[Figure]:
    m = measure(batches)
    n = m["batches"]
    calls = m["calls"]
    per_batch_polls = REAL_BATCH_SECONDS / REAL_POLL_SECONDS  # one GET per batch per interval
    get = {kind: calls.get(route, 0) for kind, route in ROUTES.items()}
    polls = get["polls"] + get["batch lists"]  # single GETs + list pages: every status call
    out: list[Figure] = []
    # A figure is only "met" if the run itself succeeded: few calls by a run that failed mean
    # nothing.
    ran = m["exit_code"] == 0 and m["created"] == n
    for kind, ideal, ok in (
        ("uploads", "1", get["uploads"] == n),
        ("creates", "1", get["creates"] == n),
        ("downloads", "1 (2 with an error file)", n <= get["downloads"] <= 2 * n),
        ("file lists", "0", get["file lists"] == 0),
    ):
        out.append(
            Figure(
                "api",
                f"{kind} per batch",
                f"{get[kind] / n:.2f} ({get[kind]} in all)",
                "",
                "≈ ideal",
                ok and ran,
                "" if ran else f"the run failed: exit code {m['exit_code']}",
                ideal=ideal,
            )
        )
    out.append(
        Figure(
            "api",
            "status calls per batch",
            f"{polls / n:.2f} ({get['batch lists']} list pages + {get['polls']} single GETs)",
            "",
            "≤ per-batch polling",
            polls / n <= per_batch_polls and ran,
            f"{n} batches in flight share one list call per {m['poll']:.2f} s interval "
            f"(= {REAL_POLL_SECONDS:.0f} s at real scale); single GETs only for batches "
            "the newest page does not show",
            ideal=f"one GET per batch per interval: ~{per_batch_polls:.0f}",
        )
    )
    total = sum(calls.values())
    out.append(
        Figure(
            "api",
            "all calls per batch",
            f"{total / n:.1f} ({total} in all)",
            "",
            "",
            None,
            f"{n} batches ({m['created']} created), exit code {m['exit_code']}, "
            f"{m['seconds']:.1f} s",
            ideal=f"per-batch polling ~{3 + per_batch_polls:.0f}",
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    t0 = time.monotonic()
    figs = figures(args.batches)
    print(f"cores: {cores()}   ({time.monotonic() - t0:.0f} s)\n")
    print(markdown_table(figs, with_part=False))
    write_json(figs, args.json)


if __name__ == "__main__":
    main()
