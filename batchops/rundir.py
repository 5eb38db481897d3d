"""A run directory: where a run keeps its database, chunk files, downloads and merged output.

<run-dir>/state.db            the run's state (store.py)
<run-dir>/inputs/             JSONL chunk files as uploaded
<run-dir>/outputs/, errors/   output and error files as downloaded
<run-dir>/final_output.csv    the merged table (.parquet / .jsonl for such sources)
<run-dir>/missing_rows.csv    rows without an answer, with their reasons
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from batchops.errors import InputError, StateError
from batchops.runlock import LOCK_NAME
from batchops.spec import JobSpec
from batchops.store import Store

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


def default_run_dir(source: str) -> Path:
    return Path("runs") / Path(source).stem


def start_over(path: Path, *, keep_backup: bool) -> Path | None:
    """--cleanup / --keep-latest: move the old run aside (or delete it) before a fresh start."""
    if not path.exists():
        return None
    # The run's lock file stays: the process starting over holds it (see runlock.py).
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME]
    if keep_backup:
        backup = path.with_name(f"{path.name}.backup-{time.strftime('%Y%m%d-%H%M%S')}")
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
    """
    store = Store.open(path)
    saved = store.get_meta("spec")
    if saved is None:
        run_id = f"run_{uuid.uuid4().hex[:12]}"
        store.set_meta("run_id", run_id)
        store.set_meta("created_at", str(time.time()))
        run = RunDir(path, store, spec, run_id)
        run.save_spec(spec)
        return run, False
    old = JobSpec.model_validate_json(saved)
    changed = [f for f in IDENTITY_FIELDS if getattr(old, f) != getattr(spec, f)]
    if changed:
        store.close()
        raise InputError(
            f"{path}: holds a run of a different job ({', '.join(changed)} differ); "
            "use --cleanup or --keep-latest to start over, or another --run-dir"
        )
    run = RunDir(path, store, spec, store.get_meta("run_id") or "run_unknown")
    run.save_spec(spec)
    return run, True


def open_existing(path: Path) -> RunDir:
    store = Store.open(path, create=False)
    saved = store.get_meta("spec")
    if saved is None:
        store.close()
        raise StateError(
            f"{path}: the run database has no job spec; start the run again with `batchops run`"
        )
    return RunDir(
        path, store, JobSpec.model_validate_json(saved), store.get_meta("run_id") or "run_unknown"
    )
