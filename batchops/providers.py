"""The only module that talks to the network: clients, the key/model pool, and remote calls.

The SDK's own retries are switched off (`max_retries=0`): it would retry a 429
`insufficient_quota` that can never succeed. Instead every call goes through `call()`, which
classifies the error by code (classify.py) and retries only what can improve.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai
from loguru import logger
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from batchops.classify import EXHAUSTING, classify_http, mask_key
from batchops.errors import BatchopsError, ConfigError
from batchops.records import ErrorClass
from batchops.spec import JobSpec, Mode, ModelEntry, RetryPolicy

T = TypeVar("T")

# Remote calls (upload, create, poll, download) are retried this many times on transient errors.
CALL_ATTEMPTS = 6


@dataclass(frozen=True)
class Key:
    """An API key. Its value never reaches a log, a file or an error message: use `label`/`key_id`."""

    value: str = field(repr=False)

    @functools.cached_property
    def key_id(self) -> str:
        # A one-way fingerprint, so the run database can say which key owns a batch. Cached:
        # online mode asks for it on every request.
        return hashlib.sha256(self.value.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return mask_key(self.value)

    def __str__(self) -> str:
        return self.label


class ApiCallError(BatchopsError):
    """A remote call failed for good (or with an error class the caller must act on)."""

    def __init__(
        self,
        what: str,
        cls: ErrorClass,
        status: int | None,
        code: str | None,
        message: str,
        retry_after: float | None = None,
    ) -> None:
        self.what, self.cls, self.status, self.code, self.retry_after = (
            what,
            cls,
            status,
            code,
            retry_after,
        )
        self.message = message
        super().__init__(f"{what}: {cls} (HTTP {status}, {code}): {message}")


def load_keys(api_key_file: Path | None = None, env: dict[str, str] | None = None) -> list[Key]:
    """The key pool, in order: OPENAI_API_KEYS (comma-separated), --api-key-file, OPENAI_API_KEY."""
    env = dict(os.environ) if env is None else env
    values: list[str] = []
    if env.get("OPENAI_API_KEYS"):
        values += [k.strip() for k in env["OPENAI_API_KEYS"].split(",") if k.strip()]
    if api_key_file is not None:
        try:
            lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(
                f"{api_key_file}: cannot read API key file ({exc.strerror})"
            ) from None
        values += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not values and env.get("OPENAI_API_KEY"):
        values.append(env["OPENAI_API_KEY"].strip())
    seen: dict[str, Key] = {}
    for v in values:
        seen.setdefault(v, Key(v))
    return list(seen.values())


class Pool:
    """The (key, model) pairs in failover order and the clients that serve them.

    Order: every model on the first key, then every model on the next key, ... An exhausted
    pair is not used again in this invocation; a new invocation starts from the top.
    """

    def __init__(
        self,
        spec: JobSpec,
        keys: list[Key],
        env: dict[str, str] | None = None,
        base_url: str | None = None,
    ) -> None:
        self.spec = spec
        self.env = dict(os.environ) if env is None else env
        self.base_url = base_url
        self._clients: dict[tuple[str, str], openai.OpenAI] = {}
        # Async clients belong to one event loop: made per online run, closed by aclose().
        self._async_clients: dict[tuple[str, str], openai.AsyncOpenAI] = {}
        # The engine's mode ("batch"/"online"): current() offers only pairs of that mode.
        self.lane: Mode | None = None
        for m in spec.models:
            _check_url(m)
        self.keys = keys
        self.pairs: list[tuple[ModelEntry, Key]] = []
        entry_keys = {m.name: self._entry_key(m) for m in spec.models}
        if not keys and any(k is None for k in entry_keys.values()):
            raise ConfigError(
                "no API key: set OPENAI_API_KEY (or OPENAI_API_KEYS, or --api-key-file); for a local server any value works"
            )
        for key in keys or [None]:
            for m in spec.models:
                k = entry_keys[m.name] or key
                if k is not None and (m, k) not in self.pairs:
                    self.pairs.append((m, k))
        self.exhausted: dict[tuple[str, str], str] = {}
        self.all_keys = {k.key_id: k for _, k in self.pairs}

    def _entry_key(self, m: ModelEntry) -> Key | None:
        if m.api_key_env is None:
            return None
        value = self.env.get(m.api_key_env)
        if not value:
            raise ConfigError(
                f"model {m.name}: environment variable {m.api_key_env} (api_key_env) is not set"
            )
        return Key(value)

    def current(self) -> tuple[ModelEntry, Key] | None:
        """The pair to use now; None when none is left, or (with a `lane`) when the next pair
        in failover order is of the other mode: the caller hands over to the other engine."""
        pair = self.first_available()
        if pair is not None and self.lane is not None and self.mode_of(pair[0]) != self.lane:
            return None
        return pair

    def first_available(self) -> tuple[ModelEntry, Key] | None:
        """The first pair not exhausted, whatever its mode."""
        for m, k in self.pairs:
            if (m.name, k.key_id) not in self.exhausted:
                return m, k
        return None

    def mode_of(self, entry: ModelEntry) -> Mode:
        """A model's effective mode: its own `mode`, else the job's."""
        return entry.mode or self.spec.mode

    def next_mode(self) -> Mode | None:
        """The mode of the first pair not exhausted (None when the pool is used up)."""
        pair = self.first_available()
        return None if pair is None else self.mode_of(pair[0])

    def exhaust(
        self, model: str, key_id: str | None, reason: str, *, whole_key: bool = False
    ) -> None:
        """Take a pair (or every pair of a key) out of the pool for this invocation."""
        before = self.first_available()
        for m, k in self.pairs:
            if (whole_key and k.key_id == key_id) or (
                m.name == model and (key_id is None or k.key_id == key_id)
            ):
                self.exhausted.setdefault((m.name, k.key_id), reason)
        after = self.first_available()
        label = self.all_keys[key_id].label if key_id in self.all_keys else "?"
        what = f"key {label}" if whole_key else f"model {model} on key {label}"
        if after is None:
            logger.warning("{} exhausted ({}); no model/key left in the pool", what, reason)
        elif before != after:
            logger.warning(
                "{} exhausted ({}); switching to model {} on key {}{}",
                what,
                reason,
                after[0].name,
                after[1].label,
                f" ({self.mode_of(after[0])} mode)" if self.lane is not None else "",
            )

    def summary(self) -> list[dict[str, str]]:
        return [
            {
                "model": m.name,
                "key": k.label,
                "state": "exhausted: " + self.exhausted[(m.name, k.key_id)]
                if (m.name, k.key_id) in self.exhausted
                else ("in use" if self.current() == (m, k) else "available"),
            }
            for m, k in self.pairs
        ]

    def client(self, model: str, key_id: str | None) -> openai.OpenAI:
        """The client for a model's endpoint with a given key (e.g. to poll a batch it owns)."""
        entry, key = self._entry_and_key(model, key_id)
        cache_key = (entry.name if (entry.base_url or entry.azure_endpoint) else "", key.key_id)
        if cache_key not in self._clients:
            self._clients[cache_key] = make_client(entry, key, self.base_url)
        return self._clients[cache_key]

    def async_client(self, model: str, key_id: str | None) -> openai.AsyncOpenAI:
        """The async twin of `client()` (online mode), for the running event loop."""
        entry, key = self._entry_and_key(model, key_id)
        cache_key = (entry.name if (entry.base_url or entry.azure_endpoint) else "", key.key_id)
        if cache_key not in self._async_clients:
            self._async_clients[cache_key] = make_async_client(entry, key, self.base_url)
        return self._async_clients[cache_key]

    async def aclose(self) -> None:
        """Close the async clients (their connections belong to the loop that is ending)."""
        clients, self._async_clients = list(self._async_clients.values()), {}
        for c in clients:
            await c.close()

    def _entry_and_key(self, model: str, key_id: str | None) -> tuple[ModelEntry, Key]:
        entry = (
            self.spec.model_entry(model)
            if model in self.spec.model_names
            else ModelEntry(name=model)
        )
        key = self.all_keys.get(key_id or "") or (self.pairs[0][1] if self.pairs else None)
        if key is None:
            raise ConfigError(f"no API key available for model {model}")
        return entry, key

    def delete_file(
        self, model: str, key_id: str | None, file_id: str | None, policy: RetryPolicy
    ) -> None:
        """Best effort: delete an uploaded file no batch will use (it only costs storage)."""
        if not file_id:
            return
        try:
            call(
                self.client(model, key_id).files.delete,
                file_id,
                what=f"delete unused file {file_id}",
                policy=policy,
                scrub=self.scrub,
                attempts=2,
            )
            logger.debug("deleted unused file {}", file_id)
        except ApiCallError as exc:
            logger.debug("could not delete unused file {}: {}", file_id, exc)

    def scrub(self, text: str) -> str:
        """Replace any key that slipped into a message by its masked label."""
        for k in self.all_keys.values():
            if k.value and k.value in text:
                text = text.replace(k.value, k.label)
        return text


