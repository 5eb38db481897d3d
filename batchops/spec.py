"""The job specification: what to run, from flags and an optional batchops.toml.

A JobSpec is saved in the run's database when the run starts, so `status`, `retry-missing`,
`merge` and a resumed `run` need only the run directory.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from batchops.errors import ConfigError

if TYPE_CHECKING:
    from batchops.policy import Rule

Endpoint = Literal["/v1/chat/completions", "/v1/responses", "/v1/embeddings"]
Mode = Literal["batch", "online"]

# Hard limits of the OpenAI Batch API (see shared/reference/batch-api-facts.md §2.3).
MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024

RETRY_CLASSES = ("timeout", "api_error", "format_error", "expired", "cancelled", "rate_limit")


class RetryPolicy(BaseModel):
    """How often and how fast failed rows and failed remote calls are tried again."""

    model_config = ConfigDict(extra="forbid")

    max_retries: int = Field(3, ge=0, description="per row, for retryable failures and expiry")
    initial_delay: float = Field(
        1.0, ge=0, description="seconds before the first retry of a remote call"
    )
    backoff: float = Field(2.0, ge=1.0, description="multiplier between retries")
    max_delay: float = Field(60.0, ge=0, description="cap on the delay between retries")
    retry_on: list[str] = Field(default_factory=lambda: list(RETRY_CLASSES))

    @field_validator("retry_on")
    @classmethod
    def _known_classes(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(RETRY_CLASSES))
        if unknown:
            raise ValueError(f"unknown retry class(es) {unknown}; known: {list(RETRY_CLASSES)}")
        return v

    def delay(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based) of a remote call."""
        return min(self.max_delay, self.initial_delay * self.backoff ** max(0, attempt - 1))


class PriceOverride(BaseModel):
    """A user's own price for a model the price library lacks (USD per 1M tokens)."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)
    cache_write: float | None = Field(
        None, ge=0, description="5-minute cache writes; default input"
    )
    cache_write_1h: float | None = Field(
        None, ge=0, description="1-hour cache writes; default input"
    )
    batch_discount: float = Field(0.5, ge=0, le=1, description="fraction taken off in batch mode")


Provider = Literal["openai", "azure", "dashscope", "vllm", "anthropic", "gemini"]
Scope = Literal["request", "model", "key", "endpoint", "account"]


class ErrorRule(BaseModel):
    """One `[[error_rules]]` entry: errors it matches (every given field must match; code,
    type and message are case-insensitive regular expressions) → class and scope."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    status: int | None = Field(None, ge=100, le=599)
    code: str | None = None
    type: str | None = None
    message: str | None = None
    class_: str = Field(alias="class")
    scope: Scope = "model"

    @field_validator("class_")
    @classmethod
    def _known_class(cls, v: str) -> str:
        from batchops.policy import ERROR_CLASSES

        if v not in ERROR_CLASSES:
            raise ValueError(f"unknown error class {v!r}; known: {list(ERROR_CLASSES)}")
        return v


