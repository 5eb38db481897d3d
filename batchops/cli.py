"""The command line: parse, call batchops.api, print, exit. No job logic lives here.

Exit codes: 0 every row succeeded (or, with --no-wait, every chunk was submitted); 2 bad input
or usage (one line, nothing uploaded); 3 the run ended with rows still missing; 130 interrupted
(state saved).
"""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import signal
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext, suppress
from functools import wraps
from importlib import resources
from pathlib import Path
from typing import Any

# Importing and defining the commands makes ~300k objects and no garbage: collecting during
# it cost ~50 ms of every command's start. They are frozen at the end (never scanned again).
gc.disable()
import click
from loguru import logger
from rich.console import Console

from batchops import __version__, api, runlock, validate
from batchops import logs as logsetup
from batchops import merge as merging
from batchops.config import load_config
from batchops.errors import BatchopsError, InputError
from batchops.pricing import UnknownPriceWarning
from batchops.progress import (
    ProgressDisplay,
    fmt_duration,
    fmt_usd,
    make_console,
    status_view,
    strip_control,
)
from batchops.rundir import default_run_dir
from batchops.states import StopReason

EXAMPLE_RUN = """\b
Example:
  batchops run --csv products.csv --id-column sku \\
      --prompt "Describe {name} in one line." --model gpt-4o-mini --model gpt-4.1-mini
"""


def _examples(*lines: str) -> str:
    """An epilog click prints as written (\\b keeps its line breaks)."""
    return (
        "\b\nExample"
        + ("s" if len(lines) > 1 else "")
        + ":\n"
        + "\n".join(f"  {ln}" for ln in lines)
    )


_STARTED = time.monotonic()


def _start_logging(log_dir: Path, verbosity: int) -> Console:
    """Log lines and the progress display share one rich Console (stderr), so log lines print
    above the live bar instead of tearing it."""
    global _STARTED
    _STARTED = time.monotonic()
    # The price warning is a log line here; a library user gets it as a Python warning instead.
    warnings.filterwarnings("ignore", category=UnknownPriceWarning)
    console = make_console()
    logsetup.configure(log_dir, verbosity, console=console)
    return console


def _display(console: Console, verbosity: int) -> ProgressDisplay:
    # -q: no live display; the plain progress lines are INFO logs, which -q hides as well.
    return ProgressDisplay(console, live=False if verbosity < 0 else None)


