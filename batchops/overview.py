"""Reading a run without sending anything: status, missing rows, cost, report."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from batchops import report as reporting
from batchops import source
from batchops.atomic import atomic_write
from batchops.errors import InputError
from batchops.estimates import estimate, online_estimate_or_none
from batchops.rundir import RunDir, open_existing


def missing(run_dir: Path) -> tuple[Path, dict[str, int]]:
    """Write <run-dir>/missing_rows.csv: every row without an answer, with its status and reason."""
    run = open_existing(Path(run_dir))
    try:
        rows = run.store.rows_by_status(("pending", "queued", "failed", "skipped"))
        last = run.store.last_attempts([r["row_idx"] for r in rows])
        by_status: dict[str, int] = {}
        with atomic_write(run.missing_rows, run.missing_rows.with_suffix(".csv.tmp")) as raw:
            fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            w = csv.writer(fh)
            w.writerow(
                [
                    "row_idx",
                    "row_id",
                    "status",
                    "attempts",
                    "error_class",
                    "error",
                    "model",
                    "batch_id",
                    "last_attempt_at",
                ]
            )
            for r in rows:
                status = "missing" if r["status"] in ("pending", "queued") else r["status"]
                by_status[status] = by_status.get(status, 0) + 1
                at = last.get(r["row_idx"])
                w.writerow(
                    [
                        r["row_idx"],
                        r["row_id"],
                        status,
                        r["attempts"],
                        r["error_class"] or "",
                        r["error"] or "",
                        r["model"] or "",
                        r["batch_id"] or "",
                        time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(at)) if at else "",
                    ]
                )
            fh.flush()
            fh.detach()  # the atomic writer closes (and fsyncs) the file itself
        return run.missing_rows, by_status
    finally:
        run.close()


def status(run_dir: Path, group_by: str | None = None) -> dict[str, Any]:
    """Everything `batchops status` shows, as plain data (also `status --json`); with
    `group_by`, rows by status per value of that source column too."""
    run = open_existing(Path(run_dir))
    try:
        st = status_of(run)
        if group_by is not None:
            st["groups"] = {"column": group_by, "values": rows_by_group(run, group_by)}
        return st
    finally:
        run.close()


def rows_by_group(run: RunDir, column: str) -> dict[str, dict[str, int]]:
    """Rows by status for each value of a source column (progress and failures per group),
    read in slices: the source column and the row states are joined on row_idx."""
    src = source.open_source(run.spec)
    if column not in src.columns:
        raise InputError(
            f"--group-by: no column {column!r} in {src.path} (columns: {', '.join(src.columns)})"
        )
    out: dict[str, dict[str, int]] = {}
    for frame in source.iter_frames(src, columns=[column]):
        idx = frame[source.ROW_IDX].to_list()
        states = run.store.states_of(idx[0], idx[-1]) if idx else {}
        for i, value in zip(idx, frame[column].to_list(), strict=True):
            state = states.get(i, "pending")
            state = "missing" if state in ("pending", "queued") else state
            group = out.setdefault(value or "", {})
            group[state] = group.get(state, 0) + 1
    return dict(sorted(out.items()))


def pool_status(run_dir: Path) -> list[dict[str, Any]]:
    """`batchops pool status`: every (model, key) pair with its state and usage."""
    from batchops.pool_admin import pool_status as of

    run = open_existing(Path(run_dir))
    try:
        return of(run)
    finally:
        run.close()


def pool_reset(run_dir: Path, model: str | None = None, key: str | None = None) -> int:
    """`batchops pool reset`: forget exhausted pairs so the next invocation tries them again."""
    from batchops.pool_admin import pool_reset as reset

    run = open_existing(Path(run_dir), write=True)
    try:
        return reset(run, model, key)
    finally:
        run.close()


def status_of(run: RunDir) -> dict[str, Any]:
    st = run.store
    now = time.time()
    counts = st.counts()
    chunk_states: dict[str, int] = {}
    submitted: set[str] = set()
    for c in st.chunks():
        chunk_states[c.state] = chunk_states.get(c.state, 0) + 1
        if c.state == "submitted" and c.batch_id:
            submitted.add(c.batch_id)
    batches = []
    remote: dict[str, int] = {}
    ages: dict[str, dict[str, Any]] = {}
    for row in st.batches():
        b = dict(row)
        b["in_flight"] = b["batch_id"] in submitted
        b["age_s"] = max(0.0, now - b["created_at"])
        b["duration_s"] = max(0.0, (b["ended_at"] or now) - b["created_at"])
        batches.append(b)
        remote[b["status"]] = remote.get(b["status"], 0) + 1
        a = ages.setdefault(b["status"], {"count": 0, "oldest_s": 0.0, "newest_s": None})
        a["count"] += 1
        a["oldest_s"] = max(a["oldest_s"], b["age_s"])
        a["newest_s"] = b["age_s"] if a["newest_s"] is None else min(a["newest_s"], b["age_s"])
    pool_state = json.loads(st.get_meta("pool_state") or "{}")
    switches = [
        {
            "ts": e["ts"],
            "when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"])),
            "chunk_id": e["chunk_id"],
            "batch_id": e["batch_id"],
            "message": e["message"],
        }
        for e in st.events_of("switch", limit=20)
    ]
    retries = st.retry_summary()
    retries["failed_attempts_by_class"] = st.failed_attempts_by_class()
    # Rows put back in the queue (a cancel, an expiry, a failed batch) and not sent again yet:
    # re-queued, not retried.
    retries["requeued"] = st.conn.execute(
        "SELECT COUNT(*) FROM rows WHERE attempts > 0 AND status = 'pending'"
    ).fetchone()[0]
    return {
        "run_id": run.run_id,
        "run_dir": str(run.path),
        "source": run.spec.source,
        "models": run.spec.model_names,
        "mode": run.spec.mode,
        "rows": counts,
        "chunks": chunk_states,
        "in_flight": len(submitted),
        "batches_by_status": remote,
        "batch_ages": ages,
        "batches": batches,
        "pool": pool_state.get("pairs", []),
        "pool_updated_at": pool_state.get("ts"),
        "switches": switches,
        "retries": retries,
        "dedup": st.dedup_savings(),  # identical requests sent once: rows, requests, $ saved
        "spent_usd": st.spent(),
        "cost_by_model": [dict(r) for r in st.cost_by_model()],
        "events": [dict(e) for e in st.events(20)],
        "next": _next_step(run, counts, len(submitted)),
    }


def _next_step(run: RunDir, counts: dict[str, int], in_flight: int) -> str:
    """One line telling the operator what to do next."""
    d = run.path
    missing_n = counts["pending"] + counts["queued"] + counts["failed"] + counts["skipped"]
    if in_flight:
        return (
            f"{in_flight} batch(es) still running: `batchops watch --run-dir {d}` follows them "
            "(or run the same `batchops run` again)"
        )
    if missing_n == 0 and counts["succeeded"]:
        if run.final_output.exists():
            return f"all rows answered: merged table at {run.final_output}"
        return f"all rows answered: `batchops merge --run-dir {d}` writes the table"
    if missing_n == 0:
        return f"nothing sent yet: `batchops watch --retry --run-dir {d}` sends the rows"
    parts = [f"{counts[k]} {k}" for k in ("failed", "skipped", "pending", "queued") if counts[k]]
    hint = (
        f"{missing_n} row(s) missing ({', '.join(parts)}): `batchops retry-missing --run-dir {d}`"
    )
    if counts["skipped"]:
        hint += f"; fix the input of skipped rows first (`batchops missing --run-dir {d}`)"
    return hint


def report(run_dir: Path, out: Path | None = None) -> tuple[Path, Path]:
    """`batchops report`: one self-contained HTML page and the same data as report.json."""
    run = open_existing(Path(run_dir))
    try:
        return reporting.write(run, out)
    finally:
        run.close()


def cost(run_dir: Path) -> dict[str, Any]:
    run = open_existing(Path(run_dir))
    try:
        by_batch = [dict(r) for r in run.store.cost_by_batch()]
        by_model = [dict(r) for r in run.store.cost_by_model()]
        unpriced = sum(m["unpriced"] or 0 for m in by_model)
        estimate_usd: float | None
        if by_batch:  # what each batch was estimated at when it was built
            costs = [b["est_cost"] for b in by_batch]
            estimate_usd = None if None in costs else sum(costs)
        elif run.spec.mode == "online" or any(m["mode"] == "online" for m in by_model):
            estimate_usd = online_estimate_or_none(run)
        else:
            estimate_usd = estimate(run).cost_usd
        return {
            "by_model": by_model,
            "by_batch": by_batch,
            # None = unknown: some answers came from a model without a price (never $0)
            "total_usd": None if unpriced else run.store.spent(),
            "spent_known_usd": run.store.spent(),
            "unpriced_requests": unpriced,
            "estimate_usd": estimate_usd,
        }
    finally:
        run.close()
