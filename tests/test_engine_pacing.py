"""Token pacing of the batch loop: what a token_limit_exceeded refusal teaches."""

from __future__ import annotations

from batchops.engine import BatchEngine


def pacing_only() -> BatchEngine:
    """An engine with just the pacing state (learn_token_limit needs nothing else)."""
    eng = object.__new__(BatchEngine)
    eng.learned_limit, eng.refused_tokens = {}, {}
    return eng


def test_learned_limit_is_the_midpoint_of_accepted_and_refused() -> None:
    eng = pacing_only()
    # Three chunks (9,397 tokens) in flight were accepted; a fourth (3,124) was refused.
    eng.learn_token_limit("m", 9_397, 12_521)
    limit = eng.learned_limit["m"]
    assert limit == (9_397 + 12_521) // 2
    # Three chunks a little larger than the accepted three fit; four of the smallest never do.
    assert 3_124 + 3_188 + 3_126 <= limit < 4 * 3_102


def test_refusals_narrow_the_bounds_and_a_changed_limit_resets_them() -> None:
    eng = pacing_only()
    eng.learn_token_limit("m", 9_000, 13_000)
    eng.learn_token_limit("m", 9_000, 12_000)  # a tighter refusal lowers the upper bound
    assert (eng.refused_tokens["m"], eng.learned_limit["m"]) == (12_000, 10_500)
    eng.learn_token_limit("m", 9_000, 13_000)  # a looser one does not raise it
    assert eng.learned_limit["m"] == 10_500
    # More accepted than was refused before: the limit (or others' use of it) changed.
    eng.learn_token_limit("m", 12_500, 15_000)
    assert (eng.refused_tokens["m"], eng.learned_limit["m"]) == (15_000, 13_750)
    eng.learn_token_limit("other", 0, 5_000)  # refused with nothing else in flight
    assert eng.learned_limit["other"] == 2_500
    assert eng.learned_limit["m"] == 13_750  # per model