class PositiveSeconds(click.ParamType):  # type: ignore[type-arg]
    """A finite number of seconds above 0: `inf`, `nan` and negatives are usage errors (exit 2),
    found before anything is sent (an infinite poll interval crashed after submitting)."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"{value!r}: give a finite number of seconds above 0", param, ctx)
        return number


SECONDS = PositiveSeconds()


def _fail(message: str, code: int) -> None:
    click.echo(f"batchops: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map batchops errors to exit codes with one line on stderr; never a traceback for them."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            failure = ("", 130)
        except BatchopsError as exc:
            failure = (logsetup.mask_secrets(str(exc)), exc.exit_code)
        except (OSError, sqlite3.OperationalError) as exc:
            environment = environment_error(exc)
            if environment is None:
                raise
            failure = (logsetup.mask_secrets(environment[0]), environment[1])
        # Outside the except block the traceback (and every frame it kept alive) is gone: collect
        # now, so half-read Arrow readers close their threads while Arrow still runs. Left to the
        # interpreter's teardown, one can abort the process (exit 134, pyarrow issue 34314).
        gc.collect()
        if failure[1] == 130:
            click.echo(
                "batchops: interrupted; state saved — run the same command again to resume",
                err=True,
            )
            sys.exit(130)
        _fail(*failure)

    return wrapper


def environment_error(exc: OSError | sqlite3.OperationalError) -> tuple[str, int] | None:
    """A full disk or a read-only place as (one line, exit code); None for anything else.

    Full disk → 3: the state is saved (every transition is a transaction) and the same command
    resumes once there is room, like any run that ended with rows missing. Read-only → 2: a usage
    problem to fix before running again."""
    if isinstance(exc, sqlite3.OperationalError):
        if "disk is full" in str(exc):
            return (
                "disk full while writing the run's database; state saved — free space and "
                "run the same command again",
                3,
            )
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}disk full ({exc.strerror}); state saved — free space and run the same "
            "command again",
            3,
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}cannot write ({exc.strerror}); the run dir must be writable", 2
    return None


def common_logging(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("-q", "--quiet", count=True, help="Less console output (-qq: errors only).")(
        fn
    )
    fn = click.option("-v", "--verbose", count=True, help="Debug output on the console.")(fn)
    fn = click.option(
        "--log-dir",
        type=click.Path(path_type=Path),
        default=Path("logs"),
        show_default=True,
        help="Folder for the DEBUG log file batch_execution_YYYYMMDD_HHMMSS.log.",
    )(fn)
    return fn


def csv_escape_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--csv-escape/--no-csv-escape",
        default=True,
        help="CSV output: prefix ' to added cells (response, error, model …) that start with "
        "= + - @ tab or CR, so a spreadsheet never runs them as formulas [escape]. Source "
        "columns, Parquet and JSONL are never changed.",
    )(fn)


# Issue 18: rows with byte-identical requests share one request (run and retry-missing).
dedup_option = click.option(
    "--dedup/--no-dedup",
    default=None,
    help="Send a request once for all rows whose request bodies are identical; each row "
    "still gets the answer (its cost and tokens on the first such row, 0 on the others) "
    "[dedup; toml: dedup = false].",
)


# Provider file stores are limited (Azure: 500 files a resource without expiry): a batch's
# files are deleted remotely once its results are recorded (the run dir keeps copies).
keep_files_option = click.option(
    "--keep-remote-files/--delete-remote-files",
    "keep_remote_files",
    default=None,
    help="Keep each batch's uploaded input file and its result files (and the batch itself, "
    "where the provider deletes batches) on the provider after its results are recorded (by "
    "default they are deleted then: the run dir keeps copies; files of a batch whose results "
    "came back short are always kept) "
    "[delete; toml: keep_remote_files = true].",
)


def run_dir_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--run-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="The run's directory [default: the only run under runs/].",
    )(fn)


# One definition for every command that ends a run's work (run, retry-missing, watch, monitor).
completion_threshold_option = click.option(
    "--completion-threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Exit 0 once at least this share of rows succeeded (the missing ones are listed) "
    "[the run's; 1.0].",
)


def key_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--base-url", default=None, help="API base URL [default: $OPENAI_BASE_URL or OpenAI]."
    )(fn)
    fn = click.option(
        "--api-key-file",
        type=click.Path(path_type=Path),
        default=None,
        help="File with one API key per line (a key pool); also $OPENAI_API_KEYS.",
    )(fn)
    return fn


def resolve_run_dir(run_dir: Path | None) -> Path:
    if run_dir is not None:
        return run_dir
    runs = sorted(p.parent for p in Path("runs").glob("*/state.db"))
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise InputError("no run found under runs/; give --run-dir")
    raise InputError(
        f"several runs under runs/ ({', '.join(str(r) for r in runs[:5])}); give --run-dir"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchops")
def cli() -> None:
    """Run large tables through the OpenAI Batch API (and compatible APIs), unattended.

    Every source row ends with exactly one answer or a stated reason, no row is paid for
    twice, and a crash at any moment loses nothing: run the same command again to resume.

    \b
    Exit codes:
      0    every row answered (run --no-wait: every chunk submitted; rows still missing)
      2    bad input, usage or config (one line on stderr; nothing uploaded)
      3    the run ended with rows still missing (`batchops missing` says why)
      130  interrupted (Ctrl+C or SIGTERM); state saved, run the same command to resume
    """


@cli.command(epilog=EXAMPLE_RUN)
@click.option(
    "--csv", "csv_path", type=click.Path(path_type=Path), help="Source table (UTF-8 CSV)."
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help="Source table: CSV, Parquet (.parquet) or JSONL (.jsonl/.ndjson), by its extension.",
)
@click.option("--id-column", help="Unique row key column [default: the 0-based row number].")
@click.option("--prompt", help="Template with {column} placeholders ({{ }} for literal braces).")
@click.option(
    "--prompt-file", type=click.Path(path_type=Path), help="Read the template from a file."
)
@click.option("--system", help="Optional system message (may use {column} placeholders).")
@click.option("--image-column", help="Column with one image file name per row (empty = no image).")
@click.option("--image-dir", help="Folder the image file names are relative to.")
@click.option(
    "--model", "models", multiple=True, help="Model pool, in order of preference (repeatable)."
)
@click.option(
    "--endpoint",
    type=click.Choice(["/v1/chat/completions", "/v1/responses", "/v1/embeddings"]),
    default=None,
    help="API endpoint [default: /v1/chat/completions].",
)
@click.option(
    "--schema",
    type=click.Path(path_type=Path),
    default=None,
    help="JSON Schema file: structured outputs; each answer is validated and its top-level "
    "fields become columns.",
)
@click.option("--schema-name", default=None, help="Name sent with --schema [default: file stem].")
@click.option(
    "--schema-prefix", default=None, help="Prefix of the answer's columns in the merged table."
)
@click.option(
    "--schema-strict/--no-schema-strict",
    default=None,
    help="Strict structured outputs (the schema must close every object) [strict].",
)
@click.option(
    "--body-extra",
    default=None,
    help="JSON object of further request-body parameters, e.g. '{\"top_p\": 0.9}'.",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Rows per batch file [default: 20; ≤ 50,000 / 200 MB].",
)
@click.option("--max-tokens", type=int, default=None, help="max_tokens in each request body.")
@click.option("--temperature", type=float, default=None, help="temperature in each request body.")
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of the run's state, chunk files and merged output; run again with the same "
    "folder to resume [default: runs/<source file stem>].",
)
@click.option(
    "--poll-interval",
    type=SECONDS,
    default=None,
    help="Seconds between status polls [default: 30].",
)
@click.option(
    "--max-retries", type=int, default=None, help="Per row, for retryable failures and expiry [3]."
)
@click.option("--start-row", type=int, default=None, help="First source row (0-based).")
@click.option("--end-row", type=int, default=None, help="Stop before this source row (exclusive).")
@click.option(
    "--mode", type=click.Choice(["batch", "online"]), default=None, help="[default: batch]"
)
@click.option(
    "--workers", type=int, default=None, help="Concurrent requests in online mode [default: 8]."
)
@click.option(
    "--rpm",
    type=float,
    default=None,
    help="Online mode: requests per minute at most (a [[models]] entry's rpm wins for it).",
)
@click.option(
    "--tpm",
    type=float,
    default=None,
    help="Online mode: estimated tokens per minute at most (prompt + --max-tokens).",
)
@click.option(
    "--retry-delay",
    type=float,
    default=None,
    help="Seconds before a remote call's first retry [1].",
)
@click.option("--retry-backoff", type=float, default=None, help="Multiplier between retries [2].")
@click.option(
    "--retry-max-delay", type=float, default=None, help="Cap on the delay between retries [60]."
)
@click.option(
    "--retry-on",
    default=None,
    help="Comma-separated failure classes that retry a row: timeout, api_error, format_error, "
    "expired, cancelled, rate_limit [all].",
)
@click.option(
    "--max-cost", type=float, default=None, help="Stop submitting before spend would pass USD."
)
@completion_threshold_option
@dedup_option
@keep_files_option
@click.option(
    "--token-limit", type=int, default=None, help="Enqueued prompt tokens in flight per model."
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="batchops.toml [default: ./batchops.toml if present].",
)
@click.option("--cleanup", is_flag=True, help="Start over: delete the previous run in --run-dir.")
@click.option(
    "--keep-latest", is_flag=True, help="Start over, keeping the previous run dir as a backup."
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Submit and return with exit code 0 although the rows are not answered yet; "
    "status/watch/merge pick the run up later.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Build and check the batch files, print the estimate; upload nothing.",
)
@csv_escape_option
@key_options
@common_logging
@handle_errors
def run(
    csv_path: Path | None,
    input_path: Path | None,
    prompt: str | None,
    prompt_file: Path | None,
    models: tuple[str, ...],
    config_path: Path | None,
    run_dir: Path | None,
    log_dir: Path,
    verbose: int,
    quiet: int,
    cleanup: bool,
    keep_latest: bool,
    no_wait: bool,
    dry_run: bool,
    api_key_file: Path | None,
    base_url: str | None,
    csv_escape: bool,
    **options: Any,
) -> None:
    """Run a table through the model(s): build, submit, poll, collect, retry, merge."""
    merging.CSV_ESCAPE.set(csv_escape)
    console = _start_logging(log_dir, verbose - quiet)
    if csv_path is not None and input_path is not None:
        raise InputError("give the source table once: --csv PATH or --input PATH, not both")
    source_path = csv_path or input_path
    if source_path is None:
        raise InputError("give the source table with --csv PATH or --input PATH")
    if not source_path.exists():
        raise InputError(f"{source_path}: file not found")
    if (prompt is None) == (prompt_file is None):
        raise InputError("give exactly one of --prompt TEXT or --prompt-file PATH")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{prompt_file}: cannot read prompt file ({exc.strerror})") from None
    config = _config(config_path)
    if options.get("body_extra") is not None:
        options["body_extra"] = _json_object("--body-extra", options["body_extra"])
    spec = api.build_spec(
        source_path=str(source_path),
        prompt=prompt or "",
        models=list(models),
        config=config,
        **options,
    )
    target = Path(run_dir or default_run_dir(spec.source))
    # A dry run never touches the run's database: it may run beside the run's writer.
    lock = nullcontext() if dry_run else runlock.hold(target, create=True)
    with lock, _display(console, verbose - quiet) as display:
        report = api.run_job(
            spec,
            target,
            cleanup=cleanup,
            keep_latest=keep_latest,
            dry_run=dry_run,
            wait=not no_wait,
            api_key_file=api_key_file,
            base_url=base_url,
            on_estimate=_print_estimate,
            on_progress=display,
        )
    if dry_run:
        _print_dry_run(report)
        click.echo(f"dry run: chunk files in {report.run_dir / 'dry-run'}; nothing uploaded")
        _DONE["dry_run"] = True
        return
    _summarize(report)
    if report.stopped_because == StopReason.NO_WAIT:
        click.echo(f"submitted; follow with: batchops status --run-dir {report.run_dir}")
        return
    _missing_hint(report)
    sys.exit(report.exit_code)


def _json_object(option: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{option}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InputError(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


def _summarize(report: api.RunReport) -> None:
    summary = report.summary()
    click.echo(summary)
    if report.final_output:
        click.echo(f"merged output: {report.final_output}")
    # The log file's closing line: what the run ended with, whatever the console showed.
    logger.debug("finished: {}; elapsed {}", summary, fmt_duration(time.monotonic() - _STARTED))


def _missing_hint(report: api.RunReport) -> None:
    if not report.exit_code:
        return
    d = report.run_dir
    click.echo(f"rows missing: see `batchops missing --run-dir {d}`", err=True)
    if report.exhausted_by in ("api_error", "timeout"):
        click.echo(
            "the pool is used up: the server did not answer (connection errors, timeouts or "
            "5xx); check --base-url and the server, then run the same command again",
            err=True,
        )
    elif report.exhausted_by == "invalid_request":
        click.echo(
            "the pool is used up: the server refused the batch calls (see the log's last "
            "'exhausted' line); check --base-url (the Batch API's /files and /batches live "
            "under …/v1); a server with no Batch API (e.g. vLLM) needs --mode online",
            err=True,
        )
    elif report.stopped_because and "exhausted" in report.stopped_because:
        click.echo(
            "the pool is used up; if the model was the problem (model_not_found, quota): "
            f"`batchops retry-missing --run-dir {d} --model OTHER-MODEL` sends the missing "
            "rows to another model",
            err=True,
        )


def _finish(report: api.RunReport) -> None:
    """The end of every command that drives a run: summary, where the table is, exit code."""
    _summarize(report)
    _missing_hint(report)
    sys.exit(report.exit_code)


def _config(path: Path | None) -> dict[str, Any]:
    if path is None:
        default = Path("batchops.toml")
        return load_config(default) if default.exists() else {}
    return load_config(path)


def _print_estimate(est: api.Estimate) -> None:
    # fmt_usd: the same figure `batchops cost` prints as "estimate:"
    cost = fmt_usd(est.cost_usd) if est.cost_usd is not None else "unknown (no price for a model)"
    click.echo(
        f"estimate: {est.rows} rows in {est.chunks} chunk(s), ~{est.prompt_tokens} prompt tokens, "
        f"≤{est.completion_tokens} completion tokens ({est.completion_assumption}); cost ≈ {cost} at {est.prices} prices"
    )


def _print_dry_run(report: api.RunReport) -> None:
    if report.checks is not None:
        click.echo(validate.summary(report.checks))
    if report.dedup and report.dedup["rows"]:
        click.echo(
            f"dedup: {report.dedup['rows']:,} row(s) repeat an earlier row's request: "
            "left out of the files, they get its answer (--no-dedup sends every row)"
        )
    skipped = report.counts.get("skipped", 0)
    if skipped:
        reasons = report.skipped_reasons[:5]
        click.echo(
            f"skipped: {skipped:,} row(s) would not be sent"
            + (": " + "; ".join(reasons) if reasons else "")
            + " (the run marks them skipped; see `batchops missing` after it)"
        )
    est = report.estimate
    if est is None:
        return
    click.echo(
        f"tokens: ~{est.prompt_tokens:,} prompt + ≤{est.completion_tokens:,} completion "
        f"= ≤{est.prompt_tokens + est.completion_tokens:,} in total"
    )
    for model, m in est.by_model.items():
        click.echo(
            f"  {model}: {m['rows']:,} rows in {m['chunks']} file(s), ~{m['prompt_tokens']:,} "
            f"prompt + ≤{m['completion_tokens']:,} completion tokens, {fmt_usd(m['cost_usd'])}"
        )


@cli.command(
    epilog=_examples("batchops status --run-dir runs/products", "batchops status --json | jq .rows")
)
@run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON.")
@click.option(
    "--group-by",
    "group_by",
    default=None,
    metavar="COLUMN",
    help="Also show rows by status for each value of this source column.",
)
@handle_errors
def status(run_dir: Path | None, as_json: bool, group_by: str | None) -> None:
    """Rows by status, batches by remote status and age, models and keys in use or exhausted,
    retries, spend so far, and what to do next."""
    st = api.status(resolve_run_dir(run_dir), group_by)
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    console = _result_console()
    console.print(status_view(st))
    if "groups" in st:
        groups = strip_control(st["groups"])
        console.print(f"rows by {groups['column']}:")
        for value, by_state in groups["values"].items():
            total = sum(by_state.values())
            done = by_state.get("succeeded", 0)
            rest = ", ".join(f"{k} {v}" for k, v in sorted(by_state.items()) if k != "succeeded")
            console.print(
                f"  {value or '(empty)'}: {done}/{total} succeeded" + (f"; {rest}" if rest else ""),
                markup=False,
            )


def _result_console() -> Console:
    """stdout, for a command's result; wide enough for tables when it is not a terminal."""
    probe = Console(highlight=False)
    return Console(highlight=False, width=None if probe.is_terminal else 120)


