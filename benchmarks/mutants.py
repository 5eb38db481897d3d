"""Mutation check: does the suite catch the one-line bugs that matter? (issue 22)

    python benchmarks/mutants.py                 # every mutant, its chosen tests
    python benchmarks/mutants.py --only 3,8      # some of them (numbers or names)
    python benchmarks/mutants.py --list          # the mutants, without running anything

Each mutant is applied on its own to a fresh temporary copy of the repository (the working tree
is never edited), and its chosen tests run against that copy (PYTHONPATH=copy, so the tests'
subprocesses import the mutated package too). A mutant counts as caught when at least
MIN_CATCHERS tests fail. The script exits 1 if any mutant is caught by fewer, and 2 when a
mutant's old text is not found exactly once in its file: the code moved, so the snippet must be
re-pointed (the mutant list below is data for exactly that).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_CATCHERS = 2
PER_TEST_TIMEOUT = 90  # a mutant that loops forever fails its test (a real one takes < 30 s)
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "logs", "_data", "*.egg-info"
)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in `file`
    new: str
    description: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root


G = "tests/test_guarantees.py::"
R = "tests/test_resilience.py::"

# ------------------------------------------------------------------------------ the mutants (DATA)
MUTANTS: list[Mutant] = [
    Mutant(
        "join-by-line-order",
        "batchops/store.py",
        '               WHERE row_id = ? AND status = \'queued\' AND chunk_id = ?""",',
        "               WHERE ? IS NOT NULL AND row_idx = (SELECT MIN(row_idx) FROM rows"
        ' WHERE status = \'queued\' AND chunk_id = ?)""",',
        "each answer goes to the chunk's next queued row (line order), not its custom_id",
        (
            R + "test_transient_failures_and_5xx_recover_without_double_execution",
            "tests/test_cli_run.py",
            "tests/test_engine.py::test_answers_joined_by_id_despite_shuffled_output",
            "tests/test_engine.py::test_every_row_answered_once",
        ),
    ),
    Mutant(
        "expired-not-requeued",
        "batchops/spec.py",
        '"format_error", "expired", "cancelled"',
        '"format_error", "cancelled"',
        "rows a batch left unexecuted at expiry fail instead of going back to pending",
        (
            G + "test_expired_batch_keeps_finished_rows_and_requeues_the_rest",
            G + "test_expired_batches_collected_by_watch_keep_and_requeue",
            R + "test_expired_batches_keep_their_finished_half",
        ),
    ),
    Mutant(
        "expired-treated-as-failed",
        "batchops/engine.py",
        "        if b.state == BatchState.FAILED:\n            self._collect_failed(chunk, b)",
        "        if b.state in (BatchState.FAILED, BatchState.EXPIRED):\n"
        "            self._collect_failed(chunk, b)",
        "an expired batch is handled as a failed one: its finished answers are thrown away",
        (
            G + "test_expired_batch_keeps_finished_rows_and_requeues_the_rest",
            G + "test_expired_batches_collected_by_watch_keep_and_requeue",
            R + "test_expired_batches_keep_their_finished_half",
        ),
    ),
    Mutant(
        "reconcile-without-lookup",
        "batchops/engine.py",
        "batch = backend.find_batch(self.submit_request(chunk), since)",
        "batch = None",
        "after a crash mid-create, never look the batch up: create it again",
        (
            G + "test_batch_created_but_answer_lost_reconciles_to_one_batch",
            R + "test_kill_9_at_random_moments_loses_nothing_and_sends_nothing_twice",
            "tests/test_engine.py::test_crash_at_each_step_then_resume_pays_once",
        ),
    ),
    Mutant(
        "no-batch-discount",
        "batchops/pricing.py",
        "prices = info.get_prices(when, _BATCH_CONTEXT if has_batch else None)",
        "prices = info.get_prices(when, None)",
        "the price library's batch prices are never looked up: batch = synchronous price",
        ("tests/test_cost.py", "tests/test_pricing.py"),
    ),
    Mutant(
        "batch-rows-at-sync-price",
        "batchops/engine.py",
        "price = pricing.price_for(chunk.model, batch=True, overrides=self.overrides())",
        "price = pricing.price_for(chunk.model, batch=False, overrides=self.overrides())",
        "rows answered by a batch are charged at synchronous prices",
        ("tests/test_cost.py", "tests/test_report.py"),
    ),
    Mutant(
        "cells-through-float",
        "batchops/render.py",
        'parts.append(pl.col(name).fill_null(""))',
        "parts.append(pl.col(name).cast(pl.Float64, strict=False).cast(pl.String)"
        '.fill_null(pl.col(name)).fill_null(""))',
        "numeric-looking cells are rendered through a float: 007 -> 7.0, 19.90 -> 19.9",
        (
            G + "test_numeric_looking_cells_are_sent_exactly_as_written",
            G + "test_dry_run_files_hold_the_cells_exactly_as_written",
            "tests/test_render.py",
            "tests/test_chunking.py",
        ),
    ),
    Mutant(
        "quota-retried-on-same-model",
        "batchops/classify.py",
        'if code == "insufficient_quota" or type_ == "insufficient_quota":\n        return "quota"',
        'if code == "insufficient_quota" or type_ == "insufficient_quota":\n'
        '        return "rate_limit"',
        "insufficient_quota is taken for a rate limit: waited on and retried on the same model",
        (
            "tests/test_classify.py",
            R + "test_first_model_out_of_quota_fails_over_to_second",
            R + "test_quota_running_out_mid_batch_requeues_on_next_model",
            G + "test_batch_quota_refusals_leave_attempts_at_zero",
        ),
    ),
    Mutant(
        "retry-budget-off-by-one",
        "batchops/policy.py",
        "if retryable and attempts <= max_retries else",
        "if retryable and attempts < max_retries else",
        "--max-retries N allows N executions instead of N + 1",
        (
            G + "test_max_retries_n_means_exactly_n_plus_1_executions",
            "tests/test_store.py",
            "tests/test_policy.py",
            R + "test_transient_failures_and_5xx_recover_without_double_execution",
        ),
    ),
    Mutant(
        "quota-refusals-spend-retries",
        "batchops/engine.py",
        "part.append((item, cost, counts_as_attempt(item.error_class)))",
        "part.append((item, cost, True))",
        "a batch line refused for quota counts as one of the row's retries",
        (
            G + "test_batch_quota_refusals_leave_attempts_at_zero",
            G + "test_batch_quota_refusals_fail_over_even_with_max_retries_0",
            R + "test_quota_running_out_mid_batch_requeues_on_next_model",
            "tests/test_engine.py::test_model_out_of_quota_mid_batch_fails_over",
            "tests/test_engine.py::test_quota_refusals_never_fail_rows_even_with_no_retries",
        ),
    ),
]


