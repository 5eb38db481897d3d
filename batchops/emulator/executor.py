"""One request through the emulated model: access, quota, injected faults, then the answer.

Shared by batch lines and synchronous calls, so both count against the same quotas and stats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from batchops.emulator import errors as E
from batchops.emulator.answers import ImageError, SchemaError, endpoint_kind, success_body
from batchops.emulator.errors import ApiError
from batchops.emulator.state import Emulator


@dataclass(slots=True)
class Outcome:
    status: int
    body: dict[str, Any]
    error: ApiError | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


def chosen(seed: int, knob: str, custom_id: str, fraction: float) -> bool:
    """Seeded, per-custom_id choice: the same ids are picked whatever batch they are in."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    digest = hashlib.blake2b(f"{seed}:{knob}:{custom_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64 < fraction


def _int_param(body: dict[str, Any], name: str, lo: int, hi: int) -> ApiError | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return E.invalid_type(name, "an integer", value)
    if value < lo or value > hi:
        low = value < lo
        return ApiError(
            400,
            f"Invalid '{name}': integer {'below minimum' if low else 'above maximum'} value. "
            f"Expected a value {'>=' if low else '<='} {lo if low else hi}, but got {value} "
            "instead.",
            param=name,
            code="integer_below_min_value" if low else "integer_above_max_value",
        )
    return None


def body_problem(body: dict[str, Any], endpoint: str) -> ApiError | None:
    """Parameter errors the model endpoint answers with a 400 (also bounds the work we do)."""
    kind = endpoint_kind(endpoint)
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            return E.invalid_type("messages", "an array of objects", msgs)
        checks = [("n", 1, 128), ("max_tokens", 1, 10**9), ("max_completion_tokens", 1, 10**9)]
    elif kind == "responses":
        checks = [("max_output_tokens", 16, 10**9)]
    else:
        checks = [("dimensions", 1, 3072)]
    for name, lo, hi in checks:
        err = _int_param(body, name, lo, hi)
        if err is not None:
            return err
    return None


def _fail(err: ApiError) -> Outcome:
    return Outcome(err.status, err.body(), err)


def execute(
    emu: Emulator,
    *,
    custom_id: str,
    model: str,
    body: dict[str, Any],
    endpoint: str,
    api_key: str,
    n_prompt: int | None = None,
    image_error: bool = False,
    lane: str = "online",
) -> Outcome:
    """Run one request. Denied models and exhausted quotas are refused before the model runs
    (not counted as executed); everything after that counts as one execution."""
    sc = emu.scenario
    c = emu.counters
    inject = sc.injected(lane, model, api_key) if sc.inject_errors else None
    if inject is not None:  # refused before the model runs, like a denied model
        return _fail(E.injected(inject))
    if model in sc.denied_models:
        return _fail(E.model_denied(model))
    if not emu.quota_left(model, api_key):
        return _fail(E.insufficient_quota(sc.retry_after_seconds))

    per_model = c.models.setdefault(model, [0, 0])
    # (each fraction is tested before hashing: this runs 50,000 times per big batch)
    fail_once = bool(sc.fail_once_fraction) and chosen(
        sc.seed, "fail_once", custom_id, sc.fail_once_fraction
    )
    truncate = bool(sc.truncate_fraction) and chosen(
        sc.seed, "truncate", custom_id, sc.truncate_fraction
    )
    invalid = bool(sc.invalid_json_fraction) and chosen(
        sc.seed, "invalid_json", custom_id, sc.invalid_json_fraction
    )
    # Earlier runs of this id (on disk) are looked up only for an id a knob picked.
    executed, answered = c.requests.get(custom_id) if fail_once or truncate or invalid else (0, 0)
    c.requests.add(custom_id, 1, 0)
    per_model[0] += 1
    c.keys[api_key] += 1

    if fail_once and executed == 0:
        return _fail(E.server_error(500))
    if sc.reject_fraction and chosen(sc.seed, "reject", custom_id, sc.reject_fraction):
        return _fail(E.rejected())
    if image_error:
        return _fail(E.unsupported_image())
    problem = body_problem(body, endpoint)
    if problem is not None:
        return _fail(problem)
    truncate = truncate and answered == 0  # only the first answer is damaged
    invalid = invalid and answered == 0
    try:
        out, n_in, n_out = success_body(
            model,
            body,
            endpoint,
            n_prompt=n_prompt,
            cached_fraction=sc.cached_tokens_fraction,
            truncate=truncate,
            invalid_json=invalid,
        )
    except ImageError:
        return _fail(E.unsupported_image())
    except SchemaError as exc:
        return _fail(
            ApiError(
                400,
                f"Invalid schema for response_format: {exc}.",
                param="response_format",
                code="invalid_json_schema",
            )
        )
    c.requests.add(custom_id, 0, 1)
    per_model[1] += 1
    cached = int(n_in * sc.cached_tokens_fraction)
    return Outcome(200, out, None, n_in, cached, n_out)