@cli.command(epilog=_examples("batchops missing --run-dir runs/products"))
@run_dir_option
@handle_errors
def missing(run_dir: Path | None) -> None:
    """Write <run-dir>/missing_rows.csv (rows without an answer and why) and print a summary."""
    path, by_status = api.missing(resolve_run_dir(run_dir))
    total = sum(by_status.values())
    click.echo(
        f"{total} row(s) without an answer"
        + (": " + ", ".join(f"{k} {v}" for k, v in by_status.items()) if total else "")
    )
    click.echo(f"written to {path}")


@cli.command(
    "retry-missing",
    epilog=_examples(
        "batchops retry-missing --run-dir runs/products",
        "batchops retry-missing --run-dir runs/products --model gpt-4.1-mini",
        "batchops retry-missing --class expired --from-model gpt-4o-mini --batch batch_abc",
    ),
)
@run_dir_option
@click.option(
    "--model", "models", multiple=True, help="Model pool for the retry [default: the run's]."
)
@click.option(
    "--class",
    "error_class",
    default=None,
    help="Only rows whose last failure had this error class (see `batchops maintain`).",
)
@click.option(
    "--from-model", default=None, help="Only rows whose last failure came from this model."
)
@click.option("--batch", "batch_id", default=None, help="Only rows of this remote batch.")
@completion_threshold_option
@dedup_option
@click.option("--poll-interval", type=SECONDS, default=None, help="Seconds between status polls.")
@key_options
@common_logging
@handle_errors
def retry_missing(
    run_dir: Path | None,
    models: tuple[str, ...],
    error_class: str | None,
    from_model: str | None,
    batch_id: str | None,
    completion_threshold: float | None,
    dedup: bool | None,
    poll_interval: float | None,
    api_key_file: Path | None,
    base_url: str | None,
    log_dir: Path,
    verbose: int,
    quiet: int,
) -> None:
    """Send every failed, skipped or missing row again, then merge."""
    console = _start_logging(log_dir, verbose - quiet)
    target = resolve_run_dir(run_dir)
    with runlock.hold(target), _display(console, verbose - quiet) as display:
        report = api.retry_missing(
            target,
            models=list(models) or None,
            error_class=error_class,
            from_model=from_model,
            batch_id=batch_id,
            completion_threshold=completion_threshold,
            dedup=dedup,
            poll_interval=poll_interval,
            api_key_file=api_key_file,
            base_url=base_url,
            on_progress=display,
        )
    _finish(report)


