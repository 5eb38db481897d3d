"""The Python API over DataFrames: `batchops.run(df, …)` and its notebook progress."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from batchops import merge as merging
from batchops.config import build_spec
from batchops.driver import merge, run_job
from batchops.errors import InputError, RunIncomplete
from batchops.rundir import start_over
from batchops.spec import JobSpec
from batchops.summaries import Estimate

if TYPE_CHECKING:  # openai and pandas take ~1 s to import; a dry run needs neither
    import pandas as pd

    from batchops.engine import Progress

# The Python API polls more often than the CLI (30 s): a notebook job is usually small, and a
# cell that says nothing for half a minute looks hung.
API_POLL_INTERVAL = 5.0


def run(
    data: pd.DataFrame | str | Path,
    *,
    prompt: str,
    model: str | Sequence[str],
    run_dir: str | Path,
    id_column: str | None = None,
    schema: Any = None,
    progress: bool | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Run a table through the model(s); return it with the merged columns.

    `data`: a pandas DataFrame, or the path of a CSV / Parquet / JSONL file. `schema`: a
    pydantic model class (or a JSON Schema dict) for structured outputs: each answer is
    validated and its fields come back as typed columns. Other keywords mirror the `run`
    options in snake_case (mode, system, batch_size, poll_interval, max_retries, endpoint,
    body_extra, schema_prefix, base_url, cleanup, wait, dedup, …); poll_interval defaults to 5
    s here. `dedup=False`: rows with identical requests are each sent (default: sent once).

    `progress`: show the estimate and a progress display (a live one in Jupyter with
    ipywidgets, else a line on stderr when something changed) [default: in a notebook or on a
    terminal]. Errors name the keyword arguments (`prompt=`), not the CLI's flags.

    A DataFrame comes back as itself (same index, same dtypes) with the merged columns added;
    it is saved as <run_dir>/source.parquet, so values and types round-trip. The run directory
    is durable: calling again with the same arguments (e.g. after a kernel restart) resumes
    instead of paying twice.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    run_keys = {"dry_run", "wait", "api_key_file", "base_url"}
    cleanup, keep_latest = options.pop("cleanup", False), options.pop("keep_latest", False)
    if options.get("poll_interval") is None:
        options["poll_interval"] = API_POLL_INTERVAL
    if cleanup or keep_latest:
        # Before the frame is written: starting over moves the whole run dir aside.
        backup = start_over(run_dir, keep_backup=bool(keep_latest))
        if backup:
            logger.info("previous run kept as {}", backup)
    frame: pd.DataFrame | None = None
    created: list[Path] = []  # what this call wrote before the job could be checked
    if isinstance(data, pd.DataFrame):
        frame = data
        folder = run_dir
        while not folder.exists():  # every folder _save_frame is about to create, innermost first
            created.append(folder)
            folder = folder.parent
        saved = run_dir / FRAME_SOURCE
        existed = saved.exists()
        source_path = str(_save_frame(data, run_dir))
        if not existed:
            created.insert(0, saved)
    else:
        source_path = str(data)
    models = [model] if isinstance(model, str) else list(model)
    try:
        spec = build_spec(
            source_path=source_path,
            prompt=prompt,
            models=models,
            id_column=id_column,
            schema=schema,
            **{k: v for k, v in options.items() if k not in run_keys},
        )
        with _api_progress(progress) as (on_estimate, on_progress):
            report = run_job(
                spec,
                run_dir,
                on_estimate=on_estimate,
                on_progress=on_progress,
                **{k: v for k, v in options.items() if k in run_keys},
            )
    except InputError as exc:
        if not (run_dir / "state.db").exists():  # no run started: leave nothing behind
            for path in created:
                if path.is_dir():
                    shutil.rmtree(path / "dry-run", ignore_errors=True)
                    _rmdir_if_empty(path)
                else:
                    path.unlink(missing_ok=True)
        shown = "the DataFrame" if frame is not None else None
        raise type(exc)(_as_keywords(str(exc), source_path, shown)) from None
    if report.final_output is None:
        raise RunIncomplete(f"{run_dir}: run not finished ({report.summary()})")
    out = report.final_output
    if merging.format_of(out) != "parquet":  # typed merged columns for the returned frame
        out = merge(run_dir, run_dir / "final_output.parquet")
    return _result_frame(out, frame)


def _rmdir_if_empty(path: Path) -> None:
    with suppress(OSError):
        path.rmdir()


_KEYWORDS = {
    *("model", "schema", "base_url", "api_key_file", "cleanup", "keep_latest", "wait"),
    *("max_retries", "retry_delay", "retry_backoff", "retry_max_delay", "retry_on"),
}


def _as_keywords(message: str, source_path: str, shown_source: str | None) -> str:
    """An error written for the CLI, in the Python API's words: `--batch-size` → `batch_size=`,
    `--csv`/`--input` → `data`, and the saved frame's path → "the DataFrame"."""
    import re

    known = set(JobSpec.model_fields) | _KEYWORDS

    def keyword(m: re.Match[str]) -> str:
        name = m.group(1).replace("-", "_")
        if name in ("csv", "input"):
            return "data"
        if name == "models":
            name = "model"
        return f"{name}=" if name in known else m.group(0)

    text = re.sub(r"--([a-z][a-z0-9-]*)", keyword, message)
    text = re.sub(r"(\w=)(?=[\s:;,)]|$)", "\\1…", text)  # "prompt=…: placeholder {x} …"
    if shown_source:
        text = text.replace(source_path, shown_source)
    return text


