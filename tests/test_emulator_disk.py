"""The emulator's batch state is on disk: nothing per request stays in memory once a batch has
ended, files are served from its working dir, and the dir goes when the emulator stops."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import openai

from batchops.emulator import EmulatorServer
from batchops.emulator.counts import RequestCounts
from batchops.emulator.testing import (
    DEFAULT_KEY,
    chat_line,
    jsonl,
    results,
    run_batch,
    wait_for_batch,
)


def _client(emu: EmulatorServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=emu.base_url, api_key=DEFAULT_KEY, max_retries=0)


def test_an_ended_batch_holds_no_request_in_memory(
    emulator_factory: Callable[..., EmulatorServer],
) -> None:
    emu = emulator_factory(fail_once_fraction=0.3, seed=3)
    client = _client(emu)
    done = run_batch(client, [chat_line(f"r{i}", f"question {i}") for i in range(200)])
    assert done.status == "completed"
    b = emu.emulator.batches[done.id]
    # what a running batch holds (its input reader and link, spools, token counts) is gone
    assert b.requests == [] and b.reader is None and b.input_path is None
    assert b.ok_spool is None and b.err_spool is None and b.tokens is None
    assert b.ok_lines == [] and b.err_lines == []
    out, err = results(client, done)
    assert (len(out), len(err)) == (done.request_counts.completed, done.request_counts.failed)
    assert len(out) + len(err) == 200 and err  # fail_once picked some ids
    # the working dir holds the three files and the counts, no spool or input link
    assert len(emu.stats()["requests"]) == 200  # (the stats write the counts out)
    work = emu.emulator.workdir()
    names = sorted(p.name.split("-")[0] for p in work.iterdir())
    assert names == ["counts.sqlite", "error", "file", "output"]


def test_files_are_streamed_from_disk_and_removed_with_the_emulator(
    emulator_factory: Callable[..., EmulatorServer],
) -> None:
    emu = emulator_factory()
    client = _client(emu)
    data = jsonl([chat_line(f"r{i}", "x" * 3000) for i in range(1000)])  # ~3 MB: many reads
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert f.bytes == len(data)
    assert client.files.content(f.id).content == data
    work = emu.emulator.workdir()
    assert sum(p.stat().st_size for p in work.iterdir()) == len(data)
    client.files.delete(f.id)
    assert list(work.iterdir()) == []
    emu.stop()
    assert not work.exists()


def test_a_batch_runs_the_input_as_created_though_the_file_is_deleted(
    emulator_factory: Callable[..., EmulatorServer],
) -> None:
    emu = emulator_factory(validating_seconds=0.3)
    client = _client(emu)
    f = client.files.create(
        file=("in.jsonl", jsonl([chat_line(f"r{i}", "hi") for i in range(30)])), purpose="batch"
    )
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.files.delete(f.id)  # the batch holds its own link to the bytes
    done = wait_for_batch(client, b.id)
    out, _ = results(client, done)
    assert done.status == "completed" and sorted(x["custom_id"] for x in out) == sorted(
        f"r{i}" for i in range(30)
    )


def test_cancelled_batch_lists_unrun_requests_from_its_file(
    emulator_factory: Callable[..., EmulatorServer],
) -> None:
    emu = emulator_factory(in_progress_seconds=30, cancelling_seconds=0.05)
    client = _client(emu)
    f = client.files.create(
        file=("in.jsonl", jsonl([chat_line(f"r{i}", "hi") for i in range(50)])), purpose="batch"
    )
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while client.batches.retrieve(b.id).status == "validating":
        time.sleep(0.01)
    client.batches.cancel(b.id)
    done = wait_for_batch(client, b.id)
    out, err = results(client, done)
    assert done.status == "cancelled"
    cancelled = [e for e in err if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert len(out) + len(cancelled) == 50 and cancelled
    ids = [x["custom_id"] for x in out + cancelled]
    assert sorted(ids) == sorted(f"r{i}" for i in range(50))


def test_request_counts_on_disk_keep_first_counted_order(tmp_path: Path) -> None:
    counts = RequestCounts(lambda: tmp_path)
    for i in range(25):
        counts.add(f"id{i}", 1, i % 2)
    counts.flush()  # what FLUSH_AT distinct ids do; later increments add up with the stored
    counts.add("id3", 1, 1)
    counts.add("new", 1, 0)
    assert counts.get("id3") == (2, 2) and counts.get("new") == (1, 0)
    assert counts.get("nobody") == (0, 0)
    items = list(counts.items())
    assert [cid for cid, _, _ in items] == [f"id{i}" for i in range(25)] + ["new"]
    assert items[3] == ("id3", 2, 2)
    counts.close()
