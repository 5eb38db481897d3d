"""Polling many batches with one list call, shared by every backend whose API lists batches.

With several batches in flight, one list page (newest first) answers for all of them; a batch
the page does not show is retrieved on its own. A list can be stale (some servers and caches
serve an old list while the batch itself moves on), so a batch whose listed view has not changed
for `STALE_LIST_POLLS` list polls is retrieved on its own as a check: when the retrieve agrees,
the list is trusted twice as long before the next check; when it does not, that batch is
retrieved on its own from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from loguru import logger

from batchops.backends.base import RemoteBatch, RemoteError

# From this many batches in flight, one list page polls them all.
LIST_POLL_MIN = 3
STALE_LIST_POLLS = 10


def _view(b: RemoteBatch) -> tuple[Any, ...]:
    return (b.raw_status, b.total, b.completed, b.failed)


class ListPoller:
    """The poll of one backend: `list_page(n)` reads one page of batches for n in flight
    (raising RemoteError), `retrieve` reads one batch."""

    def __init__(
        self,
        list_page: Callable[[int], Iterable[RemoteBatch]],
        retrieve: Callable[[str], RemoteBatch],
    ) -> None:
        self._list_page = list_page
        self._retrieve = retrieve
        self._listed: dict[str, tuple[tuple[Any, ...], int]] = {}  # id → (view, unchanged polls)
        self._trust: dict[str, int] = {}  # id → unchanged list polls before the next check
        self._untrusted: set[str] = set()  # batches the list showed wrong: always retrieved

    def poll(self, batch_ids: list[str]) -> dict[str, RemoteBatch]:
        seen: dict[str, RemoteBatch] = {}
        if len(batch_ids) >= LIST_POLL_MIN:
            wanted = set(batch_ids) - self._untrusted
            try:
                for b in self._list_page(len(batch_ids)):
                    if b.id in wanted and not self._stale(b):
                        seen[b.id] = b
            except RemoteError as exc:
                logger.debug("list poll failed ({}); polling batches one by one", exc)
        for batch_id in batch_ids:
            if batch_id in seen:
                continue
            try:
                with logger.contextualize(batch=batch_id):  # the log line names the batch
                    seen[batch_id] = got = self._retrieve(batch_id)
            except RemoteError as exc:
                logger.warning("poll of batch {} failed: {}; will poll again", batch_id, exc)
                continue
            self._check(batch_id, got)
        return seen

    def _stale(self, b: RemoteBatch) -> bool:
        """Whether this listed view has been the same for long enough to check it."""
        view = _view(b)
        old = self._listed.get(b.id)
        unchanged = old[1] + 1 if old is not None and old[0] == view else 0
        self._listed[b.id] = (view, unchanged)
        if unchanged >= self._trust.get(b.id, STALE_LIST_POLLS):
            self._listed[b.id] = (view, 0)
            return True
        return False

    def _check(self, batch_id: str, got: RemoteBatch) -> None:
        """A retrieve of a batch the list showed: trust the list longer, or never again."""
        listed = self._listed.get(batch_id)
        if listed is None or batch_id in self._untrusted:
            return
        if listed[0] == _view(got):
            self._trust[batch_id] = 2 * self._trust.get(batch_id, STALE_LIST_POLLS)
        else:
            logger.info("batch {}: the list view is stale; polled on its own", batch_id)
            self._untrusted.add(batch_id)
