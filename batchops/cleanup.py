"""Remote cleanup: a finished batch's objects on the provider are deleted, crash or not.

Provider stores are limited (Azure: 500 files a resource without expiry; a 1M-row job makes
~60 batches of 3 files) and the run dir keeps copies of every file, so once a batch's outcomes
are committed its uploaded input, output and error files are deleted, and the batch itself
where the API deletes batches (Anthropic, Gemini). What is to be deleted is recorded in the
store (`remote_cleanup`) before the transaction that ends the chunk's use of it, and is due
from that commit on: a crash between the commit and the deletes leaves them due, and the next
run/watch/monitor (at `reconcile`) deletes them. Deletes run in the background and never fail
a run: a failure is a warning (retried by the next invocation), a 404 means done.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from loguru import logger

from batchops.backends import Backend, RemoteBatch, RemoteError
from batchops.store import ChunkRow, CleanupItem, Store

if TYPE_CHECKING:
    from batchops.providers import Pool

# Deletes at once (a provider answers one in ~0.2 s: 3 a batch would hold the run loop up
# ~20 min over a 2,000-batch job were they made in line).
DELETE_WORKERS = 2

# Deletes started by this process and not yet recorded, per run database, over every engine
# of it (`monitor` makes one a cycle): an object is never handed to two deleters at once, and
# a delete an earlier engine started is recorded by the next one. An object stays here until
# its outcome is in the store, so a due record is never queued again meanwhile.
Key = tuple[str, str]  # (kind, ref)
_PENDING: dict[str, dict[Key, Future[str | None]]] = {}
_LOCK = threading.Lock()


def batch_items(
    backend: Backend,
    chunk: ChunkRow,
    b: RemoteBatch,
    *,
    input_file: bool = True,
) -> list[CleanupItem]:
    """What of this ended batch is to go: its files (file-based providers; the input only
    when `input_file`, i.e. the chunk will not send it again) and the batch itself."""
    refs: list[tuple[str, str | None]] = []
    if backend.uploads_files:  # inline requests, results by URL: no files of ours
        refs += [("input", chunk.file_id if input_file else None)]
        refs += [("output", b.output_ref), ("error", b.error_ref)]
    if backend.deletes_batches:
        refs.append(("batch", b.id))
    return [
        CleanupItem(kind, ref, chunk.chunk_id, b.id, chunk.model, chunk.key_id)
        for kind, ref in refs
        if ref
    ]


def input_item(chunk: ChunkRow, batch_id: str | None = None) -> list[CleanupItem]:
    """A chunk's uploaded file, to go once the chunk no longer uses it."""
    if not chunk.file_id:
        return []
    return [
        CleanupItem("input", chunk.file_id, chunk.chunk_id, batch_id, chunk.model, chunk.key_id)
    ]


class RemoteCleanup:
    """Plans, runs and records the deletes of one engine (only the main thread writes the
    store: workers hand their outcome back through their futures)."""

    def __init__(self, store: Store, pool: Pool, *, keep: bool) -> None:
        self.store, self.pool, self.keep = store, pool, keep
        self._db = str(store.path)
        self._pool: ThreadPoolExecutor | None = None
        # Failed for now (a transient error): asked again by the next invocation, not at every
        # collection of this one (a delete outage would cost a call per record per batch).
        self._failed: set[Key] = set()

    def plan(self, items: list[CleanupItem]) -> None:
        """Record objects to delete (nothing with --keep-remote-files); due once their chunk's
        next transition commits."""
        if items and not self.keep:
            self.store.plan_cleanup(items)

    def start(self, chunk_id: int | None = None) -> int:
        """Hand every due record (of this chunk, after its transition; of every chunk at
        reconcile, where a crash's leftovers are) not already being deleted to the background;
        returns how many."""
        if self.keep:
            return 0
        self.harvest()
        started = 0
        for item in self.store.cleanup_due(chunk_id):
            key = (item.kind, item.ref)
            with _LOCK:
                if key in _PENDING.get(self._db, {}) or key in self._failed:
                    continue
            try:
                backend = self.pool.backend(item.model, item.key_id)
            except Exception as exc:  # noqa: BLE001 - e.g. its key is gone: try another time
                logger.warning("could not delete {} {}: {}", item.kind, item.ref, exc)
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(DELETE_WORKERS, thread_name_prefix="delete")
            call = self._pool.submit(_delete, backend, item)
            with _LOCK:
                _PENDING.setdefault(self._db, {})[key] = call
            started += 1
        return started

    def harvest(self, *, wait: bool = False) -> None:
        """Record the deletes that ended (all of them, waited for, with `wait`). A delete that
        raised a BaseException (the process is going down) takes the rest with it: they stay
        due in the store."""
        with _LOCK:
            pending = dict(_PENDING.get(self._db, {}))
        done: list[tuple[str, str, str]] = []
        ended: list[Key] = []
        try:
            for key, call in pending.items():
                if not wait and not call.done():
                    continue
                try:
                    outcome = call.result()
                except BaseException:
                    with _LOCK:
                        _PENDING.pop(self._db, None)
                    raise
                ended.append(key)
                if outcome is None:
                    self._failed.add(key)
                else:
                    done.append((*key, outcome))
        finally:
            if done:
                self.store.cleanup_done(done)
            with _LOCK:  # released only once recorded: never queued twice
                for key in ended:
                    _PENDING.get(self._db, {}).pop(key, None)

    def finish(self) -> None:
        """Wait for every delete started and record them (each failure already logged)."""
        try:
            self.harvest(wait=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _delete(backend: Backend, item: CleanupItem) -> str | None:
    """Delete one remote object; returns the record's outcome (deleted, gone, refused), or
    None when it stays due (a transient failure: the next invocation tries again). Never
    raises an Exception: a cleanup must never fail the run."""
    try:
        if item.kind == "batch":
            backend.delete_batch(item.ref)
        else:
            backend.delete_file(item.ref)
        return "deleted"
    except Exception as exc:  # noqa: BLE001 - whatever it is, the run's results are committed
        if isinstance(exc, RemoteError) and exc.status == 404:
            return "gone"  # already gone (e.g. a delete whose answer was lost)
        what = "batch" if item.kind == "batch" else f"{item.kind} file"
        logger.warning("batch {}: could not delete {} {}: {}", item.batch_id, what, item.ref, exc)
        if isinstance(exc, RemoteError) and exc.refused and exc.status not in (408, 409, 429):
            return "refused"  # asking again would be refused again
        return None
