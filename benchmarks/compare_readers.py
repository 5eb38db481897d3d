#!/usr/bin/env python
"""The same emulator scenario through another commit's batchops and this tree's: the JSON of
status, cost, pool status, maintain and report.json, and the merged output, must be equal
(volatile keys - times, ids, paths - dropped; floats to 10 significant digits). The scenario
has failed-then-answered rows (fail_once), rows rejected for good, cached tokens, 70 duplicate
prompts (dedup followers), in a batch run and in an online run. Used to prove schema 6 (batch
answers summed per slice, not an attempts row each) reads the same as schema 5:

    python benchmarks/compare_readers.py <ref>      # prints "equal" or the keys that differ
"""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
W = Path(tempfile.gettempdir()) / "batchops_compare_readers"
PY = sys.executable
VOLATILE = re.compile(
    r"(_at$|^ts$|time|age|seconds|elapsed|_s$|path|dir|log|file|^id$|batch_id|since|started|ended|created|duration|html|generated|when|rate|per_s|eta|remaining|last)",
    re.I,
)


def norm(x, key=""):
    if isinstance(x, dict):
        return {k: norm(v, k) for k, v in sorted(x.items()) if not VOLATILE.search(k)}
    if isinstance(x, list):
        return [norm(v, key) for v in x]
    if isinstance(x, float):
        return float(f"{x:.10g}")
    if isinstance(x, str) and str(W) + "/" in x:
        return re.sub(re.escape(str(W)) + r"/(main|new)/", "<base>/", x)
    if isinstance(x, str) and x.startswith("run_") and key == "run_id":
        return "<run>"
    if isinstance(x, str) and re.search(r"batch_[0-9a-f]{6,}|file-[0-9a-zA-Z]{6,}", x):
        return re.sub(r"batch_[0-9a-f]+|file-[0-9a-zA-Z]+", "<id>", x)
    return x


def emulator(scn):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (W / "scn.json").write_text(json.dumps(scn))
    p = subprocess.Popen(
        [
            PY,
            "-m",
            "batchops.cli",
            "emulator",
            "--port",
            str(port),
            "--scenario",
            str(W / "scn.json"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    root = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            urllib.request.urlopen(root + "/_emulator/health", timeout=5)
            return p, root
        except OSError:
            time.sleep(0.05)
    raise SystemExit("no emulator")


def cli(*a, check=False):
    r = subprocess.run(
        [PY, "-m", "batchops.cli", *map(str, a)], capture_output=True, text=True, env=ENV
    )
    return r


def variant(name, pypath):
    global ENV
    ENV = {**os.environ, "PYTHONPATH": pypath, "OPENAI_API_KEY": "sk-test-000000000000abcd"}
    base = W / name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    src = base / "t.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sku", "name"])
        for i in range(300):
            w.writerow([f"s{i}", f"item {i % 230}"])  # 70 duplicates of an earlier prompt
    out = {}
    for mode, scn in (
        (
            "batch",
            {
                "seed": 3,
                "fail_once_fraction": 0.15,
                "reject_fraction": 0.05,
                "cached_tokens_fraction": 0.3,
                "validating_seconds": 0.05,
                "in_progress_seconds": 0.2,
            },
        ),
        (
            "online",
            {
                "seed": 4,
                "fail_once_fraction": 0.15,
                "reject_fraction": 0.05,
                "cached_tokens_fraction": 0.3,
            },
        ),
    ):
        emu, root = emulator(scn)
        try:
            rd = base / f"run_{mode}"
            r = cli(
                "run",
                "--csv",
                src,
                "--id-column",
                "sku",
                "--prompt",
                "Describe {name}",
                "--model",
                "gpt-4o-mini",
                "--run-dir",
                rd,
                "--base-url",
                root + "/v1",
                "--poll-interval",
                "0.05",
                "--batch-size",
                "1000",
                "--log-dir",
                base / "logs",
                "--mode",
                mode,
                "--retry-delay",
                "0",
            )
            out[f"{mode}:run_rc"] = r.returncode
            if r.returncode not in (0, 3):
                print(r.stdout[-2000:], r.stderr[-3000:])
            for cmd in (
                ["status", "--json"],
                ["cost", "--json"],
                ["pool", "status", "--json"],
                ["maintain", "--json"],
            ):
                r = cli(*cmd, "--run-dir", rd)
                out[f"{mode}:{' '.join(cmd)}"] = (
                    norm(json.loads(r.stdout))
                    if r.returncode == 0
                    else ("rc", r.returncode, r.stderr[-500:])
                )
            cli("report", "--run-dir", rd)
            out[f"{mode}:report.json"] = norm(json.loads((rd / "report.json").read_text()))
            rows = list(csv.DictReader((rd / "final_output.csv").open()))
            out[f"{mode}:final_output"] = sorted(
                (r["sku"], r["status"], r["response"], r.get("prompt_tokens"), r.get("cost_usd"))
                for r in rows
            )
        finally:
            emu.kill()
            emu.wait()
    return out


ref = sys.argv[1]
W.mkdir(parents=True, exist_ok=True)
exp = W / "main_tree"
shutil.rmtree(exp, ignore_errors=True)
exp.mkdir()
arch = subprocess.run(
    ["git", "archive", ref, "batchops"], cwd=ROOT, capture_output=True, check=True
).stdout
subprocess.run(["tar", "-x", "-C", str(exp)], input=arch, check=True)
a = variant("main", str(exp))
b = variant("new", str(ROOT))
(W / "a.json").write_text(json.dumps(a, indent=1, sort_keys=True, default=str))
(W / "b.json").write_text(json.dumps(b, indent=1, sort_keys=True, default=str))
bad = [k for k in a if a[k] != b.get(k)]
print("equal" if not bad else f"DIFFER: {bad}")
for k in a:
    print(k, "ok" if a[k] == b.get(k) else "DIFF")
