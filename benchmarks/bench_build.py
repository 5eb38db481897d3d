"""How fast is the request builder? One table: the copy floor, the naive per-row builder, and
batchops' columnar build_chunks (rows/s and peak RSS), plus a run with small images.

    python benchmarks/bench_build.py                 # 1,000,000 text rows, 10,000 image rows
    python benchmarks/bench_build.py --rows 200000   # quicker

Baselines, both measured on the full row count (not extrapolated): the seed scripts' pandas
iterrows builder, and a plain Python one (csv module + json.dumps), the fair per-row reference.

Data is generated once (seeded) under benchmarks/_data/ (git-ignored) and reused. Every
measurement of the library runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own.
The functions are importable for other benchmarks (e.g. a whole-process `batchops run --dry-run`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "_data"
PROMPT = "Describe {name} ({category}), price {price}: {description}"
MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"

_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "lamp",
    "chair",
    "table",
    "steel",
    "oak",
    "blue",
    "red",
    "green",
    "small",
    "large",
    "vintage",
    "modern",
    "soft",
    "hard",
    "light",
    "heavy",
    "round",
    "square",
    "woven",
    "polished",
    "matte",
    "glossy",
    "猫",
    "café",
    "naïve",
    "😀",
]


# ------------------------------------------------------------------------------------ data


def text_csv(n_rows: int, seed: int = 42) -> Path:
    """A seeded product table (~100 bytes a row): quotes, commas, a line break every 97th row,
    non-ASCII, empty cells. Generated once per (n_rows, seed)."""
    path = DATA / f"text_{n_rows}_{seed}.csv"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "name", "category", "price", "description"])
        for i in range(n_rows):
            desc = " ".join(rng.choices(_WORDS, k=rng.randint(8, 16)))
            if i % 50 == 0:
                desc += ', with "quotes"'
            if i % 97 == 0:
                desc += "\nsecond line"
            writer.writerow(
                [
                    f"p{i:07d}",
                    " ".join(rng.choices(_WORDS, k=2)).title(),
                    rng.choice(["home", "garden", "tools", ""]),
                    f"{rng.randint(0, 99999) / 100:.2f}",
                    desc,
                ]
            )
    tmp.replace(path)
    return path


def image_csv(n_rows: int, n_images: int = 20, seed: int = 7) -> tuple[Path, Path]:
    """A table whose every row names one of `n_images` small noisy PNGs (~3 KB each)."""
    base = DATA / f"images_{n_rows}_{seed}"
    path, images = base / "table.csv", base / "images"
    if path.exists():
        return path, images
    images.mkdir(parents=True, exist_ok=True)
    png_bytes = _load_sample_maker().png_bytes
    rng = random.Random(seed)
    for k in range(n_images):
        noise = [
            [tuple(rng.randrange(256) for _ in range(3)) for _ in range(32)] for _ in range(32)
        ]
        (images / f"img_{k:03d}.png").write_bytes(png_bytes(32, 32, lambda x, y, n=noise: n[y][x]))
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "name", "image"])
        for i in range(n_rows):
            writer.writerow([f"i{i:06d}", f"item {i}", f"img_{i % n_images:03d}.png"])
    return path, images


def _load_sample_maker():
    spec = importlib.util.spec_from_file_location(
        "make_sample", ROOT / "data" / "sample" / "make_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- measurements


def measure_floor(path: Path, n_rows: int) -> dict:
    """Read the CSV and write the same bytes: no builder can beat this."""
    out = DATA / "floor.out"
    start = time.perf_counter()
    with path.open("rb") as src, out.open("wb") as dst:
        while block := src.read(8 << 20):
            dst.write(block)
    seconds = time.perf_counter() - start
    out.unlink()
    return {"rows": n_rows, "seconds": seconds}


def measure_naive(path: Path, n_rows: int | None = None) -> dict:
    """What the seed scripts do: pandas iterrows + str.format + json.dumps per row."""
    import pandas as pd

    out = DATA / "naive.jsonl"
    start = time.perf_counter()
    df = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=n_rows)
    with out.open("w", encoding="utf-8") as fh:
        for _, row in df.iterrows():
            body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT.format(**row)}]}
            line = {"custom_id": row["id"], "method": "POST", "url": ENDPOINT, "body": body}
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    seconds = time.perf_counter() - start
    out.unlink()
    return {"rows": len(df), "seconds": seconds}


def measure_plain(path: Path, n_rows: int | None = None) -> dict:
    """A fair plain-Python builder: the csv module + str.format + json.dumps per row (no pandas).
    The per-row loop a careful user would write without any library."""
    out = DATA / "plain.jsonl"
    rows = 0
    start = time.perf_counter()
    with (
        path.open(encoding="utf-8", newline="") as src,
        out.open("w", encoding="utf-8") as fh,
    ):
        dumps, fmt, write = json.dumps, PROMPT.format, fh.write
        for row in csv.DictReader(src):
            if n_rows is not None and rows >= n_rows:
                break
            body = {"model": MODEL, "messages": [{"role": "user", "content": fmt(**row)}]}
            line = {"custom_id": row["id"], "method": "POST", "url": ENDPOINT, "body": body}
            write(dumps(line, ensure_ascii=False) + "\n")
            rows += 1
    seconds = time.perf_counter() - start
    out.unlink()
    return {"rows": rows, "seconds": seconds}


def measure_build(
    path: Path,
    *,
    batch_size: int = 50_000,
    prompt: str = PROMPT,
    id_column: str | None = "id",
    image_column: str | None = None,
    image_dir: Path | None = None,
    fsync: bool = True,
) -> dict:
    """open_source + build_chunks in this process, timed separately; output removed afterwards."""
    from batchops.chunking import build_chunks
    from batchops.source import open_source
    from batchops.spec import JobSpec

    spec = JobSpec(
        source=str(path),
        id_column=id_column,
        prompt=prompt,
        image_column=image_column,
        image_dir=str(image_dir) if image_dir else None,
        models=[{"name": MODEL}],
        batch_size=batch_size,
    )
    out = DATA / "build_out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    source = open_source(spec)
    t1 = time.perf_counter()
    rows = files = n_bytes = skipped = 0
    for chunk in build_chunks(
        source, spec, model=MODEL, out_dir=out, first_chunk_no=0, fsync=fsync
    ):
        rows += len(chunk.row_idxs)
        skipped += len(chunk.skipped)
        files += 1
        n_bytes += chunk.n_bytes
    t2 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    return {
        "rows": rows,
        "skipped": skipped,
        "files": files,
        "bytes": n_bytes,
        "open_seconds": t1 - t0,
        "seconds": t2 - t1,
    }


WORKERS = {
    "floor": measure_floor,
    "naive": measure_naive,
    "plain": measure_plain,
    "build": measure_build,
}


def run_isolated(worker: str, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter; adds its peak RSS in MiB."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        "--kwargs",
        json.dumps(kwargs, default=str),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:  # show why: the child's own error, not only its exit code
        raise RuntimeError(
            f"{worker} measurement failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker_main(worker: str, kwargs: dict) -> None:
    for key in ("path", "image_dir"):
        if kwargs.get(key):
            kwargs[key] = Path(kwargs[key])
    result = WORKERS[worker](**kwargs)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


# -------------------------------------------------------------------------------- report


def _row(label: str, rows: int, seconds: float, rss: float | None, note: str = "") -> str:
    rss_s = f"{rss:,.0f}" if rss is not None else "–"
    return f"| {label} | {rows:,} | {seconds:,.2f} | {rows / seconds:,.0f} | {rss_s} | {note} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--naive-rows", type=int, default=None, help="rows for the per-row baselines [all]"
    )
    parser.add_argument("--image-rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker_main(args.worker, json.loads(args.kwargs))
        return

    # Keep this process lean: a child inherits its peak RSS across fork + exec.
    path = text_csv(args.rows, args.seed)
    builds = [run_isolated("build", path=str(path), fsync=fsync) for fsync in (True, False)]
    n_rows = builds[0]["rows"]
    size_mb = path.stat().st_size / 1e6
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cores: {cores}   text table: {path.name}, {n_rows:,} rows, {size_mb:.0f} MB\n")
    print("| way of building the JSONL | rows | seconds | rows/s | peak RSS MiB | note |")
    print("|---|---:|---:|---:|---:|---|")

    floor = measure_floor(path, n_rows)
    print(_row("(a) floor: read the CSV + write the same bytes", n_rows, floor["seconds"], None))

    for worker, label in (
        ("naive", "(b) naive, seed-style: pandas iterrows + json.dumps per row"),
        ("plain", "(b') plain Python: csv module + json.dumps per row"),
    ):
        base = run_isolated(worker, path=str(path), n_rows=args.naive_rows)
        print(_row(label, base["rows"], base["seconds"], base["peak_rss_mib"], "measured"))

    for fsync, built in zip((True, False), builds, strict=True):
        mb = built["bytes"] / 1e6
        note = f"{built['files']} files, {mb:,.0f} MB; fsync {'on' if fsync else 'off'}"
        print(
            _row(
                "(c) build_chunks, batch_size 50,000",
                built["rows"],
                built["seconds"],
                built["peak_rss_mib"],
                note,
            )
        )
        print(
            _row(
                "(c') open_source (validation pass) + build_chunks",
                built["rows"],
                built["open_seconds"] + built["seconds"],
                built["peak_rss_mib"],
                f"open_source alone {built['open_seconds']:.2f} s",
            )
        )

    img_path, img_dir = image_csv(args.image_rows)
    built = run_isolated(
        "build",
        path=str(img_path),
        prompt="What is in the picture of {name}?",
        image_column="image",
        image_dir=str(img_dir),
    )
    print(
        _row(
            "(d) build_chunks with one ~3 KB PNG per row",
            built["rows"],
            built["seconds"],
            built["peak_rss_mib"],
            f"{built['files']} file(s), {built['bytes'] / 1e6:,.0f} MB, {built['skipped']} skipped",
        )
    )


if __name__ == "__main__":
    main()
