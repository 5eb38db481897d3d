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
