"""Benchmark online mode against a minimal asyncio + semaphore client, on the same emulator.

    python benchmarks/bench_online.py [--repeat 3] [--requests N] [--workers 8 --latency 0.02]

The emulator runs in its own process (`batchops emulator`) with a fixed latency per synchronous
call (`sync_latency_seconds`); each client runs in its own process as well, so neither shares
an interpreter (or a GIL) with the server. Both clients read the same CSV of N short rows, send
one chat completion per row with at most `--workers` requests in flight, and keep every answer:

* baseline — what the OpenAI cookbook suggests for parallel requests, reduced to its core:
  `asyncio.Semaphore(workers)` around `AsyncOpenAI().chat.completions.create(...)` for every
  row, `asyncio.gather`, answers written to a CSV at the end (no resumability, no pacing);
* batchops — `batchops run --mode online --workers N`: the same rows with per-answer commits
  to the run database, cost, classification and retries, and the merged table at the end;
* no-sdk (reference, not an option of batchops) — the baseline's loop without the openai SDK:
  a plain async HTTP client + orjson. The client is `httpx2.AsyncClient`, the HTTP library the
  openai SDK itself installs (openai ≥ 3 depends on `httpx2`; `httpx` is not installed), so the
  benchmark needs nothing beyond batchops' own dependencies. It shows how much of each
  request's client CPU is the SDK's request machinery;
* floor (reference) — the least any client can do: one raw asyncio stream per worker, the
  request written as bytes, the answer read by Content-Length and parsed with orjson; no HTTP
  library, no state. Its req/s is what the transport and this server allow;
* floor-min (reference) — the floor client against a minimal asyncio server (read, sleep,
  fixed answer) instead of the emulator: what the loopback, asyncio's timers and scheduling on
  the machine's cores cost alone.

The floors split one request's time (`workers / req/s`) into the sleep, the minimal server and
transport, the emulator's own handling, and the client; the table ends with that breakdown.

Each client's script is written to its own file (baseline.py, no_sdk.py, floor.py, engine.py).
A client that fails prints its own stderr and the run goes on: the table is made of the runs
that finished, and says how many did not.

Measured per run: requests/s over the client's own timed section (source read → answers
written; interpreter start-up and imports excluded — for batchops also the modules it imports
on first use, see ENGINE — reported separately as "process" wall time) and whether every row
was answered exactly once (emulator stats, by custom id). The median of `--repeat` alternating
runs is printed with its min–max, the core count and the load average. Server CPU is read from
/proc/<pid>/stat (Linux; "-" elsewhere).

Both scenarios of issue 21 run by default (20 ms with 8 workers, 5,000 requests; 100 ms with
64 workers, 10,000 requests), each followed by its verdicts against the targets. Measured on
2 cores shared with three other agents (load 3.4, median of 3; docs/benchmarks.md has the
tables and a quieter run):

    20 ms, 8 workers     req/s  client ms cpu/req  nothing lost
    baseline             199.2               1.87          True
    batchops             318.1               0.38          True   (1.60x; 94% of the floor)
    no-sdk               225.2               1.00          True
    floor                337.5               0.13          True   (transport floor, emulator)
    floor-min            370.8               0.09          -      (minimal server; ceiling 400)
    per request: 20.00 sleep + 1.58 minimal server/transport + 2.13 emulator + 1.45 batchops
    100 ms, 64 workers
    baseline             311.6               1.92          True
    batchops             566.8               0.28          True   (89% of the ceiling, 640)
    floor                591.0               0.13          True   (batchops: 96% of it)

Again at load 1.9-2.3: baseline 239.0, batchops 335.2 (1.40x: missed), floor 342.5 (batchops
at 98% of it), floor-min 370.8; per request 20.00 + 1.57 + 1.79 + 0.51 (batchops) ms.

The 1.5x ratio depends on the machine's load more than on batchops: batchops runs within
2-6% of the floor client in every run, while the baseline spends 1.9 ms of CPU per request and
slows down whenever the cores are busy. On a quiet machine the baseline reaches ~300 req/s at
20 ms and the ceiling (400) allows at most 1.33x over it, so 1.5x cannot be met there by any
client; what is left at 20 ms is the emulator's own handling (uvicorn/h11/Starlette: ~0.4 ms of
server CPU a call, which queues when 8 calls arrive together) and the loopback/timers.
At real API latencies (0.5-10 s a call) the client's CPU does not matter and every client
reaches workers / latency; there the differences are pacing (rpm/tpm, retry-after), durability
(a kill loses at most the requests in flight) and failover, not speed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt-4o-mini"
KEY = "sk-bench-00000000000000000000"

BASELINE = r"""
import asyncio, csv, sys, time
from openai import AsyncOpenAI

