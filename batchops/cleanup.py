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
FILE_KINDS = ("input", "output", "error")

# Objects being deleted by this process, over every engine of it (`monitor` makes one a
# cycle): a record is never handed to two deleters at once. (store path, kind, ref)
_IN_FLIGHT: set[tuple[str, str, str]] = set()
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
        self._calls: list[tuple[tuple[str, str, str], Future[str | None]]] = []
        self._pool: ThreadPoolExecutor | None = None

    def plan(self, items: list[CleanupItem]) -> None:
        """Record objects to delete (nothing with --keep-remote-files); due once their chunk's
        next transition commits."""
        if items and not self.keep:
            self.store.plan_cleanup(items)

    def start(self) -> int:
        """Hand every due record not already being deleted to the background; returns how
        many. Records of this invocation's collections and any a crash left behind alike."""
        if self.keep:
            return 0
        self.harvest()
        started = 0
        for item in self.store.cleanup_due():
            key = (str(self.store.path), item.kind, item.ref)
            with _LOCK:
                if key in _IN_FLIGHT:
                    continue
                _IN_FLIGHT.add(key)
            try:
                backend = self.pool.backend(item.model, item.key_id)
            except Exception as exc:  # noqa: BLE001 - e.g. its key is gone: try another time
                _release(key)
                logger.warning("could not delete {} {}: {}", item.kind, item.ref, exc)
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(DELETE_WORKERS, thread_name_prefix="delete")
            self._calls.append((key, self._pool.submit(_delete, backend, item, key)))
            started += 1
        return started

    def harvest(self, *, wait: bool = False) -> None:
        """Record the deletes that ended (all of them, waited for, with `wait`)."""
        done: list[tuple[str, str, str]] = []
        left: list[tuple[tuple[str, str, str], Future[str | None]]] = []
        for key, call in self._calls:
            if not wait and not call.done():
                left.append((key, call))
                continue
            outcome = call.result()  # a SimulatedCrash in tests surfaces here
            if outcome is not None:
                done.append((key[1], key[2], outcome))
        self._calls = left
        if done:
            self.store.cleanup_done(done)

    def finish(self) -> None:
        """Wait for every delete started and record them (each failure already logged)."""
        try:
            self.harvest(wait=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _release(key: tuple[str, str, str]) -> None:
    with _LOCK:
        _IN_FLIGHT.discard(key)


def _delete(backend: Backend, item: CleanupItem, key: tuple[str, str, str]) -> str | None:
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
    finally:
        _release(key)
