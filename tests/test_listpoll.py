"""backends/listpoll.py: one list page polls many batches; a stale list is caught."""

from __future__ import annotations

from batchops.backends.base import RemoteBatch, RemoteError
from batchops.backends.listpoll import LIST_POLL_MIN, STALE_LIST_POLLS, ListPoller
from batchops.states import BatchState


def batch(batch_id: str, completed: int, status: str = "in_progress") -> RemoteBatch:
    return RemoteBatch(
        id=batch_id,
        state=BatchState.IN_PROGRESS,
        raw_status=status,
        total=10,
        completed=completed,
        failed=0,
    )


class Remote:
    """A remote whose list may lag behind its batches (a stale cache)."""

    def __init__(self, ids: list[str]) -> None:
        self.truth = {i: batch(i, 0) for i in ids}
        self.listed = dict(self.truth)
        self.list_calls = 0
        self.retrieves: list[str] = []
        self.list_fails = False

    def list_page(self, n: int) -> list[RemoteBatch]:
        self.list_calls += 1
        if self.list_fails:
            raise RemoteError("list", "server_error", 503, None, "down")
        return list(self.listed.values())

    def retrieve(self, batch_id: str) -> RemoteBatch:
        self.retrieves.append(batch_id)
        return self.truth[batch_id]


def test_few_batches_are_retrieved_one_by_one() -> None:
    remote = Remote(["a", "b"])
    poller = ListPoller(remote.list_page, remote.retrieve)
    assert set(poller.poll(["a", "b"])) == {"a", "b"}
    assert remote.list_calls == 0 and sorted(remote.retrieves) == ["a", "b"]


def test_many_batches_share_one_list_page_and_unlisted_ones_are_retrieved() -> None:
    ids = [f"b{i}" for i in range(LIST_POLL_MIN + 2)]
    remote = Remote(ids)
    del remote.listed["b0"]  # older than the page shows
    poller = ListPoller(remote.list_page, remote.retrieve)
    assert set(poller.poll(ids)) == set(ids)
    assert remote.list_calls == 1 and remote.retrieves == ["b0"]


def test_a_list_that_never_moves_is_checked_then_no_longer_trusted() -> None:
    ids = ["a", "b", "c"]
    remote = Remote(ids)
    poller = ListPoller(remote.list_page, remote.retrieve)
    remote.truth["a"] = batch("a", 7)  # the batch moved on; the list still shows 0 done
    for _ in range(STALE_LIST_POLLS):
        assert poller.poll(ids)["a"].completed == 0  # the list is believed for a while
    assert poller.poll(ids)["a"].completed == 7  # then checked on its own
    remote.retrieves.clear()
    for _ in range(3):
        assert poller.poll(ids)["a"].completed == 7
    assert remote.retrieves == ["a", "a", "a"]  # from then on always retrieved


def test_a_list_that_agrees_is_trusted_twice_as_long() -> None:
    ids = ["a", "b", "c"]
    remote = Remote(ids)
    poller = ListPoller(remote.list_page, remote.retrieve)
    for _ in range(STALE_LIST_POLLS + 1):
        poller.poll(ids)
    assert sorted(remote.retrieves) == ["a", "b", "c"]  # one check each, the list was right
    remote.retrieves.clear()
    for _ in range(2 * STALE_LIST_POLLS - 1):
        poller.poll(ids)
    assert remote.retrieves == []
    poller.poll(ids)
    assert sorted(remote.retrieves) == ["a", "b", "c"]  # the next check, twice as late


def test_a_failed_list_falls_back_to_retrieves() -> None:
    ids = ["a", "b", "c"]
    remote = Remote(ids)
    remote.list_fails = True
    poller = ListPoller(remote.list_page, remote.retrieve)
    assert set(poller.poll(ids)) == set(ids)
    assert sorted(remote.retrieves) == ids
