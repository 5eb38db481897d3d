"""`benchmarks/run_all.py` rewrites docs/benchmarks.md: hand-written sections must survive."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run_all  # noqa: E402


def test_a_full_run_keeps_the_hand_written_sections_of_the_doc():
    old = run_all.report([], {"online": "old output"}, 1.0, True, ["machine"], 3)
    old += "\n## Where a request's time goes (measured by hand)\n\nA table.\n"
    new = run_all.report([], {"online": "new output"}, 2.0, True, ["machine"], 3)
    out = run_all.keep_hand_written(new, old)
    headings = [h for h, _ in run_all._sections(out)]
    assert "Where a request's time goes (measured by hand)" in headings
    assert headings.index("Figures") < headings.index(
        "Where a request's time goes (measured by hand)"
    )
    assert "new output" in out and "old output" not in out  # generated parts are replaced
    assert run_all.keep_hand_written(new, out) == out  # a second run changes nothing more


def test_a_baseline_is_combined_on_its_figures_not_on_the_digits_of_its_git_ref():
    texts = [f"main@09df25e {v} µs ({v} s)" for v in ("27.0", "26.1", "28.4")]
    assert run_all.first_number(texts[0]) == (27.0, "27.0")
    assert run_all._median_text(texts) == texts[0] + " · median of 3, min–max 26.1–28.4"
    assert run_all.first_number("468,920 rows/s (2.13 s)") == (468920.0, "468,920")
    assert run_all.first_number("1.60× (318.1 vs 199.2)") == (1.6, "1.60")