async def main(src, out, base_url, workers, model):
    t0, c0 = time.perf_counter(), time.process_time()
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    client = AsyncOpenAI(base_url=base_url, api_key="KEY")
    sem = asyncio.Semaphore(workers)

    async def one(row):
        async with sem:
            r = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Describe {row['name']}: {row['text']}"}],
                extra_headers={"X-Batchops-Custom-Id": row["id"]},
            )
            return row["id"], r.choices[0].message.content

    answers = await asyncio.gather(*(one(r) for r in rows))
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "response"])
        w.writerows(answers)
    await client.close()
    print(f"TIMED {time.perf_counter() - t0:.4f} {time.process_time() - c0:.4f} {len(answers)}")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
""".replace("KEY", KEY)

NO_SDK = r"""
import asyncio, csv, sys, time
import httpx2 as httpx, orjson

async def main(src, out, base_url, workers, model):
    t0, c0 = time.perf_counter(), time.process_time()
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    client = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600,
                               headers={"Authorization": "Bearer KEY"})
    sem = asyncio.Semaphore(workers)

    async def one(row):
        body = {"model": model, "messages": [
            {"role": "user", "content": f"Describe {row['name']}: {row['text']}"}]}
        async with sem:
            r = await client.post("/chat/completions", content=orjson.dumps(body), headers={
                "Content-Type": "application/json", "X-Batchops-Custom-Id": row["id"]})
            r.raise_for_status()
            return row["id"], orjson.loads(r.content)["choices"][0]["message"]["content"]

    answers = await asyncio.gather(*(one(r) for r in rows))
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "response"])
        w.writerows(answers)
    await client.aclose()
    print(f"TIMED {time.perf_counter() - t0:.4f} {time.process_time() - c0:.4f} {len(answers)}")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
""".replace("KEY", KEY)

# The transport floor (reference, not a client anyone would ship): one raw asyncio stream per
# worker, a request prebuilt but for its custom id, the answer read by Content-Length and parsed
# with orjson; no HTTP library, no SDK, no state. What any client can reach against this server.
FLOOR = r"""
import asyncio, csv, sys, time
import orjson

async def main(src, out, base_url, workers, model):
    t0, c0 = time.perf_counter(), time.process_time()
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    hostport = base_url.split("//", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    path = "/" + base_url.split("//", 1)[1].split("/", 1)[1].rstrip("/") + "/chat/completions"
    todo = list(reversed(rows))
    answers = []

    async def worker():
        reader, writer = await asyncio.open_connection(host, int(port))
        while todo:
            row = todo.pop()
            body = orjson.dumps({"model": model, "messages": [
                {"role": "user", "content": f"Describe {row['name']}: {row['text']}"}]})
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer KEY\r\n"
                         b"Content-Type: application/json\r\nX-Batchops-Custom-Id: %s\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (path.encode(), hostport.encode(),
                         row["id"].encode(), len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            answer = orjson.loads(await reader.readexactly(size))
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"HTTP {head[:40]!r}: {answer}")
            answers.append((row["id"], answer["choices"][0]["message"]["content"]))
        writer.close()

    await asyncio.gather(*(worker() for _ in range(workers)))
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "response"])
        w.writerows(answers)
    print(f"TIMED {time.perf_counter() - t0:.4f} {time.process_time() - c0:.4f} {len(answers)}")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
""".replace("KEY", KEY)

# The server floor: the least an asyncio HTTP server does for a call of this latency (read the
# request, sleep, write a fixed answer). The floor client against it shows what the loopback,
# asyncio's timers and the scheduling of 2 shared cores cost alone, without the emulator.
MIN_SERVER = r"""
import asyncio, sys
import orjson

ANSWER = orjson.dumps({"id": "chatcmpl-0", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}})
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"

