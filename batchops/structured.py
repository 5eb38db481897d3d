"""Structured outputs: the answer schema, its check on every outcome, and its merged columns.

* `resolve_schema` turns what the user gave (a pydantic model class, a JSON Schema dict, or the
  path of a JSON file) into (schema, name). Pydantic schemas are made *strict-ready* the way
  OpenAI's structured outputs need (every object closed, every property required — optional
  fields stay nullable); a schema the user wrote is sent as written and only checked.
* `check_spec` rejects, before anything is built, a schema that is not valid JSON Schema, whose
  root is not an object with properties (each property becomes a column), or that strict mode
  would refuse (so a whole batch of 400s is never paid for).
* `check_outcome(outcome, spec)` is called by both engines on every outcome: a successful answer
  that is not JSON, or violates the schema, becomes a retryable ``format_error`` with the reason
  ("answer violates the schema: 'price' is a required property"). Truncated / filtered answers
  are already ``format_error`` in results.py and pass through unchanged.
* `SchemaColumns` expands valid answers into one column per top-level property for merge.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from batchops.errors import InputError
from batchops.policy import row_retryable as is_retryable
from batchops.records import RowOutcome
from batchops.spec import JobSpec

__all__ = [
    "SchemaColumns",
    "check_outcome",
    "check_spec",
    "format_for",
    "resolve_schema",
]

_NAME_OK = re.compile(r"[^A-Za-z0-9_-]")
DEFAULT_NAME = "response"


# --------------------------------------------------------------------------- the schema


def resolve_schema(obj: Any, name: str | None = None) -> tuple[dict[str, Any], str]:
    """(JSON Schema, schema name) from a pydantic model class, a dict, or a JSON file path."""
    if isinstance(obj, type) and hasattr(obj, "model_json_schema"):
        schema = strict_ready(obj.model_json_schema())
        return schema, _clean_name(name or obj.__name__)
    if isinstance(obj, dict):
        return obj, _clean_name(name or str(obj.get("title") or DEFAULT_NAME))
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"--schema {path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--schema {path}: cannot read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"--schema {path}: not valid JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise InputError(f"--schema {path}: a JSON Schema is a JSON object")
        return schema, _clean_name(name or path.stem)
    raise InputError(
        f"schema: expected a pydantic model class, a JSON Schema dict or a file path, "
        f"got {type(obj).__name__}"
    )


def _clean_name(name: str) -> str:
    # The API accepts [A-Za-z0-9_-]{1,64} as the schema name.
    return (_NAME_OK.sub("_", name) or DEFAULT_NAME)[:64]


def strict_ready(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON Schema as strict structured outputs accept it: every object closed and
    every property required (an optional field stays nullable); `default: null` dropped."""

    def fix(node: Any) -> Any:
        if isinstance(node, list):
            return [fix(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: fix(v) for k, v in node.items() if not (k == "default" and v is None)}
        if out.get("type") == "object" or "properties" in out:
            out.setdefault("properties", {})
            out["required"] = list(out["properties"])
            out["additionalProperties"] = False
        # {"$ref": …, "description": …}: strict mode refuses siblings of $ref; keep the ref.
        if "$ref" in out and len(out) > 1:
            out = {"$ref": out["$ref"]}
        return out

    fixed: dict[str, Any] = fix(schema)
    return fixed


def check_spec(spec: JobSpec) -> None:
    """Raise InputError (one line, naming --schema) if the job's schema cannot be used."""
    schema = spec.schema_
    if schema is None:
        return
    if spec.endpoint == "/v1/embeddings":
        raise InputError("--schema has no meaning for /v1/embeddings")
    try:
        _validator(_key(schema))
    except Exception as exc:  # jsonschema.SchemaError: the schema itself is malformed
        raise InputError(f"--schema: not a valid JSON Schema ({_first_line(exc)})") from None
    root = _resolve(schema, schema)
    if root.get("type") != "object" or not isinstance(root.get("properties"), dict):
        raise InputError(
            "--schema: the root must be an object with properties (each becomes a column)"
        )
    if spec.schema_strict:
        problem = _strict_problem(schema)
        if problem:
            raise InputError(
                f"--schema: strict structured outputs refuse this schema: {problem}; "
                "fix the schema or pass --no-schema-strict"
            )
    for key in ("response_format",) if spec.endpoint == "/v1/chat/completions" else ("text",):
        if key in (spec.body_extra or {}):
            raise InputError(f"--body-extra sets {key!r}, which --schema sets")


def _strict_problem(schema: dict[str, Any]) -> str | None:
    """What OpenAI's strict mode would refuse: open objects, optional properties."""

    def walk(node: Any, where: str) -> str | None:
        if isinstance(node, list):
            for i, v in enumerate(node):
                if (p := walk(v, f"{where}[{i}]")) is not None:
                    return p
            return None
        if not isinstance(node, dict):
            return None
        if node.get("type") == "object" or "properties" in node:
            if node.get("additionalProperties") is not False:
                return f'{where} needs "additionalProperties": false'
            props = node.get("properties") or {}
            missing = [k for k in props if k not in (node.get("required") or [])]
            if missing:
                return f"{where}: every property must be required (not {missing[0]!r}; make it nullable instead)"
        for k, v in node.items():
            if k in ("enum", "const", "examples", "default"):
                continue
            if (p := walk(v, f"{where}.{k}")) is not None:
                return p
        return None

    return walk(schema, "$")


def format_for(spec: JobSpec) -> tuple[str, dict[str, Any]] | None:
    """(body key, value) that asks spec.endpoint for answers in spec's schema, or None."""
    if spec.schema_ is None:
        return None
    name = spec.schema_name or DEFAULT_NAME
    if spec.endpoint == "/v1/responses":
        return "text", {
            "format": {
                "type": "json_schema",
                "name": name,
                "schema": spec.schema_,
                "strict": spec.schema_strict,
            }
        }
    return "response_format", {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": spec.schema_, "strict": spec.schema_strict},
    }


# --------------------------------------------------------------------------- every outcome


def check_outcome(outcome: RowOutcome, spec: JobSpec) -> RowOutcome:
    """The outcome as the job sees it: with a schema, a successful answer must be JSON valid
    against it; otherwise it becomes a retryable format_error stating why (usage and model
    are kept: the answer was billed). Without a schema, or for failures, unchanged."""
    if spec.schema_ is None or not outcome.ok:
        return outcome
    try:
        value = orjson.loads(outcome.response or "")
    except orjson.JSONDecodeError as exc:
        return _invalid(outcome, "invalid_json", f"answer is not valid JSON ({exc})")
    error = _first_error(_validator(_key(spec.schema_)), value)
    if error is None:
        return outcome
    return _invalid(outcome, "schema_violation", f"answer violates the schema: {error}")


def _invalid(outcome: RowOutcome, code: str, message: str) -> RowOutcome:
    return replace(
        outcome,
        ok=False,
        error_code=code,
        error_message=message,
        error_class="format_error",
        retryable=is_retryable("format_error"),
    )


def _key(schema: dict[str, Any]) -> bytes:
    return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)