@cli.command(
    epilog=_examples(
        "batchops merge --run-dir runs/products",
        "batchops merge --run-dir runs/products -o answers.parquet",
    )
)
@run_dir_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output path: CSV, Parquet (.parquet) or JSONL (.jsonl) [default: "
    "<run-dir>/final_output.<the source's format>].",
)
@csv_escape_option
@handle_errors
def merge(run_dir: Path | None, output: Path | None, csv_escape: bool) -> None:
    """Join every answer onto the source table (source columns unchanged, then the result columns)."""
    merging.CSV_ESCAPE.set(csv_escape)
    target = resolve_run_dir(run_dir)
    with runlock.hold(target):
        path = api.merge(target, output)
    click.echo(f"merged output: {path}")


@cli.group(
    epilog=_examples(
        "batchops pool status --run-dir runs/products", "batchops pool reset --model qwen-plus"
    )
)
def pool() -> None:
    """The remembered model/key pool of a run: what is exhausted, and starting it over."""


@pool.command("status", epilog=_examples("batchops pool status --run-dir runs/products"))
@run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON.")
@handle_errors
def pool_status(run_dir: Path | None, as_json: bool) -> None:
    """Every model/key pair: state, reason, since, calls, tokens, cost, failures."""
    pairs = api.pool_status(resolve_run_dir(run_dir))
    if as_json:
        click.echo(json.dumps(pairs, indent=2))
        return
    if not pairs:
        click.echo("no model/key pair has been used or exhausted in this run yet")
        return
    for p in pairs:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["since"])) if p["since"] else ""
        cost = "unknown" if p["cost_usd"] is None and p["tokens"] else fmt_usd(p["cost_usd"] or 0)
        click.echo(
            f"{p['model']:<28} {p['key']:<10} {p['state']:<10} calls {p['calls']:>7} "
            f"failures {p['failures']:>6} tokens {p['tokens']:>10} cost {cost}"
            + (f"\n    exhausted since {since}: {p['reason']}" if p["state"] == "exhausted" else "")
        )


