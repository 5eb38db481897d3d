"""Cost and token estimates: of the chunks still to send (batch) or of the rows (online)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchops import chunking, pricing, source
from batchops.errors import InputError
from batchops.rundir import RunDir
from batchops.summaries import Estimate

if TYPE_CHECKING:  # openai and pandas take ~1 s to import; a dry run needs neither
    pass


def estimate(run: RunDir) -> Estimate:
    """The estimate of every chunk not yet collected (printed before the first upload)."""
    per_row = run.spec.max_tokens or pricing.DEFAULT_COMPLETION_ESTIMATE
    chunks = run.store.chunks("built", "uploading", "uploaded", "submitting", "submitted")
    return estimate_of(
        None,
        [(c.est_tokens, c.n_rows, c.est_cost) for c in chunks],
        per_row,
        run.spec.max_tokens,
        [c.model for c in chunks],
    )


def unpriced_attempts(run: RunDir) -> int:
    return run.store.unpriced_count()


def online_estimate(run: RunDir, src: source.Source, *, every_row: bool = False) -> Estimate:
    """What the rows without an answer (`every_row`: all of the run's rows) should cost through
    synchronous calls: their requests are built (in a scratch folder, no files kept) and
    estimated like batch chunks."""
    spec = run.spec
    model = spec.models[0].name
    per_row = spec.max_tokens or pricing.DEFAULT_COMPLETION_ESTIMATE
    overrides = pricing.overrides_from_spec(spec)
    pending = None if every_row else run.store.pending_row_idxs()
    rows: list[tuple[int, int, float | None]] = []
    if pending is None or pending:
        with tempfile.TemporaryDirectory(dir=run.path, prefix="estimate-") as tmp:
            for c in chunking.build_chunks(
                src,
                spec.model_copy(update={"batch_size": 50_000}),
                model=model,
                out_dir=Path(tmp),
                first_chunk_no=1,
                only_rows=pending,
                estimate_tokens=pricing.estimate_text_tokens_fast,
                fsync=False,
                custom_ids=False,  # only counted
            ):
                n = len(c.row_idxs)
                if n:
                    cost = pricing.estimate_cost(
                        model, c.est_prompt_tokens, per_row * n, batch=False, overrides=overrides
                    )
                    rows.append((c.est_prompt_tokens, n, cost))
    est = estimate_of(model, rows, per_row, spec.max_tokens)
    est.prices = "synchronous"
    return est


def estimate_of(
    model_by: str | None,
    chunks: list[tuple[int, int, float | None]],
    per_row: int,
    max_tokens: int | None,
    models: list[str] | None = None,
) -> Estimate:
    """An Estimate from (prompt tokens, rows, cost) per chunk; `models` names each chunk's model."""
    assumption = (
        f"--max-tokens {max_tokens} per row (an upper bound)"
        if max_tokens
        else f"{pricing.DEFAULT_COMPLETION_ESTIMATE} completion tokens per row (no --max-tokens given)"
    )
    by_model: dict[str, dict[str, Any]] = {}
    for i, (tokens, n, c) in enumerate(chunks):
        name = models[i] if models else (model_by or "?")
        m = by_model.setdefault(
            name,
            {"chunks": 0, "rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0},
        )
        m["chunks"] += 1
        m["rows"] += n
        m["prompt_tokens"] += tokens
        m["completion_tokens"] += per_row * n
        m["cost_usd"] = None if c is None or m["cost_usd"] is None else m["cost_usd"] + c
    costs = [m["cost_usd"] for m in by_model.values()]
    return Estimate(
        len(chunks),
        sum(n for _, n, _ in chunks),
        sum(t for t, _, _ in chunks),
        per_row * sum(n for _, n, _ in chunks),
        None if any(c is None for c in costs) else sum(costs),
        assumption,
        by_model,
    )


def online_estimate_or_none(run: RunDir) -> float | None:
    """The synchronous-price estimate of every row of an online run (the figure `run` printed
    before its first request); None when the source is no longer readable."""
    try:
        src = source.open_source(run.spec)
    except (InputError, OSError):
        return None
    return online_estimate(run, src, every_row=True).cost_usd