@functools.lru_cache(maxsize=16)
def _validator(key: bytes) -> Any:
    # Imported here: jsonschema is only needed by jobs with a schema (keeps imports light).
    import jsonschema

    schema = orjson.loads(key)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def _first_error(validator: Any, value: Any) -> str | None:
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
    text = _first_line(error.message)
    if len(text) > 300:
        text = text[:300] + "…"
    return f"{text} (at {where})" if where else text


def _first_line(exc: Any) -> str:
    return str(getattr(exc, "message", exc)).strip().splitlines()[0]


def _resolve(node: Any, root: dict[str, Any]) -> dict[str, Any]:
    """Follow a local $ref ("#/$defs/X") to the schema it names."""
    for _ in range(32):
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
            break
        ref = node["$ref"]
        target: Any = root
        for part in [p for p in ref.lstrip("#").split("/") if p]:
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {})
        node = target
    return node if isinstance(node, dict) else {}


# --------------------------------------------------------------------------- merged columns

# Column kinds: scalars become native columns; a list of one scalar kind a list column (in
# Parquet); anything else (objects, mixed lists, unions) stays JSON text.
_ARROW = {"string": pa.large_string(), "integer": pa.int64(), "number": pa.float64()}
_ARROW["boolean"] = pa.bool_()


@dataclass(frozen=True)
class SchemaField:
    name: str  # the property name in the answer
    column: str  # its column name in the merged output
    kind: str  # "string" | "integer" | "number" | "boolean" | "list:<scalar kind>" | "json"

    @property
    def arrow_type(self) -> pa.DataType:
        if self.kind.startswith("list:"):
            return pa.large_list(_ARROW[self.kind[5:]])
        return _ARROW.get(self.kind, pa.large_string())