@pool.command(
    "reset",
    epilog=_examples("batchops pool reset --model qwen-plus", "batchops pool reset --key …abcd"),
)
@run_dir_option
@click.option("--model", default=None, help="Only this model [default: every model].")
@click.option(
    "--key", default=None, help="Only this key, by its masked label or last 4 characters."
)
@handle_errors
def pool_reset(run_dir: Path | None, model: str | None, key: str | None) -> None:
    """Forget exhausted pairs: the next run / retry-missing tries them again."""
    n = api.pool_reset(resolve_run_dir(run_dir), model, key)
    click.echo(f"{n} exhausted model/key pair(s) forgotten; the next run tries them again")


@cli.command(
    epilog=_examples(
        "batchops monitor --run-dir runs/products --every 1h --auto-maintain --cooldown 6h",
        "batchops monitor --every 10m --max-cycles 12 --completion-threshold 0.95",
    )
)
@run_dir_option
@click.option(
    "--every", default="1h", show_default=True, help="Time between checks (90s, 10m, 1h)."
)
@click.option(
    "--auto-maintain",
    is_flag=True,
    help="Re-send missing rows when completion is below the threshold or failures too many.",
)
@click.option(
    "--cooldown",
    default="6h",
    show_default=True,
    help="At least this long between re-sends; exhausted models are tried again after it.",
)
@click.option("--max-cycles", type=click.IntRange(1), default=None, help="Stop after N checks.")
@completion_threshold_option
@click.option(
    "--max-failure-rate",
    type=click.FloatRange(0, 1),
    default=None,
    help="Re-send as well when more than this share of requests failed.",
)
@key_options
@common_logging
@handle_errors
def monitor(
    run_dir: Path | None,
    every: str,
    auto_maintain: bool,
    cooldown: str,
    max_cycles: int | None,
    completion_threshold: float | None,
    max_failure_rate: float | None,
    api_key_file: Path | None,
    base_url: str | None,
    log_dir: Path,
    verbose: int,
    quiet: int,
) -> None:
    """Check the run every so often for days: collect what finished and, with --auto-maintain,
    re-send what is missing; a JSON report per check in <run-dir>/reports/."""
    from batchops.maintenance import monitor as run_monitor
    from batchops.spec import parse_duration

    console = _start_logging(log_dir, verbose - quiet)
    target = resolve_run_dir(run_dir)
    with runlock.hold(target), _display(console, verbose - quiet) as display:
        report = run_monitor(
            target,
            every=parse_duration(every),
            auto_maintain=auto_maintain,
            cooldown=parse_duration(cooldown),
            max_cycles=max_cycles,
            completion_threshold=completion_threshold,
            max_failure_rate=max_failure_rate,
            api_key_file=api_key_file,
            base_url=base_url,
            on_progress=display,
        )
    _finish(report)