class ModelEntry(BaseModel):
    """One model of the pool; optionally with its own endpoint, key variable and limits."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="name of the env variable holding the key")
    mode: Mode | None = None
    provider: Provider = "openai"
    azure_endpoint: str | None = None
    api_version: str | None = None
    price: PriceOverride | None = None
    token_limit: int | None = Field(None, ge=1, description="enqueued prompt tokens in flight")
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)


class JobSpec(BaseModel):
    """Everything that defines a run. Field names mirror the `run` options in snake_case."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="path of the source table")
    source_format: Literal["csv", "parquet", "jsonl"] = "csv"
    id_column: str | None = None
    start_row: int | None = Field(None, ge=0)
    end_row: int | None = Field(None, ge=0)

    prompt: str
    system: str | None = None
    image_column: str | None = None
    image_dir: str | None = None
    image_detail: Literal["auto", "low", "high"] = "auto"

    models: list[ModelEntry] = Field(min_length=1)
    endpoint: Endpoint = "/v1/chat/completions"
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    body_extra: dict[str, Any] = Field(default_factory=dict)
    # Structured outputs: a JSON Schema every answer must satisfy (see batchops/structured.py).
    schema_: dict[str, Any] | None = Field(
        None, description="JSON Schema of the answer (structured outputs)"
    )
    schema_name: str | None = Field(None, description="name sent with the schema")
    schema_strict: bool = Field(True, description="strict structured outputs")
    schema_prefix: str = Field(
        "", description="prefix of the answer's columns in the merged output"
    )

    batch_size: int = Field(20, ge=1, le=MAX_REQUESTS_PER_FILE)
    poll_interval: float = Field(30.0, gt=0, allow_inf_nan=False)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    mode: Mode = "batch"
    workers: int = Field(8, ge=1)
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)
    max_cost: float | None = Field(None, ge=0)
    dedup: bool = Field(
        True, description="rows with byte-identical requests share one request and its answer"
    )
    token_limit: int | None = Field(
        None, ge=1, description="default enqueued-token limit per model"
    )
    keep_remote_files: bool = Field(
        False,
        description="keep each batch's uploaded input and its result files on the provider after"
        " collection (default: deleted once recorded; the run dir keeps copies)",
    )
    completion_window: str = "24h"
    timeout: float = Field(600.0, gt=0, description="seconds before one remote call times out")
    # Failover (docs/failover.md)
    error_rules: list[ErrorRule] = Field(default_factory=list)
    max_failures_before_switch: int | dict[str, int] | None = Field(
        None, description="consecutive failures before the pool moves on (global or per class)"
    )
    exhausted_cooldown: str | None = Field(
        None, description="how long an exhausted model/key is skipped by later runs (e.g. 24h)"
    )

    @field_validator("exhausted_cooldown")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    key_cycle: bool = Field(False, description="after the last key, return to the first")
    completion_threshold: float = Field(
        1.0, ge=0, le=1, description="exit 0 once at least this share of rows succeeded"
    )
    wait_after_switch: float = Field(0.0, ge=0, description="seconds to wait after a switch")
    pool_order: Literal["models-then-keys", "keys-then-models"] = "models-then-keys"
    prices: dict[str, PriceOverride] = Field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def batch_endpoint(self, model: str) -> str:
        """The batch `endpoint` (and each line's `url`) for a model's provider: Azure's classic
        API (an `api_version`, not the `/openai/v1` base) names it without `/v1`."""
        entry = next((m for m in self.models if m.name == model), None)
        if (
            entry is not None
            and entry.provider == "azure"
            and not (entry.azure_endpoint or "").rstrip("/").endswith("/openai/v1")
        ):
            return self.endpoint.removeprefix("/v1")
        return self.endpoint

    def rules(self) -> list[Rule]:
        """The user's `[[error_rules]]` as the policy's rules (tried before any preset)."""
        from batchops.policy import Rule, Scope

        return [
            Rule(r.class_, Scope(r.scope), r.status, r.code, r.type, r.message)  # type: ignore[arg-type]
            for r in self.error_rules
        ]

    def failure_overrides(self) -> dict[str, int]:
        """`max_failures_before_switch` as {class or "*": n}."""
        m = self.max_failures_before_switch
        if m is None:
            return {}
        return {"*": m} if isinstance(m, int) else dict(m)

    def cooldown_seconds(self) -> float | None:
        return None if self.exhausted_cooldown is None else parse_duration(self.exhausted_cooldown)

    def model_entry(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '6h', '1d' or plain seconds → seconds (ConfigError otherwise)."""
    t = str(text).strip().lower()
    try:
        value = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        raise ConfigError(f"{text!r} is not a duration (e.g. 90s, 30m, 6h, 1d)") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{text!r} is not a duration (e.g. 90s, 30m, 6h, 1d)")
    return value


SOURCE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def infer_source_format(path: str | Path) -> str:
    """csv / parquet / jsonl from the file's extension; anything else is read as CSV."""
    return SOURCE_FORMATS.get(Path(path).suffix.lower(), "csv")


def load_toml(path: Path) -> dict[str, Any]:
    """Read batchops.toml; a syntax error is a one-line ConfigError naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
