"""The collection hot path (issue 18): the fast chat-line parser gives exactly the general
path's outcome, a slice recorded out of row order (and again) applies once, and `spent()`
stays the full sum while it sums only new attempts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchops import results
from batchops.results import _fast_chat, parse_line
from batchops.store import Store
from tests.test_store import built, frame, ok, submitted

BODY: dict[str, Any] = {
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi", "refusal": None},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 1},
    },
}


def _variants() -> list[dict[str, Any]]:
    """Chat lines around the fast path's edges: each must give the general path's outcome."""
    out = []
    for change in (
        {},
        {"finish_reason": "length"},
        {"finish_reason": "content_filter"},
        {"finish_reason": None},
        {"message": {"content": "", "refusal": None}},
        {"message": {"content": None, "refusal": "no"}},
        {"message": {"content": "x", "refusal": ""}},
        {"message": {"content": [{"type": "text", "text": "a"}]}},
        {"message": {"content": None, "tool_calls": [{"id": "c"}]}},
    ):
        body = json.loads(json.dumps(BODY))
        body["choices"][0].update(change)
        out.append(body)
    for usage in (None, {"prompt_tokens": True, "completion_tokens": 2.0}, {"x": 1}, []):
        body = json.loads(json.dumps(BODY))
        body["usage"] = usage
        out.append(body)
    for model in (None, 5):
        body = json.loads(json.dumps(BODY))
        body["model"] = model
        out.append(body)
    return out


@pytest.mark.parametrize("status", [200, 200.0, True, 400])
@pytest.mark.parametrize("body", _variants())
def test_fast_chat_line_equals_general_path(body: dict[str, Any], status: Any) -> None:
    obj = {"custom_id": "r1", "response": {"status_code": status, "request_id": "q", "body": body}}
    general: Any
    try:
        general = parse_line(orjson.dumps(obj))
    except results.ResultFormatError as exc:
        general = exc.reason
    fast = _fast_chat(obj)  # None: the general path decides
    if fast is not None:
        assert fast == general
    if status == 200 and body is BODY:
        assert fast is not None  # the common line does take the fast path


def test_shuffled_slice_is_recorded_once_and_spent_is_the_full_sum(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.add_rows([frame(200)])
    submitted(store, built(1, list(range(200))), "m", None)
    items = [(ok(i), 0.01 * (i % 7), True) for i in range(200)]
    random.Random(1).shuffle(items)
    order = store.queued_order(1)
    assert sorted(order.values()) == list(range(200))
    first = store.record_outcomes(1, "b", items[:120], max_retries=3, close_chunk=False)
    spent_half = store.spent()
    again = store.record_outcomes(1, "b", items, max_retries=3, close_chunk=False)
    assert (first.succeeded, again.succeeded, again.ignored) == (120, 80, 120)
    full = store.conn.execute("SELECT SUM(cost_usd), COUNT(*) FROM attempts").fetchone()
    assert full[1] == 200  # one attempt per row, none for the repeated lines
    assert spent_half < store.spent() == pytest.approx(full[0])
    assert store.counts()["succeeded"] == 200 and store.queued_order(1) == {}