@cli.command(epilog=_examples("batchops maintain --run-dir runs/products"))
@run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@handle_errors
def maintain(run_dir: Path | None, as_json: bool) -> None:
    """Analyse only: completion, failure rates by class, model and batch, rows failing again
    and again, and the command to run next. Changes nothing."""
    from batchops.maintenance import maintain as analyse

    data = strip_control(analyse(resolve_run_dir(run_dir)))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    rows = data["rows"]
    click.echo(
        f"completion {data['completion']:.1%} ({rows['succeeded']} of {sum(rows.values())} rows); "
        f"failure rate {data['failure_rate']:.1%} of requests"
    )
    for title, key in (
        ("failed requests by class", "failed_by_class"),
        ("missing rows by class", "missing_by_class"),
    ):
        if data[key]:
            click.echo(f"{title}: " + ", ".join(f"{k} {v}" for k, v in data[key].items()))
    for model, m in data["failed_by_model"].items():
        click.echo(f"  {model}: {m['failed']} of {m['calls']} requests failed")
    if data["rows_failing_repeatedly"]:
        click.echo(f"rows failing again and again: {data['rows_failing_repeatedly']}")
    click.echo(f"recommended: {data['recommended']}")


@cli.command(epilog=_examples("batchops cancel --run-dir runs/products"))
@run_dir_option
@key_options
@common_logging
@handle_errors
def cancel(
    run_dir: Path | None,
    api_key_file: Path | None,
    base_url: str | None,
    log_dir: Path,
    verbose: int,
    quiet: int,
) -> None:
    """Cancel the run's in-flight batches and record their partial results."""
    _start_logging(log_dir, verbose - quiet)
    target = resolve_run_dir(run_dir)
    with runlock.hold(target):
        n = api.cancel(target, api_key_file=api_key_file, base_url=base_url)
    if n == 0:
        click.echo("nothing was in flight: no batch to cancel")
        return
    click.echo(
        f"{n} batch(es) cancelled; partial results recorded, the other rows re-queued. "
        "Resume with `batchops run` or retry-missing."
    )