class _PrintedProgress:
    """The Python API's progress: the estimate line, then a live display in Jupyter (with
    ipywidgets) or plain lines on stderr; the library's logger stays off."""

    def __init__(self) -> None:
        import sys

        from batchops.progress import ProgressDisplay, make_console

        console = make_console()
        live = console.is_jupyter and _has_ipywidgets()
        self._stream = sys.stderr
        self.display = ProgressDisplay(console, live=live, emit=self._print)

    def _print(self, line: str) -> None:
        print(f"batchops: {line}", file=self._stream, flush=True)

    def estimate(self, est: Estimate) -> None:
        from batchops.progress import fmt_usd

        cost = fmt_usd(est.cost_usd) if est.cost_usd is not None else "unknown (no price)"
        self._print(f"estimate: {est.rows} rows, ~{est.prompt_tokens} prompt tokens, cost ≈ {cost}")


def _has_ipywidgets() -> bool:
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


@contextmanager
def _api_progress(
    progress: bool | None,
) -> Iterator[tuple[Callable[[Estimate], None] | None, Callable[[Progress], None] | None]]:
    if progress is None:  # on where a person watches: a notebook or a terminal
        import sys

        from batchops.progress import make_console

        progress = make_console().is_jupyter or sys.stderr.isatty()
    if not progress:
        yield None, None
        return
    printed = _PrintedProgress()
    with printed.display as display:
        yield printed.estimate, display


FRAME_SOURCE = "source.parquet"


def _save_frame(df: pd.DataFrame, run_dir: Path) -> Path:
    """Write the DataFrame as <run_dir>/source.parquet, unless the same bytes are there already
    (a resumed run must find its source unchanged). A different frame in a run dir that already
    holds a run is refused: its rows' answers would be joined onto other rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [str(c) for c in df.columns]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"DataFrame has duplicate column names: {dup}")
    arrays = []
    for name in df.columns:
        col = df[name]
        try:
            arrays.append(pa.array(col, from_pandas=True))
        except (pa.ArrowException, TypeError, ValueError):  # mixed objects: their text
            arrays.append(pa.array([None if _isna(v) else str(v) for v in col], pa.string()))
    table = pa.Table.from_arrays(arrays, names=names)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FRAME_SOURCE
    tmp = run_dir / f".{FRAME_SOURCE}.{os.getpid()}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
        return path
    if path.exists() and (run_dir / "state.db").exists():
        tmp.unlink()
        raise InputError(
            f"{run_dir}: holds a run of a different DataFrame; pass cleanup=True (or "
            "keep_latest=True) to start over, or use another run_dir"
        )
    os.replace(tmp, path)
    return path


def _isna(v: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(v))  # None, NaN, NaT, pd.NA
    except (TypeError, ValueError):  # list-likes are values, not missing
        return False


def _result_frame(path: Path, frame: pd.DataFrame | None) -> pd.DataFrame:
    """The merged Parquet as pandas; for a DataFrame input, that frame plus the added columns
    (its own index and dtypes; counts as nullable Int64 since failed rows have none)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    mapper = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get
    if frame is None:
        return table.to_pandas(types_mapper=mapper)
    added = table.select(table.column_names[frame.shape[1] :]).to_pandas(types_mapper=mapper)
    out = pd.concat([frame.reset_index(drop=True), added], axis=1)
    out.index = frame.index
    return out
