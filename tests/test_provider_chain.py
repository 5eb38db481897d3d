"""One job across three providers: OpenAI (quota gone) → Anthropic (quota gone) → Gemini.

Every row is answered exactly once, by Gemini, through the real CLI and the real SDKs against
the emulator's three dialects."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cli_helpers import awkward_table, invoke, read_csv

CLAUDE = "claude-haiku-4-5"
GEMINI = "gemini-2.5-flash"
ENV = {
    "OPENAI_API_KEY": "sk-test-openai-0000000000001",
    "ANTHROPIC_API_KEY": "sk-ant-test-000000000000002",
    "GEMINI_API_KEY": "gk-test-0000000000000003",
}


def test_openai_then_anthropic_then_gemini_answers_every_row_once(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-4o-mini": 0, CLAUDE: 0})
    src = awkward_table(tmp_path, n_plain=13, images=False)
    config = tmp_path / "batchops.toml"
    config.write_text(
        f"""batch_size = 10

[[models]]
name = "gpt-4o-mini"
base_url = "{emu.base_url}"

[[models]]
name = "{CLAUDE}"
provider = "anthropic"
api_key_env = "ANTHROPIC_API_KEY"
base_url = "{emu.root_url}"

[[models]]
name = "{GEMINI}"
provider = "gemini"
api_key_env = "GEMINI_API_KEY"
base_url = "{emu.root_url}"
""",
        encoding="utf-8",
    )
    res = invoke(
        "run",
        "--csv",
        src,
        "--id-column",
        "sku",
        "--prompt",
        "Describe {name}",
        "--config",
        config,
        "--run-dir",
        tmp_path / "run",
        "--poll-interval",
        "0.05",
        "--log-dir",
        tmp_path / "logs",
        env=ENV,
    )
    assert res.exit_code == 0, res.output
    rows = read_csv(tmp_path / "run" / "final_output.csv")
    assert len(rows) == 20 and {r["status"] for r in rows} == {"succeeded"}
    assert {r["model"] for r in rows} == {GEMINI}
    stats = emu.stats()["requests"]
    assert len(stats) == 20 and all(v == {"executed": 1, "succeeded": 1} for v in stats.values())
    with sqlite3.connect(tmp_path / "run" / "state.db") as db:
        switches = [m for (m,) in db.execute("SELECT message FROM events WHERE kind = 'switch'")]
    assert len(switches) == 2
    assert "gpt-4o-mini" in switches[0] and CLAUDE in switches[1]
    log = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "logs").glob("*.log"))
    assert all(key not in log for key in ENV.values())
