"""A run directory: where a run keeps its database, chunk files, downloads and merged output.

<run-dir>/state.db            the run's state (store.py)
<run-dir>/run.json            marker written once the run exists: a run dir with it (or with chunk
                              files) and an empty database lost its database or journal: refused
<run-dir>/.lock               held by the one process writing the run (runlock.py)
<run-dir>/inputs/             JSONL chunk files as uploaded
<run-dir>/outputs/, errors/   output and error files as downloaded
<run-dir>/final_output.csv    the merged table (.parquet / .jsonl for such sources)
<run-dir>/missing_rows.csv    rows without an answer, with their reasons
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from batchops.errors import InputError, StateError
from batchops.runlock import LOCK_NAME, hold
from batchops.spec import JobSpec
from batchops.store import DB_NAME, SCHEMA_VERSION, Store

T = TypeVar("T")
MARKER = "run.json"
# What a killed atomic write leaves: .<name>.<pid>.<hex>.tmp (merge.py's _atomic_write).
_TEMP_RE = re.compile(r"^\.(.+)\.(\d+)\.[0-9a-f]+\.tmp$")

# Spec fields that define *what* is computed: a resumed run must not change them.
IDENTITY_FIELDS = (
    "source",
    "source_format",
    "id_column",
    "start_row",
    "end_row",
    "prompt",
    "system",
    "image_column",
    "image_dir",
    "image_detail",
    "endpoint",
    "max_tokens",
    "temperature",
    "body_extra",
    "schema_",
    "schema_name",
    "schema_strict",
)


@dataclass
class RunDir:
    path: Path
    store: Store
    spec: JobSpec
    run_id: str
    # The run dir's writer lock, held until close() (runlock.py); None when opened to read.
    lock: ExitStack | None = field(default=None, repr=False)

    @property
    def inputs(self) -> Path:
        return self.path / "inputs"

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"

    @property
    def errors(self) -> Path:
        return self.path / "errors"

    @property
    def final_output(self) -> Path:
        """The merged table, in the source's own format (CSV, Parquet or JSONL)."""
        ext = {"parquet": ".parquet", "jsonl": ".jsonl"}.get(self.spec.source_format, ".csv")
        return self.path / f"final_output{ext}"

    @property
    def missing_rows(self) -> Path:
        return self.path / "missing_rows.csv"

    def save_spec(self, spec: JobSpec) -> None:
        self.spec = spec
        self.store.set_meta("spec", spec.model_dump_json())

    def close(self) -> None:
        self.store.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def default_run_dir(source: str) -> Path:
    return Path("runs") / Path(source).stem


def start_over(path: Path, *, keep_backup: bool) -> Path | None:
    """--cleanup / --keep-latest: move the old run aside (or delete it) before a fresh start."""
    if not path.exists():
        return None
    # The run's lock file stays: the process starting over holds it (see runlock.py).
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME]
    if keep_backup:
        # Exactly one backup is kept, the newest: older ones of this run dir are removed.
        for old in path.parent.glob(f"{path.name}.backup-*"):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.name}.backup-{stamp}")
        backup.mkdir()
        for p in entries:
            p.rename(backup / p.name)
        return backup
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return None


def create_or_resume(path: Path, spec: JobSpec) -> tuple[RunDir, bool]:
    """Open the run in `path`, creating it for `spec`; returns (run, resumed).

    Resuming with a different job (prompt, source, ...) is refused: it would mix answers of two
    jobs in one table. Operational settings (models, poll interval, retries, budget) may change.
    The run dir's writer lock is held until `run.close()` (so the Python API has it too; the
    CLI already holds it, and the lock is re-entrant within a process).
    """
    return _locked(path, True, lambda: _create_or_resume(path, spec))


def _locked(path: Path, create: bool, opener: Callable[[], T]) -> T:
    lock = ExitStack()
    lock.enter_context(hold(path, create=create))
    try:
        result = opener()
    except BaseException:
        lock.close()
        raise
    run = result[0] if isinstance(result, tuple) else result
    assert isinstance(run, RunDir)
    run.lock = lock
    return result


def _create_or_resume(path: Path, spec: JobSpec) -> tuple[RunDir, bool]:
    clean_stale_temps(path)
    evidence = _run_evidence(path)
    store = _open_store(path)
    saved = store.get_meta("spec")
    if saved is None:
        if evidence:
            store.close()
            raise _lost_database(path, evidence)
        run_id = f"run_{uuid.uuid4().hex[:12]}"
        store.set_meta("run_id", run_id)
        store.set_meta("created_at", str(time.time()))
        run = RunDir(path, store, spec, run_id)
        run.save_spec(spec)
        write_marker(path, run_id)  # after the spec: a crash before it leaves a resumable run
        return run, False
    _check_marker(path, store)
    old = JobSpec.model_validate_json(saved)
    changed = [f for f in IDENTITY_FIELDS if getattr(old, f) != getattr(spec, f)]
    if _widens(old, spec):  # a trial slice extended: its answers are reused
        changed = [f for f in changed if f not in ("start_row", "end_row")]
    if changed:
        store.close()
        raise InputError(
            f"{path}: holds a run of a different job ({', '.join(changed)} differ); "
            "use --cleanup or --keep-latest to start over, or another --run-dir"
        )
    run = RunDir(path, store, spec, store.get_meta("run_id") or "run_unknown")
    run.save_spec(spec)
    if not (path / MARKER).exists():
        write_marker(path, run.run_id)  # a run made before the marker existed
    return run, True


