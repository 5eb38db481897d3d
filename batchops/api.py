"""The library behind every command. The CLI parses flags, calls one function here, prints, exits.

import batchops
out = batchops.run(df, prompt="Classify: {text}", model="gpt-4o-mini", run_dir="runs/demo")
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from batchops import chunking, pricing, render, source, structured, validate
from batchops import merge as merging
from batchops import report as reporting
from batchops.errors import InputError, RunIncomplete
from batchops.render import check_template
from batchops.rundir import RunDir, create_or_resume, default_run_dir, open_existing, start_over
from batchops.spec import JobSpec, ModelEntry, infer_source_format
from batchops.states import INTENT_CHUNKS, ChunkState, StopReason

if TYPE_CHECKING:  # openai and pandas take ~1 s to import; a dry run needs neither
    import pandas as pd

    from batchops.engine import BatchEngine, EngineResult, Progress
    from batchops.providers import Pool


@dataclass
class Estimate:
    """Before the first upload: what the queued chunks should cost."""

    chunks: int
    rows: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None when a model has no known price
    completion_assumption: str
    by_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: str = "batch"  # "batch" or "synchronous" (online mode)


@dataclass
class RunReport:
    run_dir: Path
    counts: dict[str, int]
    spent: float
    stopped_because: StopReason | None
    final_output: Path | None
    estimate: Estimate | None = None
    resumed: bool = False
    max_cost: float | None = None
    checks: list[validate.FileCheck] | None = None  # dry run: the chunk files' validation
    unpriced: int = 0  # requests answered by a model without a known price: spend not known

    @property
    def complete(self) -> bool:
        return all(v == 0 for k, v in self.counts.items() if k != "succeeded")

    @property
    def exit_code(self) -> int:
        return 0 if self.complete else 3

    def summary(self) -> str:
        from batchops.progress import fmt_usd

        c = self.counts
        text = (
            f"{c.get('succeeded', 0)} succeeded, {c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped, "
            f"{c.get('pending', 0) + c.get('queued', 0)} missing; spent {self.spent_text()}"
        )
        if self.stopped_because:
            text += f"; stopped: {self.stopped_because}"
        if self.max_cost is not None:
            left = max(0.0, self.max_cost - self.spent)
            text += f"; budget {fmt_usd(self.max_cost)}: {fmt_usd(left)} left"
        return text

    def spent_text(self) -> str:
        """The spend, or 'unknown' for the part answered by a model without a price (not $0)."""
        from batchops.progress import fmt_usd

        if not self.unpriced:
            return fmt_usd(self.spent)
        unknown = f"unknown ({self.unpriced} request(s) by a model without a known price)"
        return unknown if not self.spent else f"{fmt_usd(self.spent)} + {unknown}"


def build_spec(
    *,
    source_path: str,
    prompt: str,
    models: Sequence[str | ModelEntry],
    config: Mapping[str, Any] | None = None,
    **options: Any,
) -> JobSpec:
    """A JobSpec from keyword options (None = not given) over an optional batchops.toml mapping."""
    data: dict[str, Any] = {}
    cfg = dict(config or {})
    table_models = cfg.pop("models", None)
    data.update({k: v for k, v in cfg.items() if k in JobSpec.model_fields})
    data.update({k: v for k, v in options.items() if v is not None and k in JobSpec.model_fields})
    retry = dict(cfg.get("retry", {}))
    for flag, name in (
        ("max_retries", "max_retries"),
        ("retry_delay", "initial_delay"),
        ("retry_backoff", "backoff"),
        ("retry_max_delay", "max_delay"),
    ):
        if options.get(flag) is not None:
            retry[name] = options[flag]
    if options.get("retry_on"):
        retry["retry_on"] = [c.strip() for c in str(options["retry_on"]).split(",") if c.strip()]
    data["retry"] = retry
    entries: list[ModelEntry] = []
    by_name = {m["name"]: m for m in (table_models or [])} if table_models else {}
    for m in models or list(by_name):
        entries.append(
            m if isinstance(m, ModelEntry) else ModelEntry(**by_name.get(m, {"name": m}))
        )
    data["models"] = entries
    data["source"] = source_path
    data["prompt"] = prompt
    data.setdefault("source_format", infer_source_format(source_path))
    schema = options.get("schema", cfg.get("schema"))
    if schema is not None:  # a pydantic model class, a JSON Schema dict, or a JSON file path
        schema_name: str | None = options.get("schema_name") or cfg.get("schema_name")
        data["schema_"], data["schema_name"] = structured.resolve_schema(schema, schema_name)
    if not entries:
        raise InputError("no model: give --model (repeatable) or [[models]] in batchops.toml")
    try:
        return JobSpec.model_validate(data)
    except Exception as exc:  # pydantic ValidationError → one line naming the field
        raise InputError(_one_line_validation(exc)) from None


def _one_line_validation(exc: Exception) -> str:
    from pydantic import ValidationError

    from batchops.config import describe_errors

    if isinstance(exc, ValidationError):  # "--batch-size must be ≥ 1", not pydantic's wording
        return describe_errors(exc, _option_name)
    return str(exc)


# JobSpec locations whose option name is not the field name.
_OPTION_OF = {"retry.initial_delay": "retry-delay", "retry.backoff": "retry-backoff"}
_OPTION_OF |= {"retry.max_delay": "retry-max-delay", "retry.max_retries": "max-retries"}
_OPTION_OF |= {"retry.retry_on": "retry-on", "source": "csv", "models": "model"}


def _option_name(loc: tuple[Any, ...]) -> str:
    dotted = ".".join(str(x) for x in loc) or "option"
    name = _OPTION_OF.get(dotted) or _OPTION_OF.get(str(loc[0]) if loc else "") or dotted
    return "--" + name.replace("_", "-")


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


def estimate(run: RunDir) -> Estimate:
    """The estimate of every chunk not yet collected (printed before the first upload)."""
    per_row = run.spec.max_tokens or pricing.DEFAULT_COMPLETION_ESTIMATE
    chunks = run.store.chunks("built", "uploading", "uploaded", "submitting", "submitted")
    return _estimate_of(
        None,
        [(c.est_tokens, c.n_rows, c.est_cost) for c in chunks],
        per_row,
        run.spec.max_tokens,
        [c.model for c in chunks],
    )


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
        engine = _batch_engine()(run, pool, wait=wait, on_progress=on_progress, src=src)
        engine.ensure_rows()
        pool.lane = pool.next_mode() or spec.mode
        if pool.lane == "batch":
            engine.reconcile()
            engine.build_pending()
        est = estimate(run) if pool.lane == "batch" else online_estimate(run, src)
        new = run.store.chunks("built") if pool.lane == "batch" else est.rows
        if on_estimate and (new or not resumed):
            on_estimate(est)
        elif resumed:  # everything was estimated (and shown) when it was first submitted
            logger.info("resuming: nothing new to submit ({} row(s) in flight)", est.rows)
        result = _drive(run, pool, engine, on_progress=on_progress)
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
            unpriced=_unpriced(run),
        )
    finally:
        run.close()


def _unpriced(run: RunDir) -> int:
    return sum(r["unpriced"] or 0 for r in run.store.cost_by_model())


def online_estimate(run: RunDir, src: source.Source, *, every_row: bool = False) -> Estimate:
    """What the rows without an answer (`every_row`: all of the run's rows) should cost through
    synchronous calls: their requests are built (in a scratch folder, no files kept) and
    estimated like batch chunks."""
    spec = run.spec
    model = spec.models[0].name
    per_row = spec.max_tokens or pricing.DEFAULT_COMPLETION_ESTIMATE
    overrides = pricing.overrides_from_spec(spec)
    pending = None if every_row else run.store.pending_row_idxs()
    rows: list[tuple[int, int, float | None]] = []
    if pending is None or pending:
        with tempfile.TemporaryDirectory(dir=run.path, prefix="estimate-") as tmp:
            for c in chunking.build_chunks(
                src,
                spec.model_copy(update={"batch_size": 50_000}),
                model=model,
                out_dir=Path(tmp),
                first_chunk_no=1,
                only_rows=pending,
                estimate_tokens=pricing.estimate_text_tokens_fast,
                fsync=False,
            ):
                n = len(c.row_idxs)
                if n:
                    cost = pricing.estimate_cost(
                        model, c.est_prompt_tokens, per_row * n, batch=False, overrides=overrides
                    )
                    rows.append((c.est_prompt_tokens, n, cost))
    est = _estimate_of(model, rows, per_row, spec.max_tokens)
    est.prices = "synchronous"
    return est


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
    # Each finished file is checked in a thread while the next one is built (both halves run
    # in polars, which releases the GIL).
    checker = ThreadPoolExecutor(max_workers=1)
    pending_checks = []
    for c in chunking.build_chunks(
        src,
        spec,
        model=model,
        out_dir=out_dir,
        first_chunk_no=1,
        estimate_tokens=pricing.estimate_text_tokens_fast,
        fsync=False,  # throwaway files: durability buys nothing here
    ):
        skipped += len(c.skipped)
        if c.row_idxs:
            n = len(c.row_idxs)
            cost = pricing.estimate_cost(
                model, c.est_prompt_tokens, per_row * n, batch=True, overrides=overrides
            )
            est_rows.append((c.est_prompt_tokens, n, cost))
            pending_checks.append(
                checker.submit(validate.check_files, [c.path], spec.batch_endpoint(model))
            )
    est = _estimate_of(model, est_rows, per_row, spec.max_tokens)
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
        "queued": est.rows,
        "succeeded": 0,
        "failed": 0,
        "skipped": skipped,
    }
    return RunReport(
        run_dir, counts, 0.0, StopReason.DRY_RUN, None, est, False, spec.max_cost, checks=checks
    )


def _estimate_of(
    model_by: str | None,
    chunks: list[tuple[int, int, float | None]],
    per_row: int,
    max_tokens: int | None,
    models: list[str] | None = None,
) -> Estimate:
    """An Estimate from (prompt tokens, rows, cost) per chunk; `models` names each chunk's model."""
    assumption = (
        f"--max-tokens {max_tokens} per row (an upper bound)"
        if max_tokens
        else f"{pricing.DEFAULT_COMPLETION_ESTIMATE} completion tokens per row (no --max-tokens given)"
    )
    by_model: dict[str, dict[str, Any]] = {}
    for i, (tokens, n, c) in enumerate(chunks):
        name = models[i] if models else (model_by or "?")
        m = by_model.setdefault(
            name,
            {"chunks": 0, "rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0},
        )
        m["chunks"] += 1
        m["rows"] += n
        m["prompt_tokens"] += tokens
        m["completion_tokens"] += per_row * n
        m["cost_usd"] = None if c is None or m["cost_usd"] is None else m["cost_usd"] + c
    costs = [m["cost_usd"] for m in by_model.values()]
    return Estimate(
        len(chunks),
        sum(n for _, n, _ in chunks),
        sum(t for t, _, _ in chunks),
        per_row * sum(n for _, n, _ in chunks),
        None if any(c is None for c in costs) else sum(costs),
        assumption,
        by_model,
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
        run.store.outcomes_frame(),
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
    run = open_existing(Path(run_dir))
    try:
        return merge_run(run, out)
    finally:
        run.close()


def missing(run_dir: Path) -> tuple[Path, dict[str, int]]:
    """Write <run-dir>/missing_rows.csv: every row without an answer, with its status and reason."""
    run = open_existing(Path(run_dir))
    try:
        rows = run.store.rows_by_status(("pending", "queued", "failed", "skipped"))
        tmp = run.missing_rows.with_suffix(".csv.tmp")
        by_status: dict[str, int] = {}
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["row_idx", "row_id", "status", "attempts", "error_class", "error"])
            for r in rows:
                status = "missing" if r["status"] in ("pending", "queued") else r["status"]
                by_status[status] = by_status.get(status, 0) + 1
                w.writerow(
                    [
                        r["row_idx"],
                        r["row_id"],
                        status,
                        r["attempts"],
                        r["error_class"] or "",
                        r["error"] or "",
                    ]
                )
        os.replace(tmp, run.missing_rows)
        return run.missing_rows, by_status
    finally:
        run.close()


def retry_missing(
    run_dir: Path,
    *,
    models: Sequence[str] | None = None,
    poll_interval: float | None = None,
    api_key_file: Path | None = None,
    base_url: str | None = None,
    wait: bool = True,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunReport:
    """Send every failed or skipped row again (fresh retry budget), on the pool given or the run's own."""
    run = open_existing(Path(run_dir))
    spec = run.spec
    updates: dict[str, Any] = {}
    if models:
        updates["models"] = [
            spec.model_entry(m) if m in spec.model_names else ModelEntry(name=m) for m in models
        ]
    if poll_interval is not None:
        updates["poll_interval"] = poll_interval
    spec = spec.model_copy(update=updates)
    run.save_spec(spec)
    try:
        src = validate_inputs(spec)
        pool = make_pool(spec, api_key_file=api_key_file, base_url=base_url)
        n = run.store.reset_rows(("failed", "skipped"))
        logger.info("{} failed/skipped row(s) put back in the queue", n)
        engine = _batch_engine()(run, pool, wait=wait, on_progress=on_progress, src=src)
        result = _drive(run, pool, engine, on_progress=on_progress)
        final = merge_run(run, src=src) if result.stopped_because != StopReason.NO_WAIT else None
        return RunReport(
            Path(run_dir),
            result.counts,
            result.spent,
            result.stopped_because,
            final,
            None,
            True,
            spec.max_cost,
        )
    finally:
        run.close()


def cancel(run_dir: Path, *, api_key_file: Path | None = None, base_url: str | None = None) -> int:
    run = open_existing(Path(run_dir))
    try:
        pool = make_pool(run.spec, api_key_file=api_key_file, base_url=base_url)
        return _batch_engine()(run, pool).cancel_all()
    finally:
        run.close()


def status(run_dir: Path) -> dict[str, Any]:
    """Everything `batchops status` shows, as plain data (also `status --json`)."""
    run = open_existing(Path(run_dir))
    try:
        return status_of(run)
    finally:
        run.close()


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

    run = open_existing(Path(run_dir))
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


def watch(
    run_dir: Path,
    *,
    retry: bool = False,
    poll_interval: float | None = None,
    api_key_file: Path | None = None,
    base_url: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RunReport:
    """`batchops watch`: poll the run's remote batches, collecting each as it ends, until none
    is in flight. With `retry`, also re-queue what failed and submit it (the whole engine loop)."""
    run = open_existing(Path(run_dir))
    try:
        if poll_interval is not None:  # for this invocation only; the saved job is unchanged
            run.spec = run.spec.model_copy(update={"poll_interval": poll_interval})
        pool = make_pool(run.spec, api_key_file=api_key_file, base_url=base_url)
        engine = _batch_engine()(run, pool, on_progress=on_progress, sleep=sleep)
        if retry:  # the same loop as `run`: batch or online lane, whichever the pool is on
            result = _drive(run, pool, engine, on_progress=on_progress)
            stopped = result.stopped_because
        else:
            engine.reconcile()  # creates nothing: re-attaches what a crash left half-done
            while True:
                engine.poll()
                engine.report_progress()
                if not run.store.chunks("submitted"):
                    break
                engine.sleep(run.spec.poll_interval)
            c = run.store.counts()
            stopped = StopReason.ROWS_LEFT if c["pending"] or c["queued"] else None
        final = merge_run(run) if run.store.counts()["succeeded"] else None
        return RunReport(
            Path(run_dir),
            run.store.counts(),
            run.store.spent(),
            stopped,
            final,
            None,
            True,
            run.spec.max_cost,
        )
    finally:
        run.close()


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
            estimate_usd = _online_estimate_or_none(run)
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


def _online_estimate_or_none(run: RunDir) -> float | None:
    """The synchronous-price estimate of every row of an online run (the figure `run` printed
    before its first request); None when the source is no longer readable."""
    try:
        src = source.open_source(run.spec)
    except (InputError, OSError):
        return None
    return online_estimate(run, src, every_row=True).cost_usd


# The Python API polls more often than the CLI (30 s): a notebook job is usually small, and a
# cell that says nothing for half a minute looks hung.
API_POLL_INTERVAL = 5.0


def run(
    data: pd.DataFrame | str | Path,
    *,
    prompt: str,
    model: str | Sequence[str],
    run_dir: str | Path,
    id_column: str | None = None,
    schema: Any = None,
    progress: bool | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Run a table through the model(s); return it with the merged columns.

    `data`: a pandas DataFrame, or the path of a CSV / Parquet / JSONL file. `schema`: a
    pydantic model class (or a JSON Schema dict) for structured outputs: each answer is
    validated and its fields come back as typed columns. Other keywords mirror the `run`
    options in snake_case (mode, system, batch_size, poll_interval, max_retries, endpoint,
    body_extra, schema_prefix, base_url, cleanup, wait, …); poll_interval defaults to 5 s here.

    `progress`: show the estimate and a progress display (a live one in Jupyter with
    ipywidgets, else a line on stderr when something changed) [default: in a notebook or on a
    terminal]. Errors name the keyword arguments (`prompt=`), not the CLI's flags.

    A DataFrame comes back as itself (same index, same dtypes) with the merged columns added;
    it is saved as <run_dir>/source.parquet, so values and types round-trip. The run directory
    is durable: calling again with the same arguments (e.g. after a kernel restart) resumes
    instead of paying twice.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    run_keys = {"dry_run", "wait", "api_key_file", "base_url"}
    cleanup, keep_latest = options.pop("cleanup", False), options.pop("keep_latest", False)
    if options.get("poll_interval") is None:
        options["poll_interval"] = API_POLL_INTERVAL
    if cleanup or keep_latest:
        # Before the frame is written: starting over moves the whole run dir aside.
        backup = start_over(run_dir, keep_backup=bool(keep_latest))
        if backup:
            logger.info("previous run kept as {}", backup)
    frame: pd.DataFrame | None = None
    created: list[Path] = []  # what this call wrote before the job could be checked
    if isinstance(data, pd.DataFrame):
        frame = data
        folder = run_dir
        while not folder.exists():  # every folder _save_frame is about to create, innermost first
            created.append(folder)
            folder = folder.parent
        saved = run_dir / FRAME_SOURCE
        existed = saved.exists()
        source_path = str(_save_frame(data, run_dir))
        if not existed:
            created.insert(0, saved)
    else:
        source_path = str(data)
    models = [model] if isinstance(model, str) else list(model)
    try:
        spec = build_spec(
            source_path=source_path,
            prompt=prompt,
            models=models,
            id_column=id_column,
            schema=schema,
            **{k: v for k, v in options.items() if k not in run_keys},
        )
        with _api_progress(progress) as (on_estimate, on_progress):
            report = run_job(
                spec,
                run_dir,
                on_estimate=on_estimate,
                on_progress=on_progress,
                **{k: v for k, v in options.items() if k in run_keys},
            )
    except InputError as exc:
        if not (run_dir / "state.db").exists():  # no run started: leave nothing behind
            for path in created:
                if path.is_dir():
                    shutil.rmtree(path / "dry-run", ignore_errors=True)
                    _rmdir_if_empty(path)
                else:
                    path.unlink(missing_ok=True)
        shown = "the DataFrame" if frame is not None else None
        raise type(exc)(_as_keywords(str(exc), source_path, shown)) from None
    if report.final_output is None:
        raise RunIncomplete(f"{run_dir}: run not finished ({report.summary()})")
    out = report.final_output
    if merging.format_of(out) != "parquet":  # typed merged columns for the returned frame
        out = merge(run_dir, run_dir / "final_output.parquet")
    return _result_frame(out, frame)


def _rmdir_if_empty(path: Path) -> None:
    with suppress(OSError):
        path.rmdir()


_KEYWORDS = {"model", "schema", "base_url", "api_key_file", "cleanup", "keep_latest", "wait"}
_KEYWORDS |= {"max_retries", "retry_delay", "retry_backoff", "retry_max_delay", "retry_on"}


def _as_keywords(message: str, source_path: str, shown_source: str | None) -> str:
    """An error written for the CLI, in the Python API's words: `--batch-size` → `batch_size=`,
    `--csv`/`--input` → `data`, and the saved frame's path → "the DataFrame"."""
    import re

    from batchops.spec import JobSpec

    known = set(JobSpec.model_fields) | _KEYWORDS

    def keyword(m: re.Match[str]) -> str:
        name = m.group(1).replace("-", "_")
        if name in ("csv", "input"):
            return "data"
        if name == "models":
            name = "model"
        return f"{name}=" if name in known else m.group(0)

    text = re.sub(r"--([a-z][a-z0-9-]*)", keyword, message)
    text = re.sub(r"(\w=)(?=[\s:;,)]|$)", "\\1…", text)  # "prompt=…: placeholder {x} …"
    if shown_source:
        text = text.replace(source_path, shown_source)
    return text


class _PrintedProgress:
    """The Python API's progress: the estimate line, then a live display in Jupyter (with
    ipywidgets) or plain lines on stderr; the library's logger stays off."""

    def __init__(self) -> None:
        import sys

        from batchops.progress import ProgressDisplay, make_console

        console = make_console()
        live = console.is_jupyter and _has_ipywidgets()
        self._stream = sys.stderr
        self.display = ProgressDisplay(console, live=live, emit=self._print)

    def _print(self, line: str) -> None:
        print(f"batchops: {line}", file=self._stream, flush=True)

    def estimate(self, est: Estimate) -> None:
        from batchops.progress import fmt_usd

        cost = fmt_usd(est.cost_usd) if est.cost_usd is not None else "unknown (no price)"
        self._print(f"estimate: {est.rows} rows, ~{est.prompt_tokens} prompt tokens, cost ≈ {cost}")


def _has_ipywidgets() -> bool:
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


@contextmanager
def _api_progress(
    progress: bool | None,
) -> Iterator[tuple[Callable[[Estimate], None] | None, Callable[[Progress], None] | None]]:
    if progress is None:  # on where a person watches: a notebook or a terminal
        import sys

        from batchops.progress import make_console

        progress = make_console().is_jupyter or sys.stderr.isatty()
    if not progress:
        yield None, None
        return
    printed = _PrintedProgress()
    with printed.display as display:
        yield printed.estimate, display


FRAME_SOURCE = "source.parquet"


def _save_frame(df: pd.DataFrame, run_dir: Path) -> Path:
    """Write the DataFrame as <run_dir>/source.parquet, unless the same bytes are there already
    (a resumed run must find its source unchanged). A different frame in a run dir that already
    holds a run is refused: its rows' answers would be joined onto other rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [str(c) for c in df.columns]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"DataFrame has duplicate column names: {dup}")
    arrays = []
    for name in df.columns:
        col = df[name]
        try:
            arrays.append(pa.array(col, from_pandas=True))
        except (pa.ArrowException, TypeError, ValueError):  # mixed objects: their text
            arrays.append(pa.array([None if _isna(v) else str(v) for v in col], pa.string()))
    table = pa.Table.from_arrays(arrays, names=names)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FRAME_SOURCE
    tmp = run_dir / f".{FRAME_SOURCE}.{os.getpid()}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
        return path
    if path.exists() and (run_dir / "state.db").exists():
        tmp.unlink()
        raise InputError(
            f"{run_dir}: holds a run of a different DataFrame; pass cleanup=True (or "
            "keep_latest=True) to start over, or use another run_dir"
        )
    os.replace(tmp, path)
    return path


def _isna(v: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(v))  # None, NaN, NaT, pd.NA
    except (TypeError, ValueError):  # list-likes are values, not missing
        return False


def _result_frame(path: Path, frame: pd.DataFrame | None) -> pd.DataFrame:
    """The merged Parquet as pandas; for a DataFrame input, that frame plus the added columns
    (its own index and dtypes; counts as nullable Int64 since failed rows have none)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    mapper = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get
    if frame is None:
        return table.to_pandas(types_mapper=mapper)
    added = table.select(table.column_names[frame.shape[1] :]).to_pandas(types_mapper=mapper)
    out = pd.concat([frame.reset_index(drop=True), added], axis=1)
    out.index = frame.index
    return out


def _drive(
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


def _batch_engine() -> type[BatchEngine]:
    from batchops.engine import BatchEngine

    return BatchEngine
