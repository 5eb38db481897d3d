"""Identical requests are sent once: requests saved and the merged output with and without dedup.

    python benchmarks/bench_dedup.py                 # 10,000 rows, 30% of them duplicates
    python benchmarks/bench_dedup.py --rows 2000     # quicker

The table is bench_build's seeded product table of 70% of the rows, plus 30% rows that repeat
an earlier row's cells under ids of their own (so their requests are byte-identical), shuffled
with a fixed seed. The real CLI runs it twice against the emulator (a thread of this process,
localhost): as is, and with `--no-dedup`. The emulator counts the request lines it received;
the two merged outputs are compared cell by cell, apart from the billed columns (a duplicate's
cost and tokens are 0: its leader paid) and batch ids (each run's own).
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_build import DATA, text_csv  # noqa: E402
from bench_drain import run_cli  # noqa: E402
from run_all import Figure, cores, markdown_table, write_json  # noqa: E402

from batchops.emulator import EmulatorServer  # noqa: E402

SHARE = 0.3  # of the rows repeat an earlier row's request
BILLED = ("cost_usd", "prompt_tokens", "completion_tokens", "batch_id")
FAST = {"validating_seconds": 0.05, "in_progress_seconds": 0.2, "finalizing_seconds": 0.05}


def duplicated_csv(n_rows: int, seed: int = 7) -> Path:
    """n_rows rows of which round(n_rows × SHARE) repeat an earlier unique row's cells."""
    path = DATA / f"dedup_{n_rows}_{seed}.csv"
    if path.exists():
        return path
    n_dup = round(n_rows * SHARE)
    with text_csv(n_rows - n_dup).open(newline="", encoding="utf-8") as fh:
        header, *unique = list(csv.reader(fh))
    rnd = random.Random(seed)
    id_col = header.index("id")
    repeats = []
    for k in range(n_dup):
        row = list(rnd.choice(unique))
        row[id_col] = f"dup{k:07d}"
        repeats.append(row)
    rows = unique + repeats
    rnd.shuffle(rows)
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def one_run(csv_path: Path, work: Path, *extra: str) -> dict[str, Any]:
    run_dir = work / "run"
    with EmulatorServer(scenario=FAST) as emu:
        code, t0, t1 = run_cli(csv_path, run_dir, emu.base_url, 2_000, 0.05, *extra)
        requests = emu.stats()["requests"]
    with (run_dir / "final_output.csv").open(newline="", encoding="utf-8") as fh:
        merged = list(csv.DictReader(fh))
    return {"code": code, "sent": len(requests), "merged": merged, "seconds": t1 - t0}


def measure(n_rows: int = 10_000) -> dict[str, Any]:
    csv_path = duplicated_csv(n_rows)
    with tempfile.TemporaryDirectory(prefix="bench_dedup_") as tmp:
        on = one_run(csv_path, Path(tmp) / "on")
        off = one_run(csv_path, Path(tmp) / "off", "--no-dedup")
        shutil.rmtree(tmp, ignore_errors=True)
    unbilled = [
        [{k: v for k, v in r.items() if k not in BILLED} for r in run["merged"]]
        for run in (on, off)
    ]
    cost = [sum(float(r["cost_usd"] or 0) for r in run["merged"]) for run in (on, off)]
    return {
        "rows": n_rows,
        "duplicates": round(n_rows * SHARE),
        "codes": (on["code"], off["code"]),
        "sent": (on["sent"], off["sent"]),
        "merged_rows": (len(on["merged"]), len(off["merged"])),
        "same_unbilled": unbilled[0] == unbilled[1],
        "cost": cost,
    }


def figures(n_rows: int = 10_000) -> list[Figure]:
    m = measure(n_rows)
    on, off = m["sent"]
    ran = m["codes"] == (0, 0) and m["merged_rows"] == (n_rows, n_rows)
    saved = 1 - on / off if off else 0.0
    share = m["duplicates"] / n_rows
    return [
        Figure(
            "dedup",
            f"requests sent, {n_rows:,} rows of which {share:.0%} repeat an earlier row",
            f"{on:,} ({saved:.1%} fewer)",
            baseline=f"--no-dedup {off:,}",
            target=f"{share:.0%} fewer",
            met=ran and off == n_rows and on == n_rows - m["duplicates"],
            note="" if ran else f"a run failed: exit codes {m['codes']}",
            ideal=f"{n_rows - m['duplicates']:,} (one a distinct request)",
        ),
        Figure(
            "dedup",
            "merged output with dedup vs without",
            "the same in every cell" if m["same_unbilled"] else "DIFFERENT",
            target="the same apart from cost",
            met=ran and m["same_unbilled"],
            note=f"compared without the billed columns ({', '.join(BILLED)}): a duplicate's "
            f"cost and tokens are 0, its leader paid; cost ${m['cost'][0]:.4f} with dedup, "
            f"${m['cost'][1]:.4f} without",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    figs = figures(args.rows)
    print(f"cores: {cores()}\n")
    print(markdown_table(figs, with_part=False))
    write_json(figs, args.json)


if __name__ == "__main__":
    main()
