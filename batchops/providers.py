"""The model/key pool: failover order, what is exhausted, and the backend serving each pair.

The network itself lives behind `batchops.backends`; this module only decides which (model, key)
pair is used now and hands out the backend (one per endpoint and key, cached).
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from loguru import logger

from batchops.backends import Backend, BackendFactory, RemoteError, make_backend
from batchops.errors import ConfigError
from batchops.masking import mask_key, mask_secrets
from batchops.policy import Scope
from batchops.spec import JobSpec, Mode, ModelEntry


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
    """The (model, key) pairs in failover order and the backends that serve them.

    Order: every model on the first key, then every model on the next key (`pool_order =
    "keys-then-models"`: every key for the first model, then the next model). An exhausted pair
    is not used again; the engine persists what is exhausted (`remember`), so later invocations
    skip it too until `batchops pool reset` or the `exhausted_cooldown` has passed.
    """

    def __init__(
        self,
        spec: JobSpec,
        keys: list[Key],
        env: dict[str, str] | None = None,
        base_url: str | None = None,
        backend_factory: BackendFactory | None = None,
    ) -> None:
        self.spec = spec
        self.env = dict(os.environ) if env is None else env
        self.base_url = base_url
        self._factory = backend_factory
        self._backends: dict[tuple[str, str], Backend] = {}
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
        some_keys: list[Key | None] = list(keys) or [None]
        order: list[tuple[ModelEntry, Key | None]] = (
            [(m, key) for m in spec.models for key in some_keys]
            if spec.pool_order == "keys-then-models"
            else [(m, key) for key in some_keys for m in spec.models]
        )
        for m, key in order:
            k = entry_keys[m.name] or key
            if k is not None and (m, k) not in self.pairs:
                self.pairs.append((m, k))
        self.exhausted: dict[tuple[str, str], str] = {}
        self.since: dict[tuple[str, str], float] = {}
        self._cycled = False  # key_cycle: the pool started again from the first key once
        self._bad_keys: set[str] = set()  # reasons of pairs a key_cycle must not bring back
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
        """The first pair not exhausted, whatever its mode. With `key_cycle`, once every pair is
        used up the pool starts again from the first key, once per invocation (seed 001: quotas
        that reset while the last keys were used); bad keys stay out."""
        for m, k in self.pairs:
            if (m.name, k.key_id) not in self.exhausted:
                return m, k
        if self.spec.key_cycle and not self._cycled and self.exhausted:
            self._cycled = True
            keep = {p: r for p, r in self.exhausted.items() if r in self._bad_keys}
            logger.warning(
                "every model and key is used up; key_cycle: starting again from the first key"
            )
            self.exhausted = keep
            self.since = {p: t for p, t in self.since.items() if p in keep}
            return self.first_available()
        return None

    def mode_of(self, entry: ModelEntry) -> Mode:
        """A model's effective mode: its own `mode`, else the job's."""
        return entry.mode or self.spec.mode

    def next_mode(self) -> Mode | None:
        """The mode of the first pair not exhausted (None when the pool is used up)."""
        pair = self.first_available()
        return None if pair is None else self.mode_of(pair[0])

    def endpoint_of(self, entry: ModelEntry) -> str:
        """Where a model is served (models on one endpoint go down together)."""
        return entry.azure_endpoint or entry.base_url or self.base_url or "default"

    def exhaust(
        self,
        model: str,
        key_id: str | None,
        reason: str,
        *,
        scope: Scope = Scope.MODEL,
        whole_key: bool = False,
        since: float | None = None,
    ) -> list[tuple[str, str]]:
        """Take pairs out of the pool: the model on this key (`Scope.MODEL`; every key when
        `key_id` is None), every model of the key (`KEY`, `ACCOUNT`), or every model served by
        the model's endpoint on any key (`ENDPOINT`). Returns the pairs newly taken out."""
        if whole_key:
            scope = Scope.KEY
        before = self.first_available()
        entry = self.spec.model_entry(model) if model in self.spec.model_names else None
        where = self.endpoint_of(entry) if entry is not None else None
        taken: list[tuple[str, str]] = []
        for m, k in self.pairs:
            if scope in (Scope.KEY, Scope.ACCOUNT):
                hit = k.key_id == key_id
            elif scope == Scope.ENDPOINT:
                hit = where is not None and self.endpoint_of(m) == where
            else:
                hit = m.name == model and (key_id is None or k.key_id == key_id)
            if hit and (m.name, k.key_id) not in self.exhausted:
                self.exhausted[(m.name, k.key_id)] = reason
                if scope == Scope.KEY:
                    self._bad_keys.add(reason)
                self.since[(m.name, k.key_id)] = since or time.time()
                taken.append((m.name, k.key_id))
        after = self.first_available()
        if taken and since is None:
            what = self.describe_scope(model, key_id, scope)
            if after is None:
                logger.warning("{} exhausted ({}); no model/key left in the pool", what, reason)
            elif before != after:
                logger.warning(
                    "{} exhausted ({}); switching to {}{}",
                    what,
                    reason,
                    self.describe_pair(after),
                    f" ({self.mode_of(after[0])} mode)" if self.lane is not None else "",
                )
        return taken

    def describe_scope(self, model: str, key_id: str | None, scope: Scope) -> str:
        label = self.all_keys[key_id].label if key_id in self.all_keys else "?"
        if scope in (Scope.KEY, Scope.ACCOUNT):
            return f"key {label}" + (" (the whole account)" if scope == Scope.ACCOUNT else "")
        if scope == Scope.ENDPOINT:
            entry = self.spec.model_entry(model) if model in self.spec.model_names else None
            return f"endpoint {self.endpoint_of(entry) if entry else '?'} (model {model})"
        return f"model {model} on key {label}"

    def describe_pair(self, pair: tuple[ModelEntry, Key]) -> str:
        """'qwen-plus on key sk-…abcd; 13 of 15 models left' for switch messages."""
        left = {m.name for m, k in self.pairs if (m.name, k.key_id) not in self.exhausted}
        total = len({m.name for m, _ in self.pairs})
        return f"model {pair[0].name} on key {pair[1].label}; {len(left)} of {total} models left"

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

    # ------------------------------------------------------------------ remembered pool
    def remembered(self) -> list[dict[str, object]]:
        """What is exhausted, to persist in the run (keys as fingerprints and masked labels)."""
        return [
            {
                "model": m,
                "key_id": k,
                "key": self.all_keys[k].label if k in self.all_keys else "?",
                "reason": reason,
                "since": self.since.get((m, k), 0.0),
            }
            for (m, k), reason in self.exhausted.items()
        ]

    def remember(self, saved: list[dict[str, object]], cooldown: float | None) -> int:
        """Take out again what an earlier invocation exhausted (until `cooldown` seconds have
        passed since, when one is set). Returns how many pairs were restored."""
        now = time.time()
        n = 0
        for item in saved:
            model, key_id, since = str(item["model"]), str(item["key_id"]), float(item["since"])  # type: ignore[arg-type]
            if cooldown is not None and now - since >= cooldown:
                continue
            if any(m.name == model and k.key_id == key_id for m, k in self.pairs):
                n += len(self.exhaust(model, key_id, str(item["reason"]), since=since))
        return n

    def backend(self, model: str, key_id: str | None) -> Backend:
        """The backend for a model's endpoint with a given key (e.g. to poll a batch it owns).
        One per endpoint and key: batches of one account are polled together."""
        entry, key = self._entry_and_key(model, key_id)
        cache_key = (entry.name if (entry.base_url or entry.azure_endpoint) else "", key.key_id)
        if cache_key not in self._backends:
            if self._factory is not None:
                self._backends[cache_key] = self._factory(entry, key.value, self.base_url)
            else:
                self._backends[cache_key] = make_backend(
                    entry,
                    key.value,
                    self.base_url,
                    policy=self.spec.retry,
                    scrub=self.scrub,
                    timeout=self.spec.timeout,
                    rules=self.spec.rules(),
                )
        return self._backends[cache_key]

    async def aclose(self) -> None:
        """Close what the backends hold for the running event loop (online connections)."""
        for b in list(self._backends.values()):
            await b.aclose()

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

    def delete_file(self, model: str, key_id: str | None, file_id: str | None) -> None:
        """Best effort: delete an uploaded file no batch will use (it only costs storage)."""
        if not file_id:
            return
        try:
            self.backend(model, key_id).delete_file(file_id)
            logger.debug("deleted unused file {}", file_id)
        except RemoteError as exc:
            logger.debug("could not delete unused file {}: {}", file_id, exc)

    def scrub(self, text: str) -> str:
        """Replace any key that slipped into a message by its masked label."""
        return mask_secrets(text, [k.value for k in self.all_keys.values()])


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
