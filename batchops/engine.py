"""The batch loop: build → upload → create → poll → collect → re-queue, until every row is settled.

Durability: before each remote call that creates something the chunk's state says so
(`uploading`, `submitting`); remote objects carry the run id, chunk id and attempt (file name and
batch metadata). On start, `reconcile()` looks remote objects up and re-attaches instead of
creating them again, so a crash at any point never submits a chunk twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import wraps
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
from loguru import logger

from batchops import chunking, dedup, pricing, source, structured
from batchops.backends import Backend, RemoteBatch, RemoteError, SubmitRequest
from batchops.cleanup import RemoteCleanup, batch_items, input_item
from batchops.hotpath import gc_paused
from batchops.policy import (
    EXHAUSTING,
    Action,
    Scope,
    classify,
    counts_as_attempt,
    decide,
    row_retryable,
    set_aside_scope,
)
from batchops.progress import fmt_usd
from batchops.providers import Pool
from batchops.records import AnswerRun, BadLine, RowOutcome, Usage
from batchops.rundir import RunDir
from batchops.spec import ModelEntry, PriceOverride
from batchops.states import (
    INTENT_CHUNKS,
    UNSENT_CHUNKS,
    BatchState,
    ChunkState,
    RowState,
    StopReason,
)
from batchops.store import Applied, ChunkRow, Store

# How far back (seconds before the run was created) reconcile looks in the remote batch list.
RECONCILE_SLACK = 3600
# A result file with fewer lines than the batch reports done is downloaded this often in all.
DOWNLOAD_TRIES = 3
# Tries of one upload or create that fails transiently (each failure looked up before the
# next try: the call may have been carried out) before the model/key pair is set aside.
SUBMIT_TRIES = 3
# Result lines parsed and recorded per transaction while collecting (memory per slice, not per
# batch file): half a full batch of short answers is one slice, written in row order (lines
# come in any order; sorted, the updates walk the table forward: ~2.5x less SQLite work a row
# than 5,000 unsorted); long answers cut the slice at RECORD_SLICE_BYTES of answer text.
# ~1.2 KB a held row while it is recorded: 25,000 rows keep collection's peak ~30 MB.
RECORD_SLICE = 25_000
RECORD_SLICE_BYTES = 12 << 20
# At most this share of a run's time goes to counting rows for its progress display.
PROGRESS_COUNT_SHARE = 0.02
# Chunk files uploaded at once while the next ones are built (each upload is I/O on both ends).
UPLOAD_WORKERS = 3

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _in_run(fn: F) -> F:
    """Every log record inside carries the run id (the DEBUG file shows it as run=…)."""

    @wraps(fn)
    def wrapper(self: BatchEngine, *args: Any, **kwargs: Any) -> Any:
        with logger.contextualize(run=self.run.run_id):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _on_chunk(fn: F) -> F:
    """Every log record inside carries the run, chunk and batch ids of the chunk (first argument;
    the batch id from the second argument when it is a remote batch object)."""

    @wraps(fn)
    def wrapper(self: BatchEngine, chunk: ChunkRow, *args: Any, **kwargs: Any) -> Any:
        batch = args[0].id if args and isinstance(args[0], RemoteBatch) else None
        with logger.contextualize(
            run=self.run.run_id, chunk=chunk.chunk_id, batch=batch or chunk.batch_id
        ):
            return fn(self, chunk, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class Progress:
    """A snapshot for progress displays."""

    counts: dict[str, int]
    in_flight: int
    remote: dict[str, int]
    spent: float


class ProgressCounts:
    """Row counts for a progress display. Counting costs time in proportion to the rows
    without an answer (~35 ms a million): taken at every poll, a run of N rows would spend
    N × polls on it (~45 s of CPU in a 5M-row run at 0.5 s polls). So the counts are taken
    again only once 1/PROGRESS_COUNT_SHARE times their last cost has passed (at 30 s polls,
    every poll), and always when `fresh` (the last report of a run)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.clock = store, clock
        self._last: tuple[dict[str, int], float, float] | None = None  # counts, when, cost

    def get(self, *, fresh: bool = False) -> dict[str, int]:
        now = self.clock()
        if not fresh and self._last is not None:
            counts, at, cost = self._last
            if now - at < cost / PROGRESS_COUNT_SHARE:
                return counts
        counts = self.store.counts()
        self._last = (counts, now, self.clock() - now)
        return counts


@dataclass
class EngineResult:
    counts: dict[str, int]
    stopped_because: StopReason | None = None  # None: nothing was left to do
    spent: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Tally:
    """What collecting one batch did so far, over its slices."""

    applied: Applied = field(default_factory=Applied)
    cost: float = 0.0
    unpriced: int = 0


class _GaveUp(Exception):
    """A creating call failed transiently SUBMIT_TRIES times; nothing was created."""

    def __init__(self, exc: RemoteError) -> None:
        super().__init__(str(exc))
        self.exc = exc


