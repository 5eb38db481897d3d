"""Anthropic's dialect: Message Batches and the Messages API. The only module that imports the
`anthropic` SDK (`pip install "batchops[anthropic]"`); `make_backend` imports it lazily.

Requests go inline with the create call (no file upload). A chunk file (OpenAI chat lines) is
translated line by line (`anthropic_wire.to_params`); each request's custom id is
`<prefix>_<line>`, the prefix naming run, chunk and attempt, and results are mapped back to the
row ids through the chunk file's line order.

Crash recovery without a metadata field (`find_batch`), and its guarantee:
* Before the create call, an intent file `<chunk>.<prefix>.anthropic.json` (prefix, request
  count, local time) is written and fsynced next to the chunk file. No intent file: the create
  was never sent, nothing exists.
* Otherwise the batch list (newest first) is read back to the intent time minus CLOCK_SKEW.
  A batch with another request count, or one this backend polls or created for another chunk,
  is not ours. An ended batch is ours when its first result line carries our prefix (conclusive).
  A running batch cannot be read (results exist only once it ends): while any such candidate is
  left, the lookup is undecided and raises a transient RemoteError, so the chunk stays in its
  `submitting` intent and is looked up again on the next pass — never submitted again.
Limits: a create that reaches the server only after the client gave up (timeout), and after a
lookup found nothing, can still make a second batch (as for any provider); an undecided chunk
waits until the unidentified batches end (at most their 24 h window, usually minutes).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import anthropic
import orjson
from loguru import logger

from batchops.backends import anthropic_wire as W
from batchops.backends.base import (
    RemoteBatch,
    RemoteError,
    RemoteFile,
    SubmitRequest,
)
from batchops.backends.listpoll import ListPoller
from batchops.backends.retrying import call_with_retries
from batchops.classify import classify_http
from batchops.errors import ConfigError
from batchops.policy import CALL_ATTEMPTS, Rule, Scope, classify, row_retryable
from batchops.records import BadLine, ErrorClass, RowOutcome
from batchops.spec import ModelEntry, RetryPolicy

T = TypeVar("T")

DEFAULT_TIMEOUT = 600.0
# A batch's created_at (server clock) may precede our intent time (local clock) by this much.
CLOCK_SKEW = 300.0
CUSTOM_ID_HEADER = "x-batchops-custom-id"  # the emulator keys online stats by it
INTENT_SUFFIX = ".anthropic.json"
# Batch ids this process knows belong to some chunk, per account (url, key fingerprint): shared
# by the backends of all models on one key, since a lookup lists the whole account.
_CLAIMED: dict[tuple[str, str], set[str]] = {}


class AnthropicBackend:
    """One Anthropic endpoint (api.anthropic.com or a compatible server) with one key."""

    name = "anthropic"
    uploads_files = False
    # An ended batch holds its results for 29 days: deleted once they are committed.
    deletes_batches = True

    def __init__(
        self,
        entry: ModelEntry,
        api_key: str,
        *,
        policy: RetryPolicy,
        scrub: Callable[[str], str] = str,
        timeout: float = DEFAULT_TIMEOUT,
        rules: list[Rule] | None = None,
    ) -> None:
        self.url = root_url(entry.base_url)
        self._kwargs: dict[str, Any] = {"api_key": api_key, "max_retries": 0, "timeout": timeout}
        if self.url:
            self._kwargs["base_url"] = self.url
        self.provider = "anthropic"
        self.rules = list(rules or [])
        self.policy = policy
        self.scrub = scrub
        self._client: anthropic.Anthropic | None = None
        self._aclient: anthropic.AsyncAnthropic | None = None
        # Batch ids known to belong to some chunk (created, polled or found here): never
        # another chunk's lost batch. And the first custom id of ended batches already read.
        self._claimed = _CLAIMED.setdefault((self.url or "", _fingerprint(api_key)), set())
        self._first_id: dict[str, str | None] = {}
        self._ids: dict[Path, tuple[float, list[str]]] = {}
        self._dropped_logged: set[str] = set()
        self._poller = ListPoller(self._list_page, self.retrieve)

    # ------------------------------------------------------------------ clients
    @property
    def client(self) -> anthropic.Anthropic:
        if self._client is None:
            self._client = anthropic.Anthropic(**self._kwargs)
        return self._client

    @property
    def aclient(self) -> anthropic.AsyncAnthropic:
        # Async clients belong to one event loop: made per online run, closed by aclose().
        if self._aclient is None:
            self._aclient = anthropic.AsyncAnthropic(**self._kwargs)
        return self._aclient

    async def aclose(self) -> None:
        client, self._aclient = self._aclient, None
        if client is not None:
            await client.close()

    # ------------------------------------------------------------------ files (none)
    def upload(self, path: Path, name: str) -> str:
        raise NotImplementedError("Message Batches take their requests inline")

    def find_uploads(self, name: str) -> list[RemoteFile]:
        return []

    def delete_file(self, file_id: str) -> None:
        """Nothing is uploaded, so nothing is deleted."""

    def delete_batch(self, batch_id: str) -> None:
        """`DELETE /v1/messages/batches/{id}`: an ended batch and its results."""
        self._call(
            self.client.messages.batches.delete,
            batch_id,
            what=f"delete batch {batch_id}",
            attempts=2,
        )

    # ------------------------------------------------------------------ batches
    def create(self, req: SubmitRequest) -> RemoteBatch:
        prefix = W.id_prefix(req.tag, req.display_name)
        dropped: set[str] = set()
        try:
            body, n = W.batch_body(req.chunk_path, prefix, dropped)
        except W.TranslationError as exc:
            raise ConfigError(f"model {req.model}: {exc}") from None
        self._log_dropped(dropped)
        if n > W.MAX_REQUESTS or len(body) > W.MAX_BATCH_BYTES:
            # The chunker's limits (50,000 requests, 200 MB) keep chunks below these.
            raise ConfigError(
                f"{req.chunk_path.name}: {n} requests, {len(body) / 2**20:.0f} MB is over a "
                f"Message Batch's {W.MAX_REQUESTS} requests / 256 MB: lower --batch-size"
            )
        _write_intent(req.chunk_path, prefix, n)
        raw = self._call(
            self.client.post,
            "/v1/messages/batches",
            cast_to=bytes,
            content=body,
            options={"headers": {"Content-Type": "application/json"}},
            what=f"create batch for chunk {req.display_name} ({n} requests)",
            attempts=1,  # a retried create could start a second, paid batch: reconcile first
        )
        b = W.remote_batch(orjson.loads(raw))
        self._claimed.add(b.id)
        return b

    def find_batch(self, req: SubmitRequest, since: float) -> RemoteBatch | None:
        """The batch created for this request's run/chunk/attempt (see the module docstring)."""
        prefix = W.id_prefix(req.tag, req.display_name)
        intent = _read_intent(req.chunk_path, prefix)
        if intent is None:
            return None  # create() never got as far as sending
        low = max(since, float(intent["sent_at"]) - CLOCK_SKEW)
        n = int(intent["requests"])
        running: list[str] = []
        for b in self._call(lambda: list(self._listed_since(low)), what="list message batches"):
            if b.total != n or b.id in self._claimed:
                continue
            if b.output_ref is None:  # still running: its results cannot be read yet
                running.append(b.id)
                continue
            first = self._first_result_id(b.id)
            if first is not None and first.startswith(prefix + "_"):
                self._claimed.add(b.id)
                return b
        if running:
            raise RemoteError(
                f"look up the batch of chunk {req.display_name}",
                "api_error",
                None,
                "undecided",
                f"{len(running)} running batch(es) with {n} requests ({', '.join(running[:3])}) "
                "may be this chunk's; results say whose they are once they end: looked up again",
                scope=Scope.REQUEST,
            )
        return None

    def _listed_since(self, low: float) -> Iterator[RemoteBatch]:
        for item in self.client.messages.batches.list(limit=100):  # newest first, auto-paged
            b = W.remote_batch(item.model_dump())
            if b.created_at is not None and b.created_at < low:
                return
            yield b

    def _first_result_id(self, batch_id: str) -> str | None:
        """The custom id on the first line of an ended batch's results (read once)."""
        if batch_id not in self._first_id:

            def first() -> str | None:
                with self.client.messages.batches.with_streaming_response.results(batch_id) as r:
                    for line in r.iter_lines():
                        if line.strip():
                            cid = orjson.loads(line).get("custom_id")
                            return str(cid) if cid is not None else None
                return None

            self._first_id[batch_id] = self._call(first, what=f"read results of {batch_id}")
        return self._first_id[batch_id]

    def retrieve(self, batch_id: str) -> RemoteBatch:
        b = self._call(
            self.client.messages.batches.retrieve, batch_id, what=f"poll batch {batch_id}"
        )
        return W.remote_batch(b.model_dump())

    def poll(self, batch_ids: list[str]) -> dict[str, RemoteBatch]:
        """With several batches in flight, one list page (newest first) answers for them all
        (`listpoll`: a batch it does not show, or shows unchanged for a while, is retrieved)."""
        self._claimed.update(batch_ids)  # each belongs to a chunk the engine tracks
        return self._poller.poll(batch_ids)

    def _list_page(self, n: int) -> list[RemoteBatch]:
        def page() -> list[RemoteBatch]:
            items = self.client.messages.batches.list(limit=100).data  # one page, newest first
            return [W.remote_batch(item.model_dump()) for item in items]

        return self._call(page, what=f"poll {n} batches (one list page)")

    def cancel(self, batch_id: str) -> None:
        self._call(self.client.messages.batches.cancel, batch_id, what=f"cancel batch {batch_id}")

    def download(self, ref: str, dest: Path) -> Path:
        """The results JSONL of ended batch `ref`, streamed to `dest` atomically."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")

        def fetch() -> None:
            results = self.client.messages.batches.with_streaming_response.results
            with results(ref) as r, open(tmp, "wb") as fh:
                for part in r.iter_bytes():
                    fh.write(part)

        self._call(fetch, what=f"download results of {ref}")
        os.replace(tmp, dest)
        return dest

    def read_results(
        self, path: Path, chunk_path: Path, endpoint: str
    ) -> Iterator[RowOutcome | BadLine]:
        return W.read_lines(path, self._chunk_ids(chunk_path), self._classify)

    def _chunk_ids(self, chunk_path: Path) -> list[str]:
        mtime = chunk_path.stat().st_mtime
        cached = self._ids.get(chunk_path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, W.chunk_ids(chunk_path))
            self._ids = {chunk_path: cached}  # one chunk at a time is collected
        return cached[1]

    def _classify(self, status: int | None, type_: str, message: str) -> ErrorClass:
        return classify(
            status,
            type_,
            type_,
            message,
            provider=self.provider,
            rules=self.rules,
            fallback=classify_http(status, type_, type_),
        )[0]

    # ------------------------------------------------------------------ online
    async def call_online(self, endpoint: str, body: dict[str, Any], custom_id: str) -> RowOutcome:
        """One request through the Messages API; the body is the same chat body batch mode
        translates, so both lanes send the same request."""
        dropped: set[str] = set()
        try:
            params = W.to_params(body, dropped=dropped)
        except W.TranslationError as exc:
            return RowOutcome(
                custom_id,
                ok=False,
                error_code="untranslatable",
                error_message=str(exc),
                error_class="invalid_request",
                retryable=row_retryable("invalid_request"),
            )
        self._log_dropped(dropped)
        try:
            raw = await self.aclient.post(
                "/v1/messages",
                cast_to=bytes,
                body=params,
                options={"headers": {CUSTOM_ID_HEADER: header_value(custom_id)}},
            )
        except anthropic.AnthropicError as exc:
            raise self._error(exc, "online request") from None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        return W.message_outcome(custom_id, answer)

    def _log_dropped(self, dropped: set[str]) -> None:
        new = dropped - self._dropped_logged
        if new:
            self._dropped_logged |= new
            logger.warning(
                "request options with no Anthropic equivalent are not sent: {}",
                ", ".join(sorted(new)),
            )

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
            sdk_errors=anthropic.AnthropicError,
            to_error=self._error,  # type: ignore[arg-type]
            **kw,
        )

    def _error(self, exc: anthropic.AnthropicError, what: str) -> RemoteError:
        status, type_, message = _describe(exc)
        if isinstance(exc, anthropic.APITimeoutError):
            fallback: ErrorClass = "timeout"
        else:
            fallback = classify_http(status, type_, type_)
        cls, scope = classify(
            status,
            type_,
            type_,
            message,
            provider=self.provider,
            rules=self.rules,
            fallback=fallback,
        )
        if cls in ("api_error", "timeout") and (status is None or status >= 500):
            scope = Scope.ENDPOINT  # the server is down or failing: every model it serves
        return RemoteError.of_call(
            exc,
            what,
            cls,
            status,
            type_,
            message,
            _retry_after_of(exc),
            scope,
            where=self.url or "api.anthropic.com",
            scrub=self.scrub,
        )


# ---------------------------------------------------------------------- helpers


def _fingerprint(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def root_url(base_url: str | None) -> str | None:
    """The SDK wants the server root (it adds /v1/…): a configured …/v1 is accepted too."""
    if not base_url:
        return None
    url = base_url.rstrip("/")
    return url.removesuffix("/v1") or url


def header_value(row_id: str) -> str:
    if row_id.isascii() and row_id.isprintable():
        return row_id
    return quote(row_id, safe="")


def _describe(exc: anthropic.AnthropicError) -> tuple[int | None, str | None, str]:
    """(status, error type, message) of an SDK exception."""
    if isinstance(exc, anthropic.APITimeoutError):
        return None, None, "request timed out"
    if isinstance(exc, anthropic.APIConnectionError):
        return None, None, "connection error"
    if isinstance(exc, anthropic.APIStatusError):
        body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error")
        inner: dict[str, Any] = error if isinstance(error, dict) else body
        type_ = inner.get("type") or getattr(exc, "type", None)
        message = str(inner.get("message") or exc.message)
        return exc.status_code, str(type_) if type_ else None, message
    return None, None, f"{type(exc).__name__}: {exc}"


def _retry_after_of(exc: BaseException | None) -> float | None:
    if not isinstance(exc, anthropic.APIStatusError) or exc.response is None:
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


def _intent_path(chunk_path: Path, prefix: str) -> Path:
    return chunk_path.with_name(f"{chunk_path.name}.{prefix}{INTENT_SUFFIX}")


def _write_intent(chunk_path: Path, prefix: str, n: int) -> None:
    """Say, durably, that a create for this prefix is about to be sent (see find_batch)."""
    path = _intent_path(chunk_path, prefix)
    tmp = path.with_name(path.name + ".tmp")
    data = orjson.dumps({"prefix": prefix, "requests": n, "sent_at": time.time()})
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_intent(chunk_path: Path, prefix: str) -> dict[str, Any] | None:
    try:
        data = orjson.loads(_intent_path(chunk_path, prefix).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
