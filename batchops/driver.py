"""Driving runs: start or resume, dry run, retry what is missing, watch, cancel, merge.

The lane switch (batch ↔ online, when the pool moves on to a model of the other mode) lives
in `drive`; every command that sends work goes through it."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from batchops import chunking, dedup, pricing, render, source, structured, validate
from batchops import merge as merging
from batchops.errors import InputError
from batchops.estimates import estimate, estimate_of, online_estimate, unpriced_attempts
from batchops.render import check_template
from batchops.rundir import RunDir, create_or_resume, default_run_dir, open_existing, start_over
from batchops.spec import JobSpec, ModelEntry
from batchops.states import INTENT_CHUNKS, ChunkState, StopReason
from batchops.summaries import Estimate, RunReport

if TYPE_CHECKING:  # openai and pandas take ~1 s to import; a dry run needs neither
    from batchops.engine import BatchEngine, EngineResult, Progress
    from batchops.providers import Pool


def validate_inputs(spec: JobSpec) -> source.Source:
    """Everything that can be checked before anything is built or uploaded."""
    src = source.open_source(spec)
    check_template(spec.prompt, src.columns, what="--prompt", source_name=src.path)
    if spec.system:
        check_template(spec.system, src.columns, what="--system", source_name=src.path)
    if spec.image_column and not spec.image_dir:
        raise InputError(
            "--image-column needs --image-dir (the folder the image paths are relative to)"
        )
    if spec.image_dir and not Path(spec.image_dir).is_dir():
        raise InputError(f"--image-dir {spec.image_dir}: not a directory")
    structured.check_spec(spec)
    render.request_body(spec, spec.models[0].name, "")  # body options (--body-extra …) checked now
    return src


def make_pool(
    spec: JobSpec, *, api_key_file: Path | None = None, base_url: str | None = None
) -> Pool:
    from batchops.providers import Pool, load_keys

    keys = load_keys(api_key_file)
    return Pool(spec, keys, base_url=base_url or os.environ.get("OPENAI_BASE_URL"))


def run_job(
    spec: JobSpec,
    run_dir: Path | None = None,
    *,
    cleanup: bool = False,
    keep_latest: bool = False,
    dry_run: bool = False,
    wait: bool = True,
    api_key_file: Path | None = None,
    base_url: str | None = None,
    on_estimate: Callable[[Estimate], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunReport:
    """`batchops run`: start or resume a run and drive it to the end (or until it can go no further)."""
    run_dir = Path(run_dir or default_run_dir(spec.source))
    if dry_run:  # the price table loads (~0.1 s of Python) while the source is checked (no GIL)
        threading.Thread(target=_load_prices, name="batchops-prices").start()
    src = validate_inputs(spec)
    if dry_run:
        return dry_run_job(spec, src, run_dir, on_estimate=on_estimate)
    pool = make_pool(spec, api_key_file=api_key_file, base_url=base_url)
    if cleanup or keep_latest:
        backup = start_over(run_dir, keep_backup=keep_latest)
        if backup:
            logger.info("previous run kept as {}", backup)
    run, resumed = create_or_resume(run_dir, spec)
    try:
        if resumed:
            logger.info("resuming run {} in {}", run.run_id, run_dir)
        engine = batch_engine()(run, pool, wait=wait, on_progress=on_progress, src=src)
        engine.ensure_rows()
        pool.lane = pool.next_mode() or spec.mode
        if pool.lane == "batch":
            engine.reconcile()
            engine.upload_while_building = True  # each file goes up while the next is built
            engine.build_pending()
        est = estimate(run) if pool.lane == "batch" else online_estimate(run, src)
        # (chunks built now may already be uploading: uploads start while the next is built)
        new = run.store.chunks("built", "uploading") if pool.lane == "batch" else est.rows
        if on_estimate and (new or not resumed):
            on_estimate(est)
        elif resumed:  # everything was estimated (and shown) when it was first submitted
            logger.info("resuming: nothing new to submit ({} row(s) in flight)", est.rows)
        result = drive(run, pool, engine, on_progress=on_progress)
        final = None
        if result.stopped_because != StopReason.NO_WAIT:
            final = merge_run(run, src=src)
        return RunReport(
            run_dir,
            result.counts,
            result.spent,
            result.stopped_because,
            final,
            est,
            resumed,
            spec.max_cost,
            unpriced=unpriced_attempts(run),
            completion_threshold=spec.completion_threshold,
            dedup=run.store.dedup_savings(),
            exhausted_by=exhausted_by(run, result.stopped_because),
        )
    finally:
        run.close()


def _load_prices() -> None:
    with suppress(Exception):  # a head start only: the estimate loads the table itself anyway
        import genai_prices

        genai_prices.data_snapshot.get_snapshot()


def dry_run_job(
    spec: JobSpec,
    src: source.Source,
    run_dir: Path,
    *,
    on_estimate: Callable[[Estimate], None] | None = None,
) -> RunReport:
    """Build every chunk file of the job under <run-dir>/dry-run/ and estimate it.

    No network, no key, and the run's database is not touched: a dry run has no side effect
    on a real run in the same directory (which builds its own files in seconds).
    """
    out_dir = run_dir / "dry-run"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model = spec.models[0].name
    per_row = spec.max_tokens or pricing.DEFAULT_COMPLETION_ESTIMATE
    overrides = pricing.overrides_from_spec(spec)
    # Keep a summary per chunk, not the chunk: its row lists would grow with the table.
    est_rows: list[tuple[int, int, float | None]] = []
    skipped = 0
    skipped_reasons: list[str] = []  # the first few, for the dry run's summary
    # Each finished file is checked in a thread while the next one is built (both halves run
    # in polars, which releases the GIL).
    checker = ThreadPoolExecutor(max_workers=1)
    template = chunking.text_template(spec, model)  # the check's fast path: lines we made
    pending_checks = []
    # Rows repeating an earlier row's request are left out of the files, as a run would:
    # found while building (one pass over the source) unless the slice is very large.
    first_seen = None
    if spec.dedup and src.n_rows <= dedup.STREAM_ROWS:
        first_seen = dedup.FirstSeen(spec, src.n_rows, chunking.TEXT_COL, chunking.SYSTEM_COL)
        leaders, followers = None, 0
    else:
        leaders, followers = dedup.leaders_only(src, spec)
    for c in chunking.build_chunks(
        src,
        spec,
        model=model,
        out_dir=out_dir,
        first_chunk_no=1,
        only_rows=leaders,
        estimate_tokens=pricing.estimate_text_tokens_fast,
        fsync=False,  # throwaway files: durability buys nothing here
        keep=first_seen,
        custom_ids=False,  # only counted here
    ):
        skipped += len(c.skipped)
        skipped_reasons += [f"row {k.row_idx}: {k.reason}" for k in c.skipped][
            : max(0, 5 - len(skipped_reasons))
        ]
        if c.row_idxs:
            n = len(c.row_idxs)
            cost = pricing.estimate_cost(
                model, c.est_prompt_tokens, per_row * n, batch=True, overrides=overrides
            )
            est_rows.append((c.est_prompt_tokens, n, cost))
            pending_checks.append(
                checker.submit(validate.check_files, [c.path], spec.batch_endpoint(model), template)
            )
    if first_seen is not None:
        followers = first_seen.followers
    est = estimate_of(model, est_rows, per_row, spec.max_tokens)
    checks = [check for f in pending_checks for check in f.result()]
    checker.shutdown()
    bad = validate.problems(checks)
    if bad:
        more = f" (and {len(bad) - 1} more problem(s))" if len(bad) > 1 else ""
        raise InputError(f"chunk file check failed: {bad[0]}{more}")
    logger.info(validate.summary(checks))
    if on_estimate:
        on_estimate(est)
    counts = {
        "pending": 0,
        "queued": est.rows + followers,
        "succeeded": 0,
        "failed": 0,
        "skipped": skipped,
    }
    return RunReport(
        run_dir,
        counts,
        0.0,
        StopReason.DRY_RUN,
        None,
        est,
        False,
        spec.max_cost,
        checks=checks,
        skipped_reasons=skipped_reasons,
        dedup={"rows": followers, "requests": followers, "cost_usd": 0.0},
    )


def merge_run(run: RunDir, out: Path | None = None, src: source.Source | None = None) -> Path:
    spec = run.spec
    src = src or source.open_source(spec)  # a full validation pass: reuse the run's when given
    out = Path(out or run.final_output)
    # Output in the source's own format: Parquet keeps the column types, JSONL each object.
    native = merging.format_of(out) == src.format != "csv"
    summary = merging.merge_frames(
        source.iter_frames(src, native=native),
        src.columns,
        run.store,  # read by row range, one source frame at a time
        out,
        source_schema=src.arrow_schema if native else None,
        raw=native and src.format == "jsonl",
        answer_schema=spec.schema_,
        schema_prefix=spec.schema_prefix,
        embeddings=spec.endpoint == "/v1/embeddings"
        and (spec.body_extra or {}).get("encoding_format") != "base64",
    )
    logger.info(
        "merged {} rows into {} ({})",
        summary.rows,
        summary.path,
        ", ".join(f"{k} {v}" for k, v in sorted(summary.by_status.items())),
    )
    path: Path = summary.path
    return path


def merge(run_dir: Path, out: Path | None = None) -> Path:
    run = open_existing(Path(run_dir), write=True)
    try:
        return merge_run(run, out)
    finally:
        run.close()


def retry_missing(
    run_dir: Path,
    *,
    models: Sequence[str] | None = None,
    error_class: str | None = None,
    from_model: str | None = None,
    batch_id: str | None = None,
    completion_threshold: float | None = None,
    poll_interval: float | None = None,
    api_key_file: Path | None = None,
    base_url: str | None = None,
    wait: bool = True,
    on_progress: Callable[[Progress], None] | None = None,
    dedup: bool | None = None,
) -> RunReport:
    """Send failed or skipped rows again (fresh retry budget), on the pool given or the run's
    own: all of them, or only those whose last failure had this error class, came from this
    model, or belonged to this batch."""
    run = open_existing(Path(run_dir), write=True)
    spec = run.spec
    updates: dict[str, Any] = {}
    if completion_threshold is not None:
        updates["completion_threshold"] = completion_threshold
    if models:
        updates["models"] = [
            spec.model_entry(m) if m in spec.model_names else ModelEntry(name=m) for m in models
        ]
    if poll_interval is not None:
        updates["poll_interval"] = poll_interval
    if dedup is not None:  # --no-dedup: followers put back are sent on their own
        updates["dedup"] = dedup
    spec = spec.model_copy(update=updates)
    run.save_spec(spec)
    try:
        src = validate_inputs(spec)
        pool = make_pool(spec, api_key_file=api_key_file, base_url=base_url)
        n = run.store.reset_rows(
            ("failed", "skipped"), error_class=error_class, model=from_model, batch_id=batch_id
        )
        chosen = [
            f"{k} {v}"
            for k, v in (("class", error_class), ("model", from_model), ("batch", batch_id))
            if v
        ]
        logger.info(
            "{} failed/skipped row(s) put back in the queue{}",
            n,
            f" (only {', '.join(chosen)})" if chosen else "",
        )
        engine = batch_engine()(run, pool, wait=wait, on_progress=on_progress, src=src)
        result = drive(run, pool, engine, on_progress=on_progress)
        final = merge_run(run, src=src) if result.stopped_because != StopReason.NO_WAIT else None
        return report_of(run, result.stopped_because, final)
    finally:
        run.close()


def report_of(run: RunDir, stopped: StopReason | None, final: Path | None) -> RunReport:
    """What a command on an existing run comes to: its rows and spend as stored now."""
    return RunReport(
        run.path,
        run.store.counts(),
        run.store.spent(),
        stopped,
        final,
        None,
        True,
        run.spec.max_cost,
        completion_threshold=run.spec.completion_threshold,
        dedup=run.store.dedup_savings(),
        exhausted_by=exhausted_by(run, stopped),
    )


def exhausted_by(run: RunDir, stopped: StopReason | None) -> str | None:
    """What used the pool up (the last exhaustion's error class), when it ran out."""
    from batchops.engine import exhaustion_class

    if stopped != StopReason.POOL_EXHAUSTED:
        return None
    return exhaustion_class(run.store)


def cancel(run_dir: Path, *, api_key_file: Path | None = None, base_url: str | None = None) -> int:
    run = open_existing(Path(run_dir), write=True)
    try:
        pool = make_pool(run.spec, api_key_file=api_key_file, base_url=base_url)
        return batch_engine()(run, pool).cancel_all()
    finally:
        run.close()


def watch(
    run_dir: Path,
    *,
    retry: bool = False,
    poll_interval: float | None = None,
    completion_threshold: float | None = None,
    api_key_file: Path | None = None,
    base_url: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RunReport:
    """`batchops watch`: poll the run's remote batches, collecting each as it ends, until none
    is in flight. With `retry`, also re-queue what failed and submit it (the whole engine loop)."""
    run = open_existing(Path(run_dir), write=True)
    try:
        # For this invocation only; the saved job is unchanged.
        if poll_interval is not None:
            run.spec = run.spec.model_copy(update={"poll_interval": poll_interval})
        if completion_threshold is not None:
            run.spec = run.spec.model_copy(update={"completion_threshold": completion_threshold})
        pool = make_pool(run.spec, api_key_file=api_key_file, base_url=base_url)
        engine = batch_engine()(run, pool, on_progress=on_progress, sleep=sleep)
        if retry:  # the same loop as `run`: batch or online lane, whichever the pool is on
            result = drive(run, pool, engine, on_progress=on_progress)
            stopped = result.stopped_because
        else:
            engine.reconcile()  # creates nothing: re-attaches what a crash left half-done
            while True:
                engine.poll()
                ended = not run.store.chunks(ChunkState.SUBMITTED)
                engine.report_progress(fresh=ended)  # the last one shows the final counts
                if ended:
                    break
                engine.sleep(run.spec.poll_interval)
            engine.finish_deletes()
            c = run.store.counts()
            stopped = StopReason.ROWS_LEFT if c["pending"] or c["queued"] else None
        final = merge_run(run) if run.store.counts()["succeeded"] else None
        return report_of(run, stopped, final)
    finally:
        run.close()


def drive(
    run: RunDir,
    pool: Pool,
    batch: BatchEngine,
    *,
    on_progress: Callable[[Progress], None] | None = None,
) -> EngineResult:
    """Run the engine of the current pair's mode (batch, or online: synchronous calls); when
    the pool moves on to a pair of the other mode (the models before it exhausted), hand over
    to the other engine. Each engine takes only pending rows, so a row answered (or in flight)
    in one mode is never sent in the other."""
    from batchops.online import OnlineEngine

    # Rows a killed online run left queued in its groups: pending again, whichever engine runs.
    released = run.store.release_online_chunks()
    if released:
        logger.info("{} row(s) queued by an interrupted online run back to pending", released)
    result = None
    # A handover happens only when a pair is exhausted, so this ends; the bound is a safety net.
    for _ in range(len(pool.pairs) + 2):
        lane = pool.lane = pool.next_mode() or pool.lane or run.spec.mode
        if lane == "online":
            result = OnlineEngine(run, pool, on_progress=on_progress, src=batch._src).execute()
        else:
            result = batch.execute()
        after = pool.next_mode()
        if (
            after is None
            or after == lane
            or result.stopped_because in (StopReason.NO_WAIT, StopReason.BUDGET)
        ):
            break
        nxt = pool.first_available()
        logger.info(
            "the pool moved on to model {} in {} mode: handing over",
            nxt[0].name if nxt else "?",
            after,
        )
    assert result is not None
    waiting = run.store.chunks(*INTENT_CHUNKS, ChunkState.SUBMITTED)
    if pool.lane == "online" and waiting and result.stopped_because is None:
        result.stopped_because = StopReason.BATCHES_IN_FLIGHT
    return result


def batch_engine() -> type[BatchEngine]:
    from batchops.engine import BatchEngine

    return BatchEngine