class BatchEngine:
    def __init__(
        self,
        run: RunDir,
        pool: Pool,
        *,
        wait: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        src: source.Source | None = None,
    ) -> None:
        self.run = run
        self.store = run.store
        self.spec = run.spec
        self.pool = pool
        self.wait = wait
        self.on_progress = on_progress
        self.sleep = sleep
        self._src = src  # opened on first use: cancel and watch never read the table
        self.budget_hit = False
        # Learned from token_limit_exceeded (see learn_token_limit): the limit paced at, and the
        # smallest in-flight total a model refused.
        self.learned_limit: dict[str, int] = {}
        self.refused_tokens: dict[str, int] = {}
        # Rows per chunk for a model whose chunks were over its token limit on their own.
        self.row_cap: dict[str, int] = {}
        # Chunks whose batch a poll just saw completed, while they wait to be collected: the
        # remote no longer counts them against the enqueued limit (see poll(refill=True)).
        self.done_remote: set[int] = set()
        # Uploads started as soon as a chunk is built (see _upload_ahead): chunk id → call.
        self._uploads: dict[int, Future[str]] = {}
        self._uploader: ThreadPoolExecutor | None = None
        # Deletes of finished batches' remote objects, durable (see batchops/cleanup.py).
        self.cleanup = RemoteCleanup(self.store, pool, keep=run.spec.keep_remote_files)
        # Off after the first failed upload ahead: the one-by-one path, with its lookups and
        # give-up accounting, takes over for the rest of this invocation.
        self._ahead = spec_allows_ahead(run.spec)
        # Set by the run loop (and `batchops run` before its first build): each chunk starts
        # uploading as soon as it is built. Off for a bare build_pending (estimates, tests).
        self.upload_while_building = False
        self.progress_counts = ProgressCounts(self.store)

    @property
    def src(self) -> source.Source:
        if self._src is None:
            self._src = source.open_source(self.spec)  # a full validation pass over the file
        return self._src

    # ------------------------------------------------------------------ planning
    @_in_run
    def ensure_rows(self) -> None:
        register_rows(self.run, self.src)
        dedup.pair_run(self.store, self.src, self.spec)  # identical requests: sent once

    def src_frames(self, columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
        return source.iter_frames(self.src, columns=columns)

    @_in_run
    def build_pending(self) -> int:
        """Pack every pending row into chunk files for the current model; returns chunks built."""
        current = self.pool.current()
        n_pending = self.store.ready_pending_count()
        if not n_pending or current is None:
            return 0
        # Every row of the slice pending (a fresh run): the builder reads the slice as it is,
        # with no list of rows held; otherwise the pending rows as an int64 array.
        every = n_pending == self.store.row_count() == self.src.n_rows
        pending = None if every else self.store.pending_row_array()
        model = current[0].name
        self.run.inputs.mkdir(parents=True, exist_ok=True)
        built = 0
        est_completion = self.spec.max_tokens or pricing.DEFAULT_COMPLETION_ESTIMATE
        spec = self.spec
        if model in self.row_cap:
            spec = spec.model_copy(update={"batch_size": min(spec.batch_size, self.row_cap[model])})
        for chunk in chunking.build_chunks(
            self.src,
            spec,
            model=model,
            out_dir=self.run.inputs,
            first_chunk_no=self.store.next_chunk_no(),
            only_rows=pending,
            estimate_tokens=pricing.estimate_text_tokens_fast,
        ):
            est_cost = pricing.estimate_cost(
                model,
                chunk.est_prompt_tokens,
                est_completion * len(chunk.row_idxs),
                batch=True,
                overrides=self.overrides(),
            )
            if self.store.add_chunk(chunk, model, est_cost) is not None:
                built += 1
                if self.upload_while_building and len(self._uploads) < UPLOAD_WORKERS:
                    self._upload_ahead(chunk.chunk_no)
                logger.debug(
                    "chunk {} built: {} rows, {} bytes, ~{} prompt tokens, model {}",
                    chunk.chunk_no,
                    len(chunk.row_idxs),
                    chunk.n_bytes,
                    chunk.est_prompt_tokens,
                    model,
                )
            for s in chunk.skipped:
                logger.warning("row {} skipped: {}", s.row_idx, s.reason)
        if built:
            logger.info(
                "{} chunk file(s) built for {} pending row(s) (model {})",
                built,
                n_pending,
                model,
            )
        return built

    # ------------------------------------------------------------------ uploads ahead
    def _upload_ahead(self, chunk_id: int) -> None:
        """Start uploading a chunk the moment it is built, UPLOAD_WORKERS at a time, while the
        next one is built: its `uploading` intent is committed first (reconcile finds it after
        a crash), and only the main thread writes the store (see _finish_uploads)."""
        current = self.pool.current()
        if not self._ahead or current is None:
            return
        entry, key = current
        backend = self.pool.backend(entry.name, key.key_id)
        chunk = self.store.chunk(chunk_id)
        if not backend.uploads_files or chunk.model != entry.name:
            return
        name = self.remote_file_name(chunk)
        with logger.contextualize(run=self.run.run_id, chunk=chunk_id):
            logger.debug("chunk {}: built → uploading (key {}, ahead)", chunk_id, key.label)
        chunk = self.store.move_chunk(
            chunk_id,
            ChunkState.UPLOADING,
            key_id=key.key_id,
            event=f"uploading {Path(chunk.path).name} with key {key.label}",
        )
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="upload")
        path = Path(chunk.path)
        with logger.contextualize(run=self.run.run_id, chunk=chunk_id):
            self._uploads[chunk_id] = self._uploader.submit(
                logger.contextualize(run=self.run.run_id, chunk=chunk_id)(backend.upload),
                path,
                name,
            )

    def _fill_uploads(self) -> None:
        """Keep up to UPLOAD_WORKERS built chunks uploading (a window, not every file at once:
        a run stopped early has not uploaded files it never sends)."""
        if not self._ahead:
            return
        for chunk in self.store.chunks(ChunkState.BUILT):
            if len(self._uploads) >= UPLOAD_WORKERS:
                return
            if chunk.chunk_id not in self._uploads and Path(chunk.path).is_file():
                self._upload_ahead(chunk.chunk_id)

    def _finish_uploads(self, only: int | None = None) -> None:
        """Wait for the uploads started ahead (or the one of chunk `only`) and record each:
        uploaded, or (refused) built again; an ambiguous failure stays `uploading` for
        reconcile to look up."""
        if only is None:
            uploads, self._uploads = self._uploads, {}
        else:
            uploads = {only: self._uploads.pop(only)} if only in self._uploads else {}
        for chunk_id, call in uploads.items():
            try:
                file_id = call.result()
            except (RemoteError, OSError) as exc:
                # The one-by-one path takes it from here (lookups, give-up accounting, a
                # deleted file re-packed).
                self._ahead = False
                logger.warning("chunk {}: upload failed: {}", chunk_id, exc)
                if not isinstance(exc, RemoteError) or exc.nothing_created:
                    self.store.move_chunk(chunk_id, ChunkState.BUILT)
                continue
            self.store.move_chunk(
                chunk_id, ChunkState.UPLOADED, file_id=file_id, event=f"uploaded as {file_id}"
            )
            logger.debug("chunk {} uploaded as {}", chunk_id, file_id)
        if not self._uploads and self._uploader is not None:
            self._uploader.shutdown(wait=True)
            self._uploader = None

    def overrides(self) -> dict[str, PriceOverride]:
        return pricing.overrides_from_spec(self.spec)

    # ------------------------------------------------------------------ the loop
    @_in_run
    def execute(self) -> EngineResult:
        self.upload_while_building = True
        restore_pool(self.store, self.pool)
        save_pool_state(self.store, self.pool)
        self.ensure_rows()
        self.reconcile()
        self.build_pending()
        stopped: StopReason | None = None
        while True:
            self.submit_ready()
            in_flight = self.store.chunks(ChunkState.SUBMITTED)
            if not in_flight:
                if self.store.has_pending() and self.pool.current() and not self.budget_hit:
                    if self.build_pending():
                        continue
                    wait = self.store.seconds_until_ready()
                    if wait > 0:  # failed rows wait before they are sent again
                        self.sleep(min(wait, self.spec.poll_interval))
                        continue
                waiting = self.store.chunks(*UNSENT_CHUNKS, *INTENT_CHUNKS)
                if waiting and self.pool.current() and not self.budget_hit:
                    # Nothing in flight but a chunk could not be sent (a transient error, an
                    # ambiguous create to reconcile, a token limit learned at zero): wait and
                    # try again rather than give up on it.
                    self.sleep(self.spec.poll_interval)
                    continue
                stopped = self._why_stopped()
                break
            if not self.wait:
                stopped = StopReason.NO_WAIT
                break
            self.report_progress()
            self.sleep(self.spec.poll_interval)
            self.poll(refill=True)
            if self.store.has_pending() and self.pool.current():
                self.build_pending()
        self._finish_uploads()
        self.finish_deletes()
        explain_stop(self.store, stopped)
        self.report_progress(fresh=True)
        return EngineResult(self.store.counts(), stopped, self.store.spent())

    def _why_stopped(self) -> StopReason | None:
        counts = self.store.counts()
        if counts["pending"] or counts["queued"]:
            if self.pool.current() is None:
                return StopReason.POOL_EXHAUSTED
            if self.budget_hit:
                return StopReason.BUDGET
        return None

    def exhaust(
        self,
        chunk: ChunkRow,
        key_id: str | None,
        reason: str,
        batch_id: str | None = None,
        *,
        scope: Scope = Scope.MODEL,
        error_class: str = "quota",
    ) -> None:
        """Take a model/key (or what `scope` names) out of the pool (see `record_exhaustion`)."""
        if (
            record_exhaustion(
                self.store,
                self.pool,
                chunk.model,
                key_id,
                reason,
                scope=scope,
                chunk_id=chunk.chunk_id,
                batch_id=batch_id,
                error_class=error_class,
            )
            and self.spec.wait_after_switch
        ):
            self.sleep(self.spec.wait_after_switch)

    def report_progress(self, *, fresh: bool = False) -> None:
        if self.on_progress is None:
            return
        remote: dict[str, int] = {}
        for b in self.store.batches():
            if b["collected_at"] is None:
                remote[b["status"]] = remote.get(b["status"], 0) + 1
        self.on_progress(
            Progress(
                self.progress_counts.get(fresh=fresh),
                len(self.store.chunks(ChunkState.SUBMITTED)),
                remote,
                self.store.spent(),
            )
        )

    # ------------------------------------------------------------------ submitting
    def token_limit(self, model: str) -> int | None:
        entry = self.spec.model_entry(model) if model in self.spec.model_names else None
        configured = (entry.token_limit if entry else None) or self.spec.token_limit
        learned = self.learned_limit.get(model)
        limits = [x for x in (configured, learned) if x]
        return min(limits) if limits else None

    def in_flight_tokens(self, model: str) -> int:
        return sum(
            c.est_tokens
            for c in self.store.chunks(ChunkState.SUBMITTING, ChunkState.SUBMITTED)
            if c.model == model and c.chunk_id not in self.done_remote
        )

    def fits_token_limit(self, chunk: ChunkRow) -> bool:
        limit = self.token_limit(chunk.model)
        if limit is None:
            return True
        in_flight = self.in_flight_tokens(chunk.model)
        # A chunk larger than the limit on its own still goes when nothing else is in flight.
        return in_flight == 0 or in_flight + chunk.est_tokens <= limit

    def _split_or_fail(self, chunk: ChunkRow, batch_id: str, text: str) -> None:
        """A chunk over the enqueued-token limit on its own: its rows are re-packed into chunks
        of half the size; a single request over the limit fails, saying so."""
        if chunk.n_rows > 1:
            cap = max(1, chunk.n_rows // 2)
            self.row_cap[chunk.model] = min(cap, self.row_cap.get(chunk.model, cap))
            reason = (
                f"batch {batch_id} failed: {text}; chunk of {chunk.n_rows} rows is over the "
                f"limit on its own: re-packed in chunks of {self.row_cap[chunk.model]}"
            )
            logger.warning(reason)
            self.store.abandon_chunk(chunk.chunk_id, reason)
            return
        self.store.requeue_chunk_rows(
            chunk.chunk_id,
            f"the request alone is over {chunk.model}'s enqueued-token limit ({text})",
            "token_limit",
            counts=True,
            max_retries=0,
        )

    def learn_token_limit(self, model: str, accepted: int, refused: int) -> None:
        """A token_limit_exceeded refusal bounds the model's enqueued-token limit: the `accepted`
        tokens in flight were taken, `refused` (them + the refused chunk) was too much. Pace at the
        midpoint. Pacing at the lower bound made a chunk a few tokens larger than the one that
        finished wait a whole batch duration (bench_drain: 5 waves instead of 4, drain 1.30x the
        ideal); a midpoint that is too high costs one more refusal, which narrows the bounds."""
        accepted = max(0, accepted)
        hi = self.refused_tokens.get(model)
        # A refusal below what was accepted before: the limit (or others' use of it) changed.
        hi = refused if hi is None or hi <= accepted else min(hi, refused)
        self.refused_tokens[model] = hi
        self.learned_limit[model] = max(1, (accepted + hi) // 2)

    def fits_budget(self, chunk: ChunkRow) -> bool:
        cap = self.spec.max_cost
        if cap is None:
            return True
        in_flight = sum(
            c.est_cost or 0.0
            for c in self.store.chunks(ChunkState.SUBMITTING, ChunkState.SUBMITTED)
        )
        return self.store.spent() + in_flight + (chunk.est_cost or 0.0) <= cap + 1e-12

    @_in_run
    def submit_ready(self) -> None:
        self._finish_uploads()
        if self.store.chunks(*INTENT_CHUNKS):
            self.reconcile()  # a call failed ambiguously earlier in this invocation
        unsent = self.store.chunks(*UNSENT_CHUNKS)
        for chunk in unsent:
            # This file and the next ones go up UPLOAD_WORKERS at a time, while batches of
            # the files already up are created.
            self._fill_uploads()
            if chunk.chunk_id in self._uploads:
                self._finish_uploads(chunk.chunk_id)
                chunk = self.store.chunk(chunk.chunk_id)
                if chunk.state not in UNSENT_CHUNKS:  # an ambiguous upload: reconcile decides
                    continue
            current = self.pool.current()
            if current is None:
                return
            entry, key = current
            if chunk.model != entry.name:
                # Built for a model that is now exhausted: re-render its rows for the current model.
                self._drop_unsent(
                    chunk, f"model {chunk.model} exhausted; rows re-packed for {entry.name}"
                )
                continue
            if not Path(chunk.path).is_file():
                # The chunk file was deleted (e.g. someone cleaned inputs/): its rows are
                # rebuilt from the source, which renders the same requests.
                self._drop_unsent(chunk, f"chunk file {chunk.path} is missing; rows re-packed")
                continue
            if not self.fits_token_limit(chunk):
                continue
            if not self.fits_budget(chunk):
                if not self.budget_hit:
                    logger.warning(
                        "budget: submitting chunk {} (est {}) would pass --max-cost {} "
                        "(spent {}); no more chunks are submitted",
                        chunk.chunk_id,
                        fmt_usd(chunk.est_cost or 0.0),
                        fmt_usd(self.spec.max_cost or 0.0),
                        fmt_usd(self.store.spent()),
                    )
                self.budget_hit = True
                return
            try:
                self._submit(chunk, key.key_id, key.label)
            except RemoteError as exc:
                scope = set_aside_scope(exc.cls, exc.scope, exc.status if exc.refused else None)
                if scope is not None:
                    self.exhaust(
                        chunk,
                        key.key_id,
                        f"{exc.what}: {exc.cls} (HTTP {exc.status}, {exc.code}): {exc.message}",
                        scope=scope,
                        error_class=exc.cls,
                    )
                    continue
                if exc.cls == "token_limit":
                    # Some providers (Azure fail-fast) refuse at create time: same as a failed batch.
                    others = self.in_flight_tokens(chunk.model)
                    self.learn_token_limit(chunk.model, others, others + chunk.est_tokens)
                    continue
                logger.warning("chunk {}: {}; will try again", chunk.chunk_id, exc)
                return

    @_on_chunk
    def _drop_unsent(self, chunk: ChunkRow, reason: str) -> None:
        self.cleanup.plan(input_item(chunk))  # its uploaded file, due once abandoned
        self.store.abandon_chunk(chunk.chunk_id, reason)
        self.cleanup.start(chunk.chunk_id)

    def remote_file_name(self, chunk: ChunkRow) -> str:
        return f"{self.run.run_id}-c{chunk.chunk_id:06d}-a{chunk.attempt}.jsonl"

    def metadata(self, chunk: ChunkRow) -> dict[str, str]:
        return {
            "batchops_run": self.run.run_id,
            "batchops_chunk": str(chunk.chunk_id),
            "batchops_attempt": str(chunk.attempt),
        }

    def submit_request(self, chunk: ChunkRow) -> SubmitRequest:
        return SubmitRequest(
            chunk_path=Path(chunk.path),
            file_ref=chunk.file_id,
            model=chunk.model,
            endpoint=self.spec.batch_endpoint(chunk.model),
            completion_window=self.spec.completion_window,
            tag=self.metadata(chunk),
            display_name=self.remote_file_name(chunk).removesuffix(".jsonl"),
        )

    @_on_chunk
    def _submit(self, chunk: ChunkRow, key_id: str, key_label: str) -> None:
        backend = self.pool.backend(chunk.model, key_id)
        if chunk.state == ChunkState.UPLOADED and chunk.key_id != key_id:
            # The file belongs to another key's account: upload it again under this key.
            self.cleanup.plan(input_item(chunk))  # the old file, due once dropped
            chunk = self.store.move_chunk(chunk.chunk_id, ChunkState.BUILT, file_id=None)
            self.cleanup.start(chunk.chunk_id)
        if chunk.state == ChunkState.BUILT and backend.uploads_files:
            logger.debug("chunk {}: built → uploading (key {})", chunk.chunk_id, key_label)
            name = self.remote_file_name(chunk)
            chunk = self.store.move_chunk(
                chunk.chunk_id,
                ChunkState.UPLOADING,
                key_id=key_id,
                event=f"uploading {Path(chunk.path).name} with key {key_label}",
            )
            try:
                file_id = self._creating(
                    chunk,
                    key_id,
                    lambda: backend.upload(Path(chunk.path), name),
                    lambda: self._found_upload(backend, chunk, name),
                    harmless=True,  # an extra uploaded file is never paid for
                )
            except RemoteError as exc:
                if exc.nothing_created:  # the intent is void
                    self.store.move_chunk(chunk.chunk_id, ChunkState.BUILT)
                raise
            except _GaveUp as gave_up:
                self.store.move_chunk(chunk.chunk_id, ChunkState.BUILT)
                raise gave_up.exc from None
            chunk = self.store.move_chunk(
                chunk.chunk_id, ChunkState.UPLOADED, file_id=file_id, event=f"uploaded as {file_id}"
            )
            logger.debug("chunk {} uploaded as {}", chunk.chunk_id, file_id)
        back = ChunkState(chunk.state)  # where a refused create leaves the chunk
        logger.debug("chunk {}: {} → submitting (key {})", chunk.chunk_id, back, key_label)
        chunk = self.store.move_chunk(chunk.chunk_id, ChunkState.SUBMITTING, key_id=key_id)
        req = self.submit_request(chunk)
        since = float(self.store.get_meta("created_at") or 0) - RECONCILE_SLACK
        try:
            b = self._creating(
                chunk, key_id, lambda: backend.create(req), lambda: backend.find_batch(req, since)
            )
        except RemoteError as exc:
            if exc.nothing_created:
                self.store.move_chunk(chunk.chunk_id, back)
            # Otherwise (a lookup failed too) the batch may exist: reconcile decides later.
            raise
        except _GaveUp as gave_up:
            self.store.move_chunk(chunk.chunk_id, back)
            raise gave_up.exc from None
        self._attach(chunk, b)

    def _creating(
        self,
        chunk: ChunkRow,
        key_id: str,
        create: Callable[[], T],
        lookup: Callable[[], T | None],
        *,
        harmless: bool = False,
    ) -> T:
        """Run a call that creates something (upload, create). It is never retried blindly: a
        call that failed in transit may have been carried out, so it is looked up first and
        tried again only when nothing was created. After SUBMIT_TRIES transient failures in a
        row the model/key pair is set aside (a server that always fails is not hammered for
        as long as the run lasts) and _GaveUp is raised."""
        tries = max(1, self.spec.failure_overrides().get("*", SUBMIT_TRIES))
        for n in range(1, tries + 1):
            try:
                return create()
            except RemoteError as exc:
                if exc.refused or decide(exc.cls) != Action.RETRY:
                    raise
                last = exc
                if exc.unsent:
                    # No connection was opened, so nothing can exist remotely: no lookup (it
                    # would wait out its own retries against the same dead server), only the
                    # job's backoff before the next try, in case the server is restarting.
                    logger.info("{}; nothing was sent; try {} of {}", exc, n, tries)
                    if n < tries:
                        self.sleep(self.spec.retry.delay(n))
                    continue
                try:
                    found = lookup()
                except RemoteError:
                    if not harmless:
                        raise  # the intent stays: reconcile looks again before any new create
                    found = None  # a second upload costs nothing; reconcile deletes extras
                if found is not None:
                    logger.info(
                        "chunk {}: reconciled: {} was carried out although its answer was lost",
                        chunk.chunk_id,
                        exc.what,
                    )
                    self.store.event(
                        "reconciled",
                        f"{exc.what}: carried out, answer lost",
                        chunk_id=chunk.chunk_id,
                    )
                    return found
                logger.info("{} failed; nothing was created; try {} of {}", exc, n, tries)
        self.exhaust(
            chunk,
            key_id,
            f"{tries} tries in a row failed; last: {last.what}: {last.cls} "
            f"(HTTP {last.status}): {last.message}",
            scope=last.scope if last.scope == Scope.ENDPOINT else Scope.MODEL,
            error_class=last.cls,
        )
        raise _GaveUp(last)

    def _found_upload(self, backend: Backend, chunk: ChunkRow, name: str) -> str | None:
        matches = backend.find_uploads(name)
        for extra in matches[1:]:
            self._delete_file(chunk.model, chunk.key_id, extra.id)
        return matches[0].id if matches else None

    @_on_chunk
    def _attach(self, chunk: ChunkRow, b: RemoteBatch) -> None:
        chunk = self.store.chunk(chunk.chunk_id)
        self.store.upsert_batch(chunk, b)
        self.store.move_chunk(
            chunk.chunk_id,
            ChunkState.SUBMITTED,
            batch_id=b.id,
            event=f"batch {b.id} submitted ({chunk.n_rows} rows, model {chunk.model})",
        )
        logger.info(
            "chunk {} submitted as batch {} ({} rows, model {})",
            chunk.chunk_id,
            b.id,
            chunk.n_rows,
            chunk.model,
        )

    def _delete_file(self, model: str, key_id: str | None, file_id: str | None) -> None:
        self.pool.delete_file(model, key_id, file_id)

    # ------------------------------------------------------------------ crash recovery
    @_in_run
    def reconcile(self) -> None:
        """Re-attach to remote objects created just before a crash, instead of creating them again."""
        self._finish_uploads()  # an upload of this invocation is not a crash's leftover
        for chunk in self.store.chunks(*INTENT_CHUNKS):
            try:
                self._reconcile_one(chunk)
            except RemoteError as exc:
                if chunk.state == ChunkState.UPLOADING:
                    # Uploading again is harmless (an extra file is never paid for, and the
                    # next lookup by name deletes extras): the submit path takes over, with its
                    # give-up accounting for a server that does not answer.
                    self.store.move_chunk(
                        chunk.chunk_id, ChunkState.BUILT, event=f"upload lookup failed: {exc}"
                    )
                    continue
                # A create may exist: the intent stays, and is looked up again later.
                logger.warning(
                    "chunk {}: reconcile failed ({}); will try again", chunk.chunk_id, exc
                )
        # Deletes a crash (or a failed delete) left due: in the background, never twice at once.
        if self.cleanup.start():
            logger.info("deleting remote objects of batches collected before")

    @_on_chunk
    def _reconcile_one(self, chunk: ChunkRow) -> None:
        backend = self.pool.backend(chunk.model, chunk.key_id)
        if chunk.state == ChunkState.UPLOADING:
            found = self._found_upload(backend, chunk, self.remote_file_name(chunk))
            if found:
                self.store.move_chunk(
                    chunk.chunk_id,
                    ChunkState.UPLOADED,
                    file_id=found,
                    event=f"reconciled: upload found as {found}",
                )
                logger.info("chunk {}: reconciled, upload found as {}", chunk.chunk_id, found)
            else:
                self.store.move_chunk(
                    chunk.chunk_id, ChunkState.BUILT, event="reconciled: upload never arrived"
                )
                logger.info("chunk {}: reconciled, upload never arrived", chunk.chunk_id)
            return
        since = float(self.store.get_meta("created_at") or 0) - RECONCILE_SLACK
        batch = backend.find_batch(self.submit_request(chunk), since)
        if batch is not None:
            self._attach(chunk, batch)
            self.store.event(
                "reconciled",
                f"re-attached to batch {batch.id}",
                chunk_id=chunk.chunk_id,
                batch_id=batch.id,
            )
            logger.info("chunk {}: reconciled, re-attached to batch {}", chunk.chunk_id, batch.id)
        else:
            back = ChunkState.UPLOADED if chunk.file_id else ChunkState.BUILT
            self.store.move_chunk(chunk.chunk_id, back, event="reconciled: batch was never created")
            logger.info("chunk {}: reconciled, batch was never created", chunk.chunk_id)

    # ------------------------------------------------------------------ polling and collecting
    @_in_run
    def poll(self, *, refill: bool = False) -> None:
        """Poll every in-flight batch and collect the finished ones.

        With `refill` (the run loop), batches that completed without an error file are collected
        last: chunks waiting for the token limit are submitted first, because a finished batch no
        longer counts against the remote enqueued limit and downloading and recording a big
        result file takes seconds. (Batches with failed requests are collected first: their
        errors may exhaust a model or key, which decides where the next chunk goes.)"""
        self.cleanup.harvest()  # deletes that ended meanwhile are recorded done
        deferred: list[tuple[ChunkRow, RemoteBatch]] = []
        in_flight = self.store.chunks(ChunkState.SUBMITTED)
        # One poll per backend (account): it may answer for all its batches with one call.
        groups: dict[int, tuple[Backend, list[ChunkRow]]] = {}
        for chunk in in_flight:
            backend = self.pool.backend(chunk.model, chunk.key_id)
            groups.setdefault(id(backend), (backend, []))[1].append(chunk)
        for backend, chunks in groups.values():
            seen = backend.poll([c.batch_id for c in chunks if c.batch_id])
            for chunk in chunks:
                b = seen.get(chunk.batch_id or "")
                if b is None:
                    continue  # polled again next time
                with logger.contextualize(chunk=chunk.chunk_id, batch=b.id):
                    self.store.upsert_batch(chunk, b)
                    logger.debug(
                        "batch {} (chunk {}): {} total={} completed={} failed={}",
                        b.id,
                        chunk.chunk_id,
                        b.raw_status,
                        b.total,
                        b.completed,
                        b.failed,
                    )
                    if refill and b.state == BatchState.COMPLETED and not b.error_ref:
                        deferred.append((chunk, b))
                    elif b.state in (
                        BatchState.COMPLETED,
                        BatchState.FAILED,
                        BatchState.EXPIRED,
                        BatchState.CANCELLED,
                    ):
                        self._collect_or_retry(chunk, b)
        if not deferred:
            return
        self.done_remote = {chunk.chunk_id for chunk, _ in deferred}
        try:
            self.submit_ready()
        finally:
            self.done_remote = set()
        for chunk, b in deferred:
            self._collect_or_retry(chunk, b)

    def _collect_or_retry(self, chunk: ChunkRow, b: RemoteBatch) -> None:
        try:
            self.collect(chunk, b)
        except RemoteError as exc:  # the chunk stays submitted: the next poll collects it
            logger.warning("collecting batch {} failed: {}; will try again", b.id, exc)

    @_on_chunk
    def collect(self, chunk: ChunkRow, b: RemoteBatch) -> None:
        """Record a finished batch's result files, streamed: lines are parsed and recorded in
        slices of RECORD_SLICE, so memory does not grow with the batch (only the set of ids
        seen, to tell a short file). Successes are recorded in a first pass over the files and
        failures in a second one (only when there were any): a success line always wins over a
        failure line for the same custom id. Each slice is its own transaction; recording the
        same lines again changes nothing, so a crash mid-way is collected again from the files."""
        if b.state == BatchState.FAILED:
            self._collect_failed(chunk, b)
            return
        backend = self.pool.backend(chunk.model, chunk.key_id)
        reported = (b.completed or 0) + (b.failed or 0)
        tally = _Tally()
        for tries in range(1, DOWNLOAD_TRIES + 1):
            paths = self._download_results(backend, b)
            with gc_paused():
                seen, bad = self._record_files(backend, chunk, b, paths, tally)
            if seen >= reported:
                break
            logger.warning(
                "batch {}: result files hold {} line(s) for {} request(s) the batch reports "
                "done{} (download {} of {})",
                b.id,
                seen,
                reported,
                f"; unreadable: {'; '.join(bad[:3])}" if bad else "",
                tries,
                DOWNLOAD_TRIES,
            )
        short = seen < reported
        # Rows without a line: re-sent only when the remote says they were not executed (an
        # expired or cancelled batch whose files are complete). An answer merely absent from
        # the files of requests the batch reports done is never re-sent: that could pay twice.
        not_run = b.state in (BatchState.EXPIRED, BatchState.CANCELLED) and not short
        self._plan_remote_cleanup(backend, chunk, b, short)  # due once the close commits
        closed = self.store.record_outcomes(
            chunk.chunk_id,
            b.id,
            (),
            key_id=chunk.key_id,
            max_retries=self.spec.retry.max_retries,
            retry_wait=self.spec.retry.delay,
            unanswered=RowState.PENDING if not_run else RowState.FAILED,
            lost_reason=(
                f"not executed: batch {b.id} {b.raw_status} before this row ran"
                if not_run
                else f"no answer in the result files of batch {b.id} although it reports "
                f"{reported} request(s) done (files hold {seen}{'; ' + bad[0] if bad else ''}); "
                "not re-sent to avoid paying twice: `batchops retry-missing` sends it again"
            ),
        )
        logger.info(
            "batch {} {}: {} succeeded, {} re-queued, {} failed",
            b.id,
            b.raw_status,
            tally.applied.succeeded,
            tally.applied.requeued + closed.requeued,
            tally.applied.failed + closed.failed,
        )
        logger.info(
            "cost: batch {} (model {}) ${:.6f}{}; run total ${:.6f}",
            b.id,
            chunk.model,
            tally.cost,
            f" + {tally.unpriced} request(s) without a known price" if tally.unpriced else "",
            self.store.spent(),
        )
        self.cleanup.start(chunk.chunk_id)

    def _plan_remote_cleanup(
        self, backend: Backend, chunk: ChunkRow, b: RemoteBatch, short: bool
    ) -> None:
        """Record a collected batch's remote objects (input and result files, the batch where
        the API deletes batches) for deletion: due once its outcomes are committed (a crash
        before leaves the record not due, after leaves it due for the next invocation). The
        objects of a batch whose results came back short are kept, to be looked at again: any
        record an earlier try at collecting it wrote is withdrawn."""
        if short:
            self.store.unplan_cleanup(chunk.chunk_id, b.id)
        else:
            self.cleanup.plan(batch_items(backend, chunk, b))

    def finish_deletes(self) -> None:
        """Wait for the background deletes and record them (each failure already logged)."""
        self.cleanup.finish()

    def _download_results(self, backend: Backend, b: RemoteBatch) -> list[Path]:
        paths = []
        for ref, folder in ((b.output_ref, self.run.outputs), (b.error_ref, self.run.errors)):
            if ref:
                paths.append(backend.download(ref, folder / f"{b.id}.jsonl"))
        return paths

    def _record_files(
        self,
        backend: Backend,
        chunk: ChunkRow,
        b: RemoteBatch,
        paths: list[Path],
        tally: _Tally,
    ) -> tuple[int, list[str]]:
        """Read the downloaded files twice at most (successes, then failures), recording in
        slices. Returns how many distinct custom ids the files answer, and the unreadable
        lines, named."""
        price = pricing.price_for(chunk.model, batch=True, overrides=self.overrides())
        entry = self.spec.model_entry(chunk.model) if chunk.model in self.spec.model_names else None
        rules = self.spec.rules()
        answered: set[str] = set()
        failed_ids: set[str] = set()
        bad: list[str] = []
        part: list[tuple[RowOutcome, float | None, bool]] = []
        # A success line with a price (nearly every line) goes into `answers` with its row
        # from `order`, recorded by `record_answers`; any other line into `part`.
        answers: list[tuple[int, RowOutcome, float | None]] = []
        part_bytes = answer_bytes = 0  # answer text each list holds
        order = self.store.queued_order(chunk.chunk_id)
        costs: dict[tuple[int, int, int, int], float] = {}  # a batch's usages repeat a lot
        exhausted = False
        n_failed_only = 0
        schema = self.spec.schema_ is not None
        # Runs of common answers (`AnswerRun`) take a fast path in the first pass: the
        # parameters of `_success_sql` made straight from the lines' tuples and recorded by
        # `record_answer_rows` (no RowOutcome and no trip through the loop below a line). Not
        # with a schema (each answer is validated) or without a price (an unpriced answer is
        # counted as an attempt); the second pass skips them (only successes) unless a schema
        # may have failed one.
        fast = price is not None and not schema
        params: list[tuple[Any, ...]] = []
        params_bytes = 0
        tally.cost, tally.unpriced = 0.0, 0  # the cost of the lines these files hold
        for second in (False, True):
            if second and not failed_ids:
                break
            runs = (fast and not second) or (second and not schema)
            for item in self._lines(backend, chunk, b, paths, bad if not second else None, runs):
                if isinstance(item, AnswerRun):
                    if second:
                        continue
                    assert price is not None
                    for cid, text, finish, model, p, c, co, r, _ in item.rows:
                        if cid in answered:
                            continue
                        answered.add(cid)
                        if failed_ids:
                            failed_ids.discard(cid)
                        key = (p, c, co, r)
                        cost = costs.get(key)
                        if cost is None:
                            cost = costs[key] = pricing.cost_of(Usage(p, c, co, r), price)
                        tally.cost += cost
                        params.append(
                            (text, finish, model, p, c, co, r, cost, 1, order.get(cid, -1))
                        )
                        params_bytes += len(text)
                        if len(params) >= RECORD_SLICE or params_bytes >= RECORD_SLICE_BYTES:
                            self._record_answer_rows(chunk, b, params, tally)
                            params, params_bytes = [], 0
                    continue
                if isinstance(item, BadLine):
                    continue
                if not second:
                    if schema:  # schema answers: validated
                        item = structured.check_outcome(item, self.spec)
                    if item.ok:
                        if item.custom_id in answered:
                            continue
                        answered.add(item.custom_id)
                        if failed_ids:
                            failed_ids.discard(item.custom_id)
                    elif item.custom_id not in answered:
                        failed_ids.add(item.custom_id)
                        continue
                    else:
                        continue
                else:
                    if item.custom_id not in failed_ids:
                        continue  # answered by a success line (or recorded already)
                    item = structured.check_outcome(item, self.spec)
                    if item.ok:  # its success was counted in the first pass
                        continue
                    failed_ids.discard(item.custom_id)  # the first failure line decides
                    scope = self._judge(item, chunk, entry, rules)
                    if item.error_class in EXHAUSTING and not exhausted:
                        exhausted = True
                        self.exhaust(
                            chunk,
                            chunk.key_id,
                            f"requests refused: {item.error_code or item.error_class}: "
                            f"{item.error_message or ''}".rstrip(": "),
                            b.id,
                            scope=scope,
                            error_class=item.error_class or "quota",
                        )
                cost = None
                u = item.usage
                if u is not None and price is not None:
                    key = (
                        u.prompt_tokens,
                        u.cached_tokens,
                        u.completion_tokens,
                        u.reasoning_tokens,
                    )
                    cost = costs.get(key)
                    if cost is None:
                        cost = costs[key] = pricing.cost_of(u, price)
                elif u is not None:
                    tally.unpriced += 1
                tally.cost += cost or 0.0
                if cost is not None and not second:  # a priced answer: nearly every line
                    answers.append((order.get(item.custom_id, -1), item, cost))
                    answer_bytes += len(item.response or "")
                    if len(answers) >= RECORD_SLICE or answer_bytes >= RECORD_SLICE_BYTES:
                        self._record_answers(chunk, b, answers, tally)
                        answers, answer_bytes = [], 0
                    continue
                # Exhausted model/key is not the row's fault: it does not use up a retry.
                part.append((item, cost, counts_as_attempt(item.error_class)))
                part_bytes += len(item.response or "")
                if len(part) >= RECORD_SLICE or part_bytes >= RECORD_SLICE_BYTES:
                    self._record_part(chunk, b, part, tally, order)
                    part, part_bytes = [], 0
            if answers:
                self._record_answers(chunk, b, answers, tally)
                answers, answer_bytes = [], 0
            if params:
                self._record_answer_rows(chunk, b, params, tally)
                params, params_bytes = [], 0
            if part:
                self._record_part(chunk, b, part, tally, order)
                part, part_bytes = [], 0
            if not second:
                n_failed_only = len(failed_ids)
        return len(answered) + n_failed_only, bad

    def _lines(
        self,
        backend: Backend,
        chunk: ChunkRow,
        b: RemoteBatch,
        paths: list[Path],
        bad: list[str] | None,
        runs: bool,
    ) -> Iterator[RowOutcome | BadLine | AnswerRun]:
        """The files' lines; `runs`: runs of common answers as they come, else as outcomes."""
        for path in paths:
            for item in backend.read_results(path, Path(chunk.path), self.spec.endpoint):
                if isinstance(item, AnswerRun):
                    if runs:
                        yield item
                    else:
                        yield from item.outcomes()
                    continue
                if isinstance(item, BadLine) and bad is not None:
                    bad.append(f"{item.path.name} line {item.line_no}: {item.reason}")
                    logger.warning(
                        "batch {}: {} line {} unreadable: {}",
                        b.id,
                        item.path,
                        item.line_no,
                        item.reason,
                    )
                yield item

    def _judge(self, o: RowOutcome, chunk: ChunkRow, entry: ModelEntry | None, rules: Any) -> Scope:
        """A failure line as the job sees it: the provider's error dialect (presets and the
        user's rules) decides its class and scope; the user's retry_on whether it is retried."""
        scope = Scope.REQUEST
        if o.status_code and o.status_code != 200:
            o.error_class, scope = classify(
                o.status_code,
                o.error_code,
                None,
                o.error_message,
                provider=entry.provider if entry else "openai",
                rules=rules,
                fallback=o.error_class or "api_error",
            )
            o.retryable = row_retryable(o.error_class)
        o.retryable = o.retryable and row_retryable(o.error_class, self.spec.retry.retry_on)
        if o.model is None:
            o.model = chunk.model  # a failed line is attributed to the model it was sent to
        return scope

    def _record_answers(
        self,
        chunk: ChunkRow,
        b: RemoteBatch,
        answers: list[tuple[int, RowOutcome, float | None]],
        tally: _Tally,
    ) -> None:
        answers.sort(key=itemgetter(0))  # stable: row order (-1, not in the chunk, first)
        applied = self.store.record_answers(chunk.chunk_id, b.id, answers, key_id=chunk.key_id)
        tally.applied.succeeded += applied.succeeded

    def _record_answer_rows(
        self, chunk: ChunkRow, b: RemoteBatch, params: list[tuple[Any, ...]], tally: _Tally
    ) -> None:
        params.sort(key=itemgetter(9))  # row order (-1, not queued in the chunk, first)
        applied = self.store.record_answer_rows(chunk.chunk_id, b.id, params, key_id=chunk.key_id)
        tally.applied.succeeded += applied.succeeded

    def _record_part(
        self,
        chunk: ChunkRow,
        b: RemoteBatch,
        part: list[tuple[RowOutcome, float | None, bool]],
        tally: _Tally,
        order: dict[str, int],
    ) -> None:
        part.sort(key=lambda p: order.get(p[0].custom_id, -1))  # stable: first line first
        applied = self.store.record_outcomes(
            chunk.chunk_id,
            b.id,
            part,
            key_id=chunk.key_id,
            max_retries=self.spec.retry.max_retries,
            retry_wait=self.spec.retry.delay,
            close_chunk=False,
            order=order,
        )
        tally.applied.succeeded += applied.succeeded
        tally.applied.requeued += applied.requeued
        tally.applied.failed += applied.failed

    @_on_chunk
    def _collect_failed(self, chunk: ChunkRow, b: RemoteBatch) -> None:
        problems = b.problems
        classes = {p.cls for p in problems}
        text = (
            "; ".join(list(dict.fromkeys(f"{p.code}: {p.message}" for p in problems))[:3])
            or "batch failed without errors"
        )
        text = self.pool.scrub(text)
        backend = self.pool.backend(chunk.model, chunk.key_id)
        if "token_limit" in classes:
            # Not the chunk's fault: wait for in-flight batches of this model, then send the same file again.
            others = self.in_flight_tokens(chunk.model) - chunk.est_tokens
            if others <= 0:  # refused with nothing else in flight: it can never fit as it is
                # Its file, error file and batch are due once the chunk is re-packed.
                self.cleanup.plan(batch_items(backend, chunk, b))
                self._split_or_fail(chunk, b.id, text)
                self.cleanup.start(chunk.chunk_id)
                return
            # The file is sent again: only the error file and the batch are due (once the
            # chunk no longer names this batch); the file goes when the chunk is done with it.
            self.cleanup.plan(batch_items(backend, chunk, b, input_file=False))
            self.learn_token_limit(chunk.model, others, others + chunk.est_tokens)
            self.store.move_chunk(
                chunk.chunk_id,
                ChunkState.UPLOADED if chunk.file_id else ChunkState.BUILT,
                attempt=chunk.attempt + 1,
                batch_id=None,
                event=f"batch {b.id} failed: {text}; will resubmit when in-flight batches finish",
            )
            logger.info(
                "batch {} hit the enqueued-token limit of {}; chunk {} waits for in-flight batches",
                b.id,
                chunk.model,
                chunk.chunk_id,
            )
            self.cleanup.start(chunk.chunk_id)
            return
        exhausting = sorted(classes & EXHAUSTING)
        if exhausting:
            self.exhaust(chunk, chunk.key_id, text, b.id, error_class=exhausting[0])
        # Its rows are re-packed into a new file: this one, any error file and the batch are
        # due once the chunk is closed below.
        self.cleanup.plan(batch_items(backend, chunk, b))
        self.store.requeue_chunk_rows(
            chunk.chunk_id,
            f"batch {b.id} failed: {text}",
            exhausting[0] if exhausting else "api_error",
            counts=not exhausting,
            max_retries=self.spec.retry.max_retries,
        )
        self.cleanup.start(chunk.chunk_id)
        logger.warning("batch {} failed: {}", b.id, text)

    # ------------------------------------------------------------------ cancel
    @_in_run
    def cancel_all(self) -> int:
        """Cancel every in-flight batch, wait for them to stop, and record their partial results."""
        chunks = self.store.chunks(ChunkState.SUBMITTED)
        for chunk in chunks:
            self._cancel_one(chunk)
        while self.store.chunks(ChunkState.SUBMITTED):
            self.poll()
            if self.store.chunks(ChunkState.SUBMITTED):
                self.sleep(min(self.spec.poll_interval, 2.0))
        self.finish_deletes()
        return len(chunks)

    @_on_chunk
    def _cancel_one(self, chunk: ChunkRow) -> None:
        try:
            self.pool.backend(chunk.model, chunk.key_id).cancel(chunk.batch_id or "")
            self.store.event(
                "cancel",
                f"cancel requested for batch {chunk.batch_id}",
                chunk_id=chunk.chunk_id,
                batch_id=chunk.batch_id,
            )
            logger.info("cancel requested for batch {}", chunk.batch_id)
        except RemoteError as exc:
            if exc.status != 409:  # 409: already finished; it is collected below
                logger.warning("cancel of batch {} failed: {}", chunk.batch_id, exc)


def spec_allows_ahead(spec: Any) -> bool:
    """Uploads ahead of submitting are free but not useful when a budget may stop the run
    before a chunk is sent (its file would sit uploaded for nothing)."""
    return spec.max_cost is None


def register_rows(run: RunDir, src: source.Source) -> None:
    """Register the slice's rows: once for a new run, and again when the slice was widened
    (rows already registered keep their answers)."""
    wanted = json.dumps([run.spec.start_row, run.spec.end_row])
    if run.store.row_count() and run.store.get_meta("rows_slice", wanted) == wanted:
        return
    n = run.store.add_rows(source.iter_frames(src, columns=[]))
    run.store.set_meta("rows_slice", wanted)
    logger.info("run {}: {} source row(s) registered", run.run_id, n)


# Meta key: the error class of the last exhaustion (quota, auth, api_error for a server that
# did not answer …), given to the rows left unsent when the pool runs out.
EXHAUSTED_BY = "exhausted_by"


def exhaustion_class(store: Store) -> str:
    """The error class of the last exhaustion (a pool used up before any was recorded: quota)."""
    return store.get_meta(EXHAUSTED_BY) or "quota"


def explain_stop(store: Store, stopped: StopReason | None) -> None:
    """Rows left without an answer when a run stops get the reason (missing_rows.csv, merge)."""
    if stopped == StopReason.POOL_EXHAUSTED:
        last = store.events_of("switch", limit=1)
        why = last[0]["message"] if last else "every model and key in the pool is exhausted"
        store.explain_unsent(f"not sent: {why}", exhaustion_class(store))
    elif stopped == StopReason.BUDGET:
        store.explain_unsent("not sent: the --max-cost budget was reached", "budget")


def record_exhaustion(
    store: Store,
    pool: Pool,
    model: str,
    key_id: str | None,
    reason: str,
    *,
    scope: Scope = Scope.MODEL,
    chunk_id: int | None = None,
    batch_id: str | None = None,
    error_class: str = "quota",
) -> bool:
    """Take a model/key (or what `scope` names) out of the pool, for both lanes: every switch is
    an event, and what is exhausted is saved in the run, so later invocations skip it too.
    Returns whether anything was newly taken out (the caller waits `wait_after_switch`)."""
    before = pool.current()
    taken = pool.exhaust(model, key_id, reason, scope=scope)
    if not taken:
        return False
    after = pool.current()
    what = pool.describe_scope(model, key_id, scope)
    if after is None:
        then = "no model/key left in the pool"
    elif after != before:
        then = f"switching to {pool.describe_pair(after)}"
    else:
        then = f"still using {pool.describe_pair(after)}"
    store.event(
        "switch",
        pool.scrub(f"{what} exhausted ({reason}); {then}"),
        chunk_id=chunk_id,
        batch_id=batch_id,
    )
    store.set_meta(EXHAUSTED_BY, error_class)  # the class unsent rows get if the pool runs out
    save_pool_state(store, pool)
    return True


def save_pool_state(store: Store, pool: Pool) -> None:
    """The pool as this invocation sees it (keys masked), for `batchops status`, and what is
    exhausted (key fingerprints, never keys), which later invocations skip."""
    state = {"ts": time.time(), "pairs": pool.summary()}
    store.set_meta("pool_state", pool.scrub(json.dumps(state)))
    store.set_meta("pool_exhausted", pool.scrub(json.dumps(pool.remembered())))
    known = json.loads(store.get_meta("pool_keys") or "{}")
    known.update({k.key_id: k.label for k in pool.all_keys.values()})
    store.set_meta("pool_keys", json.dumps(known))


def restore_pool(store: Store, pool: Pool) -> int:
    """Skip what earlier invocations of this run exhausted (until `batchops pool reset` or the
    `exhausted_cooldown` has passed). Returns how many pairs stay out."""
    saved = json.loads(store.get_meta("pool_exhausted") or "[]")
    n = pool.remember(saved, pool.spec.cooldown_seconds())
    if n:
        left = pool.first_available()
        logger.info(
            "{} model/key pair(s) exhausted by an earlier run are skipped{} "
            "(`batchops pool reset` tries them again)",
            n,
            f"; starting with {pool.describe_pair(left)}" if left else "; none is left",
        )
    return n
