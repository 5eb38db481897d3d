"""Failover the way the seed scripts need it, through the real CLI against the emulator:
DashScope's error dialect, dead endpoints, scopes (model / key / account), a remembered pool."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import invoke, read_csv

from batchops.policy import Scope, classify

KEY1 = "sk-dash-key-one-000000001111"
KEY2 = "sk-dash-key-two-000000002222"
QWEN = ["qwen-free", "qwen-quota", "qwen-plus"]
FREE_TIER = {
    "status": 403,
    "code": "AllocationQuota.FreeTierOnly",
    "type": "AllocationQuota.FreeTierOnly",
    "message": "The free tier of the model has been exhausted. If you wish to continue access the "
    'model on a paid basis, please disable the "use free tier only" mode in the management console.',
}
ALLOCATION = {
    "status": 429,
    "code": "Throttling.AllocationQuota",
    "type": "Throttling.AllocationQuota",
    "message": "Allocated quota exceeded, please increase your quota limit.",
}


def csv_table(tmp: Path, n: int) -> Path:
    path = tmp / "table.csv"
    lines = ["id,name"] + [f"r{i:03d},item {i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toml_config(tmp: Path, models: list[dict[str, Any]], **top: Any) -> Path:
    out = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for m in models:
        out.append("[[models]]")
        out += [f"{k} = {json.dumps(v)}" for k, v in m.items()]
    path = tmp / "batchops.toml"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def run(tmp: Path, src: Path, config: Path, *extra: Any, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return invoke(
        "run",
        "--csv",
        src,
        "--id-column",
        "id",
        "--prompt",
        "Describe {name}",
        "--config",
        config,
        "--run-dir",
        tmp / "run",
        "--poll-interval",
        "0.02",
        "--retry-delay",
        "0.01",
        "--log-dir",
        tmp / "logs",
        *extra,
        env=env,
    )


def retry_missing(tmp: Path, *extra: Any, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return invoke(
        "retry-missing",
        "--run-dir",
        tmp / "run",
        "--poll-interval",
        "0.02",
        "--log-dir",
        tmp / "logs",
        *extra,
        env=env,
    )


def dead_url() -> str:
    """A local address where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def executed_by_model(emu: Any) -> dict[str, int]:
    return {m: v["executed"] for m, v in emu.stats()["models"].items()}


# ---------------------------------------------------------------------- the rules themselves


def test_dashscope_preset_scopes():
    def dash(status: int, code: str, fallback: str = "api_error") -> tuple[str, Scope]:
        return classify(status, code, code, "", provider="dashscope", fallback=fallback)  # type: ignore[arg-type]

    assert dash(403, "AllocationQuota.FreeTierOnly", "auth") == ("quota", Scope.MODEL)
    assert dash(429, "Throttling.AllocationQuota", "rate_limit") == ("quota", Scope.MODEL)
    assert dash(429, "Throttling.RateQuota", "rate_limit") == ("rate_limit", Scope.REQUEST)
    assert dash(400, "Arrearage", "invalid_request") == ("quota", Scope.ACCOUNT)
    assert dash(401, "InvalidApiKey", "auth") == ("auth", Scope.KEY)
    assert dash(404, "ModelNotFound", "invalid_request") == ("model_not_found", Scope.MODEL)
    assert dash(400, "DataInspectionFailed", "invalid_request") == (
        "invalid_request",
        Scope.REQUEST,
    )


def test_compatible_servers_scope_an_unknown_403_to_the_model():
    assert classify(403, None, None, "no", provider="vllm", fallback="auth") == (
        "model_not_found",
        Scope.MODEL,
    )
    # OpenAI's own API keeps its meaning: a 403 there is the key's.
    assert classify(403, None, None, "no", provider="openai", fallback="auth") == (
        "auth",
        Scope.KEY,
    )
    assert classify(
        400,
        "x",
        None,
        "You exceeded your current quota",
        provider="vllm",
        fallback="invalid_request",
    ) == ("quota", Scope.MODEL)


def test_user_rules_come_first():
    from batchops.policy import Rule

    rule = Rule("quota", Scope.KEY, status=400, message="balance is too low")
    got = classify(
        400, None, None, "Your balance is too low", rules=[rule], fallback="invalid_request"
    )
    assert got == ("quota", Scope.KEY)


# ---------------------------------------------------------------------- DashScope, one key


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_dashscope_free_tier_then_allocation_quota_then_a_working_model(
    emulator_factory, tmp_path: Path, mode: str
):
    emu = emulator_factory(
        inject_errors=[{"model": QWEN[0], **FREE_TIER}, {"model": QWEN[1], **ALLOCATION}]
    )
    src = csv_table(tmp_path, 6)
    models = [{"name": m, "provider": "dashscope", "base_url": emu.base_url} for m in QWEN]
    config = toml_config(tmp_path, models, batch_size=6)
    res = run(tmp_path, src, config, "--mode", mode, env={"OPENAI_API_KEY": KEY1})
    assert res.exit_code == 0, res.output
    rows = read_csv(tmp_path / "run" / "final_output.csv")
    assert {r["model"] for r in rows} == {"qwen-plus"} and {r["status"] for r in rows} == {
        "succeeded"
    }
    assert executed_by_model(emu) == {"qwen-plus": 6}
    assert all(v["executed"] == 1 for v in emu.stats()["requests"].values())
    with sqlite3.connect(tmp_path / "run" / "state.db") as db:
        switches = [m for (m,) in db.execute("SELECT message FROM events WHERE kind = 'switch'")]
    assert len(switches) == 2  # each refusing model set aside once (quota threshold 1)
    assert any("2 of 3 models left" in m for m in switches)
    assert any("1 of 3 models left" in m for m in switches)
    if mode == "batch":  # one refused create per model, then the batch that ran
        assert emu.stats()["calls"]["POST /v1/batches"] == 3


