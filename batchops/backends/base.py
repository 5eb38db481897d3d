"""What the engine needs from a provider, in batchops-owned types.

A backend speaks one provider's dialect (OpenAI and compatible servers, an in-memory emulator for
tests, later Anthropic and Gemini). The engine never sees an SDK object: only `RemoteBatch`,
`RemoteFile`, `RowOutcome` and `RemoteError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from batchops.errors import BatchopsError
from batchops.policy import Scope, default_scope
from batchops.records import AnswerRun, BadLine, ErrorClass, RowOutcome
from batchops.states import BatchState


@dataclass(frozen=True, slots=True)
class BatchProblem:
    """One entry of a failed batch's error list (`errors.data[]` in OpenAI's dialect)."""

    code: str | None
    message: str
    cls: ErrorClass


@dataclass(slots=True)
class RemoteBatch:
    """A remote batch as the engine sees it, whatever the provider."""

    id: str
    state: BatchState
    raw_status: str  # the provider's own word for it (shown in status)
    total: int | None = None
    completed: int | None = None
    failed: int | None = None
    created_at: float | None = None
    expires_at: float | None = None
    ended_at: float | None = None
    tag: dict[str, str] = field(default_factory=dict)  # batchops_run / _chunk / _attempt
    input_ref: str | None = None
    output_ref: str | None = None  # a handle `download` understands (file id, results url)
    error_ref: str | None = None
    problems: list[BatchProblem] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RemoteFile:
    id: str
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """Everything a backend needs to create one batch for one chunk."""

    chunk_path: Path
    file_ref: str | None  # the uploaded file (file-based backends), else None
    model: str
    endpoint: str
    completion_window: str
    tag: dict[str, str]
    display_name: str  # run/chunk/attempt, for providers without metadata


class RemoteError(BatchopsError):
    """A remote call failed for good, or with an error class the caller must act on.

    The message is already scrubbed of keys. `scope` says what the failure condemns: this
    request, the model (on this key), the key, the endpoint or the whole account."""

    def __init__(
        self,
        what: str,
        cls: ErrorClass,
        status: int | None,
        code: str | None,
        message: str,
        retry_after: float | None = None,
        scope: Scope | None = None,
        *,
        unsent: bool = False,
    ) -> None:
        self.unsent = unsent
        self.what, self.cls, self.status, self.code, self.retry_after = (
            what,
            cls,
            status,
            code,
            retry_after,
        )
        self.message = message
        self.scope = scope or default_scope(cls)
        super().__init__(f"{what}: {cls} (HTTP {status}, {code}): {message}")

    @property
    def refused(self) -> bool:
        """The server answered with a 4xx: it created nothing, so a written intent is void."""
        return self.status is not None and 400 <= self.status < 500

    @classmethod
    def of_call(
        cls,
        exc: BaseException,
        what: str,
        error_class: ErrorClass,
        status: int | None,
        code: str | None,
        message: str,
        retry_after: float | None,
        scope: Scope | None,
        *,
        where: str,
        scrub: Callable[[str], str],
    ) -> RemoteError:
        """A failed SDK call, as every backend reports it: a call whose connection never
        opened is `unsent` and says so; a call with no answer at all names the server."""
        unsent = never_connected(exc)
        if unsent:
            message = "could not connect"  # refused, unreachable, DNS or TLS: nothing was sent
        if status is None:
            message = f"{message} ({where})"  # say where
        return cls(
            what, error_class, status, code, scrub(message), retry_after, scope, unsent=unsent
        )

    @property
    def nothing_created(self) -> bool:
        """Refused by the server, or never sent (no connection was opened): either way
        nothing exists remotely, so nothing needs to be looked up."""
        return self.refused or self.unsent


def never_connected(exc: BaseException | None) -> bool:
    """Whether a call failed before its connection was open (refused, unreachable, DNS, TLS
    handshake, connect timeout): the request never left, so the server cannot have carried
    it out. The SDKs wrap the transport's error; its cause chain says which it was."""
    import httpx2  # here, not at the top: the store imports this module, and a dry run needs no HTTP

    for _ in range(8):  # a cause chain is short; a cycle must not loop forever
        if exc is None:
            return False
        if isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Backend(Protocol):
    """One provider endpoint with one key. Every method raises RemoteError on failure."""

    name: str
    # File-based providers (OpenAI, Gemini) upload the chunk first; inline ones (Anthropic)
    # send the requests with the create call.
    uploads_files: bool
    # Whether the API deletes ended batches (Anthropic, Gemini; OpenAI has no such call):
    # after collection, as their results are no longer needed (see batchops/cleanup.py).
    deletes_batches: bool

    def upload(self, path: Path, name: str) -> str:
        """Upload a chunk file under `name`; returns the remote file's id. Called once (a retry
        could create a second file): an ambiguous failure is reconciled with `find_uploads`."""
        ...

    def find_uploads(self, name: str) -> list[RemoteFile]:
        """Remote files with this name, oldest first."""
        ...

    def delete_file(self, file_id: str) -> None: ...

    def delete_batch(self, batch_id: str) -> None:
        """Delete an ended batch (and the results it holds); a no-op where `deletes_batches`
        is false. RemoteError with status 404 when it is already gone."""
        ...

    def create(self, req: SubmitRequest) -> RemoteBatch:
        """Create one batch. Called once: an ambiguous failure is reconciled with `find_batch`."""
        ...

    def find_batch(self, req: SubmitRequest, since: float) -> RemoteBatch | None:
        """The batch created for this request's tag, if any (crash recovery)."""
        ...

    def poll(self, batch_ids: list[str]) -> dict[str, RemoteBatch]:
        """The current view of these batches; ids the backend could not see are left out."""
        ...

    def retrieve(self, batch_id: str) -> RemoteBatch: ...

    def cancel(self, batch_id: str) -> None:
        """Ask the remote to cancel; RemoteError with status 409 when it already ended."""
        ...

    def download(self, ref: str, dest: Path) -> Path:
        """Write a result file to `dest` (atomically) and return it."""
        ...

    def read_results(
        self, path: Path, chunk_path: Path, endpoint: str
    ) -> Iterator[RowOutcome | BadLine | AnswerRun]:
        """Per-request outcomes of a downloaded result file, custom ids as in the chunk file;
        a line that cannot be read is a BadLine (never an exception: the rest is recorded).
        A backend may hand consecutive common chat answers as one `AnswerRun` (OpenAI's
        format: collection's fast path)."""
        ...

    async def call_online(
        self, endpoint: str, body: dict[str, object], custom_id: str
    ) -> RowOutcome:
        """One synchronous request (online mode), parsed. RemoteError when the call failed;
        an answer that does not parse is a failed outcome (format_error)."""
        ...

    async def aclose(self) -> None:
        """Close what belongs to the running event loop (online mode's connections)."""
        ...