class SnippetMissing(Exception):
    """A mutant's old text is not in its file exactly once: re-point it."""


def apply(m: Mutant, root: Path) -> None:
    path = root / m.file
    text = path.read_text(encoding="utf-8")
    n = text.count(m.old)
    if n != 1:
        raise SnippetMissing(
            f"mutant {m.name!r}: old text found {n} times in {m.file} (must be exactly once):\n"
            f"    {m.old!r}"
        )
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")


def check_all_snippets() -> list[str]:
    """Every old text is found exactly once in the working tree (read only)."""
    problems = []
    for m in MUTANTS:
        text = (ROOT / m.file).read_text(encoding="utf-8")
        if (n := text.count(m.old)) != 1:
            problems.append(f"{m.name}: old text found {n} times in {m.file}: {m.old!r}")
    return problems


def failed_tests(junit: Path) -> tuple[list[str], int]:
    """(names of failed or erroring tests, number of tests run) from a junit XML report."""
    if not junit.exists():
        return [], 0
    failed, total = [], 0
    for case in ET.parse(junit).getroot().iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
    return failed, total


def run_mutant(m: Mutant, python: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
        apply(m, copy)
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--timeout={PER_TEST_TIMEOUT}",
            f"--junitxml={junit}",
            *m.tests,
        ]
        t = time.monotonic()
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
        took = time.monotonic() - t
        failed, total = failed_tests(junit)
        if total == 0:  # pytest could not even collect: show why, do not count it as caught
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return {"mutant": m, "failed": failed, "total": total, "seconds": took}


def pick(only: str | None) -> list[tuple[int, Mutant]]:
    numbered = list(enumerate(MUTANTS, 1))
    if not only:
        return numbered
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    return [(i, m) for i, m in numbered if str(i) in wanted or m.name in wanted]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutant numbers or names")
    ap.add_argument("--list", action="store_true", help="show the mutants and exit")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    args = ap.parse_args()
    problems = check_all_snippets()
    if problems:
        print("mutants.py: snippets to re-point (nothing was run):", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 2
    chosen = pick(args.only)
    if args.list:
        for i, m in chosen:
            print(f"{i:2d} {m.name:30s} {m.file}: {m.description}")
        return 0
    rows = []
    for i, m in chosen:
        print(f"[{i}/{len(MUTANTS)}] {m.name} ...", file=sys.stderr, flush=True)
        r = run_mutant(m, args.python)
        rows.append((i, r))
        print(
            f"    {len(r['failed'])}/{r['total']} tests failed in {r['seconds']:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    print(f"\n| # | mutant | tests failed / run | caught ≥ {MIN_CATCHERS} | failing tests |")
    print("|---|---|---|---|---|")
    weak = 0
    for i, r in rows:
        m, failed = r["mutant"], r["failed"]
        ok = len(failed) >= MIN_CATCHERS
        weak += not ok
        names = ", ".join(failed[:8]) + (f" (+{len(failed) - 8} more)" if len(failed) > 8 else "")
        print(
            f"| {i} | {m.name}: {m.description} | {len(failed)} / {r['total']} "
            f"| {'yes' if ok else 'NO'} | {names} |"
        )
    return 1 if weak else 0


if __name__ == "__main__":
    sys.exit(main())
