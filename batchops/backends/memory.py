"""An in-process backend over the emulator's core: OpenAI's dialect without HTTP.

Engine tests run on it in milliseconds, the way httpx tests run through a transport. It drives
the same `Emulator` object the HTTP emulator serves (same scenario knobs: quotas, expiry,
token limits, failing requests, dropped and failing calls), so a fault behaves the same in
both. The HTTP emulator stays the contract test of the real OpenAI backend.

Time does not pass by itself: batches advance when they are polled (with the scenario's
timings at zero, one poll takes a batch to its end).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchops import results
from batchops.backends.base import RemoteBatch, RemoteError, RemoteFile, SubmitRequest
from batchops.backends.openai_wire import remote_batch
from batchops.classify import classify_http
from batchops.emulator import errors as E
from batchops.emulator.errors import ApiError
from batchops.emulator.executor import execute
from batchops.emulator.runner import start_validation, tick
from batchops.emulator.scenario import Scenario
from batchops.emulator.state import Emulator
from batchops.emulator.validation import validate_create
from batchops.policy import CALL_ATTEMPTS, Rule, call_is_retried, classify
from batchops.records import AnswerRun, BadLine, RowOutcome

# Scenario timings for a memory emulator: a batch ends at its first poll.
INSTANT = {"validating_seconds": 0.0, "in_progress_seconds": 0.0, "finalizing_seconds": 0.0}


def memory_emulator(**knobs: Any) -> Emulator:
    """An emulator core with instant timings (and any other scenario knobs)."""
    return Emulator(Scenario(**{**INSTANT, **knobs}))


class SimulatedCrash(BaseException):
    """The process 'dies' right after a remote call took effect (see `crash_after`)."""


class MemoryBackend:
    name = "memory"
    uploads_files = True

    def __init__(
        self,
        emu: Emulator,
        api_key: str,
        *,
        crash_after: dict[str, int] | None = None,
        provider: str = "openai",
        rules: list[Rule] | None = None,
        deletes_batches: bool = False,
    ) -> None:
        self.emu = emu
        self.api_key = api_key
        self.provider = provider
        self.rules = list(rules or [])
        # Crash knob for recovery tests: {"create": 2} dies right after the 2nd batch was
        # created (kinds: upload, create, poll, download, cancel). The remote effect stays,
        # exactly as when a process is killed between a call and its bookkeeping. Kind
        # `delete` dies just *before* the n-th delete (file or batch) and every later one: a
        # process killed after a collection committed, before its deletes.
        self.crash_after = dict(crash_after or {})
        self.calls: dict[str, int] = {}
        # OpenAI's dialect has no batch delete; on, ended batches are deleted like Anthropic's
        # (the engine's path for providers that delete batches, in milliseconds).
        self.deletes_batches = deletes_batches
        self.deleted: list[str] = []  # every object this backend deleted, in order

    def _crash_point(self, kind: str) -> None:
        n = self.calls[kind] = self.calls.get(kind, 0) + 1
        if self.crash_after.get(kind) == n:
            raise SimulatedCrash(f"crash after {kind} #{n}")

    def _crash_before_delete(self) -> None:
        n = self.calls["delete"] = self.calls.get("delete", 0) + 1
        point = self.crash_after.get("delete")
        if point is not None and n >= point:
            raise SimulatedCrash(f"crash before delete #{n}")

    # ------------------------------------------------------------------ transport
    def _call(
        self, what: str, fn: Any, *args: Any, attempts: int = CALL_ATTEMPTS, **kw: Any
    ) -> Any:
        """One API call, tried like the OpenAI backend tries it: transient failures again (no
        waiting here), up to `attempts` (calls that create something get one)."""
        for n in range(1, attempts + 1):
            try:
                return self._call_once(what, fn, *args, **kw)
            except RemoteError as exc:
                if n == attempts or not call_is_retried(exc.cls):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _call_once(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """One API call through the scenario's transport faults, auth and error mapping."""
        emu, sc = self.emu, self.emu.scenario
        emu.counters.api_calls += 1
        n = emu.counters.api_calls
        drop = sc.drop_connection_every > 0 and n % sc.drop_connection_every == 0
        if drop and not sc.drop_after_processing:
            raise RemoteError(what, "api_error", None, None, "connection error")
        if not drop and sc.http_error_every > 0 and n % sc.http_error_every == 0:
            raise self._error(what, E.server_error(sc.http_error_status))
        try:
            emu.authenticate(self.api_key)
            out = fn(*args, **kw)
        except ApiError as err:
            raise self._error(what, err) from None
        if drop:  # the call was carried out, then the connection dropped
            raise RemoteError(what, "api_error", None, None, "connection error")
        return out

    def _error(self, what: str, err: ApiError) -> RemoteError:
        after = err.headers.get("retry-after")
        cls, scope = classify(
            err.status,
            err.code,
            err.type,
            err.message,
            provider=self.provider,
            rules=self.rules,
            fallback=classify_http(err.status, err.code, err.type),
        )
        return RemoteError(
            what, cls, err.status, err.code, err.message, float(after) if after else None, scope
        )

    # ------------------------------------------------------------------ files
    def upload(self, path: Path, name: str) -> str:
        data = Path(path).read_bytes()

        def add() -> str:
            if not name.lower().endswith(".jsonl"):
                raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl")
            if len(data) > self.emu.scenario.max_file_bytes:
                raise ApiError(400, "File is too large.")
            self.emu.counters.files_uploaded += 1
            return self.emu.add_file(name, "batch", data, None).id

        file_id = str(self._call(f"upload chunk file {name}", add, attempts=1))
        self._crash_point("upload")
        return file_id

    def find_uploads(self, name: str) -> list[RemoteFile]:
        files = self._call("list files", lambda: list(self.emu.files.values()))
        return sorted(
            (
                RemoteFile(f.id, f.filename, float(f.created_at))
                for f in files
                if f.filename == name
            ),
            key=lambda f: f.created_at,
        )

    def delete_file(self, file_id: str) -> None:
        self._crash_before_delete()
        self._call(f"delete file {file_id}", self.emu.delete_file, file_id)
        self.deleted.append(file_id)

    def delete_batch(self, batch_id: str) -> None:
        def delete() -> None:
            b = self.emu.get_batch(batch_id)
            if b.status not in ("completed", "failed", "expired", "cancelled"):
                raise ApiError(400, f"Batch {batch_id} cannot be deleted while it is running.")
            del self.emu.batches[batch_id]
            self.emu.live.pop(batch_id, None)

        if not self.deletes_batches:
            return
        self._crash_before_delete()
        self._call(f"delete batch {batch_id}", delete)
        self.deleted.append(batch_id)

    def download(self, ref: str, dest: Path) -> Path:
        data = self._call(f"download {ref}", lambda: self.emu.get_file(ref).data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        self._crash_point("download")
        return dest

    def read_results(
        self, path: Path, chunk_path: Path, endpoint: str
    ) -> Iterator[RowOutcome | BadLine | AnswerRun]:
        return results.read_runs(path, endpoint)

    # ------------------------------------------------------------------ batches
    def create(self, req: SubmitRequest) -> RemoteBatch:
        def create() -> dict[str, Any]:
            emu = self.emu
            params = validate_create(
                {
                    "input_file_id": req.file_ref,
                    "endpoint": req.endpoint,
                    "completion_window": req.completion_window,
                    "metadata": req.tag,
                }
            )
            f = emu.files.get(params.input_file_id)
            model = emu.file_model(f) if f is not None else None
            inject = emu.scenario.injected("create", model, self.api_key)
            if inject is not None:
                raise E.injected(inject)
            if not emu.quota_left(model, self.api_key):
                raise E.insufficient_quota(emu.scenario.retry_after_seconds)
            b = emu.add_batch(params, self.api_key)
            start_validation(emu, b)
            return b.to_api()

        b = remote_batch(
            self._call(f"create batch for chunk {req.display_name}", create, attempts=1)
        )
        self._crash_point("create")
        return b

    def find_batch(self, req: SubmitRequest, since: float) -> RemoteBatch | None:
        batches = self._call("list batches", lambda: list(reversed(self.emu.batches.values())))
        for b in batches:
            meta = b.params.metadata or {}
            if all(meta.get(k) == v for k, v in req.tag.items()):
                return remote_batch(b.to_api())
        return None

    def retrieve(self, batch_id: str) -> RemoteBatch:
        self._advance()
        b = remote_batch(
            self._call(f"poll batch {batch_id}", lambda: self.emu.get_batch(batch_id).to_api())
        )
        self._crash_point("poll")
        return b

    def poll(self, batch_ids: list[str]) -> dict[str, RemoteBatch]:
        seen: dict[str, RemoteBatch] = {}
        for batch_id in batch_ids:
            try:
                seen[batch_id] = self.retrieve(batch_id)
            except RemoteError:
                continue  # polled again next time, as over HTTP
        return seen

    def cancel(self, batch_id: str) -> None:
        self._call(f"cancel batch {batch_id}", self.emu.cancel_batch, batch_id)
        self._crash_point("cancel")

    def _advance(self) -> None:
        """Let the emulated service run until nothing more can happen right now."""
        for b in list(self.emu.live.values()):
            if b.check is not None:
                b.check.result()  # validation runs in the emulator's thread pool
        before = None
        for _ in range(1_000):
            busy = tick(self.emu)
            now = [(b.id, b.status, b.next_index) for b in self.emu.batches.values()]
            if not busy and now == before:
                break
            before = now

    # ------------------------------------------------------------------ online
    async def call_online(self, endpoint: str, body: dict[str, Any], custom_id: str) -> RowOutcome:
        def run() -> dict[str, Any]:
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise ApiError(400, "you must provide a model parameter")
            self.emu.check_rate_limit(self.api_key, model)
            out = execute(
                self.emu,
                custom_id=custom_id,
                model=model,
                body=body,
                endpoint=endpoint,
                api_key=self.api_key,
            )
            if out.error is not None:
                raise out.error
            return dict(out.body)

        answer = self._call("online request", run)
        return results.parse_sync_response(answer, endpoint, custom_id)

    async def aclose(self) -> None:
        return None
