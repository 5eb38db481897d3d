"""Online mode: the same job through synchronous calls, for endpoints without a Batch API.

N workers (asyncio tasks sharing one `AsyncOpenAI` client per endpoint and key) take pending rows
and send one request each. Durability follows the store's row life cycle:

* rows are taken in groups into an *online chunk* (a chunks row in state `online`, no file): the
  group's rows become `queued` in it before any of them is sent;
* every answer is committed before its worker takes another row (group commit: answers that
  arrive in the same turn of the event loop share one `Store.record_outcomes` transaction), so
  a worker holds at most one request that is sent but not committed, and a kill loses at most
  the requests in flight — at most one per worker (`--workers`), as with one commit per answer;
* a group is closed when all its rows are settled; on start, rows still queued in `online`
  chunks (a killed run) go back to pending, and a re-run sends only rows without an answer.

Errors come classified from the backend and are decided by `batchops.policy`, as in batch
mode: quota / no access / bad key fail over (the pair or key leaves the pool) and the row goes
back to pending without using a retry; a 429 rate limit pauses every worker for its
`retry-after`; 5xx, timeouts and dropped connections retry with the job's backoff; any other
4xx fails the row for good. Client-side pacing (`rpm`, `tpm`, per model
entry or run-wide) uses leaky buckets from aiolimiter.

Ctrl+C stops taking rows, lets the requests in flight finish and records them (a second Ctrl+C
abandons them; their rows go back to pending), then raises KeyboardInterrupt (exit 130).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from aiolimiter import AsyncLimiter
from loguru import logger

from batchops import dedup, pricing, render, source, structured
from batchops.backends import RemoteError
from batchops.engine import (
    EngineResult,
    Progress,
    ProgressCounts,
    explain_stop,
    record_exhaustion,
    register_rows,
    restore_pool,
)
from batchops.policy import (
    CALL_ATTEMPTS,
    RATE_LIMIT_ATTEMPTS,
    Action,
    Scope,
    counts_as_attempt,
    decide,
    failures_before_switch,
    row_retryable,
)
from batchops.progress import fmt_usd
from batchops.providers import Key, Pool
from batchops.records import ErrorClass, RowOutcome, Skipped, Usage
from batchops.render import ImageProblem
from batchops.rundir import RunDir
from batchops.spec import JobSpec, ModelEntry
from batchops.states import ChunkState, StopReason
from batchops.store import Applied, Store

# Rows per online chunk: small enough that a group is settled quickly, large enough that the
# source is read in few passes and the chunks table stays small (1M rows → ~4,000 chunks).
GROUP_ROWS = 256
PROGRESS_EVERY = 2.0  # seconds between progress callbacks

STOP_INTERRUPTED = StopReason.INTERRUPTED
# No usable pair for this lane: exhausted, or the next pair is of the other mode.
STOP_POOL = StopReason.POOL_EXHAUSTED
STOP_BUDGET = StopReason.BUDGET
STOP_ERROR = StopReason.ERROR


# (row_idx, row_id, rendered text, image cell, rendered system text) of one row to send.
Group = tuple[int, str, str, str | None, str | None]


@dataclass(slots=True)
class Job:
    """One row to send: rendered text, its image cell (read only when sent: memory stays flat)."""

    chunk_id: int
    row_idx: int
    row_id: str
    text: str
    image: str | None
    system: str | None = None  # the row's rendered system text (None: none, or the same for all)


@dataclass(slots=True)
class _Unsaved:
    """An answer waiting for its group commit; `done` is the waiting worker's future."""

    job: Job
    outcome: RowOutcome
    cost: float | None
    counts: bool
    key_id: str | None
    done: asyncio.Future[None]


@dataclass
class _Counters:
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    requeued: int = 0
    skipped: int = 0
    retries: int = 0
    rate_limited: int = 0
    by_class: dict[str, int] = field(default_factory=dict)


