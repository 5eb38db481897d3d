"""How many API calls does `batchops run` make per batch?

    python benchmarks/bench_api_economy.py              # 20 batches of 10 minutes, 30 s polls
    python benchmarks/bench_api_economy.py --batches 8  # quicker

Real life: 20 batches that each take 10 minutes, polled at the default 30 s. Here the same run
is time-scaled by 1/100 (the emulator's `time_scale` = 0.01, so a batch takes 6 s, and
`--poll-interval 0.3`); the emulator counts every call by route (`/_emulator/stats`). The real CLI
runs in a subprocess; the emulator is on a thread of this process (localhost).

The ideal per batch: 1 upload, 1 create, ~20 polls (600 s / 30 s), 1 download (2 if some
requests failed), no list calls. Polling is one `GET /v1/batches/{id}` per in-flight batch per
interval; `GET /v1/batches?limit=100` would see up to 100 of them per call.
"""

from __future__ import annotations

import argparse
import math
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
LIST_PAGE = 100  # batches.list limit
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
    ideal_polls = REAL_BATCH_SECONDS / REAL_POLL_SECONDS
    ideal = {
        "uploads": "1",
        "creates": "1",
        "polls": f"~{ideal_polls:.0f}",
        "downloads": "1 (2 with an error file)",
        "batch lists": "0",
        "file lists": "0",
    }
    out: list[Figure] = []
    per: dict[str, float] = {}
    for kind, route in ROUTES.items():
        per[kind] = calls.get(route, 0) / n
    matches = {
        "uploads": per["uploads"] == 1,
        "creates": per["creates"] == 1,
        # Within 10%, and the time-scaled run may poll a little less (see the note).
        "polls": per["polls"] <= ideal_polls * 1.1 + 1,
        "downloads": 1 <= per["downloads"] <= 2,
        "batch lists": per["batch lists"] == 0,
        "file lists": per["file lists"] == 0,
    }
    # The poll loop sleeps the interval, then polls every in-flight batch one by one: a round
    # takes interval + n × (one call's latency). Latency is not time-scaled, so here it is a
    # quarter of the round and the scaled run polls less often than the real one would.
    rounds = per["polls"]
    cycle = m["batch_seconds"] / rounds if rounds else float("nan")
    overhead = max(0.0, cycle - m["poll"])  # seconds of calls per round, the same at real scale
    projected = REAL_BATCH_SECONDS / (REAL_POLL_SECONDS + overhead)
    for kind in ROUTES:
        note = ""
        if kind == "polls":
            note = (
                f"one GET per in-flight batch per round; round {cycle:.2f} s = --poll-interval "
                f"{m['poll']:.2f} s + {overhead:.2f} s of calls; at real scale that is "
                f"~{projected:.0f} polls per batch"
            )
        out.append(
            Figure(
                "api",
                f"{kind} per batch",
                f"{per[kind]:.2f} ({calls.get(ROUTES[kind], 0)} in all)",
                f"ideal {ideal[kind]}",
                "≈ ideal",
                matches[kind],
                note,
            )
        )
    known = set(ROUTES.values())
    other = {r: c for r, c in calls.items() if r not in known}
    total = sum(calls.values())
    ideal_total = 3 + ideal_polls
    out.append(
        Figure(
            "api",
            "all calls per batch",
            f"{total / n:.1f} ({total} in all)",
            f"ideal ~{ideal_total:.0f}",
            "",
            None,
            (f"other routes: {other}; " if other else "")
            + f"{n} batches ({m['created']} created), exit code {m['exit_code']}, "
            f"{m['seconds']:.1f} s",
        )
    )
    # What batches.list would save: one call per round sees up to LIST_PAGE in-flight batches.
    list_calls = math.ceil(rounds) * math.ceil(n / LIST_PAGE)
    out.append(
        Figure(
            "api",
            f"polls with {n} batches in flight",
            f"{calls.get(ROUTES['polls'], 0)} GET /v1/batches/{{id}}",
            f"batches.list(limit={LIST_PAGE}): ~{list_calls} calls",
            "",
            None,
            f"{calls.get(ROUTES['polls'], 0) / max(1, list_calls):.0f}× fewer poll calls "
            f"with a list per round (≤ {LIST_PAGE} batches a page, newest first; stop paging at "
            "the oldest in-flight batch); not changed without the lead",
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
