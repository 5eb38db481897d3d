"""The life cycles of rows, chunks and remote batches: states as enums, transitions as tables.

The store changes a state only through a guarded transition (`UPDATE … WHERE state = ?`) checked
against these tables, so an illegal move raises instead of silently corrupting a run.
docs/architecture.md shows the same tables (a test keeps it in sync).
"""

from __future__ import annotations

from enum import StrEnum

from batchops.errors import StateError


class RowState(StrEnum):
    PENDING = "pending"  # waiting to be packed (or re-sent)
    QUEUED = "queued"  # in a chunk (a batch file, or an online group) and maybe sent
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # with a reason; a retryable failure goes back to pending instead
    SKIPPED = "skipped"  # an input problem (e.g. a missing image): never sent


class ChunkState(StrEnum):
    BUILT = "built"  # the JSONL file exists locally
    UPLOADING = "uploading"  # intent: an upload may be under way (reconcile looks it up)
    UPLOADED = "uploaded"  # the remote file exists (file-based backends)
    SUBMITTING = "submitting"  # intent: a batch may be being created (reconcile looks it up)
    SUBMITTED = "submitted"  # a remote batch runs it
    COLLECTED = "collected"  # its outcomes are recorded; rows settled or re-queued
    ABANDONED = "abandoned"  # never submitted (model exhausted, re-packed): rows back to pending
    ONLINE = "online"  # an online group whose rows are being sent synchronously


class BatchState(StrEnum):
    """A remote batch's state, whatever the provider calls it (backends map theirs onto these)."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"  # the whole batch was refused (validation, token limit ...)
    EXPIRED = "expired"  # partial: finished rows are kept
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"  # partial: finished rows are kept


class StopReason(StrEnum):
    """Why a run stopped before every row was settled (None when nothing is left)."""

    NO_WAIT = "no-wait"
    POOL_EXHAUSTED = "every model and key in the pool is exhausted"
    BUDGET = "budget reached"
    INTERRUPTED = "interrupted"
    BATCHES_IN_FLIGHT = (
        "batches of an earlier batch run are still in flight: `batchops watch` collects them"
    )
    ERROR = "error"
    DRY_RUN = "dry run"
    ROWS_LEFT = "rows left to send: `batchops watch --retry` sends them"


ROW_TRANSITIONS: dict[RowState, frozenset[RowState]] = {
    RowState.PENDING: frozenset({RowState.QUEUED, RowState.SKIPPED}),
    RowState.QUEUED: frozenset(
        {RowState.SUCCEEDED, RowState.FAILED, RowState.PENDING, RowState.SKIPPED}
    ),
    # retry-missing puts failed/skipped rows back; a success is final.
    RowState.FAILED: frozenset({RowState.PENDING}),
    RowState.SKIPPED: frozenset({RowState.PENDING}),
    RowState.SUCCEEDED: frozenset(),
}

CHUNK_TRANSITIONS: dict[ChunkState, frozenset[ChunkState]] = {
    ChunkState.BUILT: frozenset(
        {ChunkState.UPLOADING, ChunkState.SUBMITTING, ChunkState.ABANDONED}
    ),
    ChunkState.UPLOADING: frozenset({ChunkState.UPLOADED, ChunkState.BUILT}),
    ChunkState.UPLOADED: frozenset({ChunkState.SUBMITTING, ChunkState.BUILT, ChunkState.ABANDONED}),
    ChunkState.SUBMITTING: frozenset({ChunkState.SUBMITTED, ChunkState.UPLOADED, ChunkState.BUILT}),
    # A token-limit refusal sends the same file again (uploaded / built for inline backends).
    ChunkState.SUBMITTED: frozenset(
        {ChunkState.COLLECTED, ChunkState.UPLOADED, ChunkState.BUILT, ChunkState.ABANDONED}
    ),
    ChunkState.ONLINE: frozenset({ChunkState.COLLECTED}),
    ChunkState.COLLECTED: frozenset(),
    ChunkState.ABANDONED: frozenset(),
}

BATCH_TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    BatchState.VALIDATING: frozenset(
        {BatchState.IN_PROGRESS, BatchState.FAILED, BatchState.CANCELLING, BatchState.EXPIRED}
    ),
    BatchState.IN_PROGRESS: frozenset(
        {
            BatchState.FINALIZING,
            BatchState.COMPLETED,
            BatchState.EXPIRED,
            BatchState.CANCELLING,
            BatchState.FAILED,
        }
    ),
    BatchState.FINALIZING: frozenset(
        {BatchState.COMPLETED, BatchState.EXPIRED, BatchState.CANCELLING, BatchState.FAILED}
    ),
    BatchState.CANCELLING: frozenset({BatchState.CANCELLED, BatchState.EXPIRED}),
    BatchState.COMPLETED: frozenset(),
    BatchState.FAILED: frozenset(),
    BatchState.EXPIRED: frozenset(),
    BatchState.CANCELLED: frozenset(),
}

# Rows and chunks that are still moving; everything else is settled.
ACTIVE_ROWS = frozenset({RowState.PENDING, RowState.QUEUED})
TERMINAL_ROWS = frozenset(ROW_TRANSITIONS) - ACTIVE_ROWS
UNSENT_CHUNKS = frozenset({ChunkState.BUILT, ChunkState.UPLOADED})
INTENT_CHUNKS = frozenset({ChunkState.UPLOADING, ChunkState.SUBMITTING})
IN_FLIGHT_CHUNKS = frozenset({ChunkState.SUBMITTING, ChunkState.SUBMITTED})
TERMINAL_CHUNKS = frozenset({ChunkState.COLLECTED, ChunkState.ABANDONED})
TERMINAL_BATCHES = frozenset(
    {BatchState.COMPLETED, BatchState.FAILED, BatchState.EXPIRED, BatchState.CANCELLED}
)


def check_chunk(old: ChunkState | str, new: ChunkState | str) -> None:
    """Raise StateError unless a chunk may move from `old` to `new` (staying put is allowed)."""
    _check("chunk", CHUNK_TRANSITIONS, ChunkState(old), ChunkState(new))


def check_row(old: RowState | str, new: RowState | str) -> None:
    _check("row", ROW_TRANSITIONS, RowState(old), RowState(new))


def _check(what: str, table: dict, old: StrEnum, new: StrEnum) -> None:  # type: ignore[type-arg]
    if old != new and new not in table[old]:
        raise StateError(f"illegal {what} transition {old} → {new}")


def transition_table_markdown() -> str:
    """The transition tables as Markdown (docs/architecture.md embeds this text)."""
    out: list[str] = []
    for title, table in (
        ("Row", ROW_TRANSITIONS),
        ("Chunk", CHUNK_TRANSITIONS),
        ("Remote batch", BATCH_TRANSITIONS),
    ):
        out += [f"| {title} state | may move to |", "|---|---|"]
        for state, targets in table.items():
            order = list(table)
            moves = ", ".join(f"`{t}`" for t in sorted(targets, key=order.index)) or "— (final)"
            out.append(f"| `{state}` | {moves} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
