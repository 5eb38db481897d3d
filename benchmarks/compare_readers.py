#!/usr/bin/env python
"""Do two commits' readers of a run give the same figures? One emulator scenario through another
commit's batchops and this tree's: the JSON of status, cost, pool status, maintain and
report.json, and the merged output, must be equal (volatile keys - times, ids, paths - dropped;
floats to 10 significant digits). The scenario has failed-then-answered rows (fail_once), rows
rejected for good, cached tokens and 70 duplicate prompts (dedup followers), in a batch run and
in an online run. Written to prove that schema 6 (batch answers summed per slice, not an
attempts row each) reads as schema 5 did; useful for any change of what the store holds:

    python benchmarks/compare_readers.py <ref>      # prints "equal" or the keys that differ
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_run import start_emulator  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "batchops_compare_readers"
KEY = "sk-test-000000000000abcd"
VOLATILE = re.compile(
    r"(_at$|^ts$|time|age|seconds|elapsed|_s$|path|dir|log|file|^id$|batch_id|since|started"
    r"|ended|created|duration|html|generated|when|rate|per_s|eta|remaining|last)",
    re.I,
)
REPORTS = (
    ["status", "--json"],
    ["cost", "--json"],
    ["pool", "status", "--json"],
    ["maintain", "--json"],
)
COMMON = {"fail_once_fraction": 0.15, "reject_fraction": 0.05, "cached_tokens_fraction": 0.3}
SCENARIOS = {
    "batch": {"seed": 3, "validating_seconds": 0.05, "in_progress_seconds": 0.2, **COMMON},
    "online": {"seed": 4, **COMMON},
}


def norm(x: Any, key: str = "") -> Any:
    """x without what differs from run to run (times, ids, paths), floats to 10 digits."""
    if isinstance(x, dict):
        return {k: norm(v, k) for k, v in sorted(x.items()) if not VOLATILE.search(k)}
    if isinstance(x, list):
        return [norm(v, key) for v in x]
    if isinstance(x, float):
        return float(f"{x:.10g}")
    if isinstance(x, str) and str(WORK) + "/" in x:
        return re.sub(re.escape(str(WORK)) + r"/(base|head)/", "<dir>/", x)
    if isinstance(x, str) and x.startswith("run_") and key == "run_id":
        return "<run>"
    if isinstance(x, str) and re.search(r"batch_[0-9a-f]{6,}|file-[0-9a-zA-Z]{6,}", x):
        return re.sub(r"batch_[0-9a-f]+|file-[0-9a-zA-Z]+", "<id>", x)
    return x


def table(path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sku", "name"])
        for i in range(300):
            w.writerow([f"s{i}", f"item {i % 230}"])  # 70 repeat an earlier row's prompt


def figures(name: str, code: Path) -> dict[str, Any]:
    """Every reader's output for the scenarios, run with the batchops found in `code`."""
    env = {**os.environ, "PYTHONPATH": str(code), "OPENAI_API_KEY": KEY}
    base = WORK / name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    src = base / "t.csv"
    table(src)

    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "batchops.cli", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env)

    out: dict[str, Any] = {}
    for mode, knobs in SCENARIOS.items():
        emu, root = start_emulator(base, knobs, env)
        try:
            rd = base / f"run_{mode}"
            r = cli(
                *("run", "--csv", src, "--id-column", "sku", "--prompt", "Describe {name}"),
                *("--model", "gpt-4o-mini", "--run-dir", rd, "--base-url", root + "/v1"),
                *("--poll-interval", "0.05", "--batch-size", "1000", "--retry-delay", "0"),
                *("--log-dir", base / "logs", "--mode", mode),
            )
            out[f"{mode}:run_rc"] = r.returncode
            if r.returncode not in (0, 3):
                print(r.stdout[-2000:], r.stderr[-3000:])
            for cmd in REPORTS:
                r = cli(*cmd, "--run-dir", rd)
                ok = r.returncode == 0
                out[f"{mode}:{' '.join(cmd)}"] = (
                    norm(json.loads(r.stdout)) if ok else ("rc", r.returncode, r.stderr[-500:])
                )
            cli("report", "--run-dir", rd)
            out[f"{mode}:report.json"] = norm(json.loads((rd / "report.json").read_text()))
            with (rd / "final_output.csv").open(newline="") as fh:
                out[f"{mode}:final_output"] = sorted(
                    (r["sku"], r["status"], r["response"], r["prompt_tokens"], r["cost_usd"])
                    for r in csv.DictReader(fh)
                )
        finally:
            emu.kill()
            emu.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", help="the git ref to compare this tree with")
    ref = ap.parse_args().ref
    tree = WORK / "base_tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", ref, "batchops"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    a, b = figures("base", tree), figures("head", ROOT)
    for name, got in (("base", a), ("head", b)):
        (WORK / f"{name}.json").write_text(json.dumps(got, indent=1, sort_keys=True, default=str))
    for k in a:
        print(k, "ok" if a[k] == b.get(k) else "DIFF")
    bad = [k for k in a if a[k] != b.get(k)]
    print("equal" if not bad else f"DIFFER: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
