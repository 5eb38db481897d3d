"""OpenAI's dialect: api.openai.com, Azure OpenAI (classic and v1) and any compatible server
(DashScope, vLLM …). The only module that imports the `openai` SDK.

The SDK's own retries are off (`max_retries=0`): it would retry a 429 `insufficient_quota` that
can never succeed. Every call goes through `_call`, which classifies the error by code and
retries only what `policy` says can improve. Calls that create something are tried once: an
ambiguous failure is reconciled (`find_uploads`, `find_batch`) before anything is sent again.

Online calls take a lean path (`http1.Http1Pool`: pooled keep-alive connections, orjson bytes,
headers built once from the SDK client's own settings) wherever a direct connection reaches the
server; Azure and proxied endpoints keep the SDK's transport. Either way an error is mapped by
the same `_error`: the lean path builds the SDK's own exception for it first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx2
import openai
import orjson

from batchops import results
from batchops.backends import http1
from batchops.backends.base import RemoteBatch, RemoteError, RemoteFile, SubmitRequest
from batchops.backends.listpoll import ListPoller
from batchops.backends.openai_wire import remote_batch
from batchops.backends.retrying import call_with_retries
from batchops.classify import classify_http
from batchops.errors import ConfigError
from batchops.policy import CALL_ATTEMPTS, Rule, Scope, classify, row_retryable
from batchops.records import AnswerRun, BadLine, ErrorClass, RowOutcome
from batchops.spec import ModelEntry, RetryPolicy

T = TypeVar("T")

CUSTOM_ID_HEADER = "X-Batchops-Custom-Id"
DEFAULT_TIMEOUT = 600.0


class OpenAIBackend:
    """One OpenAI-compatible endpoint with one key."""

    name = "openai"
    uploads_files = True
    deletes_batches = False  # no delete endpoint for batches (their files are deleted)

    def __init__(
        self,
        entry: ModelEntry,
        api_key: str,
        *,
        base_url: str | None = None,
        policy: RetryPolicy,
        scrub: Callable[[str], str] = str,
        timeout: float = DEFAULT_TIMEOUT,
        rules: list[Rule] | None = None,
        lean_online: bool = True,
    ) -> None:
        self._azure, self._kwargs = _client_kwargs(entry, api_key, base_url, timeout)
        self.provider = entry.provider
        self.rules = list(rules or [])
        self.url = self._kwargs.get("azure_endpoint") or self._kwargs.get("base_url") or ""
        self.policy = policy
        self.scrub = scrub
        self._client: openai.OpenAI | None = None
        self._aclient: openai.AsyncOpenAI | None = None
        # The lean online transport (None: not made yet for this loop; False: not usable here).
        # (lean_online=False keeps the SDK's transport: the tests compare the two paths.)
        self._lean: http1.Http1Pool | bool | None = None if lean_online else False
        self._timeout = timeout
        self._poller = ListPoller(self._list_page, self.retrieve)

    # ------------------------------------------------------------------ clients
    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            cls = openai.AzureOpenAI if self._azure else openai.OpenAI
            self._client = cls(**self._kwargs)
        return self._client

    @property
    def aclient(self) -> openai.AsyncOpenAI:
        # Async clients belong to one event loop: made per online run, closed by aclose().
        if self._aclient is None:
            cls = openai.AsyncAzureOpenAI if self._azure else openai.AsyncOpenAI
            self._aclient = cls(**self._kwargs)
        return self._aclient

    async def aclose(self) -> None:
        client, self._aclient = self._aclient, None
        lean = self._lean
        if isinstance(lean, http1.Http1Pool):
            self._lean = None  # the next run's loop makes its own
            await lean.aclose()
        if client is not None:
            await client.close()

    def _lean_pool(self) -> http1.Http1Pool | None:
        """The lean transport for online calls, made once per run (its connections belong to
        the running loop); None where the SDK's transport must be used."""
        if self._lean is None:
            self._lean = False
            client = self.aclient
            base = str(client.base_url)
            if not self._azure and http1.usable_for(base):
                # The SDK's own headers (auth, organization, project, user agent …), once.
                headers = {
                    k: v
                    for k, v in {**client.default_headers, **client.auth_headers}.items()
                    if isinstance(v, str)
                }
                try:
                    self._lean = http1.Http1Pool(
                        base, headers, self._timeout, httpx2.create_ssl_context()
                    )
                except UnicodeEncodeError:  # a header HTTP/1.1 cannot carry raw
                    self._lean = False
        return self._lean if isinstance(self._lean, http1.Http1Pool) else None

    # ------------------------------------------------------------------ files
    def upload(self, path: Path, name: str) -> str:
        with open(path, "rb") as fh:
            f = self._call(
                self.client.files.create,
                file=(name, fh),
                purpose="batch",
                what=f"upload chunk file {name}",
                attempts=1,
            )
        return str(f.id)

    def find_uploads(self, name: str) -> list[RemoteFile]:
        files = self._call(lambda: list(self.client.files.list(purpose="batch")), what="list files")
        found = [RemoteFile(f.id, f.filename, float(f.created_at)) for f in files]
        return sorted((f for f in found if f.name == name), key=lambda f: f.created_at)

    def delete_file(self, file_id: str) -> None:
        self._call(self.client.files.delete, file_id, what=f"delete file {file_id}", attempts=2)

    def delete_batch(self, batch_id: str) -> None:
        """OpenAI's API has no batch delete: the batch stays listed (its files are deleted)."""

    def download(self, ref: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        self._call(self._stream_to, ref, tmp, what=f"download {ref}")
        os.replace(tmp, dest)
        return dest

    def _stream_to(self, ref: str, tmp: Path) -> None:
        """The file's content written as it arrives (the SDK's streaming response, decoded
        blocks as read): the whole-body read and re-chunking of `content().write_to_file`
        cost ~2.2 µs a result line, this ~0.9. A transport error mid-body is the SDK's
        connection error, as it is when the SDK reads the body itself."""
        with self.client.with_streaming_response.files.content(ref) as r, tmp.open("wb") as fh:
            try:
                fh.writelines(r.iter_bytes())
            except httpx2.TransportError as exc:
                raise openai.APIConnectionError(request=r.http_response.request) from exc

    def read_results(
        self, path: Path, chunk_path: Path, endpoint: str
    ) -> Iterator[RowOutcome | BadLine | AnswerRun]:
        return results.read_runs(path, endpoint)

    # ------------------------------------------------------------------ batches
    def create(self, req: SubmitRequest) -> RemoteBatch:
        b = self._call(
            self.client.batches.create,
            input_file_id=req.file_ref,
            endpoint=req.endpoint,
            completion_window=req.completion_window,
            metadata=req.tag,
            what=f"create batch for chunk {req.display_name}",
            attempts=1,  # a retried create could start a second, paid batch: reconcile first
        )
        return _remote(b)

    def find_batch(self, req: SubmitRequest, since: float) -> RemoteBatch | None:
        page = self._call(self.client.batches.list, limit=100, what="list batches")
        for b in page:  # auto-paginates; newest first, so stop once older than the run
            meta = b.metadata or {}
            if all(meta.get(k) == v for k, v in req.tag.items()):
                return _remote(b)
            if b.created_at and b.created_at < since:
                break
        return None

    def retrieve(self, batch_id: str) -> RemoteBatch:
        return _remote(
            self._call(self.client.batches.retrieve, batch_id, what=f"poll batch {batch_id}")
        )

    def poll(self, batch_ids: list[str]) -> dict[str, RemoteBatch]:
        """With several batches in flight, one `batches.list` page answers for all of them
        (`listpoll`: a batch it does not show, or shows unchanged for a while, is retrieved)."""
        return self._poller.poll(batch_ids)

    def _list_page(self, n: int) -> list[RemoteBatch]:
        page = self._call(
            self.client.batches.list, limit=100, what=f"poll {n} batches (one list page)"
        )
        return [_remote(b) for b in page.data]

    def cancel(self, batch_id: str) -> None:
        self._call(self.client.batches.cancel, batch_id, what=f"cancel batch {batch_id}")

    # ------------------------------------------------------------------ online
    async def call_online(self, endpoint: str, body: dict[str, Any], custom_id: str) -> RowOutcome:
        """One request; the body goes out exactly as rendered and the answer is parsed from
        raw bytes. The lean transport where it can be used, else the SDK's generic `post`."""
        lean = self._lean_pool()
        if lean is None:
            return await self._call_online_sdk(endpoint, body, custom_id)
        path = endpoint.removeprefix("/v1")
        try:
            answer = await lean.post(
                path,
                orjson.dumps(body),
                f"{CUSTOM_ID_HEADER}: {header_value(custom_id)}\r\n".encode("ascii"),
            )
        except http1.TimedOut:
            raise self._error(
                openai.APITimeoutError(request=self._request_of(path)), "online request"
            ) from None
        except http1.NoAnswer as failed:
            err = openai.APIConnectionError(request=self._request_of(path))
            if isinstance(failed, http1.NeverConnected):  # as the SDK's transport says it
                err.__cause__ = httpx2.ConnectError(str(failed))
            raise self._error(err, "online request") from None
        if not 200 <= answer.status < 300:
            # Rare: built as the SDK builds it, so `_error` maps it exactly as before.
            response = httpx2.Response(
                answer.status,
                headers=answer.headers,
                content=answer.body,
                request=self._request_of(path),
            )
            exc = self.aclient._make_status_error_from_response(response)
            raise self._error(exc, "online request") from None
        return _parse_answer(answer.body, endpoint, custom_id)

    def _request_of(self, path: str) -> httpx2.Request:
        return httpx2.Request("POST", str(self.aclient.base_url).rstrip("/") + path)

    async def _call_online_sdk(
        self, endpoint: str, body: dict[str, Any], custom_id: str
    ) -> RowOutcome:
        """Through the client's generic `post` (no typed-parameter transform)."""
        try:
            raw = await self.aclient.post(
                endpoint.removeprefix("/v1"),
                cast_to=bytes,
                body=body,
                options={"headers": {CUSTOM_ID_HEADER: header_value(custom_id)}},
            )
        except openai.OpenAIError as exc:
            raise self._error(exc, "online request") from None
        return _parse_answer(raw, endpoint, custom_id)

    # ------------------------------------------------------------------ calls and errors
    def _call(
        self, fn: Callable[..., T], *args: Any, what: str, attempts: int = CALL_ATTEMPTS, **kw: Any
    ) -> T:
        """One SDK call through the shared retry loop (backends/retrying.py)."""
        return call_with_retries(
            fn,
            *args,
            what=what,
            attempts=attempts,
            policy=self.policy,
            sdk_errors=openai.OpenAIError,
            to_error=self._error,  # type: ignore[arg-type]
            **kw,
        )

    def _error(self, exc: openai.OpenAIError, what: str) -> RemoteError:
        fallback, status, code, message = _describe(exc)
        type_ = (
            exc.body.get("type")
            if isinstance(exc, openai.APIStatusError) and isinstance(exc.body, dict)
            else None
        )
        cls, scope = classify(
            status,
            code,
            type_,
            message,
            provider=self.provider,
            rules=self.rules,
            fallback=fallback,
        )
        if cls in ("api_error", "timeout") and status is None:
            scope = Scope.ENDPOINT  # no answer at all: the server is down for every model
        return RemoteError.of_call(
            exc,
            what,
            cls,
            status,
            code,
            message,
            _retry_after_of(exc),
            scope,
            where=str(self.url or self.client.base_url),
            scrub=self.scrub,
        )


# ---------------------------------------------------------------------- helpers


def header_value(row_id: str) -> str:
    """The custom-id header value: the id itself, percent-encoded if it is not printable ASCII
    (HTTP headers cannot carry it raw, and a newline would split the header)."""
    if row_id.isascii() and row_id.isprintable():
        return row_id
    return quote(row_id, safe="")


def _parse_answer(raw: bytes, endpoint: str, custom_id: str) -> RowOutcome:
    """A 2xx answer's bytes → outcome; one that is not a JSON object is a format_error."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        return RowOutcome(
            custom_id,
            ok=False,
            status_code=200,
            error_code="invalid_response",
            error_message="the answer is not a JSON object",
            error_class="format_error",
            retryable=row_retryable("format_error"),
        )
    return results.parse_sync_response(answer, endpoint, custom_id)


def _remote(b: Any) -> RemoteBatch:
    """An SDK Batch → RemoteBatch."""
    return remote_batch(b.model_dump())


def _class_of(exc: BaseException) -> ErrorClass:
    return _describe(exc)[0] if isinstance(exc, openai.OpenAIError) else "api_error"


def _describe(exc: openai.OpenAIError) -> tuple[ErrorClass, int | None, str | None, str]:
    """(class, status, code, message) of an SDK exception."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None, None, "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        return "api_error", None, None, "connection error"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        code = body.get("code") or getattr(exc, "code", None)
        type_ = body.get("type") or getattr(exc, "type", None)
        message = str(body.get("message") or exc.message)
        return classify_http(exc.status_code, code, type_), exc.status_code, code, message
    return "api_error", None, None, f"{type(exc).__name__}: {exc}"


def _retry_after_of(exc: BaseException | None) -> float | None:
    if not isinstance(exc, openai.APIStatusError) or exc.response is None:
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                return None
    return None


def _client_kwargs(
    entry: ModelEntry, api_key: str, base_url: str | None, timeout: float
) -> tuple[bool, dict[str, Any]]:
    """(azure?, constructor arguments): the same settings for the sync and the async client."""
    common: dict[str, Any] = {"api_key": api_key, "max_retries": 0, "timeout": timeout}
    if entry.provider == "azure":
        if not entry.azure_endpoint:
            raise ConfigError(f"model {entry.name}: provider azure needs azure_endpoint")
        return True, {
            "azure_endpoint": entry.azure_endpoint,
            "api_version": entry.api_version or "2024-10-21",
            **common,
        }
    return False, {"base_url": entry.base_url or base_url, **common}
