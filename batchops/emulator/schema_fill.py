"""Deterministic JSON values that satisfy a (structured-outputs style) JSON Schema.

Covers what OpenAI's structured outputs accept: object/array/string/number/integer/boolean/null,
enum/const, anyOf/oneOf/allOf (first branch / merged), $ref into $defs/definitions, string
length, numeric bounds, array length. `pattern` and `format` are not honoured beyond a few
common formats. Values are derived from a seed text (the request), so the same request always
gets the same JSON.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

_FORMATS = {
    "date": "2024-01-01",
    "date-time": "2024-01-01T00:00:00Z",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _h(seed: str, path: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{path}".encode(), digest_size=8).digest())


def _resolve(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """Follow local $refs ("#/$defs/X", "#/definitions/X", "#")."""
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 32:
        ref = schema["$ref"]
        node: Any = root
        if isinstance(ref, str) and ref.startswith("#"):
            for part in [p for p in ref[1:].split("/") if p]:
                node = node.get(part.replace("~1", "/").replace("~0", "~"), {})
        else:
            node = {}
        schema = node
        seen += 1
    return schema if isinstance(schema, dict) else {}


def _type_of(schema: dict[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        return non_null[0] if non_null else "null"
    if isinstance(t, str):
        return t
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return None


MAX_DEPTH = 12  # recursive schemas ($ref to an ancestor) stop here
# Absurd minItems/minLength are not honoured beyond these (the answer must stay small).
MAX_ITEMS = 100
MAX_STRING = 10_000


def fill(schema: Any, seed: str, snippet: str = "", *, root: Any = None, path: str = "$") -> Any:
    """A value valid against `schema`, derived from `seed` (and readable via `snippet`)."""
    root = schema if root is None else root
    s = _resolve(schema, root)
    if path.count(".") + path.count("[") > MAX_DEPTH:
        return None
    if "const" in s:
        return s["const"]
    if isinstance(s.get("enum"), list) and s["enum"]:
        return s["enum"][_h(seed, path) % len(s["enum"])]
    for key in ("anyOf", "oneOf"):
        if isinstance(s.get(key), list) and s[key]:
            options = [o for o in s[key] if _type_of(_resolve(o, root)) != "null"] or s[key]
            return fill(options[0], seed, snippet, root=root, path=path)
    if isinstance(s.get("allOf"), list) and s["allOf"]:
        merged: dict[str, Any] = {k: v for k, v in s.items() if k != "allOf"}
        props: dict[str, Any] = dict(_dict(merged.get("properties")))
        for part in s["allOf"]:
            part = _resolve(part, root)
            props.update(_dict(part.get("properties")))
            for k, v in part.items():
                merged.setdefault(k, v)
        merged["properties"] = props
        return fill(merged, seed, snippet, root=root, path=path)

    t = _type_of(s)
    if t == "object":
        props = _dict(s.get("properties"))
        return {k: fill(v, seed, snippet, root=root, path=f"{path}.{k}") for k, v in props.items()}
    if t == "array":
        lo = _int(s.get("minItems"), 0)
        hi = _int(s.get("maxItems"), max(lo, 2))
        n = min(max(lo, min(hi, 2)), MAX_ITEMS)
        items = s.get("items", {})
        return [fill(items, seed, snippet, root=root, path=f"{path}[{i}]") for i in range(n)]
    if t == "string":
        return _string(s, seed, snippet, path)
    if t == "integer":
        ilo, ihi = _bounds(s, integer=True)
        return int(ilo + _h(seed, path) % (int(ihi) - int(ilo) + 1))
    if t == "number":
        flo, fhi = _bounds(s, integer=False)
        value = round(flo + (_h(seed, path) % 10_001) / 10_000 * (fhi - flo), 2)
        return min(max(value, flo), fhi)
    if t == "boolean":
        return bool(_h(seed, path) & 1)
    if t == "null":
        return None
    return _string(s, seed, snippet, path)  # no type: anything goes, a string is readable


def _string(s: dict[str, Any], seed: str, snippet: str, path: str) -> str:
    fmt = s.get("format")
    if isinstance(fmt, str) and fmt in _FORMATS:
        return _FORMATS[fmt]
    name = path.rsplit(".", 1)[-1].strip("$[]0123456789") or "value"
    text = f"{name}: {snippet[:40]}".rstrip() if snippet else f"{name} {_h(seed, path) % 1000}"
    lo = min(_int(s.get("minLength"), 0), MAX_STRING)
    hi = s.get("maxLength")
    if hi is not None:
        text = text[: max(0, _int(hi, len(text)))]
    if len(text) < lo:
        text = text + "x" * (lo - len(text))
    return text


def _num(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _bounds(s: dict[str, Any], *, integer: bool) -> tuple[float, float]:
    """[lo, hi] from minimum/maximum/exclusive*; open sides span 100 from the other one."""
    step = 1 if integer else 0.01
    lo, hi = _num(s.get("minimum")), _num(s.get("maximum"))
    ex_lo, ex_hi = _num(s.get("exclusiveMinimum")), _num(s.get("exclusiveMaximum"))
    if ex_lo is not None:
        lo = ex_lo + step if lo is None else max(lo, ex_lo + step)
    if ex_hi is not None:
        hi = ex_hi - step if hi is None else min(hi, ex_hi - step)
    if lo is None and hi is None:
        lo, hi = 0, 100
    elif lo is None and hi is not None:
        lo = min(0, hi - 100)
    elif hi is None and lo is not None:
        hi = lo + 100
    assert lo is not None and hi is not None
    if integer:
        lo, hi = math.ceil(lo), math.floor(hi)
    return lo, max(lo, hi)


def violating(schema: Any) -> Any:
    """A JSON value that does not satisfy `schema` (wrong root type), for fault injection."""
    s = _resolve(schema, schema) if isinstance(schema, dict) else {}
    return {"unexpected": True} if _type_of(s) == "array" else ["unexpected"]