def test_arrearage_takes_every_model_of_the_account_and_the_next_key_answers(
    emulator_factory, tmp_path: Path
):
    arrears = {"status": 400, "code": "Arrearage", "message": "Access denied, account overdue."}
    emu = emulator_factory(inject_errors=[{"key": KEY1, **arrears}])
    src = csv_table(tmp_path, 6)
    models = [{"name": m, "provider": "dashscope", "base_url": emu.base_url} for m in QWEN]
    res = run(
        tmp_path,
        src,
        toml_config(tmp_path, models, batch_size=6),
        env={"OPENAI_API_KEYS": f"{KEY1},{KEY2}", "OPENAI_API_KEY": ""},
    )
    assert res.exit_code == 0, res.output
    rows = read_csv(tmp_path / "run" / "final_output.csv")
    assert {r["model"] for r in rows} == {"qwen-free"}  # the first model, on the second key
    assert set(emu.stats()["keys"]) == {"sk-…2222"}
    assert emu.stats()["calls"]["POST /v1/batches"] == 2  # one refusal took the whole key


# ---------------------------------------------------------------------- dead endpoints


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_first_endpoint_down_every_row_goes_through_the_second(
    emulator_factory, tmp_path: Path, mode: str
):
    emu = emulator_factory()
    src = csv_table(tmp_path, 12)
    models = [
        {"name": "local-a", "provider": "vllm", "base_url": dead_url()},
        {"name": "local-b", "provider": "vllm", "base_url": emu.base_url},
    ]
    config = toml_config(tmp_path, models, batch_size=6)
    res = run(tmp_path, src, config, "--mode", mode, env={"OPENAI_API_KEY": "local"})
    assert res.exit_code == 0, res.output
    rows = read_csv(tmp_path / "run" / "final_output.csv")
    assert {r["model"] for r in rows} == {"local-b"}
    assert all(v["executed"] == 1 for v in emu.stats()["requests"].values())
    with sqlite3.connect(tmp_path / "run" / "state.db") as db:
        # the dead endpoint did not use up any row's retries
        assert db.execute("SELECT MAX(attempts) FROM rows").fetchone()[0] == 0
        switches = [m for (m,) in db.execute("SELECT message FROM events WHERE kind = 'switch'")]
    assert len(switches) == 1 and "endpoint" in switches[0] and "local-a" in switches[0]


# ---------------------------------------------------------------------- remembered pool


def test_exhausted_models_are_remembered_until_the_pool_is_reset(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-a": 0, "gpt-b": 4})
    src = csv_table(tmp_path, 10)
    models = [{"name": "gpt-a"}, {"name": "gpt-b"}]
    config = toml_config(tmp_path, models, batch_size=2)
    res = run(tmp_path, src, config, "--base-url", emu.base_url)
    assert res.exit_code == 3, res.output  # gpt-a refused, gpt-b ran out after 4 rows
    assert executed_by_model(emu) == {"gpt-b": 4}
    creates = emu.stats()["calls"]["POST /v1/batches"]

    # The quotas reset, but the run remembers both models as exhausted: nothing is sent.
    emu.update_scenario(model_quota={"gpt-a": 0})
    res = retry_missing(tmp_path, "--base-url", emu.base_url)
    assert res.exit_code == 3, res.output
    assert emu.stats()["calls"]["POST /v1/batches"] == creates
    pool = json.loads(invoke("pool", "status", "--run-dir", tmp_path / "run", "--json").output)
    assert {p["model"]: p["state"] for p in pool} == {"gpt-a": "exhausted", "gpt-b": "exhausted"}
    # gpt-b: 4 answers and 6 quota refusals (their lines are attempts too); gpt-a: none
    assert {p["model"]: (p["calls"], p["failures"]) for p in pool} == {
        "gpt-a": (0, 0),
        "gpt-b": (10, 6),
    }

    # Resetting gpt-b alone: the rest is answered by gpt-b; gpt-a still gets nothing.
    res = invoke("pool", "reset", "--run-dir", tmp_path / "run", "--model", "gpt-b")
    assert res.exit_code == 0 and "1 exhausted" in res.output
    res = retry_missing(tmp_path, "--base-url", emu.base_url)
    assert res.exit_code == 0, res.output
    assert executed_by_model(emu) == {"gpt-b": 10}
    assert emu.stats()["calls"]["POST /v1/batches"] == creates + 3


def test_exhausted_cooldown_lets_a_model_be_tried_again(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-a": 0})
    src = csv_table(tmp_path, 4)
    config = toml_config(tmp_path, [{"name": "gpt-a"}], batch_size=4, exhausted_cooldown="0s")
    assert run(tmp_path, src, config, "--base-url", emu.base_url).exit_code == 3
    emu.update_scenario(model_quota={})
    res = retry_missing(tmp_path, "--base-url", emu.base_url)
    assert res.exit_code == 0, res.output
    assert executed_by_model(emu) == {"gpt-a": 4}


def test_failover_doc_has_the_generated_preset_tables():
    from batchops.policy import presets_markdown

    doc = (Path(__file__).parent.parent / "docs" / "failover.md").read_text(encoding="utf-8")
    assert presets_markdown() in doc, "docs/failover.md is stale: paste policy.presets_markdown()"
