"""Unattended maintenance: `batchops maintain` (analyse only) and `batchops monitor` (a loop that
collects, and with auto-maintain re-sends what is missing), with a timestamped JSON report per
cycle under `<run-dir>/reports/`.

The monitor drives the same engine as `run` / `retry-missing` (one writer lock, intent before
every remote call, reconcile after a crash), so `kill -9` at any moment is as safe as for `run`.
Memory stays flat: each cycle reads counts and aggregates from the store, never the rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from batchops.driver import (
    batch_engine,
    drive,
    make_pool,
    merge_run,
    report_of,
    validate_inputs,
)
from batchops.rundir import RunDir, open_existing
from batchops.states import ChunkState
from batchops.summaries import RunReport

if TYPE_CHECKING:
    from batchops.engine import Progress

# Classes a re-send cannot fix (the request itself is wrong): never re-sent automatically.
NOT_RESENT = ("invalid_request", "input")


def analyse(run: RunDir) -> dict[str, Any]:
    """Failure patterns of a run and the recommended command; reads only."""
    st = run.store
    counts = st.counts()
    total = sum(counts.values()) or 1
    failed_attempts = st.failed_attempts_by_class()
    attempts = sum(r["calls"] for r in st.cost_by_model())
    by_model = {
        (r["model"] or "unknown"): {
            "calls": r["calls"],
            "failed": r["failed"],
            "failure_rate": round(r["failed"] / r["calls"], 4) if r["calls"] else 0.0,
        }
        for r in st.cost_by_model()
    }
    by_batch = [
        {
            "batch_id": r["batch_id"],
            "model": r["model"],
            "status": r["status"],
            "failed": r["request_failed"] or 0,
            "total": r["request_total"] or 0,
        }
        for r in st.cost_by_batch()
        if r["request_failed"]
    ]
    repeated = st.conn.execute(
        "SELECT COUNT(*) FROM rows WHERE status != 'succeeded' AND attempts >= 2"
    ).fetchone()[0]
    missing = total - counts["succeeded"]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": counts,
        "completion": round(counts["succeeded"] / total, 6),
        "failure_rate": round(sum(failed_attempts.values()) / attempts, 6) if attempts else 0.0,
        "failed_by_class": failed_attempts,
        "missing_by_class": {c["error_class"]: c["rows"] for c in st.error_classes(0)},
        "failed_by_model": by_model,
        "batches_with_failures": by_batch,
        "rows_failing_repeatedly": repeated,
        "recommended": _recommend(run, counts, missing),
    }


def _recommend(run: RunDir, counts: dict[str, int], missing: int) -> str:
    d = run.path
    if missing == 0:
        return "nothing to do: every row is answered"
    if run.store.chunks(ChunkState.SUBMITTED):
        return f"batchops watch --run-dir {d}"
    classes = {
        c["error_class"]: c["rows"]
        for c in run.store.error_classes(0)
        if c["error_class"] not in NOT_RESENT
    }
    if classes:
        top = max(classes, key=lambda c: classes[c])
        return f"batchops retry-missing --run-dir {d} --class {top}"
    return f"batchops retry-missing --run-dir {d}"


def maintain(run_dir: Path) -> dict[str, Any]:
    """`batchops maintain`: the analysis, with no side effect."""
    run = open_existing(Path(run_dir))
    try:
        return analyse(run)
    finally:
        run.close()


def write_report(run: RunDir, data: dict[str, Any]) -> Path:
    """`<run-dir>/reports/maintenance_YYYYMMDD_HHMMSS.json` (never overwrites an earlier one)."""
    folder = run.path / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    n = 1
    while True:
        path = folder / f"maintenance_{stamp}{'' if n == 1 else f'_{n}'}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            n += 1
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
    return path


def monitor(
    run_dir: Path,
    *,
    every: float,
    auto_maintain: bool = False,
    cooldown: float = 0.0,
    max_cycles: int | None = None,
    completion_threshold: float | None = None,
    max_failure_rate: float | None = None,
    api_key_file: Path | None = None,
    base_url: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RunReport:
    """Every `every` seconds: collect finished batches; with `auto_maintain`, when completion
    is below the threshold or the failure rate above `max_failure_rate` (and no maintenance
    ran within `cooldown`), forget pool pairs exhausted longer than `cooldown` ago and re-send
    the missing rows (the errors a re-send cannot fix excepted). A report per cycle. Ends when
    every row is answered (or the threshold is met and nothing is left to try), or after
    `max_cycles`."""
    from batchops.pool_admin import forget_exhausted_before

    run = open_existing(Path(run_dir), write=True)
    try:
        if completion_threshold is not None:
            run.spec = run.spec.model_copy(update={"completion_threshold": completion_threshold})
        spec = run.spec
        src = validate_inputs(spec)
        last_action = 0.0
        cycle = 0
        while True:
            cycle += 1
            actions: list[str] = []
            pool = make_pool(spec, api_key_file=api_key_file, base_url=base_url)
            engine = batch_engine()(run, pool, on_progress=on_progress, sleep=sleep, src=src)
            engine.reconcile()
            if run.store.chunks(ChunkState.SUBMITTED):
                engine.poll()
                actions.append("polled and collected batches in flight")
            engine.finish_deletes()  # also those reconcile started (a crash's leftovers)
            before = analyse(run)
            below = before["completion"] < spec.completion_threshold
            failing = max_failure_rate is not None and before["failure_rate"] > max_failure_rate
            now = time.time()
            if (
                auto_maintain
                and (below or failing)
                and now - last_action >= cooldown
                and not run.store.chunks(ChunkState.SUBMITTED)
            ):
                forgotten = forget_exhausted_before(run, now - cooldown)
                if forgotten:
                    actions.append(f"{forgotten} exhausted model/key pair(s) tried again")
                n = run.store.reset_rows(("failed",), exclude_classes=NOT_RESENT)
                actions.append(f"{n} failed row(s) re-queued; missing rows sent")
                pool = make_pool(spec, api_key_file=api_key_file, base_url=base_url)
                engine = batch_engine()(run, pool, on_progress=on_progress, sleep=sleep, src=src)
                result = drive(run, pool, engine, on_progress=on_progress)
                last_action = time.time()
                if result.stopped_because:
                    actions.append(f"stopped: {result.stopped_because}")
            after = analyse(run)
            rows = after["rows"]
            settled = not rows["pending"] and not rows["queued"]
            fixable = sum(
                n for cls, n in after["missing_by_class"].items() if cls not in NOT_RESENT
            )
            # Done: every row answered; or the threshold met with nothing moving; or nothing
            # left that a re-send could fix.
            done = rows["succeeded"] == sum(rows.values()) or (
                settled
                and (after["completion"] >= spec.completion_threshold or not fixable)
                and not run.store.chunks(ChunkState.SUBMITTED)
            )
            left = max_cycles is not None and cycle >= max_cycles
            report = {
                "cycle": cycle,
                **after,
                "thresholds": {
                    "completion_threshold": spec.completion_threshold,
                    "max_failure_rate": max_failure_rate,
                },
                "actions": actions,
                "next_check": None
                if done or left
                else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() + every)),
            }
            path = write_report(run, report)
            logger.info(
                "monitor cycle {}: completion {:.1%}, failure rate {:.1%}; {}; report {}",
                cycle,
                after["completion"],
                after["failure_rate"],
                "; ".join(actions) or "nothing to do",
                path,
            )
            if done or left:
                break
            sleep(every)
        final = merge_run(run, src=src) if run.store.counts()["succeeded"] else None
        return report_of(run, None, final)
    finally:
        run.close()
