"""The batch loop: build → upload → create → poll → collect → re-queue, until every row is settled.

Durability: before each remote call that creates something the chunk's state says so
(`uploading`, `submitting`); remote objects carry the run id, chunk id and attempt (file name and
batch metadata). On start, `reconcile()` looks remote objects up and re-attaches instead of
creating them again, so a crash at any point never submits a chunk twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from batchops import chunking, pricing, results, source, structured
from batchops.classify import EXHAUSTING, classify_batch_error, is_retryable
from batchops.providers import ApiCallError, Pool, call
from batchops.records import RowOutcome
from batchops.rundir import RunDir
from batchops.store import ChunkRow, Store

# From this many batches in flight on one account, one list call polls them all.
LIST_POLL_MIN = 3
# How far back (seconds before the run was created) reconcile looks in the remote batch list.
RECONCILE_SLACK = 3600

F = TypeVar("F", bound=Callable[..., Any])


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
        batch = getattr(args[0], "id", None) if args else None
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


@dataclass
class EngineResult:
    counts: dict[str, int]
    stopped_because: str | None = None  # "pool exhausted", "budget reached", "no-wait", ...
    spent: float = 0.0
    notes: list[str] = field(default_factory=list)


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

    @property
    def src(self) -> source.Source:
        if self._src is None:
            self._src = source.open_source(self.spec)  # a full validation pass over the file
        return self._src

    # ------------------------------------------------------------------ planning
    @_in_run
    def ensure_rows(self) -> None:
        if self.store.row_count() == 0:
            n = self.store.add_rows(self.src_frames(columns=[]))
            logger.info("run {}: {} source row(s) registered", self.run.run_id, n)

    def src_frames(self, columns: list[str] | None = None):
        return source.iter_frames(self.src, columns=columns)

    @_in_run
    def build_pending(self) -> int:
        """Pack every pending row into chunk files for the current model; returns chunks built."""
        pending = self.store.pending_row_idxs()
        current = self.pool.current()
        if not pending or current is None:
            return 0
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
                len(pending),
                model,
            )
        return built

    def overrides(self):
        return pricing.overrides_from_spec(self.spec)

    # ------------------------------------------------------------------ the loop
    @_in_run
    def execute(self) -> EngineResult:
        save_pool_state(self.store, self.pool)
        self.ensure_rows()
        self.reconcile()
        self.build_pending()
        stopped: str | None = None
        while True:
            self.submit_ready()
            in_flight = self.store.chunks("submitted")
            if not in_flight:
                if (
                    self.store.counts()["pending"]
                    and self.pool.current()
                    and not self.budget_hit
                    and self.build_pending()
                ):
                    continue
                ready = self.store.chunks("built", "uploaded")
                if ready and self.pool.current() and not self.budget_hit:
                    # Nothing in flight but a chunk could not be sent (a transient error or a token
                    # limit learned at zero): wait and try again rather than give up on it.
                    self.sleep(self.spec.poll_interval)
                    continue
                stopped = self._why_stopped()
                break
            if not self.wait:
                stopped = "no-wait"
                break
            self.report_progress()
            self.sleep(self.spec.poll_interval)
            self.poll(refill=True)
            if self.store.counts()["pending"] and self.pool.current():
                self.build_pending()
        self.report_progress()
        return EngineResult(self.store.counts(), stopped, self.store.spent())

    def _why_stopped(self) -> str | None:
        counts = self.store.counts()
        if counts["pending"] or counts["queued"]:
            if self.pool.current() is None:
                return "every model and key in the pool is exhausted"
            if self.budget_hit:
                return "budget reached"
        return None

    def exhaust(
        self,
        chunk: ChunkRow,
        key_id: str | None,
        reason: str,
        batch_id: str | None = None,
        *,
        whole_key: bool = False,
    ) -> None:
        """Take a model/key out of the pool (see `record_exhaustion`)."""
        record_exhaustion(
            self.store,
            self.pool,
            chunk.model,
            key_id,
            reason,
            whole_key=whole_key,
            chunk_id=chunk.chunk_id,
            batch_id=batch_id,
        )

    def report_progress(self) -> None:
        if self.on_progress is None:
            return
        remote: dict[str, int] = {}
        for b in self.store.batches():
            if b["collected_at"] is None:
                remote[b["status"]] = remote.get(b["status"], 0) + 1
        self.on_progress(
            Progress(
                self.store.counts(), len(self.store.chunks("submitted")), remote, self.store.spent()
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
            for c in self.store.chunks("submitting", "submitted")
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
        in_flight = sum(c.est_cost or 0.0 for c in self.store.chunks("submitting", "submitted"))
        return self.store.spent() + in_flight + (chunk.est_cost or 0.0) <= cap + 1e-12

    @_in_run
    def submit_ready(self) -> None:
        if self.store.chunks("uploading", "submitting"):
            self.reconcile()  # a call failed ambiguously earlier in this invocation
        for chunk in self.store.chunks("built", "uploaded"):
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
            if not self.fits_token_limit(chunk):
                continue
            if not self.fits_budget(chunk):
                if not self.budget_hit:
                    logger.warning(
                        "budget: submitting chunk {} (est ${:.4f}) would pass --max-cost ${:.4f} "
                        "(spent ${:.4f}); no more chunks are submitted",
                        chunk.chunk_id,
                        chunk.est_cost or 0.0,
                        self.spec.max_cost,
                        self.store.spent(),
                    )
                self.budget_hit = True
                return
            try:
                self._submit(chunk, key)
            except ApiCallError as exc:
                if exc.cls in EXHAUSTING:
                    self.exhaust(
                        chunk,
                        key.key_id,
                        f"{exc.what}: {exc.cls} ({exc.code}): {exc.message}",
                        whole_key=exc.cls == "auth",
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
        if chunk.file_id:
            self._delete_file(chunk.model, chunk.key_id, chunk.file_id)
        self.store.abandon_chunk(chunk.chunk_id, reason)

    def remote_file_name(self, chunk: ChunkRow) -> str:
        return f"{self.run.run_id}-c{chunk.chunk_id:06d}-a{chunk.attempt}.jsonl"

    def metadata(self, chunk: ChunkRow) -> dict[str, str]:
        return {
            "batchops_run": self.run.run_id,
            "batchops_chunk": str(chunk.chunk_id),
            "batchops_attempt": str(chunk.attempt),
        }

    @_on_chunk
    def _submit(self, chunk: ChunkRow, key) -> None:
        client = self.pool.client(chunk.model, key.key_id)
        policy = self.spec.retry
        if chunk.state == "uploaded" and chunk.key_id != key.key_id:
            # The file belongs to another key's account: upload it again under this key.
            self._delete_file(chunk.model, chunk.key_id, chunk.file_id)
            self.store.set_chunk(chunk.chunk_id, state="built", file_id=None)
            chunk = self.store.chunk(chunk.chunk_id)
        if chunk.state == "built":
            logger.debug("chunk {}: built → uploading (key {})", chunk.chunk_id, key.label)
            self.store.set_chunk(
                chunk.chunk_id,
                state="uploading",
                key_id=key.key_id,
                event=f"uploading {Path(chunk.path).name} with key {key.label}",
            )
            try:
                with open(chunk.path, "rb") as fh:
                    f = call(
                        client.files.create,
                        file=(self.remote_file_name(chunk), fh),
                        purpose="batch",
                        what=f"upload chunk {chunk.chunk_id}",
                        policy=policy,
                        scrub=self.pool.scrub,
                        # Never retried blindly: an upload that timed out may exist; reconcile
                        # looks it up by name before anything is sent again.
                        attempts=1,
                    )
            except ApiCallError as exc:
                if _refused(exc):  # nothing was created: the intent is void
                    self.store.set_chunk(chunk.chunk_id, state="built")
                raise
            self.store.set_chunk(
                chunk.chunk_id, state="uploaded", file_id=f.id, event=f"uploaded as {f.id}"
            )
            logger.debug("chunk {} uploaded as {}", chunk.chunk_id, f.id)
            chunk = self.store.chunk(chunk.chunk_id)
        logger.debug("chunk {}: uploaded → submitting (key {})", chunk.chunk_id, key.label)
        self.store.set_chunk(chunk.chunk_id, state="submitting", key_id=key.key_id)
        try:
            b = call(
                client.batches.create,
                input_file_id=chunk.file_id,
                endpoint=self.spec.batch_endpoint(chunk.model),
                completion_window=self.spec.completion_window,
                metadata=self.metadata(chunk),
                what=f"create batch for chunk {chunk.chunk_id}",
                policy=policy,
                scrub=self.pool.scrub,
                attempts=1,  # a retried create could start a second, paid batch: reconcile first
            )
        except ApiCallError as exc:
            if _refused(exc):
                self.store.set_chunk(chunk.chunk_id, state="uploaded")
            # Otherwise (timeout, dropped connection, 5xx) the batch may exist: reconcile decides.
            raise
        self._attach(chunk, b)

    @_on_chunk
    def _attach(self, chunk: ChunkRow, b) -> None:
        chunk = self.store.chunk(chunk.chunk_id)
        self.store.upsert_batch(chunk, b)
        self.store.set_chunk(
            chunk.chunk_id,
            state="submitted",
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
        self.pool.delete_file(model, key_id, file_id, self.spec.retry)

    # ------------------------------------------------------------------ crash recovery
    @_in_run
    def reconcile(self) -> None:
        """Re-attach to remote objects created just before a crash, instead of creating them again."""
        for chunk in self.store.chunks("uploading", "submitting"):
            self._reconcile_one(chunk)

    @_on_chunk
    def _reconcile_one(self, chunk: ChunkRow) -> None:
        client = self.pool.client(chunk.model, chunk.key_id)
        policy = self.spec.retry
        if chunk.state == "uploading":
            name = self.remote_file_name(chunk)
            files = call(
                lambda c=client: list(c.files.list(purpose="batch")),
                what="list files",
                policy=policy,
                scrub=self.pool.scrub,
            )
            matches = sorted((f for f in files if f.filename == name), key=lambda f: f.created_at)
            if matches:
                for extra in matches[1:]:
                    self._delete_file(chunk.model, chunk.key_id, extra.id)
                self.store.set_chunk(
                    chunk.chunk_id,
                    state="uploaded",
                    file_id=matches[0].id,
                    event=f"reconciled: upload found as {matches[0].id}",
                )
                logger.info(
                    "chunk {}: reconciled, upload found as {}", chunk.chunk_id, matches[0].id
                )
            else:
                self.store.set_chunk(
                    chunk.chunk_id, state="built", event="reconciled: upload never arrived"
                )
                logger.info("chunk {}: reconciled, upload never arrived", chunk.chunk_id)
        else:
            found = self._find_remote_batch(client, chunk)
            if found is not None:
                self._attach(chunk, found)
                self.store.event(
                    "reconciled",
                    f"re-attached to batch {found.id}",
                    chunk_id=chunk.chunk_id,
                    batch_id=found.id,
                )
                logger.info(
                    "chunk {}: reconciled, re-attached to batch {}", chunk.chunk_id, found.id
                )
            else:
                self.store.set_chunk(
                    chunk.chunk_id,
                    state="uploaded",
                    event="reconciled: batch was never created",
                )
                logger.info("chunk {}: reconciled, batch was never created", chunk.chunk_id)

    def _find_remote_batch(self, client, chunk: ChunkRow):
        want = self.metadata(chunk)
        since = float(self.store.get_meta("created_at") or 0) - RECONCILE_SLACK
        page = call(
            client.batches.list,
            limit=100,
            what="list batches",
            policy=self.spec.retry,
            scrub=self.pool.scrub,
        )
        for b in page:  # auto-paginates; newest first, so stop once older than this run
            if (b.metadata or {}) == want or all(
                (b.metadata or {}).get(k) == v for k, v in want.items()
            ):
                return b
            if b.created_at and b.created_at < since:
                break
        return None

    # ------------------------------------------------------------------ polling and collecting
    @_in_run
    def poll(self, *, refill: bool = False) -> None:
        """Poll every in-flight batch and collect the finished ones.

        With `refill` (the run loop), batches that completed without an error file are collected
        last: chunks waiting for the token limit are submitted first, because a finished batch no
        longer counts against the remote enqueued limit and downloading and recording a big
        result file takes seconds. (Batches with failed requests are collected first: their
        errors may exhaust a model or key, which decides where the next chunk goes.)"""
        deferred: list[tuple[ChunkRow, Any]] = []
        in_flight = self.store.chunks("submitted")
        listed = self._list_in_flight(in_flight)
        for chunk in in_flight:
            with logger.contextualize(chunk=chunk.chunk_id, batch=chunk.batch_id):
                client = self.pool.client(chunk.model, chunk.key_id)
                b = listed.get(chunk.batch_id or "")
                try:
                    b = b or call(
                        client.batches.retrieve,
                        chunk.batch_id,
                        what=f"poll batch {chunk.batch_id}",
                        policy=self.spec.retry,
                        scrub=self.pool.scrub,
                    )
                except ApiCallError as exc:
                    logger.warning(
                        "poll of batch {} failed: {}; will poll again", chunk.batch_id, exc
                    )
                    continue
                self.store.upsert_batch(chunk, b)
                logger.debug(
                    "batch {} (chunk {}): {} {}",
                    b.id,
                    chunk.chunk_id,
                    b.status,
                    b.request_counts.model_dump() if b.request_counts else "",
                )
                if refill and b.status == "completed" and not b.error_file_id:
                    deferred.append((chunk, b))
                elif b.status in ("completed", "failed", "expired", "cancelled"):
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

    def _list_in_flight(self, chunks: list[ChunkRow]) -> dict[str, Any]:
        """With several batches in flight on one account, one `batches.list` page (newest
        first, up to 100) answers for all of them: one call instead of one per batch. A batch
        it does not show (older than the page) is retrieved on its own."""
        groups: dict[int, tuple[Any, int]] = {}  # one account (client): its batches in flight
        for c in chunks:
            client = self.pool.client(c.model, c.key_id)
            groups[id(client)] = (client, groups.get(id(client), (client, 0))[1] + 1)
        seen: dict[str, Any] = {}
        for client, n in groups.values():
            if n < LIST_POLL_MIN:
                continue
            try:
                page = call(
                    client.batches.list,
                    limit=100,
                    what=f"poll {n} batches (one list page)",
                    policy=self.spec.retry,
                    scrub=self.pool.scrub,
                )
            except ApiCallError as exc:
                logger.debug("list poll failed ({}); polling batches one by one", exc)
                continue
            seen.update((b.id, b) for b in page.data)
        return seen

    def _collect_or_retry(self, chunk: ChunkRow, b) -> None:
        try:
            self.collect(chunk, b)
        except ApiCallError as exc:  # the chunk stays submitted: the next poll collects it
            logger.warning("collecting batch {} failed: {}; will try again", b.id, exc)

    @_on_chunk
    def collect(self, chunk: ChunkRow, b) -> None:
        if b.status == "failed":
            self._collect_failed(chunk, b)
            return
        outcomes: list[tuple[RowOutcome, float | None, bool]] = []
        exhausted = False
        for file_id, folder in (
            (b.output_file_id, self.run.outputs),
            (b.error_file_id, self.run.errors),
        ):
            if not file_id:
                continue
            path = self._download(chunk, b.id, file_id, folder)
            for o in results.parse_file(path, self.spec.endpoint):
                o = structured.check_outcome(o, self.spec)  # schema answers: validated
                o.retryable = (
                    o.retryable and is_retryable(o.error_class, self.spec.retry.retry_on)
                    if o.error_class
                    else o.retryable
                )
                exhausted |= o.error_class in EXHAUSTING
                cost = None
                if o.usage is not None:
                    cost = pricing.cost_or_none(
                        o.usage, chunk.model, batch=True, overrides=self.overrides()
                    )
                # Exhausted model/key is not the row's fault: it does not use up a retry.
                outcomes.append((o, cost, o.error_class not in EXHAUSTING))
        if exhausted:
            self.exhaust(
                chunk, chunk.key_id, "requests refused with insufficient quota / no access", b.id
            )
        applied = self.store.record_outcomes(
            chunk.chunk_id, b.id, outcomes, max_retries=self.spec.retry.max_retries
        )
        logger.info(
            "batch {} {}: {} succeeded, {} re-queued, {} failed",
            b.id,
            b.status,
            applied.succeeded,
            applied.requeued,
            applied.failed,
        )
        batch_cost = sum(c for _, c, _ in outcomes if c is not None)
        unpriced = sum(1 for o, c, _ in outcomes if c is None and o.usage is not None)
        logger.info(
            "cost: batch {} (model {}) ${:.6f}{}; run total ${:.6f}",
            b.id,
            chunk.model,
            batch_cost,
            f" + {unpriced} request(s) without a known price" if unpriced else "",
            self.store.spent(),
        )

    def _download(self, chunk: ChunkRow, batch_id: str, file_id: str, folder: Path) -> Path:
        client = self.pool.client(chunk.model, chunk.key_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{batch_id}.jsonl"
        content = call(
            client.files.content,
            file_id,
            what=f"download {file_id}",
            policy=self.spec.retry,
            scrub=self.pool.scrub,
        )
        tmp = path.with_suffix(".jsonl.tmp")
        content.write_to_file(tmp)
        os.replace(tmp, path)
        return path

    @_on_chunk
    def _collect_failed(self, chunk: ChunkRow, b) -> None:
        errors = list(b.errors.data) if b.errors and b.errors.data else []
        classes = {classify_batch_error(e.code) for e in errors}
        text = (
            "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "batch failed without errors"
        )
        text = self.pool.scrub(text)
        if "token_limit" in classes:
            # Not the chunk's fault: wait for in-flight batches of this model, then send the same file again.
            others = self.in_flight_tokens(chunk.model) - chunk.est_tokens
            if others <= 0:  # refused with nothing else in flight: it can never fit as it is
                self._split_or_fail(chunk, b.id, text)
                return
            self.learn_token_limit(chunk.model, others, others + chunk.est_tokens)
            self.store.set_chunk(
                chunk.chunk_id,
                state="uploaded",
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
            return
        exhausting = classes & EXHAUSTING
        if exhausting:
            self.exhaust(chunk, chunk.key_id, text, b.id)
        self.store.requeue_chunk_rows(
            chunk.chunk_id,
            f"batch {b.id} failed: {text}",
            next(iter(exhausting)) if exhausting else "api_error",
            counts=not exhausting,
            max_retries=self.spec.retry.max_retries,
        )
        logger.warning("batch {} failed: {}", b.id, text)

    # ------------------------------------------------------------------ cancel
    @_in_run
    def cancel_all(self) -> int:
        """Cancel every in-flight batch, wait for them to stop, and record their partial results."""
        chunks = self.store.chunks("submitted")
        for chunk in chunks:
            self._cancel_one(chunk)
        while self.store.chunks("submitted"):
            self.poll()
            if self.store.chunks("submitted"):
                self.sleep(min(self.spec.poll_interval, 2.0))
        return len(chunks)

    @_on_chunk
    def _cancel_one(self, chunk: ChunkRow) -> None:
        client = self.pool.client(chunk.model, chunk.key_id)
        try:
            call(
                client.batches.cancel,
                chunk.batch_id,
                what=f"cancel batch {chunk.batch_id}",
                policy=self.spec.retry,
                scrub=self.pool.scrub,
            )
            self.store.event(
                "cancel",
                f"cancel requested for batch {chunk.batch_id}",
                chunk_id=chunk.chunk_id,
                batch_id=chunk.batch_id,
            )
            logger.info("cancel requested for batch {}", chunk.batch_id)
        except ApiCallError as exc:
            if exc.status != 409:  # 409: already finished; it is collected below
                logger.warning("cancel of batch {} failed: {}", chunk.batch_id, exc)


def _refused(exc: ApiCallError) -> bool:
    """The server answered with a 4xx: it created nothing, so the written intent can be undone."""
    return exc.status is not None and 400 <= exc.status < 500


def record_exhaustion(
    store: Store,
    pool: Pool,
    model: str,
    key_id: str | None,
    reason: str,
    *,
    whole_key: bool = False,
    chunk_id: int | None = None,
    batch_id: str | None = None,
) -> None:
    """Take a model/key out of the pool, for both lanes: every switch is an event, and the pool
    state `batchops status` shows is saved (the pool itself lives only in this invocation)."""
    before = pool.current()
    pool.exhaust(model, key_id, reason, whole_key=whole_key)
    after = pool.current()
    label = pool.all_keys[key_id].label if key_id in pool.all_keys else "?"
    what = f"key {label}" if whole_key else f"model {model} on key {label}"
    if after is None:
        then = "no model/key left in the pool"
    elif after != before:
        then = f"switching to model {after[0].name} on key {after[1].label}"
    else:
        then = f"still using model {after[0].name} on key {after[1].label}"
    store.event(
        "switch",
        pool.scrub(f"{what} exhausted ({reason}); {then}"),
        chunk_id=chunk_id,
        batch_id=batch_id,
    )
    save_pool_state(store, pool)


def save_pool_state(store: Store, pool: Pool) -> None:
    """The pool as this invocation sees it (keys masked), for `batchops status`."""
    state = {"ts": time.time(), "pairs": pool.summary()}
    store.set_meta("pool_state", pool.scrub(json.dumps(state)))