class SchemaColumns:
    """The answer's top-level properties as merged-output columns.

    Column names: `prefix + property`; one a column already uses (source or merged columns)
    gets ``batchops_`` in front (``batchops_2_`` … if that is taken too), like merge's rule.
    """

    def __init__(self, schema: dict[str, Any], prefix: str, taken: Iterable[str]) -> None:
        root = _resolve(schema, schema)
        used = set(taken)
        self.fields: list[SchemaField] = []
        for prop, sub in (root.get("properties") or {}).items():
            column, k = prefix + prop, 1
            while column in used:
                column = f"batchops_{prefix}{prop}" if k == 1 else f"batchops_{k}_{prefix}{prop}"
                k += 1
            used.add(column)
            self.fields.append(SchemaField(prop, column, _kind(_resolve(sub, schema))))

    @property
    def columns(self) -> list[str]:
        return [f.column for f in self.fields]

    def values(self, responses: Sequence[str | None], ok: Sequence[bool]) -> dict[str, list[Any]]:
        """Per column, the Python value of each row (None where the row has no valid answer)."""
        out: dict[str, list[Any]] = {f.column: [] for f in self.fields}
        cols = [(f.name, out[f.column]) for f in self.fields]
        for text, good in zip(responses, ok, strict=True):
            obj: Any = None
            if good and text:
                try:
                    obj = orjson.loads(text)
                except orjson.JSONDecodeError:
                    obj = None
            if not isinstance(obj, dict):
                obj = {}
            for name, dest in cols:
                dest.append(obj.get(name))
        return out

    def csv_text(self, column: str, values: list[Any]) -> list[str | None]:
        """Text cells: strings as they are, numbers/booleans as JSON writes them, nested
        values as compact JSON; None (no answer, or null) as an empty cell."""
        return [_text(v) for v in values]

    def arrow(self, column: str, values: list[Any]) -> pa.Array:
        """A typed Arrow column; anything that does not fit the declared kind → JSON text."""
        f = next(f for f in self.fields if f.column == column)
        if f.kind == "json":
            return pa.array([None if v is None else _json(v) for v in values], pa.large_string())
        coerce = _coerce_list if f.kind.startswith("list:") else _coerce_scalar
        base = f.kind[5:] if f.kind.startswith("list:") else f.kind
        fixed = [coerce(v, base) for v in values]
        return pa.array(fixed, f.arrow_type)


def _kind(node: dict[str, Any]) -> str:
    t = _scalar_type(node)
    if t in _ARROW:
        return t
    if t == "array":
        items = node.get("items")
        item = _scalar_type(items) if isinstance(items, dict) else None
        if item in _ARROW:
            return f"list:{item}"
    return "json"


def _scalar_type(node: dict[str, Any]) -> str | None:
    """The one JSON type a (sub)schema allows, null aside; None if several or unknown."""
    t = node.get("type")
    types: list[str] = []
    if isinstance(t, str):
        types = [t]
    elif isinstance(t, list):
        types = [x for x in t if isinstance(x, str)]
    elif isinstance(node.get("anyOf"), list):  # pydantic's Optional[X]: anyOf [X, null]
        for branch in node["anyOf"]:
            if isinstance(branch, dict) and isinstance(branch.get("type"), str):
                types.append(branch["type"])
            else:
                return None
    elif "enum" in node and all(isinstance(v, str) or v is None for v in node["enum"]):
        types = ["string"]
    non_null = {x for x in types if x != "null"}
    return non_null.pop() if len(non_null) == 1 else None


def _coerce_scalar(v: Any, kind: str) -> Any:
    # jsonschema accepts 3.0 as an integer and 3 as a number; Arrow wants one Python type.
    if v is None:
        return None
    if kind == "integer" and isinstance(v, float) and v.is_integer():
        return int(v)
    if kind == "number" and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if kind == "string" and not isinstance(v, str):
        return _json(v)
    ok = {
        "integer": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, float),
        "boolean": isinstance(v, bool),
        "string": True,
    }[kind]
    return v if ok else None  # validated answers never get here; unvalidated ones lose the cell


def _coerce_list(v: Any, kind: str) -> Any:
    if not isinstance(v, list):
        return None
    return [_coerce_scalar(x, kind) for x in v]


def _json(v: Any) -> str:
    try:
        return orjson.dumps(v).decode()
    except TypeError:
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return _json(v)  # true/false, 7, 1.5, [..], {..}