async def serve(reader, writer, latency):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(size)
            await asyncio.sleep(latency)
            writer.write(HEAD % len(ANSWER) + ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main(port, latency):
    server = await asyncio.start_server(lambda r, w: serve(r, w, latency), "127.0.0.1", port)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
"""

# The batchops CLI with its imports done before the clock starts (as the baseline's are): the
# timed section is the command itself — source checks, rows registered, requests, merged output.
# Imports include the ones done on first use: pandas (pyarrow loads it when it converts a numpy
# array: ~0.2 s), the price table (genai_prices.data: ~0.1 s); the "process" column keeps them.
ENGINE = r"""
import importlib, sys, time
import batchops.api, batchops.cli, batchops.engine, batchops.online, batchops.providers, openai
for lazy in ("pandas", "pyarrow.compute", "genai_prices.data"):
    try:
        importlib.import_module(lazy)
    except ImportError:  # not installed: then nothing imports it during the run either
        pass
t0, c0 = time.perf_counter(), time.process_time()
try:
    batchops.cli.main()
finally:
    print(f"TIMED {time.perf_counter() - t0:.4f} {time.process_time() - c0:.4f}", file=sys.stderr)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin(root: str, path: str, method: str = "GET") -> dict:
    req = urllib.request.Request(
        root + path, method=method, data=b"{}" if method == "POST" else None
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def start_min_server(tmp: Path, latency: float) -> tuple[subprocess.Popen, str]:
    """The server floor (MIN_SERVER) in its own process; returns it and its root URL."""
    script = tmp / "min_server.py"
    script.write_text(MIN_SERVER)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), str(latency)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    if proc.stdout is None or proc.stdout.readline().strip() != "READY":
        proc.kill()
        raise RuntimeError("the minimal server did not start")
    return proc, f"http://127.0.0.1:{port}"


def start_emulator(tmp: Path, latency: float) -> tuple[subprocess.Popen, str]:
    scenario = tmp / "scenario.json"
    scenario.write_text(json.dumps({"sync_latency_seconds": latency}))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchops.cli",
            "emulator",
            "--port",
            str(port),
            "--scenario",
            str(scenario),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            admin(root, "/_emulator/health")
            return proc, root
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("emulator did not start")


def exactly_once(root: str, n: int) -> bool:
    reqs = admin(root, "/_emulator/stats")["requests"]
    return len(reqs) == n and all(v == {"executed": 1, "succeeded": 1} for v in reqs.values())


def write_source(path: Path, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "name", "text"])
        for i in range(n):
            w.writerow([f"r{i:06d}", f"item {i}", f"a short product note number {i}"])


class ClientFailed(RuntimeError):
    """A client run that did not finish; the message carries its own stderr."""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_baseline(src: Path, tmp: Path, root: str, workers: int, name: str, code: str) -> dict:
    script = tmp / f"{name}.py"  # each client its own script file
    script.write_text(code)
    out = tmp / f"{name}_out.csv"
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(script), str(src), str(out), root + "/v1", str(workers), MODEL],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    m = re.search(r"TIMED ([\d.]+) ([\d.]+) (\d+)", p.stdout)
    if p.returncode or not m:
        raise ClientFailed(f"{name} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return {
        "timed": float(m.group(1)),
        "cpu": float(m.group(2)),
        "wall": wall,
        "answers": int(m.group(3)),
    }


