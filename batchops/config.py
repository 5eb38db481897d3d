"""batchops.toml: read it and check every value before anything is built.

A bad value is one ConfigError line (exit 2) naming the file, the key and what is allowed, never
a pydantic traceback. `describe_errors` gives pydantic errors the same plain wording for options
(`--batch-size must be ≥ 1`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from batchops import structured
from batchops.errors import ConfigError, InputError
from batchops.spec import (
    JobSpec,
    ModelEntry,
    PriceOverride,
    RetryPolicy,
    infer_source_format,
    load_toml,
)

# Top-level keys build_spec reads besides JobSpec's own fields.
_EXTRA_KEYS = {"models", "retry", "prices", "schema", "schema_name"}
# JobSpec fields a config file does not set (the command line or the run does).
_NOT_IN_CONFIG = {"source", "prompt", "schema_"}


_TYPES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a table",
    "list": "a list",
}


def plain(error: Mapping[str, Any]) -> str:
    """One pydantic error as a phrase: 'must be ≥ 1', "must be one of 'openai', 'azure'"."""
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    bounds = {
        "greater_than_equal": ("≥", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("≤", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        sign, key = bounds[kind]
        return f"must be {sign} {ctx.get(key)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')!s}"
    if kind == "extra_forbidden":
        return "is not a known key"
    if kind == "missing":
        return "is required"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return "must be " + str(_TYPES.get(kind.split("_")[0], kind.split("_")[0]))
    msg = str(error.get("msg", "is not valid"))
    return msg[0].lower() + msg[1:] if msg else "is not valid"


def describe_errors(
    exc: ValidationError, name: Callable[[tuple[Any, ...]], str], limit: int = 3
) -> str:
    """Up to `limit` errors, each as '<name of its location> <plain phrase>', joined by '; '."""
    return "; ".join(f"{name(tuple(e['loc']))} {plain(e)}" for e in exc.errors()[:limit])


def load_config(path: Path) -> dict[str, Any]:
    """Read and check batchops.toml; every problem is a ConfigError naming file and key."""
    data = load_toml(path)
    check_config(data, path)
    return data


def check_config(data: Mapping[str, Any], path: Path | str) -> None:
    known = (set(JobSpec.model_fields) - _NOT_IN_CONFIG) | _EXTRA_KEYS
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{path}: unknown key {key!r} (known keys: {', '.join(sorted(known))})"
            )
    models = data.get("models", [])
    if not isinstance(models, list):
        raise ConfigError(f"{path}: models must be a list of [[models]] tables")
    for i, entry in enumerate(models, 1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: [[models]] entry {i} must be a table")
        where = f"[[models]] entry {i}" + (f" ({entry['name']})" if "name" in entry else "")
        _check(ModelEntry, entry, path, where, allowed=ModelEntry)
    if "retry" in data:
        _check(RetryPolicy, data["retry"], path, "[retry]", allowed=RetryPolicy)
    prices = data.get("prices", {})
    if not isinstance(prices, dict):
        raise ConfigError(f'{path}: prices must be a table of [prices."MODEL"] tables')
    for model, price in prices.items():
        _check(PriceOverride, price, path, f"[prices.{json.dumps(model)}]", allowed=PriceOverride)
    for key, value in data.items():
        if key in JobSpec.model_fields:
            try:  # the field's own type and bounds, without the rest of a JobSpec
                JobSpec.__pydantic_validator__.validate_assignment(
                    JobSpec.model_construct(),  # type: ignore[call-arg]  # an empty shell on purpose
                    key,
                    value,
                )
            except ValidationError as exc:
                raise ConfigError(f"{path}: {key} = {value!r}: {plain(exc.errors()[0])}") from None


def _check(
    model: type[BaseModel], value: Any, path: Path | str, where: str, allowed: type[BaseModel]
) -> None:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        shown = f" = {e['input']!r}" if e["type"] != "missing" and loc else ""
        hint = ""
        if e["type"] == "extra_forbidden":
            hint = f" (known keys: {', '.join(allowed.model_fields)})"
        raise ConfigError(f"{path}: {where}: {loc or 'value'}{shown}: {plain(e)}{hint}") from None


def build_spec(
    *,
    source_path: str,
    prompt: str,
    models: Sequence[str | ModelEntry],
    config: Mapping[str, Any] | None = None,
    **options: Any,
) -> JobSpec:
    """A JobSpec from keyword options (None = not given) over an optional batchops.toml mapping."""
    data: dict[str, Any] = {}
    cfg = dict(config or {})
    table_models = cfg.pop("models", None)
    data.update({k: v for k, v in cfg.items() if k in JobSpec.model_fields})
    data.update({k: v for k, v in options.items() if v is not None and k in JobSpec.model_fields})
    retry = dict(cfg.get("retry", {}))
    for flag, name in (
        ("max_retries", "max_retries"),
        ("retry_delay", "initial_delay"),
        ("retry_backoff", "backoff"),
        ("retry_max_delay", "max_delay"),
    ):
        if options.get(flag) is not None:
            retry[name] = options[flag]
    if options.get("retry_on"):
        retry["retry_on"] = [c.strip() for c in str(options["retry_on"]).split(",") if c.strip()]
    data["retry"] = retry
    entries: list[ModelEntry] = []
    by_name = {m["name"]: m for m in (table_models or [])} if table_models else {}
    for m in models or list(by_name):
        entries.append(
            m if isinstance(m, ModelEntry) else ModelEntry(**by_name.get(m, {"name": m}))
        )
    data["models"] = entries
    data["source"] = source_path
    data["prompt"] = prompt
    data.setdefault("source_format", infer_source_format(source_path))
    schema = options.get("schema", cfg.get("schema"))
    if schema is not None:  # a pydantic model class, a JSON Schema dict, or a JSON file path
        schema_name: str | None = options.get("schema_name") or cfg.get("schema_name")
        data["schema_"], data["schema_name"] = structured.resolve_schema(schema, schema_name)
    if not entries:
        raise InputError("no model: give --model (repeatable) or [[models]] in batchops.toml")
    try:
        return JobSpec.model_validate(data)
    except Exception as exc:  # pydantic ValidationError → one line naming the field
        raise InputError(_one_line_validation(exc)) from None


def _one_line_validation(exc: Exception) -> str:
    from pydantic import ValidationError

    from batchops.config import describe_errors

    if isinstance(exc, ValidationError):  # "--batch-size must be ≥ 1", not pydantic's wording
        return describe_errors(exc, _option_name)
    return str(exc)


# JobSpec locations whose option name is not the field name.
_OPTION_OF = {
    "retry.initial_delay": "retry-delay",
    "retry.backoff": "retry-backoff",
    "retry.max_delay": "retry-max-delay",
    "retry.max_retries": "max-retries",
    "retry.retry_on": "retry-on",
    "source": "csv",
    "models": "model",
}


def _option_name(loc: tuple[Any, ...]) -> str:
    dotted = ".".join(str(x) for x in loc) or "option"
    name = _OPTION_OF.get(dotted) or _OPTION_OF.get(str(loc[0]) if loc else "") or dotted
    return "--" + name.replace("_", "-")
