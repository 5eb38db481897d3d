"""State of the emulator: files, batches, counters and quotas.

File bytes, result lines being produced and per-custom-id counts live on disk, in a working dir
removed when the emulator is closed; memory holds per-batch and per-file objects only, so it
does not grow with the number of requests run.

Everything here is touched only from the server's event loop thread (the HTTP handlers and the
batch runner task both run there), so no locks are needed. Other threads go through
`EmulatorServer`, which hops onto the loop.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import weakref
from array import array
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from batchops.emulator import errors as E
from batchops.emulator.counts import RequestCounts
from batchops.emulator.errors import ApiError
from batchops.emulator.ids import hex_id, new_id
from batchops.emulator.scenario import Scenario
from batchops.emulator.spool import Spool
from batchops.emulator.validation import BatchRequest, CreateParams, InputCheck
from batchops.masking import mask_key

FILE_DEFAULT_EXPIRY = 2_592_000  # batch files expire after 30 days unless told otherwise
BATCH_WINDOW = 86_400
TERMINAL = ("completed", "failed", "expired", "cancelled")
STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)


class StoredFile:
    """A file's metadata; its bytes are on disk in the emulator's working dir (a 5M-row run
    uploads and produces gigabytes)."""

    __slots__ = ("id", "filename", "purpose", "created_at", "expires_at", "size", "path")

    def __init__(
        self,
        file_id: str,
        filename: str,
        purpose: str,
        path: Path,
        created_at: int,
        expires_at: int | None,
    ) -> None:
        self.id = file_id
        self.filename = filename
        self.purpose = purpose
        self.created_at = created_at
        self.expires_at = expires_at
        self.path = path
        self.size = path.stat().st_size

    @property
    def data(self) -> bytes:
        """The whole file (small files and fault paths only; downloads are streamed)."""
        return self.path.read_bytes()

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(slots=True)
class Batch:
    id: str
    seq: int  # creation order since the last reset (seeds the output shuffle)
    params: CreateParams
    api_key: str
    created_at: int
    phase_started: float  # monotonic time the current status was entered
    created_mono: float = 0.0  # monotonic creation time: phase deadlines count from here
    dialect: str = "openai"  # "anthropic"/"gemini": no OpenAI files, shown by their own routes
    status: str = "validating"
    stamps: dict[str, int | None] = field(default_factory=dict)
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage_in: int = 0
    usage_cached: int = 0
    usage_out: int = 0
    # Runner internals
    check: Future[InputCheck] | None = None
    # Other dialects: their validated requests (freed when the batch ends). OpenAI batches read
    # theirs from `input_path` (a link to the input file, taken at create) as they run.
    requests: list[BatchRequest] = field(default_factory=list)
    input_path: Path | None = None
    reader: BinaryIO | None = None
    tokens: array[int] | None = None  # prompt tokens counted by validation (-1: bad image)
    total: int = 0
    next_index: int = 0
    # Result lines: in memory for other dialects (rendered by their own routes), spooled to
    # disk for OpenAI batches.
    ok_lines: list[bytes] = field(default_factory=list)
    err_lines: list[bytes] = field(default_factory=list)
    ok_spool: Spool | None = None
    err_spool: Spool | None = None
    # Counts of the lines once they moved into the output/error files (OpenAI dialect): the
    # batch then drops its own lines, so a downloaded 50,000-line file is held once, not twice.
    closed_counts: tuple[int, int] | None = None
    expire_index: int | None = None  # set for batches chosen by expire_first_n
    prompt_tokens: int = 0
    # Output order: lines are placed at random as they are produced (inside-out Fisher-Yates),
    # so closing a 50,000-line batch needs no shuffle.
    ok_rng: random.Random | None = None
    err_rng: random.Random | None = None

    def enter(self, status: str, wall: int, mono: float) -> None:
        self.status = status
        self.phase_started = mono
        self.stamps[f"{status}_at"] = wall

    def counts(self) -> tuple[int, int]:
        """(completed, failed) requests so far."""
        if self.closed_counts is not None:
            return self.closed_counts
        if self.ok_spool is not None and self.err_spool is not None:
            return len(self.ok_spool), len(self.err_spool)
        return len(self.ok_lines), len(self.err_lines)

    def release(self) -> None:
        """Drop what the batch held while running: its input reader and link, its spools."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.input_path is not None:
            self.input_path.unlink(missing_ok=True)
            self.input_path = None
        for spool in (self.ok_spool, self.err_spool):
            if spool is not None:
                spool.discard()
        self.ok_spool = self.err_spool = None
        self.tokens = None
        self.requests = []

    def to_api(self) -> dict[str, Any]:
        st = self.stamps
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.params.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.params.input_file_id,
            "completion_window": self.params.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": st.get("in_progress_at"),
            "expires_at": self.created_at + BATCH_WINDOW,
            "finalizing_at": st.get("finalizing_at"),
            "completed_at": st.get("completed_at"),
            "failed_at": st.get("failed_at"),
            "expired_at": st.get("expired_at"),
            "cancelling_at": st.get("cancelling_at"),
            "cancelled_at": st.get("cancelled_at"),
            "request_counts": {
                "total": self.total,
                "completed": self.counts()[0],
                "failed": self.counts()[1],
            },
            "usage": {
                "input_tokens": self.usage_in,
                "input_tokens_details": {"cached_tokens": self.usage_cached},
                "output_tokens": self.usage_out,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage_in + self.usage_out,
            },
            "metadata": self.params.metadata,
        }


