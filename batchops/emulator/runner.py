"""Drives batches through their life cycle on the server clock, whether or not anyone polls.

validating → in_progress → finalizing → completed, or → failed (validation), → expired
(expire_first_n / the 24 h window), cancelling → cancelled. Requests run progressively over the
in-progress time, so a cancel or an expiry leaves a real partial result.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from batchops.emulator import errors as E
from batchops.emulator.errors import ORG
from batchops.emulator.executor import Outcome, execute
from batchops.emulator.ids import hex_id
from batchops.emulator.spool import Spool
from batchops.emulator.state import BATCH_WINDOW, TERMINAL, Batch, Emulator
from batchops.emulator.validation import BatchRequest, InputCheck, parse_request, validate_input

log = logging.getLogger("batchops.emulator")

TICK_SECONDS = 0.01
# Work per slice before yielding to the HTTP handlers (keeps polls fast during a 50k batch).
SLICE_SECONDS = 0.02

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."

# Input validation parses whole files; it runs off the event loop.
_validators = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emulator-validate")


def start_validation(emu: Emulator, b: Batch) -> None:
    """Begin checking the batch's input file (snapshotted now, like the real service)."""
    f = emu.files.get(b.params.input_file_id)
    if f is None:
        missing = InputCheck(
            errors=[
                {
                    "code": "invalid_request",
                    "message": f"Cannot find file {b.params.input_file_id}, or organization "
                    f"{ORG} does not have access to it.",
                    "param": "file_id",
                    "line": None,
                }
            ]
        )
        b.check = _validators.submit(lambda: missing)
        return
    sc = emu.scenario
    known = set(sc.models) if sc.models is not None else None
    # The batch's own link to the bytes: deleting the file later does not change what it runs.
    b.input_path = emu.new_path("input")
    os.link(f.path, b.input_path)
    b.check = _validators.submit(
        _validate_file,
        b.input_path,
        b.params.endpoint,
        known_models=known,
        max_requests=sc.max_requests_per_batch,
        need_tokens=bool(sc.enqueued_token_limit),
    )


def _validate_file(path: Path, endpoint: str, **kwargs: Any) -> InputCheck:
    with path.open("rb") as fh:
        return validate_input(fh, endpoint, **kwargs)


async def run_forever(emu: Emulator) -> None:
    """The runner task: advance every live batch, yielding often."""
    while True:
        try:
            busy = tick(emu)
        except Exception:  # a bug must not stop every batch: log it and keep ticking
            log.exception("emulator runner tick failed")
            busy = False
        await asyncio.sleep(0 if busy else TICK_SECONDS)


def tick(emu: Emulator) -> bool:
    """Advance all batches once; True when work is left that should run right away."""
    deadline = time.monotonic() + SLICE_SECONDS
    busy = False
    for b in list(emu.live.values()):
        busy |= _advance(emu, b, deadline)
        if b.status in TERMINAL:
            emu.live.pop(b.id, None)
    return busy


def _advance(emu: Emulator, b: Batch, deadline: float) -> bool:
    """One step of one batch. Phase ends are scheduled from the batch's creation, so time
    spent validating a big file is made up during in_progress (when execution keeps up)."""
    sc = emu.scenario
    mono = time.monotonic()
    wall = int(time.time())
    since_created = mono - b.created_mono
    validating_end = sc.scaled(sc.validating_seconds)

    if b.status == "validating":
        if since_created < validating_end or b.check is None or not b.check.done():
            return False
        _finish_validation(emu, b, wall, mono)
        return b.status == "in_progress"

    n = b.total
    running_end = validating_end + sc.scaled(sc.in_progress_seconds + sc.per_request_seconds * n)
    if b.status == "in_progress":
        if wall >= b.created_at + BATCH_WINDOW:
            _close(emu, b, "expired", wall, mono)
            return False
        span = running_end - (b.phase_started - b.created_mono)
        elapsed = mono - b.phase_started
        target = n if elapsed >= span else math.floor(n * elapsed / span)
        if b.expire_index is not None:
            target = min(target, b.expire_index)
        more = _run_requests(emu, b, target, deadline)
        if b.expire_index is not None and b.next_index >= b.expire_index:
            _close(emu, b, "expired", wall, mono)
        elif b.next_index >= n:
            b.enter("finalizing", wall, mono)
        return more

    if b.status == "finalizing":
        if since_created >= running_end + sc.scaled(sc.finalizing_seconds):
            _close(emu, b, "completed", wall, mono)
        return False

    if b.status == "cancelling" and mono - b.phase_started >= sc.scaled(sc.cancelling_seconds):
        _close(emu, b, "cancelled", wall, mono)
    return False