class Pacer:
    """Client-side limits (requests and tokens per minute) and the shared pause after a 429.

    A model entry's own `rpm`/`tpm` applies to that model; otherwise the run-wide `spec.rpm`/
    `spec.tpm` applies to every model together. Each bucket holds one second's worth (at least
    one request), so a run starts at the limit's pace instead of with a minute-sized burst.
    Limiters are created inside the running event loop (aiolimiter binds them to it).
    """

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self._limiters: dict[tuple[str, str], AsyncLimiter] = {}
        self.paused_until = 0.0

    def limits(
        self, entry: ModelEntry
    ) -> tuple[tuple[str, float] | None, tuple[str, float] | None]:
        """((scope, rpm) or None, (scope, tpm) or None) for a model entry."""
        rpm = (
            (entry.name, entry.rpm)
            if entry.rpm
            else ("*", self.spec.rpm)
            if self.spec.rpm
            else None
        )
        tpm = (
            (entry.name, entry.tpm)
            if entry.tpm
            else ("*", self.spec.tpm)
            if self.spec.tpm
            else None
        )
        return rpm, tpm

    def needs_tokens(self, entry: ModelEntry) -> bool:
        return self.limits(entry)[1] is not None

    def _limiter(self, scope: str, kind: str, per_minute: float) -> AsyncLimiter:
        lim = self._limiters.get((scope, kind))
        if lim is None:
            burst = max(1.0, per_minute / 60.0)
            lim = AsyncLimiter(burst, burst * 60.0 / per_minute)
            self._limiters[(scope, kind)] = lim
        return lim

    def pause(self, seconds: float) -> None:
        """Every worker waits this long before its next request (a 429's retry-after)."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def wait(self, entry: ModelEntry, tokens: int) -> None:
        while (left := self.paused_until - time.monotonic()) > 0:
            await asyncio.sleep(left)
        rpm, tpm = self.limits(entry)
        if rpm is not None:
            await self._limiter(rpm[0], "rpm", rpm[1]).acquire(1)
        if tpm is not None:
            lim = self._limiter(tpm[0], "tpm", tpm[1])
            left_tokens = float(max(1, tokens))
            while left_tokens > 0:  # a request larger than the bucket waits for several refills
                take = min(left_tokens, lim.max_rate)
                await lim.acquire(take)
                left_tokens -= take


class OnlineEngine:
    """Drive every pending row through synchronous calls until settled, or until the pool has
    no pair for online mode (exhausted, or the next pair is a batch-mode one: the caller hands
    over to the batch engine)."""

    def __init__(
        self,
        run: RunDir,
        pool: Pool,
        *,
        workers: int | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        group_rows: int = GROUP_ROWS,
        src: source.Source | None = None,
    ) -> None:
        self.run = run
        self.spec = run.spec
        self.store: Store = run.store
        self.pool = pool
        self.workers = workers or self.spec.workers
        self.on_progress = on_progress
        self.progress_counts = ProgressCounts(self.store)
        self.group_rows = group_rows
        self.src = src or source.open_source(self.spec)
        self.overrides = pricing.overrides_from_spec(self.spec)
        self._prices: dict[str, tuple[pricing.ModelPrice | None, float]] = {}
        self.image_dir = Path(self.spec.image_dir) if self.spec.image_dir else self.src.path.parent
        self.count = _Counters()
        # Consecutive failures per (model, key, class) or ("endpoint", url), reset by a success.
        self.failures: dict[tuple[str, ...], int] = {}
        self.stop_reason: StopReason | None = None
        self.in_flight = 0
        self.spent = 0.0
        self.reserved = 0.0  # estimated cost of requests in flight (for --max-cost)

    # ------------------------------------------------------------------ entry point
    def execute(self) -> EngineResult:
        """Run to the end; raises KeyboardInterrupt after a clean stop on Ctrl+C."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            result = asyncio.run(self._main())
        else:
            result = self._execute_in_thread()  # e.g. Jupyter: a loop already runs here
        if self.stop_reason == STOP_INTERRUPTED:
            raise KeyboardInterrupt
        return result

    def _execute_in_thread(self) -> EngineResult:
        # sqlite connections belong to their thread: the thread opens its own on the same file.
        box: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        main_store = self.store

        main_run = self.run

        def target() -> None:
            self.store = Store.open(self.run.path)
            self.run = dataclasses.replace(main_run, store=self.store)
            try:
                box["result"] = asyncio.run(self._main())
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc
            finally:
                self.store.close()

        t = threading.Thread(target=target, name="batchops-online", daemon=True)
        t.start()
        try:
            while t.is_alive():
                try:
                    t.join(0.1)
                except KeyboardInterrupt:  # forwarded: the first stops, the second abandons
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self._on_sigint)
        finally:
            self.store = main_store
            self.run = main_run
        if "error" in box:
            raise box["error"]
        result: EngineResult = box["result"]
        return result

    # ------------------------------------------------------------------ the loop
    async def _main(self) -> EngineResult:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._sigints = 0
        self._crash: BaseException | None = None
        self._stop_event = asyncio.Event()
        self.pacer = Pacer(self.spec)
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=self.workers * 2)
        self._open: dict[int, int] = {}  # online chunk → jobs not yet settled
        self._tasks: list[asyncio.Task[None]] = []
        self._producer: asyncio.Task[None] | None = None
        self._unsaved: list[_Unsaved] = []  # answers waiting for the next group commit
        self._commits = 0
        handlers = self._install_signals(loop)
        started = time.monotonic()
        try:
            self._prepare()
            self._tasks = [
                asyncio.create_task(self._worker(), name=f"online-worker-{i}")
                for i in range(self.workers)
            ]
            self._producer = asyncio.create_task(self._produce(), name="online-producer")
            progress = asyncio.create_task(self._progress_loop())
            try:
                await asyncio.gather(self._producer, return_exceptions=True)
                if self._producer.done() and not self._producer.cancelled():
                    self._crash = self._crash or self._producer.exception()
                if self._crash is not None:
                    self._stop(STOP_ERROR)
                # Workers still busy drain the queue (discarding jobs once stopping), then end.
                for t in self._tasks:
                    if not t.done():
                        await self.queue.put(None)
                await asyncio.gather(*self._tasks, return_exceptions=True)
            finally:
                progress.cancel()
        finally:
            self._commit()  # answers of workers cancelled while waiting for their commit
            released = self.store.release_online_chunks()
            if released:
                logger.info("{} unsent row(s) of online groups back to pending", released)
            await self.pool.aclose()
            for sig in handlers:
                loop.remove_signal_handler(sig)
        if self._crash is not None:
            raise self._crash
        elapsed = time.monotonic() - started
        c = self.count
        logger.info(
            "online: {} answer(s) recorded in {:.1f}s ({:.1f}/s): {} succeeded, {} re-queued, "
            "{} failed, {} skipped; {} transient retries, {} rate-limited; {} commit(s){}",
            c.sent,
            elapsed,
            c.sent / elapsed if elapsed > 0 else 0.0,
            c.succeeded,
            c.requeued,
            c.failed,
            c.skipped,
            c.retries,
            c.rate_limited,
            self._commits,
            f"; stopped: {self.stop_reason}" if self.stop_reason else "",
        )
        stopped = self._why_stopped()
        explain_stop(self.store, stopped)
        self._report(fresh=True)
        return EngineResult(self.store.counts(), stopped, self.store.spent())

    def _why_stopped(self) -> StopReason | None:
        counts = self.store.counts()
        if not (counts["pending"] or counts["queued"]):
            return None
        if self.stop_reason in (STOP_BUDGET, STOP_INTERRUPTED):
            return self.stop_reason
        if self.pool.current() is None:
            return StopReason.POOL_EXHAUSTED
        return None

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        except (NotImplementedError, RuntimeError, ValueError):  # e.g. Windows
            return []
        return [signal.SIGINT]

    def _on_sigint(self) -> None:
        self._sigints += 1
        if self._sigints == 1:
            logger.warning(
                "interrupted: no new rows are sent; finishing {} request(s) in flight "
                "(Ctrl+C again abandons them)",
                self.in_flight,
            )
            self._stop(STOP_INTERRUPTED)
        else:
            logger.warning("interrupted again: abandoning {} request(s) in flight", self.in_flight)
            if self._producer is not None:
                self._producer.cancel()
            for t in self._tasks:
                t.cancel()

    def _stop(self, reason: StopReason) -> None:
        if self.stop_reason is None or reason == STOP_INTERRUPTED:
            self.stop_reason = reason
        self._stop_event.set()

    def _prepare(self) -> None:
        """Register the rows (first run), release what a killed run left queued, and take back
        rows of batch chunks that were never sent (they are answered online now)."""
        register_rows(self.run, self.src)
        dedup.pair_run(self.store, self.src, self.spec)  # identical requests: sent once
        released = self.store.release_online_chunks()
        if released:
            logger.info("{} row(s) queued by an interrupted online run back to pending", released)
        restore_pool(self.store, self.pool)
        for chunk in self.store.chunks(ChunkState.BUILT, ChunkState.UPLOADED):
            self.pool.delete_file(chunk.model, chunk.key_id, chunk.file_id)
            self.store.abandon_chunk(
                chunk.chunk_id, "never submitted; its rows are answered in online mode"
            )
        self.spent = self.store.spent()
        waiting = self.store.chunks(
            ChunkState.UPLOADING, ChunkState.SUBMITTING, ChunkState.SUBMITTED
        )
        if waiting:
            logger.info(
                "{} batch chunk(s) in flight are left alone (a batch run or `watch` collects them)",
                len(waiting),
            )

    # ------------------------------------------------------------------ producing
    async def _produce(self) -> None:
        """Pass over the pending rows in source order, group by group, until none is left.

        Rows that come back to pending (retryable failure, exhausted pair) are taken by the next
        pass; the last pass ends when nothing is in flight and nothing is pending."""
        columns = list(
            dict.fromkeys(
                [*render.template_fields(self.spec.prompt), *render.system_fields(self.spec)]
            )
        )
        if self.spec.image_column:
            columns = list(dict.fromkeys([*columns, self.spec.image_column]))
        while self.stop_reason is None:
            pending = self.store.pending_row_idxs()
            if not pending and (wait := self.store.seconds_until_ready()) > 0:
                await self._sleep(wait)  # failed rows wait before they are sent again
                continue
            if not pending:
                await self.queue.join()  # everything sent is settled: anything back to pending?
                if self.stop_reason is None and not self.store.pending_row_idxs(ready_only=False):
                    return
                continue
            if self.pool.current() is None:
                self._stop(STOP_POOL)
                return
            frames = source.iter_frames(
                self.src, columns=columns, batch_rows=self.group_rows, only_rows=pending
            )
            try:
                while self.stop_reason is None:
                    # Reading and rendering happen off the loop: workers keep sending meanwhile.
                    group = await asyncio.to_thread(self._next_group, frames)
                    if group is None:
                        break
                    await self._enqueue(group)
            finally:
                close = getattr(frames, "close", None)  # a generator: release the reader
                if close is not None:
                    close()

    def _next_group(self, frames: Iterator[pl.DataFrame]) -> list[Group] | None:
        frame = next(frames, None)
        if frame is None:
            return None
        image_col = self.spec.image_column
        per_row_system = bool(render.system_fields(self.spec))
        out: list[Group] = []
        for row in frame.iter_rows(named=True):
            text = render.render_text(self.spec.prompt, row)
            cell = row[image_col] if image_col else None
            system = render.system_text(self.spec, row) if per_row_system else None
            out.append((row[source.ROW_IDX], row[source.ROW_ID], text, cell or None, system))
        return out

    async def _enqueue(self, group: list[Group]) -> None:
        current = self.pool.current()
        if current is None:
            self._stop(STOP_POOL)
            return
        chunk_id, queued = self.store.add_online_chunk(current[0].name, [g[0] for g in group])
        if not queued:
            self.store.close_online_chunk(chunk_id)
            return
        self._open[chunk_id] = len(queued)
        for row_idx, row_id, text, image, system in group:
            if row_idx in queued:
                await self.queue.put(Job(chunk_id, row_idx, row_id, text, image, system))

    # ------------------------------------------------------------------ workers
    async def _worker(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                if job is None:
                    return
                if self.stop_reason is None:
                    await self._handle(job)
                self._settled(job.chunk_id)
            except Exception as exc:  # a bug or a broken database: stop the run, report it
                # (the worker keeps draining the queue, so nothing waits on it forever)
                if self._crash is None:
                    self._crash = exc
                self._stop(STOP_ERROR)
            finally:
                self.queue.task_done()

    def _settled(self, chunk_id: int) -> None:
        left = self._open.get(chunk_id, 0) - 1
        if left > 0:
            self._open[chunk_id] = left
            return
        self._open.pop(chunk_id, None)
        if self.stop_reason is None:
            # Every row of the group is settled (rows of a stopped run are released at the end).
            self.store.close_online_chunk(chunk_id)

    async def _handle(self, job: Job) -> None:
        image_url: str | None = None
        if job.image is not None:
            try:
                image_url = await asyncio.to_thread(
                    render.image_data_url, self.image_dir, job.image
                )
            except ImageProblem as exc:
                self.store.skip_rows(job.chunk_id, [Skipped(job.row_idx, exc.reason)])
                self.count.skipped += 1
                logger.warning("row {} skipped: {}", job.row_idx, exc.reason)
                return
        transient_tries = 0
        rate_tries = 0
        while self.stop_reason is None:
            pair = self.pool.current()
            if pair is None:
                self._stop(STOP_POOL)
                return
            entry, key = pair
            body = render.request_body(self.spec, entry.name, job.text, image_url, job.system)
            tokens = self._tokens(entry, body)
            est = self._estimate_cost(entry.name, tokens)
            if not self._fits_budget(est):
                return
            await self.pacer.wait(entry, tokens)
            if self.stop_reason is not None:
                return  # stopped while waiting: not sent, the row goes back to pending
            try:
                outcome = await self._send(entry, key, body, job.row_id, est)
            except RemoteError as exc:
                err = exc
            else:
                self.failures.pop(("endpoint", self.pool.endpoint_of(entry)), None)
                if self.failures:  # a success ends the model's run of failures
                    self.failures = {
                        k: v for k, v in self.failures.items() if k[:2] != (entry.name, key.key_id)
                    }
                outcome = self._checked(outcome)
                cost = None if outcome.usage is None else self._cost(outcome.usage, entry.name)
                await self._record(job, outcome, cost, True, key)
                return
            cls, action = err.cls, decide(err.cls)
            if action == Action.FAIL_OVER:
                if self._failures_reach_threshold((entry.name, key.key_id, cls), cls):
                    await self._exhaust(entry.name, key, err)
                # Not the row's fault: back to pending without using a retry.
                failure = self._failure(job, entry, err)
                await self._record(job, failure, None, counts_as_attempt(cls), key)
                return
            if err.scope == Scope.ENDPOINT and self._failures_reach_threshold(
                ("endpoint", self.pool.endpoint_of(entry)), cls, per_call=True
            ):
                # A dead or failing server: every model it serves is set aside, and the row
                # goes to the next endpoint without being charged a retry.
                await self._exhaust(entry.name, key, err)
                await self._record(job, self._failure(job, entry, err), None, False, key)
                return
            if cls == "rate_limit" and rate_tries < RATE_LIMIT_ATTEMPTS:
                rate_tries += 1
                self.count.rate_limited += 1
                delay = max(err.retry_after or 0.0, self.spec.retry.delay(rate_tries))
                self.pacer.pause(delay)  # everyone slows down, not only this worker
                logger.debug("row {}: rate limited; workers pause {:.2f}s", job.row_id, delay)
                await self._sleep(delay)
                continue
            if action in (Action.RETRY, Action.PACE) and transient_tries < CALL_ATTEMPTS - 1:
                transient_tries += 1
                self.count.retries += 1
                delay = max(err.retry_after or 0.0, self.spec.retry.delay(transient_tries))
                logger.debug(
                    "row {}: {} (HTTP {} {}: {}); retry {} in {:.2f}s",
                    job.row_id,
                    cls,
                    err.status,
                    err.code,
                    err.message,
                    transient_tries,
                    delay,
                )
                await self._sleep(delay)
                continue
            await self._record(job, self._failure(job, entry, err), None, True, key)
            return

    def _failures_reach_threshold(
        self, what: tuple[str, ...], cls: ErrorClass, *, per_call: bool = False
    ) -> bool:
        """Count a failure of a model (or an endpoint) with no success in between; True when
        `max_failures_before_switch` is reached. Endpoint failures count calls, and every row
        retries a transient failure up to CALL_ATTEMPTS times: the threshold is that many
        times larger, so passing trouble (a 503 now and then) never adds up to a switch."""
        n = self.failures.get(what, 0) + 1
        self.failures[what] = n
        limit = failures_before_switch(cls, self.spec.failure_overrides())
        if n < limit * (CALL_ATTEMPTS if per_call else 1):
            return False
        self.failures.pop(what, None)
        return True

    async def _send(
        self, entry: ModelEntry, key: Key, body: dict[str, Any], row_id: str, est: float
    ) -> RowOutcome:
        """One request through the pair's backend (which never retries on its own)."""
        self.reserved += est
        self.in_flight += 1
        try:
            backend = self.pool.backend(entry.name, key.key_id)
            return await backend.call_online(self.spec.endpoint, body, row_id)
        finally:
            self.in_flight -= 1
            self.reserved -= est

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the run stops (Ctrl+C does not wait out a backoff)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)

    def _checked(self, outcome: RowOutcome) -> RowOutcome:
        outcome = structured.check_outcome(outcome, self.spec)  # schema answers: validated
        if outcome.error_class:  # the user's retry_on decides (as for batch results)
            outcome.retryable = outcome.retryable and row_retryable(
                outcome.error_class, self.spec.retry.retry_on
            )
        return outcome

    def _failure(self, job: Job, entry: ModelEntry, err: RemoteError) -> RowOutcome:
        return RowOutcome(
            job.row_id,
            ok=False,
            model=entry.name,
            status_code=err.status,
            error_code=err.code,
            error_message=err.message,
            error_class=err.cls,
            retryable=row_retryable(err.cls, self.spec.retry.retry_on),
        )

    async def _record(
        self,
        job: Job,
        outcome: RowOutcome,
        cost: float | None,
        counts: bool,
        key: Key | None = None,
    ) -> None:
        """Commit one answer; returns once it is committed, so the worker takes its next row
        only then (the kill bound above). Answers that arrive in the same loop turn are
        committed together by `_commit`, scheduled once per turn."""
        self.spent += cost or 0.0  # now: the budget check of other workers must see it
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsaved.append(_Unsaved(job, outcome, cost, counts, key.key_id if key else None, fut))
        if len(self._unsaved) == 1:
            asyncio.get_running_loop().call_soon(self._commit)
        await fut

    def _commit(self) -> None:
        """One transaction per (online chunk, key) for successes; a failure gets its own, so
        its log line says whether it failed for good."""
        unsaved, self._unsaved = self._unsaved, []
        groups: dict[tuple[Any, ...], list[_Unsaved]] = {}
        for u in unsaved:
            group = (u.job.chunk_id, u.key_id) if u.outcome.ok else (id(u),)
            groups.setdefault(group, []).append(u)
        for items in groups.values():
            first = items[0]
            try:
                applied = self.store.record_outcomes(
                    first.job.chunk_id,
                    None,
                    [(u.outcome, u.cost, u.counts) for u in items],
                    key_id=first.key_id,
                    retry_wait=self.spec.retry.delay,
                    mode="online",
                    max_retries=self.spec.retry.max_retries,
                    close_chunk=False,
                )
            except Exception as exc:  # the workers waiting on it stop the run
                for u in items:
                    if not u.done.done():
                        u.done.set_exception(exc)
                continue
            self._commits += 1
            self._counted(items, applied)
            for u in items:
                if not u.done.done():
                    u.done.set_result(None)

    def _counted(self, items: list[_Unsaved], applied: Applied) -> None:
        self.count.sent += len(items)
        self.count.succeeded += applied.succeeded
        self.count.failed += applied.failed
        self.count.requeued += applied.requeued
        for u in items:
            if u.outcome.ok:
                continue
            cls = u.outcome.error_class or "error"
            self.count.by_class[cls] = self.count.by_class.get(cls, 0) + 1
            logger.debug(
                "row {}: {} ({}){}",
                u.job.row_id,
                cls,
                u.outcome.error_message,
                " — failed for good" if applied.failed else "",
            )

    async def _exhaust(self, model: str, key: Key, err: RemoteError) -> None:
        if (model, key.key_id) in self.pool.exhausted:
            return  # another worker's answer already switched
        if (
            record_exhaustion(
                self.store,
                self.pool,
                model,
                key.key_id,
                f"{err.code or err.cls}: {err.message}",
                scope=err.scope,
                error_class=err.cls,
            )
            and self.spec.wait_after_switch
        ):
            await self._sleep(self.spec.wait_after_switch)

    def _cost(self, usage: Usage, model: str) -> float | None:
        """The answer's cost at synchronous prices (None when the model has no known price)."""
        now = time.monotonic()
        cached = self._prices.get(model)
        if cached is None or cached[1] < now:
            # The lookup costs more than the sum: once a minute per model (prices are dated).
            cached = (pricing.price_for(model, batch=False, overrides=self.overrides), now + 60)
            self._prices[model] = cached
        return None if cached[0] is None else pricing.cost_of(usage, cached[0])

    # ------------------------------------------------------------------ limits and budget
    def _tokens(self, entry: ModelEntry, body: dict[str, Any]) -> int:
        if not (self.pacer.needs_tokens(entry) or self.spec.max_cost is not None):
            return 0
        # As OpenAI counts it against TPM: the prompt estimate plus the completion cap.
        return pricing.estimate_request_tokens(body, self.spec.endpoint) + (
            self.spec.max_tokens or 0
        )

    def _estimate_cost(self, model: str, tokens: int) -> float:
        if self.spec.max_cost is None:
            return 0.0
        prompt = tokens - (self.spec.max_tokens or 0)
        completion = self.spec.max_tokens or pricing.DEFAULT_COMPLETION_ESTIMATE
        est = pricing.estimate_cost(
            model, prompt, completion, batch=False, overrides=self.overrides
        )
        return est or 0.0

    def _fits_budget(self, est: float) -> bool:
        cap = self.spec.max_cost
        if cap is None or self.spent + self.reserved + est <= cap + 1e-12:
            return True
        if self.stop_reason is None:
            logger.warning(
                "budget: the next request (est {}) would pass --max-cost {} "
                "(spent {}); no more rows are sent",
                fmt_usd(est),
                fmt_usd(cap),
                fmt_usd(self.spent),
            )
        self._stop(STOP_BUDGET)
        return False

    # ------------------------------------------------------------------ progress
    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            self._report()

    def _report(self, *, fresh: bool = False) -> None:
        if self.on_progress is None:
            return
        self.on_progress(
            Progress(
                self.progress_counts.get(fresh=fresh),
                0,
                {"online requests in flight": self.in_flight},
                self.spent,
            )
        )