@cli.command(epilog=_examples("batchops cost --run-dir runs/products", "batchops cost --json"))
@run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def cost(run_dir: Path | None, as_json: bool) -> None:
    """Cost per model and per batch, total, and estimate vs actual."""
    data = api.cost(resolve_run_dir(run_dir))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    for m in data["by_model"]:
        click.echo(
            f"{m['model']} ({m['mode']}): {m['calls']} calls, {m['prompt_tokens']} prompt, "
            f"{m['cached_tokens']} cached, {m['completion_tokens']} completion tokens: "
            f"{fmt_usd(m['cost_usd'])}"
        )
    for b in data["by_batch"]:
        c = fmt_usd(b["cost_usd"]) if b["cost_usd"] is not None else "-"
        click.echo(
            f"  {b['batch_id']} chunk {b['chunk_id']} {b['status']}: {c} "
            f"(estimate {fmt_usd(b['est_cost'])})"
        )
    total = fmt_usd(data["total_usd"])
    if data["unpriced_requests"]:  # unknown, not $0: say what is known and what is not
        known = data["spent_known_usd"]
        total += (
            f" ({fmt_usd(known) + ' known, plus ' if known else ''}{data['unpriced_requests']} "
            "request(s) by a model without a price: add one to batchops.toml [prices])"
        )
    click.echo(f"total: {total}")
    click.echo(f"estimate: {fmt_usd(data['estimate_usd'])}")


@cli.command(
    epilog=_examples(
        "batchops run --csv products.csv --prompt-file p.txt --model gpt-4o-mini --no-wait",
        "batchops watch --run-dir runs/products",
        "batchops watch --run-dir runs/products --retry   # also resubmit what failed",
    )
)
@run_dir_option
@click.option(
    "--retry",
    is_flag=True,
    help="Also re-queue what failed or expired and submit it again, until every row is settled.",
)
@completion_threshold_option
@click.option("--poll-interval", type=SECONDS, default=None, help="Seconds between status polls.")
@key_options
@common_logging
@handle_errors
def watch(
    run_dir: Path | None,
    retry: bool,
    completion_threshold: float | None,
    poll_interval: float | None,
    api_key_file: Path | None,
    base_url: str | None,
    log_dir: Path,
    verbose: int,
    quiet: int,
) -> None:
    """Follow the run's remote batches to the end, collecting results as each one finishes."""
    console = _start_logging(log_dir, verbose - quiet)
    target = resolve_run_dir(run_dir)
    with runlock.hold(target), _display(console, verbose - quiet) as display:
        report = api.watch(
            target,
            retry=retry,
            completion_threshold=completion_threshold,
            poll_interval=poll_interval,
            api_key_file=api_key_file,
            base_url=base_url,
            on_progress=display,
        )
    _finish(report)