@dataclass
class Counters:
    """What `GET /_emulator/stats` reports (plus per-key usage for key quotas)."""

    requests: RequestCounts  # cid -> (executed, succeeded), on disk
    calls: Counter[str] = field(default_factory=Counter)
    models: dict[str, list[int]] = field(default_factory=dict)  # model -> [executed, succeeded]
    keys: Counter[str] = field(default_factory=Counter)  # key -> executed
    batches_created: int = 0
    batches_started: int = 0  # entered in_progress (expire_first_n counts these)
    files_uploaded: int = 0
    files_deleted: int = 0
    api_calls: int = 0  # every non-admin call, drives the *_every faults


class Emulator:
    """The whole emulated account: scenario, objects, counters."""

    def __init__(self, scenario: Scenario | None = None) -> None:
        self.scenario = scenario or Scenario()
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self.live: dict[str, Batch] = {}  # not yet terminal: what the runner advances
        self._workdir: Path | None = None
        self._cleanup: Callable[[], Any] | None = None  # a weakref.finalize
        self.counters = Counters(RequestCounts(self.workdir))
        self.rpm_windows: dict[str, deque[float]] = {}
        self._file_models: dict[str, str | None] = {}
        self.dialects: dict[str, Any] = {}  # per-dialect registries (anthropic_dialect, …)
        self.downloads: Counter[str] = Counter()  # file id -> content downloads (result faults)
        self.listed: dict[str, dict[str, Any]] = {}  # batch id -> first listed view (list_stale)

    # ------------------------------------------------------------------ working dir
    def workdir(self) -> Path:
        """The dir of file bytes, spools and counts (made on first use; gone at close/exit)."""
        if self._workdir is None:
            path = Path(tempfile.mkdtemp(prefix="batchops-emulator-"))
            self._workdir = path
            self._cleanup = weakref.finalize(self, shutil.rmtree, path, True)
        return self._workdir

    def new_path(self, kind: str) -> Path:
        return self.workdir() / f"{kind}-{hex_id('')}"

    def close(self) -> None:
        """Forget everything and remove the working dir (the emulator stops)."""
        self.reset()
        if self._cleanup is not None:
            self._cleanup()
        self._workdir = self._cleanup = None

    # ------------------------------------------------------------------ admin
    def reset(self) -> None:
        for b in self.batches.values():
            if b.check is not None:
                b.check.cancel()
            b.release()
        for b in self.live.values():  # dialect batches are live without being listed here
            b.release()
        for f in self.files.values():
            f.path.unlink(missing_ok=True)
        self.files.clear()
        self.batches.clear()
        self.live.clear()
        self.counters.requests.close()
        if self._workdir is not None:
            (self._workdir / "counts.sqlite").unlink(missing_ok=True)
        self.counters = Counters(RequestCounts(self.workdir))
        self.rpm_windows.clear()
        self._file_models.clear()
        self.dialects.clear()
        self.downloads.clear()
        self.listed.clear()

    def update_scenario(self, changes: dict[str, Any]) -> Scenario:
        self.scenario = self.scenario.updated(**changes)
        # Stuck batches no longer among the first stuck_first_n go on now (dialects.start_batch).
        for reg in self.dialects.values():
            for seq, release in list(reg.get("stuck", {}).items()):
                if seq >= self.scenario.stuck_first_n:
                    release()
        return self.scenario

    def stats(self) -> dict[str, Any]:
        c = self.counters
        by_status = Counter(b.status for b in self.batches.values())
        out: dict[str, Any] = {
            "requests": {k: {"executed": e, "succeeded": s} for k, e, s in c.requests.items()},
            "calls": dict(sorted(c.calls.items())),
            "batches": {
                "created": c.batches_created,
                "by_status": {s: by_status[s] for s in STATUSES if by_status[s]},
            },
            "files": {
                "uploaded": c.files_uploaded,
                "deleted": c.files_deleted,
                "live": len(self.files),
            },
            "models": {m: {"executed": v[0], "succeeded": v[1]} for m, v in c.models.items()},
            "keys": self._masked_key_stats(),
        }
        if self.dialects:  # Anthropic / Gemini batches: created since the reset, still listed
            out["dialects"] = {
                name: {"created": reg.get("seq", 0), "listed": len(reg.get("batches", {}))}
                for name, reg in sorted(self.dialects.items())
            }
        return out

    def _masked_key_stats(self) -> dict[str, dict[str, int]]:
        """Executions per key, keys masked (two keys with the same mask are added up)."""
        out: dict[str, dict[str, int]] = {}
        for key, n in self.counters.keys.items():
            entry = out.setdefault(mask_key(key), {"executed": 0})
            entry["executed"] += n
        return out

    # ------------------------------------------------------------------ auth and quotas
    def authenticate(self, key: str | None) -> str:
        if not key:
            raise E.missing_api_key()
        allowed = self.scenario.api_keys
        if allowed is not None and key not in allowed:
            raise E.invalid_api_key(key)
        return key

    def quota_left(self, model: str | None, key: str) -> bool:
        """False when the model's or the key's execution quota is used up."""
        sc = self.scenario
        if model is not None and model in sc.model_quota:
            used = self.counters.models.get(model, [0, 0])[0]
            if used >= sc.model_quota[model]:
                return False
        return not (key in sc.key_quota and self.counters.keys[key] >= sc.key_quota[key])

    def check_rate_limit(self, key: str, model: str) -> dict[str, str]:
        """Record a sync call against the key's RPM window; ApiError when over it."""
        rpm = self.scenario.rate_limit_rpm
        if rpm is None:
            return {}
        now = time.monotonic()
        window = self.rpm_windows.setdefault(key, deque())
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= rpm:
            raise E.rate_limited(model, rpm, len(window), self.scenario.retry_after_seconds)
        window.append(now)
        reset = 60.0 - (now - window[0])
        return {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(rpm - len(window)),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }

    # ------------------------------------------------------------------ files
    def add_file(
        self, filename: str, purpose: str, data: bytes | Path, expires_seconds: int | None
    ) -> StoredFile:
        """A new file from its bytes, or from a file of the working dir (taken over)."""
        now = int(time.time())
        if expires_seconds is None and purpose in ("batch", "batch_output"):
            expires_seconds = FILE_DEFAULT_EXPIRY
        if isinstance(data, bytes):
            path = self.new_path("file")
            path.write_bytes(data)
        else:
            path = data
        f = StoredFile(
            new_id("file-"),
            filename,
            purpose,
            path,
            now,
            now + expires_seconds if expires_seconds else None,
        )
        self.files[f.id] = f
        return f

    def get_file(self, file_id: str) -> StoredFile:
        f = self.files.get(file_id)
        if f is None:
            raise E.no_such_file(file_id)
        return f

    def delete_file(self, file_id: str) -> dict[str, Any]:
        if self.scenario.delete_error_status:
            status = self.scenario.delete_error_status
            raise ApiError(status, f"injected delete failure ({status})")
        f = self.get_file(file_id)
        del self.files[file_id]
        f.path.unlink(missing_ok=True)  # a batch reading it holds its own link
        self._file_models.pop(file_id, None)
        self.counters.files_deleted += 1
        return {"id": file_id, "object": "file", "deleted": True}

    def file_model(self, f: StoredFile) -> str | None:
        """The model named by a batch input file (cached; used for quota checks on create)."""
        from batchops.emulator.validation import first_model

        if f.id not in self._file_models:
            with f.path.open("rb") as fh:
                self._file_models[f.id] = first_model(fh)
        return self._file_models[f.id]

    # ------------------------------------------------------------------ batches
    def get_batch(self, batch_id: str) -> Batch:
        b = self.batches.get(batch_id)
        if b is None:
            raise E.no_such_batch(batch_id)
        return b

    def add_batch(self, params: CreateParams, api_key: str) -> Batch:
        c = self.counters
        b = Batch(
            id=hex_id("batch_"),
            seq=c.batches_created,
            params=params,
            api_key=api_key,
            created_at=int(time.time()),
            phase_started=time.monotonic(),
        )
        b.created_mono = b.phase_started
        seed = self.scenario.seed
        b.ok_rng = random.Random(f"{seed}:{b.seq}:output")
        b.err_rng = random.Random(f"{seed}:{b.seq}:error")
        c.batches_created += 1
        self.batches[b.id] = b
        self.live[b.id] = b
        return b

    def cancel_batch(self, batch_id: str) -> Batch:
        b = self.get_batch(batch_id)
        if b.status in ("completed", "failed", "expired"):
            raise ApiError(409, f"Cannot cancel a batch with status '{b.status}'.")
        if b.status in ("validating", "in_progress", "finalizing"):
            b.enter("cancelling", int(time.time()), time.monotonic())
        return b

    def enqueued_tokens(self, model: str, exclude: Batch) -> int:
        return sum(
            b.prompt_tokens
            for b in self.batches.values()
            if b is not exclude
            and b.model == model
            and b.status in ("validating", "in_progress", "finalizing")
        )


def page(
    items: list[Any], after: str | None, limit: int, key: Any = lambda x: x.id
) -> dict[str, Any]:
    """A cursor page of API objects: items after the one with id `after`, at most `limit`."""
    start = 0
    if after:
        ids = [key(x) for x in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    chunk = items[start : start + limit]
    data = [x.to_api() for x in chunk]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(items),
    }