def run_engine(src: Path, tmp: Path, root: str, workers: int, i: int) -> dict:
    script = tmp / "engine.py"
    script.write_text(ENGINE)
    run_dir = tmp / f"run{i}"
    env = {**os.environ, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
    env.pop("OPENAI_API_KEYS", None)
    t = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            str(script),
            "run",
            "--csv",
            str(src),
            "--id-column",
            "id",
            "--prompt",
            "Describe {name}: {text}",
            "--model",
            MODEL,
            "--mode",
            "online",
            "--workers",
            str(workers),
            "--run-dir",
            str(run_dir),
            "--base-url",
            root + "/v1",
            "--log-dir",
            str(tmp / "logs"),
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t
    m = re.search(r"TIMED ([\d.]+) ([\d.]+)", p.stderr)
    if p.returncode or not m:
        raise ClientFailed(f"batchops exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    with (run_dir / "final_output.csv").open(newline="", encoding="utf-8") as fh:
        answered = sum(1 for r in csv.DictReader(fh) if r["status"] == "succeeded")
    return {"timed": float(m.group(1)), "cpu": float(m.group(2)), "wall": wall, "answers": answered}


# Every client: (script file name, code); batchops runs its CLI (run_engine). "floor" and
# "floor-min" are references, not options.
CLIENTS: dict[str, tuple[str, str]] = {
    "baseline": ("baseline", BASELINE),
    "batchops": ("engine", ENGINE),
    "no-sdk": ("no_sdk", NO_SDK),
    "floor": ("floor", FLOOR),  # the transport floor against the emulator
    "floor-min": ("floor", FLOOR),  # the same client against MIN_SERVER: the server floor
}
# (latency s, workers, requests) measured by default: local-server speed, and a latency where
# 64 workers should keep the ceiling (workers / latency) nearly full. The second sends 10,000
# requests so the run's fixed cost (source checks, estimate, registering rows, merge: ~1 s)
# weighs on its figure as it would on a real table, not 15% of a 8-second run.
SCENARIOS = ((0.02, 8, 5000), (0.1, 64, 10000))
# The targets of issue 21.
TARGET_RATIO = 1.5  # batchops / baseline at 20 ms
TARGET_CEILING = 0.85  # of workers / latency at 100 ms, 64 workers
TARGET_CPU_MS = 0.8  # client CPU per request


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, help="per scenario [5000 at 20 ms, 10000 at 100 ms]")
    ap.add_argument("--workers", type=int, help="one scenario only (with --latency)")
    ap.add_argument("--latency", type=float, help="one scenario only (with --workers)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if (args.workers is None) != (args.latency is None):
        ap.error("--workers and --latency go together")
    scenarios = (
        SCENARIOS
        if args.workers is None
        else ((args.latency, args.workers, args.requests or 5000),)
    )
    failed = False
    verdicts: list[str] = []
    for latency, workers, n in scenarios:
        n = args.requests or n
        results, failures = measure(n, latency, workers, args.repeat)
        verdicts += print_table(n, latency, workers, results, failures)
        failed = failed or not results["baseline"] or not results["batchops"]
    print()
    print("targets (issue 21):")
    for line in verdicts:
        print(f"  {line}")
    if failed:
        sys.exit("bench_online: no finished run of the baseline or of batchops (see above)")


def measure(
    n: int, latency: float, workers: int, repeat: int
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """`repeat` alternating runs of every client against one emulator at this latency."""
    print(f"== {latency * 1000:.0f} ms per call, {workers} in flight, {n} requests", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_online_") as d:
        tmp = Path(d)
        src = tmp / "source.csv"
        write_source(src, n)
        emu, root = start_emulator(tmp, latency)
        minimal, min_root = start_min_server(tmp, latency)
        results: dict[str, list[dict]] = {name: [] for name in CLIENTS}
        failures: dict[str, int] = dict.fromkeys(results, 0)
        try:
            for i in range(repeat):
                for name in results:
                    on_emulator = name != "floor-min"
                    server = emu if on_emulator else minimal
                    if on_emulator:
                        admin(root, "/_emulator/reset", "POST")
                    before = cpu_seconds(server.pid)
                    try:
                        if name == "batchops":
                            r = run_engine(src, tmp, root, workers, i)
                        else:
                            script, code = CLIENTS[name]
                            at = root if on_emulator else min_root
                            r = run_baseline(src, tmp, at, workers, script, code)
                    except ClientFailed as exc:  # keep the runs that finished; show why
                        failures[name] += 1
                        print(f"  run {i + 1} {name}: FAILED: {exc}", file=sys.stderr, flush=True)
                        continue
                    after = cpu_seconds(server.pid)
                    r["server_cpu"] = None if before is None or after is None else after - before
                    # The minimal server keeps no stats: there, every answer back is all we know.
                    r["once"] = exactly_once(root, n) if on_emulator else None
                    r["rps"] = n / r["timed"]
                    results[name].append(r)
                    cpu_s = "-" if r["server_cpu"] is None else f"{r['server_cpu'] / n * 1e3:.2f}"
                    print(
                        f"  run {i + 1} {name:9s} {r['rps']:7.1f} req/s  timed {r['timed']:6.2f}s  "
                        f"process {r['wall']:6.2f}s  client cpu {r['cpu'] / n * 1e3:.2f} "
                        f"ms/req  server cpu {cpu_s} ms/req  "
                        f"answers {r['answers']}  exactly once {r['once']}",
                        flush=True,
                    )
        finally:
            for proc in (emu, minimal):
                proc.terminate()
                proc.wait()
    return results, failures


def nothing_lost(rs: list[dict], n: int) -> str:
    """Every run answered every row (and exactly once, where the server counts executions)."""
    ok = all(r["once"] is not False and r["answers"] == n for r in rs)
    return f"{ok}" + (" (answers only)" if any(r["once"] is None for r in rs) else "")


def spread(values: list[float], fmt: str) -> str:
    """ "median [min–max]" of the runs."""
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def print_table(
    n: int, latency: float, workers: int, results: dict[str, list[dict]], failures: dict
) -> list[str]:
    """The scenario's table; returns its verdicts against the targets."""
    ideal = workers / latency
    print()
    print(
        f"{n} requests, {workers} in flight, {latency * 1000:.0f} ms per call "
        f"(ceiling {ideal:.0f} req/s), {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        f"median [min–max] of the runs that finished"
    )
    print(
        "| client | runs | req/s | timed s | process s | client ms cpu/req | server ms cpu/req "
        "| nothing lost |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    med: dict[str, float] = {}
    for name, rs in results.items():
        runs = f"{len(rs)}" + (f" ({failures[name]} failed)" if failures[name] else "")
        if not rs:
            print(f"| {name} | {runs} | – | – | – | – | – | – |")
            continue
        med[name] = statistics.median(r["rps"] for r in rs)
        server = [r["server_cpu"] / n * 1e3 for r in rs if r["server_cpu"] is not None]
        print(
            f"| {name} | {runs} | {spread([r['rps'] for r in rs], '.1f')} "
            f"| {spread([r['timed'] for r in rs], '.2f')} "
            f"| {spread([r['wall'] for r in rs], '.2f')} "
            f"| {spread([r['cpu'] / n * 1e3 for r in rs], '.2f')} "
            f"| {spread(server, '.2f') if server else '-'} "
            f"| {nothing_lost(rs, n)} |"
        )
    verdicts: list[str] = []
    at = f"{latency * 1000:.0f} ms/{workers} workers"
    if "baseline" in med and "batchops" in med:
        ratio = med["batchops"] / med["baseline"]
        print(f"ratio batchops / baseline (medians): {ratio:.2f}x")
        if workers == 8:
            verdicts.append(
                f"{at}: batchops / baseline {ratio:.2f}x (target ≥ {TARGET_RATIO}x; "
                f"the ceiling allows at most {ideal / med['baseline']:.2f}x; load "
                # the baseline's speed follows the machine's load: say which load this was
                f"{os.getloadavg()[0]:.1f}): " + ("met" if ratio >= TARGET_RATIO else "MISSED")
            )
    if "baseline" in med and "no-sdk" in med:
        print(
            f"ratio no-sdk / baseline (medians): {med['no-sdk'] / med['baseline']:.2f}x (reference)"
        )
    if all(name in med for name in ("floor-min", "floor", "batchops")):
        print_breakdown(latency, workers, med)
    rs = results["batchops"]
    if rs:
        share = med["batchops"] / ideal
        cpu = statistics.median(r["cpu"] / n * 1e3 for r in rs)
        once = all(r["once"] and r["answers"] == n for r in rs)
        print(f"batchops: {share:.0%} of the ceiling")
        if workers == 64:
            verdicts.append(
                f"{at}: batchops at {share:.0%} of the ceiling (target ≥ "
                f"{TARGET_CEILING:.0%}): " + ("met" if share >= TARGET_CEILING else "MISSED")
            )
        verdicts.append(
            f"{at}: batchops client CPU {cpu:.2f} ms/request (target ≤ {TARGET_CPU_MS}): "
            + ("met" if cpu <= TARGET_CPU_MS else "MISSED")
        )
        verdicts.append(f"{at}: every row answered exactly once in every run: {once}")
    return verdicts


def print_breakdown(latency: float, workers: int, med: dict[str, float]) -> None:
    """Where one request's time goes: `workers / req/s` of each client (timed sections, so each
    client's fixed costs are spread over its requests) stacked from the sleep upwards."""
    per = {name: workers / rps * 1e3 for name, rps in med.items()}
    rows = [
        ("the emulator's sleep (sync_latency_seconds)", latency * 1e3),
        (
            "+ minimal asyncio server, loopback, timers, scheduling",
            per["floor-min"] - latency * 1e3,
        ),
        ("+ the emulator's own handling of a call", per["floor"] - per["floor-min"]),
        ("+ batchops' client (incl. its run's fixed costs)", per["batchops"] - per["floor"]),
        ("= batchops, per request", per["batchops"]),
    ]
    if "baseline" in per:
        rows.append(("  (the baseline's client over the floor)", per["baseline"] - per["floor"]))
    print(f"where a request's time goes ({workers} in flight, ms = {workers} / median req/s):")
    for what, ms in rows:
        print(f"  {what:56s} {ms:6.2f} ms")
    print(f"batchops: {med['batchops'] / med['floor']:.0%} of the transport floor (floor client)")


if __name__ == "__main__":
    main()