def _finish_validation(emu: Emulator, b: Batch, wall: int, mono: float) -> None:
    assert b.check is not None
    check = b.check.result()
    b.check = None
    if check.errors:
        b.errors = check.errors
        b.release()
        b.enter("failed", wall, mono)
        return
    b.model = check.model
    b.prompt_tokens = check.prompt_tokens
    limit = emu.scenario.enqueued_token_limit.get(check.model or "")
    if limit is not None and check.prompt_tokens + emu.enqueued_tokens(b.model or "", b) > limit:
        b.errors = [
            {
                "code": "token_limit_exceeded",
                "message": f"Enqueued token limit reached for {b.model} in organization {ORG}. "
                f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress "
                "batches have been completed.",
                "param": None,
                "line": None,
            }
        ]
        b.prompt_tokens = 0
        b.release()
        b.enter("failed", wall, mono)
        return
    if b.input_path is not None:  # an OpenAI batch: requests are read from the file as they run
        b.total = check.count
        b.tokens = check.tokens
        b.reader = b.input_path.open("rb")
        shuffle = emu.scenario.shuffle_output
        b.ok_spool = Spool(emu.new_path("ok"), b.ok_rng, shuffle)
        b.err_spool = Spool(emu.new_path("err"), b.err_rng, shuffle)
    else:
        b.requests = check.requests
        b.total = len(b.requests)
    c = emu.counters
    if c.batches_started < emu.scenario.expire_first_n:
        b.expire_index = math.floor(b.total * emu.scenario.expire_done_fraction)
    c.batches_started += 1
    b.enter("in_progress", wall, mono)


def _run_requests(emu: Emulator, b: Batch, target: int, deadline: float) -> bool:
    """Execute requests up to index `target`; True if stopped by the time slice."""
    endpoint = b.params.endpoint
    model = b.model or ""
    dumps = orjson.dumps
    shuffle = emu.scenario.shuffle_output
    i = b.next_index
    while i < target:
        r = _request(b, i)
        try:
            out = execute(
                emu,
                custom_id=r.custom_id,
                model=r.body.get("model") or model,  # an Anthropic batch may mix models
                body=r.body,
                endpoint=endpoint,
                api_key=b.api_key,
                n_prompt=r.prompt_tokens,
                image_error=r.image_error,
                lane="line",
            )
        except Exception:  # an emulator bug on one odd request: a 500 line, not a stuck batch
            log.exception("emulator failed on request %s", r.custom_id)
            err = E.server_error(500)
            out = Outcome(err.status, err.body(), err)
        line = {
            "id": hex_id("batch_req_"),
            "custom_id": r.custom_id,
            "response": {
                "status_code": out.status,
                "request_id": hex_id("req_"),
                "body": out.body,
            },
            "error": None,
        }
        if out.status == 200:
            if b.ok_spool is not None:
                b.ok_spool.add(dumps(line))
            else:
                _place(b.ok_lines, b.ok_rng, dumps(line), shuffle)
            b.usage_in += out.prompt_tokens
            b.usage_cached += out.cached_tokens
            b.usage_out += out.completion_tokens
        elif b.err_spool is not None:
            b.err_spool.add(dumps(line))
        else:
            _place(b.err_lines, b.err_rng, dumps(line), shuffle)
        i += 1
        if i & 63 == 0 and time.monotonic() >= deadline:
            break
    b.next_index = i
    return i < target


def _close(emu: Emulator, b: Batch, status: str, wall: int, mono: float) -> None:
    """Enter a terminal status: unexecuted requests become error lines, files are written."""
    code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
    runnable = b.reader is not None or bool(b.requests)  # none before validation (OpenAI)
    if code is not None and runnable and b.next_index < b.total:
        message = EXPIRED_MESSAGE if code == "batch_expired" else CANCELLED_MESSAGE
        shuffle = emu.scenario.shuffle_output
        for i in range(b.next_index, b.total):
            line = _error_line(_request(b, i).custom_id, code, message)
            if b.err_spool is not None:
                b.err_spool.add(line)
            else:
                _place(b.err_lines, b.err_rng, line, shuffle)
        b.next_index = b.total
    if b.check is not None:
        b.check.cancel()  # cancelled before validation finished: no requests, no files
        b.check = None
    if b.dialect == "openai":  # other dialects render results from the lines themselves
        b.closed_counts = b.counts()
        b.output_file_id = _write(emu, b, b.ok_spool, "output")
        b.error_file_id = _write(emu, b, b.err_spool, "error")
    b.release()  # nothing of a request stays in memory once the batch has ended
    b.enter(status, wall, mono)


def _request(b: Batch, i: int) -> BatchRequest:
    """Request i of the batch: for OpenAI batches the next line of the input file (they are
    read in order, once)."""
    if b.reader is None:
        return b.requests[i]
    raw = b.reader.readline()
    while raw and not raw.strip():  # blank lines were skipped by validation too
        raw = b.reader.readline()
    return parse_request(raw, b.tokens[i] if b.tokens is not None else None)


def _place(lines: list[bytes], rng: random.Random | None, line: bytes, shuffle: bool) -> None:
    """Append `line` at a seeded random position (inside-out Fisher-Yates step)."""
    if shuffle and rng is not None and lines:
        j = int(rng.random() * (len(lines) + 1))
        if j < len(lines):
            lines.append(lines[j])
            lines[j] = line
            return
    lines.append(line)


def _error_line(custom_id: str, code: str, message: str) -> bytes:
    line: dict[str, Any] = {
        "id": hex_id("batch_req_"),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return orjson.dumps(line)


def _write(emu: Emulator, b: Batch, spool: Spool | None, kind: str) -> str | None:
    if spool is None or not len(spool):
        return None
    path = emu.new_path(kind)
    spool.write_to(path)
    f = emu.add_file(f"{b.id}_{kind}.jsonl", "batch_output", path, b.params.output_expires_seconds)
    return f.id
