"""OpenAI's batch object as JSON → `RemoteBatch` (shared by the SDK backend and the in-memory
backend, which serves the same JSON without HTTP)."""

from __future__ import annotations

from typing import Any

from batchops.backends.base import BatchProblem, RemoteBatch
from batchops.classify import classify_batch_error
from batchops.states import BatchState

_STATES = {s.value: s for s in BatchState}
_ENDED = ("completed_at", "failed_at", "expired_at", "cancelled_at")


def remote_batch(b: dict[str, Any]) -> RemoteBatch:
    rc = b.get("request_counts") or {}
    errors = (b.get("errors") or {}).get("data") or []
    ended = next((b[k] for k in _ENDED if b.get(k)), None)
    status = str(b.get("status") or "")
    return RemoteBatch(
        id=str(b["id"]),
        # Azure's older api-versions capitalise ("Validating").
        state=_STATES.get(status.lower(), BatchState.IN_PROGRESS),
        raw_status=status,
        total=rc.get("total"),
        completed=rc.get("completed"),
        failed=rc.get("failed"),
        created_at=_time(b.get("created_at")),
        expires_at=_time(b.get("expires_at")),
        ended_at=_time(ended),
        tag={str(k): str(v) for k, v in (b.get("metadata") or {}).items()},
        input_ref=b.get("input_file_id"),
        output_ref=b.get("output_file_id") or None,
        error_ref=b.get("error_file_id") or None,
        problems=[
            BatchProblem(
                e.get("code"), str(e.get("message") or ""), classify_batch_error(e.get("code"))
            )
            for e in errors
        ],
    )


def _time(v: Any) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool) and v:
        return float(v)
    return None  # missing, or an ISO string from an old Azure api-version (not needed here)
