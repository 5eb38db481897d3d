"""The emulator's knobs: timings, known models, quotas and injected faults.

One pydantic model, loadable from TOML or JSON with the same keys, and partially updatable at
runtime (`POST /_emulator/scenario`). Every knob is described in docs/emulator.md.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class InjectedError(BaseModel):
    """An error answered in any provider's words, for a model and/or key, at one place: when a
    batch is created, for each batch line, or for each online call (failover tests)."""

    model_config = ConfigDict(extra="forbid")

    at: Literal["create", "line", "online", "any"] = "any"
    model: str | None = Field(None, description="only requests for this model (None: any)")
    key: str | None = Field(None, description="only requests paid by this key (None: any)")
    status: int = Field(ge=400, le=599)
    code: str | None = None
    type: str = "invalid_request_error"
    message: str = "injected error"
    retry_after: float | None = Field(None, ge=0)


class Scenario(BaseModel):
    """How the emulator behaves. Defaults give a healthy, fast API with no faults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Determinism
    seed: int = Field(0, description="seeds output shuffling and every fraction-based fault")
    shuffle_output: bool = Field(True, description="output/error lines in seeded random order")

    # Batch timings (seconds of wall clock, multiplied by time_scale)
    validating_seconds: float = Field(0.5, ge=0)
    in_progress_seconds: float = Field(2.0, ge=0)
    finalizing_seconds: float = Field(0.2, ge=0)
    cancelling_seconds: float = Field(0.5, ge=0)
    per_request_seconds: float = Field(0.0, ge=0, description="extra in-progress time per request")
    time_scale: float = Field(1.0, ge=0, description="multiplies every batch duration")
    sync_latency_seconds: float = Field(0.0, ge=0, description="delay of each sync model call")

    # Models and keys
    models: list[str] | None = Field(None, description="known models; None = any name is known")
    denied_models: list[str] = Field(default_factory=list, description="403 model_not_found")
    api_keys: list[str] | None = Field(None, description="accepted keys; None = any key")

    # Quotas and limits
    model_quota: dict[str, int] = Field(
        default_factory=dict, description="executions a model may do (batch+sync)"
    )
    key_quota: dict[str, int] = Field(
        default_factory=dict, description="executions an API key may pay for (batch+sync)"
    )
    enqueued_token_limit: dict[str, int] = Field(
        default_factory=dict, description="per model: prompt tokens of running batches"
    )
    rate_limit_rpm: int | None = Field(None, ge=1, description="sync calls per key per minute")
    retry_after_seconds: float = Field(1.0, ge=0)
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_requests_per_batch: int = Field(50_000, ge=1)

    # Per-request faults (chosen per custom_id from the seed)
    fail_once_fraction: float = Field(0.0, ge=0, le=1, description="first execution → 500")
    reject_fraction: float = Field(0.0, ge=0, le=1, description="always 400")
    invalid_json_fraction: float = Field(0.0, ge=0, le=1, description="first answer breaks schema")
    truncate_fraction: float = Field(0.0, ge=0, le=1, description="first answer cut (length)")
    cached_tokens_fraction: float = Field(0.0, ge=0, le=1)

    # Transport faults (count every non-admin API call)
    http_error_every: int = Field(0, ge=0, description="every Nth call answers http_error_status")
    http_error_status: int = Field(503, ge=400, le=599)
    drop_connection_every: int = Field(0, ge=0, description="every Nth call: connection closed")
    drop_after_processing: bool = Field(
        False, description="a dropped call is first processed (its effect happens), then dropped"
    )
    drop_route: str = Field(
        "",
        description='one route ("POST /v1/batches"): every drop_route_every-th call of it is'
        " processed, then its connection dropped (a fault that does not depend on call order)",
    )
    drop_route_every: int = Field(0, ge=0)
    delete_error_status: int = Field(
        0, ge=0, le=599, description="every file delete answers this status (0: none)"
    )
    slow_response_seconds: float = Field(0.0, ge=0, description="delay of every API call")

    # Batch-level faults
    expire_first_n: int = Field(0, ge=0, description="first N batches to run expire part-way")
    expire_done_fraction: float = Field(0.5, ge=0, le=1)

    # Anthropic and Gemini dialects
    stuck_first_n: int = Field(
        0,
        ge=0,
        description="first N Anthropic/Gemini batches stay pending for stuck_seconds"
        " (or until a scenario change lowers this below their number)",
    )
    stuck_seconds: float = Field(3600.0, ge=0, description="how long a stuck batch stays pending")
    omit_retry_after: bool = Field(False, description="Anthropic/Gemini 429s without retry-after")
    anthropic_max_requests: int = Field(100_000, ge=1, description="requests per Message Batch")

    # Provider error dialects (failover tests)
    inject_errors: list[InjectedError] = Field(
        default_factory=list,
        description="errors with any status/code/type/message per model and key (first match)",
    )

    def injected(self, at: str, model: str | None, key: str | None) -> InjectedError | None:
        """The first injected error that applies here (at create / line / online)."""
        for e in self.inject_errors:
            if e.at in (at, "any") and e.model in (None, model) and e.key in (None, key):
                return e
        return None

    # Result-file and listing faults
    result_fault_downloads: int = Field(
        1, ge=0, description="output-file faults hit the first N downloads of a file; 0 = every"
    )
    output_drop_fraction: float = Field(
        0.0, ge=0, le=1, description="custom_ids whose success line is left out of the file"
    )
    output_truncate_last: bool = Field(False, description="the file's last line is cut in half")
    output_duplicate_fraction: float = Field(
        0.0, ge=0, le=1, description="custom_ids whose success line appears twice"
    )
    output_failure_first_fraction: float = Field(
        0.0, ge=0, le=1, description="custom_ids with a 500 line just before their success line"
    )
    output_malformed_lines: int = Field(0, ge=0, description="lines that are not JSON, inserted")
    list_stale: bool = Field(
        False, description="GET /v1/batches shows each batch as it was when first listed"
    )
    upload_error_keys: list[str] = Field(
        default_factory=list, description="POST /v1/files always answers 500 for these keys"
    )

    @classmethod
    def from_file(cls, path: str | Path) -> Scenario:
        """Read a scenario from a .toml or .json file (same keys as the model)."""
        p = Path(path)
        raw = p.read_bytes()
        data: dict[str, Any]
        if p.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
        # A TOML file may keep the knobs under a [scenario] table.
        if set(data) == {"scenario"} and isinstance(data["scenario"], dict):
            data = data["scenario"]
        return cls.model_validate(data)

    def updated(self, **changes: Any) -> Scenario:
        """A validated copy with some knobs changed (unknown names are an error)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def scaled(self, seconds: float) -> float:
        return seconds * self.time_scale