def _widens(old: JobSpec, new: JobSpec) -> bool:
    """Whether the new row slice contains the old one (rows answered stay answered)."""
    inf = float("inf")
    return (new.start_row or 0) <= (old.start_row or 0) and (
        inf if new.end_row is None else new.end_row
    ) >= (inf if old.end_row is None else old.end_row)


def open_existing(path: Path, *, write: bool = False) -> RunDir:
    """Open a run for any command but `run`; a read-only run dir is opened read-only.

    `write`: the caller changes the run (retry-missing, merge, cancel, watch): hold the run
    dir's writer lock until `close()`; another process holding it is RunLocked (exit 2)."""
    if write:
        return _locked(path, False, lambda: _open_existing(path))
    return _open_existing(path)


def _open_existing(path: Path) -> RunDir:
    evidence = _run_evidence(path)
    if not (path / DB_NAME).exists() and evidence:
        raise _lost_database(path, evidence)
    with suppress(OSError):  # a read-only run dir: nothing to clean, and reading still works
        clean_stale_temps(path)
    try:
        store = _open_store(path, create=False)
    except UnwritableDatabase:
        store = _open_read_only(path)
    saved = store.get_meta("spec")
    if saved is None:
        store.close()
        if evidence:
            raise _lost_database(path, evidence)
        raise StateError(
            f"{path}: the run database has no job spec; start the run again with `batchops run`"
        )
    _check_marker(path, store)
    return RunDir(
        path, store, JobSpec.model_validate_json(saved), store.get_meta("run_id") or "run_unknown"
    )


def write_marker(path: Path, run_id: str) -> None:
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(
        json.dumps({"run_id": run_id, "created_at": time.time()}) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path / MARKER)


def _run_evidence(path: Path) -> list[str]:
    """What shows that a run already lives here (so an empty database means a lost one)."""
    found = []
    if (path / MARKER).exists():
        found.append(MARKER)
    for sub in ("inputs", "outputs", "errors"):
        d = path / sub
        if d.is_dir() and any(d.iterdir()):
            found.append(f"{sub}/")
    return found


def _lost_database(path: Path, evidence: list[str]) -> StateError:
    db = path / DB_NAME
    what = "is missing" if not db.exists() else "is empty"
    return StateError(
        f"{db}: {what} but {path} holds a run ({', '.join(evidence)}); its database or journal "
        f"({DB_NAME}-wal) was deleted. Restore {DB_NAME} together with {DB_NAME}-wal, or start "
        "over with --cleanup (rows already paid for would be sent again); nothing was sent"
    )


def _check_marker(path: Path, store: Store) -> None:
    """The database must be the one the run was created with (not a stale copy of another)."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no marker (an older run) or unreadable: nothing to compare with
    run_id = store.get_meta("run_id")
    if isinstance(marker, dict) and marker.get("run_id") not in (None, run_id):
        store.close()
        raise StateError(
            f"{path / DB_NAME}: belongs to run {run_id}, but {path / MARKER} names run "
            f"{marker.get('run_id')}; the database was replaced. Restore the run's own "
            f"{DB_NAME} (with {DB_NAME}-wal), or start over with --cleanup; nothing was sent"
        )


class UnwritableDatabase(StateError):
    """The database (or its run dir) cannot be written: exit 2; reading commands open it read-only."""


def _open_store(path: Path, *, create: bool = True) -> Store:
    """Store.open, with a corrupt or unusable database as one StateError naming the file."""
    try:
        return Store.open(path, create=create)
    except sqlite3.DatabaseError as exc:
        raise _db_error(path / DB_NAME, exc) from None


def _db_error(db: Path, exc: sqlite3.DatabaseError) -> StateError:
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and (
        "readonly" in text or "unable to open" in text
    ):
        return UnwritableDatabase(
            f"{db}: cannot open the run's database for writing ({text}); the run dir must be "
            "writable for this command (`batchops status` can still read it)"
        )
    return StateError(
        f"{db}: not a usable SQLite database ({text}); it is corrupt. Restore it (with "
        f"{DB_NAME}-wal) from a backup, or start over with --cleanup; nothing was sent"
    )


def _open_read_only(path: Path) -> Store:
    """A run dir we may not write to: read its database without creating -wal/-shm files."""
    db = path / DB_NAME
    wal = path / f"{DB_NAME}-wal"
    # Committed changes still in the journal: read through it; else (closed cleanly) the main
    # file is the whole database and nothing needs to be created beside it.
    mode = "ro" if wal.exists() and wal.stat().st_size > 0 else "ro&immutable=1"
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode={mode}", uri=True)
        conn.row_factory = sqlite3.Row
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StateError(
            f"{db}: the run dir is read-only and its database cannot be read ({exc}); "
            "make the run dir writable"
        ) from None
    if version != SCHEMA_VERSION:
        conn.close()
        raise StateError(f"{db}: read-only, with schema {version} (expected {SCHEMA_VERSION})")
    return Store(conn, db)


def clean_stale_temps(path: Path) -> list[Path]:
    """Remove what killed atomic writes left (e.g. `.final_output.csv.<pid>.<hex>.tmp`, up to
    the size of the table); a file of a process that is still alive is kept."""
    removed: list[Path] = []
    if not path.is_dir():
        return removed
    for p in path.glob(".*.tmp"):
        m = _TEMP_RE.match(p.name)
        if m and not _alive(int(m.group(2))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call in this process: not being written now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
