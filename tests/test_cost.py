"""Cost: every row priced from its own usage at batch prices, counted once, estimated up front."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cli_helpers import awkward_table, invoke, read_csv, run_args

from batchops.pricing import price_for


def row_usage(run_dir: Path) -> dict[str, sqlite3.Row]:
    with sqlite3.connect(run_dir / "state.db") as db:
        db.row_factory = sqlite3.Row
        return {r["row_id"]: r for r in db.execute("SELECT * FROM rows")}


def expected_cost(price, prompt: int, cached: int, completion: int) -> float:
    return (
        (prompt - cached) * price.input_per_mtok
        + cached * price.cached_input_per_mtok
        + completion * price.output_per_mtok
    ) / 1e6


def test_cost_per_row_is_tokens_times_batch_price(emulator_factory, tmp_path: Path):
    emu = emulator_factory(cached_tokens_fraction=0.5)
    src = awkward_table(tmp_path, n_plain=30, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emu, src, run_dir, "--batch-size", "10")).exit_code == 0
    price = price_for("gpt-4o-mini", batch=True)
    sync = price_for("gpt-4o-mini", batch=False)
    assert price.input_per_mtok == pytest.approx(sync.input_per_mtok / 2)
    rows = row_usage(run_dir)
    out = read_csv(run_dir / "final_output.csv")
    assert any(r["cached_tokens"] for r in rows.values())
    for o in out:
        r = rows[o["sku"]]
        want = expected_cost(price, r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"])
        assert abs(float(o["cost_usd"]) - want) < 1e-9
        assert int(o["prompt_tokens"]) == r["prompt_tokens"]
    total = sum(float(o["cost_usd"]) for o in out)
    cost = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)
    assert cost["total_usd"] == pytest.approx(total, abs=1e-12)
    assert sum(m["cost_usd"] for m in cost["by_model"]) == pytest.approx(total, abs=1e-12)
    assert sum(b["cost_usd"] for b in cost["by_batch"]) == pytest.approx(total, abs=1e-12)
    (m,) = cost["by_model"]
    assert m["calls"] == len(out) and m["mode"] == "batch"
    assert m["cached_tokens"] == sum(r["cached_tokens"] for r in rows.values())
    # Checking status and merging again and again changes nothing.
    for _ in range(3):
        assert invoke("status", "--run-dir", run_dir).exit_code == 0
        assert invoke("merge", "--run-dir", run_dir).exit_code == 0
    again = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)
    assert again["total_usd"] == cost["total_usd"]
    assert sum(
        float(o["cost_usd"]) for o in read_csv(run_dir / "final_output.csv")
    ) == pytest.approx(total)


def test_override_table_prices_a_model_the_library_lacks(emulator, tmp_path: Path):
    (tmp_path / "batchops.toml").write_text(
        '[prices."qwen-plus"]\ninput = 0.4\noutput = 1.2\nbatch_discount = 0.5\n', encoding="utf-8"
    )
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(emulator, src, run_dir, "--config", tmp_path / "batchops.toml", model="qwen-plus")
    )
    assert res.exit_code == 0, res.output
    rows = row_usage(run_dir)
    for o in read_csv(run_dir / "final_output.csv"):
        r = rows[o["sku"]]
        want = (r["prompt_tokens"] * 0.2 + r["completion_tokens"] * 0.6) / 1e6
        assert abs(float(o["cost_usd"]) - want) < 1e-9


def test_unknown_model_cost_is_unknown_not_zero(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=2, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emulator, src, run_dir, model="no-such-model"))
    assert res.exit_code == 0, res.output
    # The CLI says it once, as a log line (no raw Python warning: issue 15, item 9).
    assert res.stderr.count("No price known for model 'no-such-model'") <= 1
    # the estimate says so before the first upload
    est = next(ln for ln in res.output.splitlines() if ln.startswith("estimate: "))
    assert est.startswith("estimate: 9 rows in 1 chunk(s), ")
    assert est.endswith("; cost ≈ unknown (no price for a model) at batch prices")
    assert {o["cost_usd"] for o in read_csv(run_dir / "final_output.csv")} == {""}
    cost = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)
    (m,) = cost["by_model"]
    assert (m["model"], m["calls"], m["ok"], m["cost_usd"]) == ("no-such-model", 9, 9, None)
    rows = row_usage(run_dir)
    prompt = sum(r["prompt_tokens"] for r in rows.values())
    completion = sum(r["completion_tokens"] for r in rows.values())
    assert (m["prompt_tokens"], m["completion_tokens"]) == (prompt, completion)
    assert invoke("cost", "--run-dir", run_dir).output.splitlines()[0] == (
        f"no-such-model (batch): 9 calls, {prompt} prompt, 0 cached, {completion} completion "
        "tokens: unknown"
    )


def test_unknown_model_total_is_unknown_not_zero(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=2, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emulator, src, run_dir, model="no-such-model"))
    assert res.exit_code == 0, res.output
    assert json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)["total_usd"] is None


def test_budget_summary_says_spent_and_left(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=40, images=False)
    run_dir = tmp_path / "run"
    res = invoke(
        *run_args(
            emulator,
            src,
            run_dir,
            "--batch-size",
            "10",
            "--max-tokens",
            "50",
            "--max-cost",
            "0.0002",
        )
    )
    assert res.exit_code == 3
    assert (
        "budget reached" in res.output and "budget $0.000200" in res.output and "left" in res.output
    )
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert st["spent_usd"] <= 0.0002
    assert 0 < st["rows"]["succeeded"] < 47  # some chunks ran, then submitting stopped


def test_online_mode_is_priced_at_synchronous_prices(emulator, tmp_path: Path):
    src = awkward_table(tmp_path, n_plain=10, images=False)
    run_dir = tmp_path / "run"
    res = invoke(*run_args(emulator, src, run_dir, "--mode", "online"))
    assert res.exit_code == 0, res.output
    assert "estimate: 17 rows" in res.output and "at synchronous prices" in res.output
    sync = price_for("gpt-4o-mini", batch=False)
    rows = row_usage(run_dir)
    for o in read_csv(run_dir / "final_output.csv"):
        r = rows[o["sku"]]
        want = expected_cost(sync, r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"])
        assert abs(float(o["cost_usd"]) - want) < 1e-9
    (m,) = json.loads(invoke("cost", "--run-dir", run_dir, "--json").output)["by_model"]
    assert m["mode"] == "online" and m["calls"] == 17
