"""Per-model endpoints: every configuration in docs/endpoints.md runs against emulators.

The doc's TOML blocks are read as written; only their URLs are pointed at emulator instances
(two of them stand in for two vLLM servers; Azure's classic `/openai/...` paths and `api-key`
header are served by the emulator too). A URL the test does not know how to point is a failure,
so the doc cannot drift away from what is tested.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import executions, invoke, read_csv

DOC = Path(__file__).resolve().parents[1] / "docs" / "endpoints.md"
EXAMPLE = re.compile(r"```toml\n# example: (\w+)\n(.*?)```", re.S)


def table(tmp: Path, n: int) -> Path:
    path = tmp / "table.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "name", "text"])
        w.writerows([f"r{i:05d}", f"item {i}", f"note {i}"] for i in range(n))
    return path


def doc_config(name: str) -> str:
    found = {m.group(1): m.group(2) for m in EXAMPLE.finditer(DOC.read_text(encoding="utf-8"))}
    return found[name]


def write_config(tmp: Path, name: str, urls: dict[str, str]) -> Path:
    text = doc_config(name)
    for doc_url, emu_url in urls.items():
        assert doc_url in text, f"{doc_url} is not in the {name} example"
        text = text.replace(doc_url, emu_url)
    left = re.findall(r'"(https?://[^"]*)"', text)
    assert all(u.startswith("http://127.0.0.1:") for u in left), f"unmapped URL(s): {left}"
    path = tmp / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run(tmp: Path, config: Path, n_rows: int, *extra: Any, env: dict[str, str] | None = None):
    src = table(tmp, n_rows)
    run_dir = tmp / "run"
    res = invoke(
        "run",
        "--csv",
        src,
        "--id-column",
        "id",
        "--prompt",
        "Describe {name}: {text}",
        "--config",
        config,
        "--run-dir",
        run_dir,
        "--poll-interval",
        "0.05",
        "--batch-size",
        "10",
        "--retry-delay",
        "0.01",
        "--retry-max-delay",
        "0.05",
        "--log-dir",
        tmp / "logs",
        *extra,
        env={"OPENAI_API_KEY": "", **(env or {})},
    )
    return res, run_dir


def by_model(run_dir: Path) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for r in read_csv(run_dir / "final_output.csv"):
        out.setdefault(r["model"], []).append(r)
    return out


def status(run_dir: Path) -> dict[str, Any]:
    return json.loads(invoke("status", "--run-dir", run_dir, "--json").output)


def test_the_doc_has_every_tested_example():
    names = [m.group(1) for m in EXAMPLE.finditer(DOC.read_text(encoding="utf-8"))]
    assert sorted(names) == ["azure", "dashscope", "dashscope15", "openai", "vllm"]


def test_vllm_example_two_servers_each_model_on_its_own(emulator_factory, tmp_path: Path):
    qwen, llama = "Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"
    # The first server stops serving its model after 12 answers (404 model_not_found from then
    # on is the same switch): the pool moves to the second server.
    first = emulator_factory(model_quota={qwen: 12})
    second = emulator_factory()
    config = write_config(
        tmp_path,
        "vllm",
        {"http://localhost:8000/v1": first.base_url, "http://localhost:8001/v1": second.base_url},
    )
    res, run_dir = run(tmp_path, config, 30, env={"VLLM_API_KEY": "EMPTY"})
    assert res.exit_code == 0, res.output
    # Each model went to its own server, and only there; nothing used a Batch API.
    assert first.stats()["models"] == {qwen: {"executed": 12, "succeeded": 12}}
    assert second.stats()["models"] == {llama: {"executed": 18, "succeeded": 18}}
    for emu in (first, second):
        assert not any("batches" in route for route in emu.stats()["calls"])
    answered = {**executions(first), **executions(second)}
    assert len(answered) == 30 and all(v["succeeded"] == 1 for v in answered.values())
    models = by_model(run_dir)
    assert len(models[qwen]) == 12 and len(models[llama]) == 18
    assert {r["cost_usd"] for rs in models.values() for r in rs} == {"0.0"}
    stats = {(m["model"], m["mode"]): m for m in status(run_dir)["cost_by_model"]}
    assert stats[(llama, "online")]["ok"] == 18 and stats[(llama, "online")]["cost_usd"] == 0


def test_dashscope_example_batch_then_online(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"qwen-plus": 15})
    config = write_config(
        tmp_path,
        "dashscope",
        {"https://dashscope-intl.aliyuncs.com/compatible-mode/v1": emu.base_url},
    )
    key = "sk-dashscope-test-000000009999"
    res, run_dir = run(tmp_path, config, 35, env={"DASHSCOPE_API_KEY": key})
    assert res.exit_code == 0, res.output
    models = by_model(run_dir)
    batch, online = models["qwen-plus"], models["qwen-turbo"]
    assert len(batch) == 15 and all(r["batch_id"] for r in batch)
    assert len(online) == 20 and not any(r["batch_id"] for r in online)
    assert all(v["succeeded"] == 1 for v in executions(emu).values())
    assert set(emu.stats()["keys"]) == {"sk-…9999"}
    # Prices from the entries: batch at half price, online at the full one.
    r = batch[0]
    want = (int(r["prompt_tokens"]) * 0.40 + int(r["completion_tokens"]) * 1.20) / 1e6 * 0.5
    assert float(r["cost_usd"]) == pytest.approx(want, rel=1e-9)
    r = online[0]
    want = (int(r["prompt_tokens"]) * 0.05 + int(r["completion_tokens"]) * 0.20) / 1e6
    assert float(r["cost_usd"]) == pytest.approx(want, rel=1e-9)
    modes = {(m["model"], m["mode"]) for m in status(run_dir)["cost_by_model"] if m["ok"]}
    assert modes == {("qwen-plus", "batch"), ("qwen-turbo", "online")}


def test_dashscope_15_qwen_models_on_one_key(emulator_factory, tmp_path: Path):
    names = re.findall(r'^name = "(.+)"$', doc_config("dashscope15"), re.M)
    assert len(names) == 15
    free_tier = {
        "status": 403,
        "code": "AllocationQuota.FreeTierOnly",
        "type": "AllocationQuota.FreeTierOnly",
        "message": "The free tier of the model has been exhausted.",
    }
    allocation = {"status": 429, "code": "Throttling.AllocationQuota", "message": "quota used up"}
    # The first 13 models are out of free quota, the 14th's allocation is used up after a few
    # rows; the 15th answers the rest.
    emu = emulator_factory(
        inject_errors=[{"model": m, **free_tier} for m in names[:13]]
        + [{"model": names[13], "at": "create", **allocation}]
    )
    config = write_config(
        tmp_path,
        "dashscope15",
        {"https://dashscope-intl.aliyuncs.com/compatible-mode/v1": emu.base_url},
    )
    res, run_dir = run(tmp_path, config, 30, env={"DASHSCOPE_API_KEY": "sk-dash-0000000000001234"})
    assert res.exit_code == 0, res.output
    assert set(by_model(run_dir)) == {names[14]}
    assert all(v == {"executed": 1, "succeeded": 1} for v in executions(emu).values())
    pool = {
        p["model"]: p["state"]
        for p in json.loads(invoke("pool", "status", "--run-dir", run_dir, "--json").output)
    }
    assert [pool.get(m) for m in names[:14]] == ["exhausted"] * 14
    assert "1 of 15 models left" in "".join(
        p.read_text() for p in (tmp_path / "logs").glob("*.log")
    )


def test_azure_example_deployments_batch_and_online(emulator_factory, tmp_path: Path):
    key = "azure-key-0000000000000000beef"
    emu = emulator_factory(model_quota={"gpt-4o-mini-batch": 12}, api_keys=[key])
    # azure_endpoint is the resource root: only Azure's /openai/... paths exist there.
    config = write_config(
        tmp_path, "azure", {"https://YOUR-RESOURCE.openai.azure.com": emu.root_url}
    )
    res, run_dir = run(tmp_path, config, 30, env={"AZURE_OPENAI_API_KEY": key})
    assert res.exit_code == 0, res.output
    assert emu.stats()["models"] == {
        "gpt-4o-mini-batch": {"executed": 12, "succeeded": 12},
        "gpt-4o-mini": {"executed": 18, "succeeded": 18},
    }
    calls = emu.stats()["calls"]
    assert calls["POST /v1/batches"] >= 2 and calls["POST /v1/chat/completions"] == 18
    models = by_model(run_dir)
    assert all(r["batch_id"] for r in models["gpt-4o-mini-batch"])
    assert all(float(r["cost_usd"]) > 0 for rs in models.values() for r in rs)
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert key not in log
    # Azure's classic API names the batch endpoint (and each line's url) without /v1.
    urls = {
        json.loads(line)["url"]
        for f in (run_dir / "inputs").glob("*.jsonl")
        for line in f.read_text().splitlines()
    }
    assert urls == {"/chat/completions"}


def test_openai_example_two_batch_models_then_online(emulator_factory, tmp_path: Path):
    emu = emulator_factory(model_quota={"gpt-4o-mini": 10, "gpt-4.1-mini": 10})
    config = write_config(tmp_path, "openai", {})
    key = "sk-openai-test-0000000000005555"
    res, run_dir = run(
        tmp_path, config, 40, "--base-url", emu.base_url, env={"OPENAI_API_KEY": key}
    )
    assert res.exit_code == 0, res.output
    models = by_model(run_dir)
    assert {m: len(rs) for m, rs in models.items()} == {
        "gpt-4o-mini": 10,
        "gpt-4.1-mini": 10,
        "gpt-4.1-nano": 20,
    }
    assert all(r["batch_id"] for r in models["gpt-4o-mini"] + models["gpt-4.1-mini"])
    assert not any(r["batch_id"] for r in models["gpt-4.1-nano"])
    assert all(v["succeeded"] == 1 for v in executions(emu).values())
    assert all(float(r["cost_usd"]) > 0 for rs in models.values() for r in rs)


@pytest.mark.parametrize(
    "entry, message",
    [
        ('base_url = "localhost:8000/v1"', "base_url 'localhost:8000/v1' is not an http(s) URL"),
        ('base_url = "ftp://example.com/v1"', "is not an http(s) URL"),
        ('api_key_env = "BATCHOPS_TEST_NO_SUCH_KEY"', "BATCHOPS_TEST_NO_SUCH_KEY"),
    ],
)
def test_bad_model_entry_is_a_clear_error_at_start(emulator, tmp_path: Path, entry, message):
    config = tmp_path / "bad.toml"
    config.write_text(f'mode = "online"\n[[models]]\nname = "m1"\n{entry}\n', encoding="utf-8")
    res, run_dir = run(
        tmp_path,
        config,
        3,
        "--base-url",
        emulator.base_url,
        env={"OPENAI_API_KEY": "sk-x-1234567890"},
    )
    assert res.exit_code == 2, res.output
    assert "model m1" in res.output and message in res.output
    assert "Traceback" not in res.output
    assert emulator.stats()["calls"] == {}