@cli.command(
    epilog=_examples(
        "batchops report --run-dir runs/products",
        "batchops report --run-dir runs/products -o /tmp/products-report.html",
    )
)
@run_dir_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="HTML file [default: <run-dir>/report.html]; report.json is written next to it.",
)
@handle_errors
def report(run_dir: Path | None, output: Path | None) -> None:
    """One self-contained HTML page about the run (counts, cost, timeline, errors, sample
    answers) and the same data as report.json."""
    html_path, json_path = api.report(resolve_run_dir(run_dir), output)
    click.echo(f"report: {html_path}")
    click.echo(f"data:   {json_path}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--scenario",
    type=click.Path(path_type=Path),
    default=None,
    help="Scenario file (TOML or JSON).",
)
@handle_errors
def emulator(host: str, port: int, scenario: Path | None) -> None:
    """Serve a local OpenAI-compatible Batch API with fault injection (see docs/emulator.md).

    \b
    Example:
      batchops emulator --port 8000 &
      OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=sk-local batchops run ...
    """
    from batchops.emulator import Scenario, serve
    from batchops.emulator.server import bind

    sc = Scenario.from_file(scenario) if scenario else Scenario()
    sock = bind(host, port)  # before the URL is printed: a busy port is one line, exit 2
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"emulator on http://{shown}:{sock.getsockname()[1]}/v1 (Ctrl+C stops it)", err=True)
    # Ctrl+C or SIGTERM: a server holds no run state to resume, so it just says it stopped.
    with suppress(KeyboardInterrupt):
        serve(host=host, port=port, scenario=sc, sock=sock)
    click.echo("emulator stopped", err=True)


@cli.command(epilog=_examples("batchops demo", "batchops demo -v   # debug lines on the console"))
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder with products.csv, prompt.txt and images/ [default: the sample shipped with "
    "batchops].",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Folder of the demo run (started over each time).",
)
@common_logging
@handle_errors
def demo(data_dir: Path, run_dir: Path, log_dir: Path, verbose: int, quiet: int) -> None:
    """Run the bundled sample (with images) end to end against the built-in emulator; no key, no network."""
    from batchops.emulator import EmulatorServer, Scenario

    data_dir = data_dir if data_dir is not None else sample_dir()
    csv_path = data_dir / "products.csv"
    if not csv_path.exists():  # checked before logging starts: no empty log file on an error
        raise InputError(
            f"{csv_path}: sample not found (give --data-dir a folder with products.csv)"
        )
    console = _start_logging(log_dir, verbose - quiet)
    scenario = Scenario(
        validating_seconds=0.2, in_progress_seconds=1.0, finalizing_seconds=0.2, seed=7
    )
    with EmulatorServer(scenario=scenario, host="127.0.0.1", port=0) as emu:
        os.environ["OPENAI_API_KEY"] = "sk-emulator-demo-key-0000"
        prompt = (data_dir / "prompt.txt").read_text(encoding="utf-8")
        spec = api.build_spec(
            source_path=str(csv_path),
            prompt=prompt,
            models=["gpt-4o-mini"],
            id_column="sku",
            image_column="image",
            image_dir=str(data_dir / "images"),
            batch_size=10,
            poll_interval=0.5,
            max_tokens=200,
        )
        with _display(console, verbose - quiet) as display:
            report = api.run_job(
                spec,
                run_dir,
                cleanup=True,
                base_url=emu.base_url,
                on_estimate=_print_estimate,
                on_progress=display,
            )
    _finish(report)


def sample_dir() -> Path:
    """The demo's sample, shipped inside the package (found from any working directory)."""
    return Path(str(resources.files("batchops").joinpath("sample")))


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a scheduler's SIGTERM stops as cleanly as Ctrl+C (exit 130)


# Set by a command whose every file is written and closed: the process may end at once.
_DONE: dict[str, bool] = {}


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    _DONE.clear()  # only this call's command may end the process early (not an earlier in-process one)
    try:
        cli(prog_name="batchops")
    except SystemExit as done:
        if _DONE.get("dry_run") and done.code in (None, 0):
            # The interpreter's teardown (modules, Arrow and polars memory) costs ~0.15 s of a
            # 1M-row dry run; its output is on disk, the log's last line is flushed below.
            logger.remove()
            with suppress(OSError):  # e.g. a closed pipe: as the normal exit would
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(0)
        raise


gc.freeze()  # off since the imports (see there)
gc.enable()

if __name__ == "__main__":
    main()
