"""What a run and its estimate come to: the values commands return and print."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchops import validate
from batchops.states import StopReason

if TYPE_CHECKING:  # openai and pandas take ~1 s to import; a dry run needs neither
    pass


@dataclass
class Estimate:
    """Before the first upload: what the queued chunks should cost."""

    chunks: int
    rows: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None when a model has no known price
    completion_assumption: str
    by_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: str = "batch"  # "batch" or "synchronous" (online mode)


@dataclass
class RunReport:
    run_dir: Path
    counts: dict[str, int]
    spent: float
    stopped_because: StopReason | None
    final_output: Path | None
    estimate: Estimate | None = None
    resumed: bool = False
    max_cost: float | None = None
    checks: list[validate.FileCheck] | None = None  # dry run: the chunk files' validation
    unpriced: int = 0  # requests answered by a model without a known price: spend not known
    completion_threshold: float = 1.0  # exit 0 once at least this share of rows succeeded
    skipped_reasons: list[str] = field(default_factory=list)  # dry run: the first few skips
    # Identical requests sent once (Store.dedup_savings): rows that shared one, requests and
    # dollars saved. A dry run: the rows left out of the files.
    dedup: dict[str, Any] | None = None
    # The error class of the last exhaustion when the pool ran out (quota, auth, api_error …).
    exhausted_by: str | None = None

    @property
    def complete(self) -> bool:
        return all(v == 0 for k, v in self.counts.items() if k != "succeeded")

    @property
    def completion(self) -> float:
        total = sum(self.counts.values())
        return self.counts.get("succeeded", 0) / total if total else 1.0

    @property
    def threshold_met(self) -> bool:
        """Not every row succeeded, but at least --completion-threshold of them did."""
        return not self.complete and self.completion >= self.completion_threshold

    @property
    def exit_code(self) -> int:
        return 0 if self.complete or self.threshold_met else 3

    def summary(self) -> str:
        from batchops.progress import fmt_usd

        c = self.counts
        text = (
            f"{c.get('succeeded', 0)} succeeded, {c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped, "
            f"{c.get('pending', 0) + c.get('queued', 0)} missing; spent {self.spent_text()}"
        )
        if self.dedup and self.dedup["rows"] and self.stopped_because != StopReason.DRY_RUN:
            text += "; " + dedup_text(self.dedup)
        if self.stopped_because:
            text += f"; stopped: {self.stopped_because}"
        if self.max_cost is not None:
            left = max(0.0, self.max_cost - self.spent)
            text += f"; budget {fmt_usd(self.max_cost)}: {fmt_usd(left)} left"
        if self.threshold_met:
            text += (
                f"; completion {self.completion:.1%} meets the threshold "
                f"{self.completion_threshold:.1%} (missing rows: `batchops missing` lists them)"
            )
        return text

    def spent_text(self) -> str:
        """The spend, or 'unknown' for the part answered by a model without a price (not $0)."""
        from batchops.progress import fmt_usd

        if not self.unpriced:
            return fmt_usd(self.spent)
        unknown = f"unknown ({self.unpriced} request(s) by a model without a known price)"
        return unknown if not self.spent else f"{fmt_usd(self.spent)} + {unknown}"


def dedup_text(saved: dict[str, Any]) -> str:
    """'dedup: 30 row(s) shared an identical row's request: 30 request(s), $0.0012 saved'."""
    from batchops.progress import fmt_usd

    return (
        f"dedup: {saved['rows']:,} row(s) shared an identical row's request: "
        f"{saved['requests']:,} request(s), {fmt_usd(saved['cost_usd'])} saved"
    )