def make_client(entry: ModelEntry, key: Key, base_url: str | None = None) -> openai.OpenAI:
    azure, kwargs = _client_kwargs(entry, key, base_url)
    return openai.AzureOpenAI(**kwargs) if azure else openai.OpenAI(**kwargs)


def make_async_client(
    entry: ModelEntry, key: Key, base_url: str | None = None
) -> openai.AsyncOpenAI:
    azure, kwargs = _client_kwargs(entry, key, base_url)
    return openai.AsyncAzureOpenAI(**kwargs) if azure else openai.AsyncOpenAI(**kwargs)


def _client_kwargs(
    entry: ModelEntry, key: Key, base_url: str | None
) -> tuple[bool, dict[str, Any]]:
    """(azure?, constructor arguments): the same settings for the sync and the async client."""
    common: dict[str, Any] = {"api_key": key.value, "max_retries": 0, "timeout": 600.0}
    if entry.provider == "azure":
        if not entry.azure_endpoint:
            raise ConfigError(f"model {entry.name}: provider azure needs azure_endpoint")
        return True, {
            "azure_endpoint": entry.azure_endpoint,
            "api_version": entry.api_version or "2024-10-21",
            **common,
        }
    return False, {"base_url": entry.base_url or base_url, **common}


def _check_url(entry: ModelEntry) -> None:
    """A model entry's base_url / azure_endpoint must be an http(s) URL with a host."""
    for name, value in (("base_url", entry.base_url), ("azure_endpoint", entry.azure_endpoint)):
        if value is None:
            continue
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"model {entry.name}: {name} {value!r} is not an http(s) URL "
                "(e.g. http://localhost:8000/v1)"
            )


def describe_exception(
    exc: BaseException,
) -> tuple[ErrorClass, int | None, str | None, str, float | None]:
    """(class, status, code, message, retry_after) of an SDK exception."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None, None, "request timed out", None
    if isinstance(exc, openai.APIConnectionError):
        return "api_error", None, None, "connection error", None
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        code = body.get("code") or getattr(exc, "code", None)
        type_ = body.get("type") or getattr(exc, "type", None)
        message = str(body.get("message") or exc.message)
        retry_after = _retry_after(exc.response.headers if exc.response is not None else {})
        return (
            classify_http(exc.status_code, code, type_),
            exc.status_code,
            code,
            message,
            retry_after,
        )
    return "api_error", None, None, f"{type(exc).__name__}: {exc}", None


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name) if headers else None
        if value:
            try:
                return float(value) * scale
            except ValueError:
                return None
    return None


def _transient(exc: BaseException) -> bool:
    if not isinstance(exc, openai.OpenAIError):
        return False
    cls = describe_exception(exc)[0]
    return cls in ("api_error", "timeout", "rate_limit")


def call(
    fn: Callable[..., T],
    *args: Any,
    what: str,
    policy: RetryPolicy,
    scrub: Callable[[str], str] = str,
    attempts: int = CALL_ATTEMPTS,
    **kwargs: Any,
) -> T:
    """Run one SDK call, retrying transient failures (5xx, timeouts, connection, rate limit) with backoff.

    Anything else, or a transient failure that outlasts the attempts, raises ApiCallError with a
    classified, key-free message.
    """

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = describe_exception(exc)[4] if exc else None
        delay = policy.delay(state.attempt_number)
        return max(delay, after or 0.0)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        cls, status, code, message, _ = (
            describe_exception(exc) if exc else ("api_error", None, None, "", None)
        )
        logger.debug(
            "{} failed ({} HTTP {} {}: {}); retry {} of {}",
            what,
            cls,
            status,
            code,
            scrub(message),
            state.attempt_number,
            attempts - 1,
        )

    try:
        for attempt in Retrying(
            retry=retry_if_exception(_transient),
            wait=wait,
            stop=stop_after_attempt(attempts),
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                logger.debug("remote call: {}", what)
                return fn(*args, **kwargs)
    except openai.OpenAIError as exc:
        cls, status, code, message, retry_after = describe_exception(exc)
        raise ApiCallError(what, cls, status, code, scrub(message), retry_after) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def post_raw(
    client: openai.AsyncOpenAI, path: str, body: dict[str, Any], headers: dict[str, str]
) -> bytes:
    """One synchronous request (online mode): the answer's raw bytes, or the SDK's exception.

    The body goes out exactly as rendered through the client's generic `post` — one path for
    every endpoint, no typed-parameter transform, no pydantic response objects. The caller owns
    the retry policy (the client has max_retries=0) and classifies errors with
    describe_exception."""
    return await client.post(path, cast_to=bytes, body=body, options={"headers": headers})


def is_exhausting(exc: ApiCallError) -> bool:
    return exc.cls in EXHAUSTING
