"""Console views of a run: the live progress display and the `batchops status` table.

One rich Console (stderr) carries both the log lines and the display, so log lines print cleanly
above the live bar. Without a terminal (CI, pipes, `NO_COLOR` has nothing to do with it) there is
no live display: a plain progress line is logged when something changed, or as a heartbeat.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from loguru import logger
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # the engine pulls in openai; a status view does not need it
    from batchops.engine import Progress

DONE = ("succeeded", "failed", "skipped")


def make_console() -> Console:
    """The Console every view and the log sink share (stderr: stdout stays for results)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def interactive(console: Console) -> bool:
    """A live display only when a person watches: stdout and the console are both terminals."""
    if os.environ.get("TERM") == "dumb":
        return False
    return console.is_terminal and sys.stdout.isatty()


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_usd(value: float | None) -> str:
    """The one way batchops prints money, so figures from different commands compare equal."""
    if value is None:
        return "unknown"
    if value == 0 or abs(value) >= 5e-7:
        return f"${value:.6f}"
    # Tiny amounts (a --max-cost of 0.0000001) keep their first digits: never "$0.000000" for
    # a figure that is not zero, never scientific notation.
    return "$" + f"{value:.12f}".rstrip("0")


def _queued_label(p: Progress) -> str:
    """Queued rows are in flight only once something was sent: rows packed into chunks that
    never got uploaded (a rejected key, an unreachable server) are not."""
    sent = p.in_flight > 0 or any(v for k, v in p.remote.items() if "in flight" in k)
    return "in flight" if sent else "queued (not sent)"


class ProgressDisplay:
    """`on_progress` callback for the engine: a live display on a terminal, log lines otherwise.

    Use as a context manager around the engine run; call it with each `engine.Progress`.
    """

    def __init__(
        self,
        console: Console,
        *,
        live: bool | None = None,
        heartbeat: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        """`emit`: where the plain progress lines go without a live display [an INFO log]."""
        self.console = console
        self.emit = emit or (lambda line: logger.info("progress: {}", line))
        self.live_mode = interactive(console) if live is None else live
        self.heartbeat = heartbeat
        self.clock = clock
        self.started = clock()
        self.snapshot: Progress | None = None
        self._live: Live | None = None
        self._first: tuple[float, int] | None = None  # (time, rows done) at the first snapshot
        self._last_key: Any = None
        self._last_emit = 0.0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ProgressDisplay:
        # The live display starts with the first snapshot: what is printed before (the estimate,
        # a dry run's summary) goes out as plain text, and a dry run never shows a bar at all.
        return self

    def _start_live(self) -> None:
        self._live = Live(
            get_renderable=self.render,
            console=self.console,
            refresh_per_second=4,
            transient=False,
        )
        self._live.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ------------------------------------------------------------------ updates
    def __call__(self, p: Progress) -> None:
        now = self.clock()
        done = sum(p.counts.get(k, 0) for k in DONE)
        if self._first is None:
            self._first = (now, done)
        self.snapshot = p
        key = (tuple(sorted(p.counts.items())), tuple(sorted(p.remote.items())), round(p.spent, 9))
        changed = key != self._last_key
        self._last_key = key
        if self.live_mode and self._live is None:
            self._start_live()
        if self._live is not None:
            self._live.refresh()
            if changed:  # the file log keeps the history the live display overwrites
                logger.debug("progress: {}", self.line())
        elif changed or now - self._last_emit >= self.heartbeat:
            self._last_emit = now
            self.emit(self.line())

    # ------------------------------------------------------------------ figures
    def totals(self) -> tuple[int, int]:
        p = self.snapshot
        if p is None:
            return 0, 0
        return sum(p.counts.get(k, 0) for k in DONE), sum(p.counts.values())

    def eta(self) -> float | None:
        """Seconds left at the rate rows settled since this invocation's first snapshot."""
        done, total = self.totals()
        if self._first is None or done >= total:
            return 0.0 if total and done >= total else None
        t0, done0 = self._first
        elapsed = self.clock() - t0
        if done <= done0 or elapsed <= 0:
            return None
        return (total - done) / ((done - done0) / elapsed)

    def line(self) -> str:
        """The plain one-line form (CI logs, the DEBUG file)."""
        p = self.snapshot
        if p is None:
            return "starting"
        c = p.counts
        done, total = self.totals()
        batches = ", ".join(f"{k} {v}" for k, v in sorted(p.remote.items())) or "none"
        return (
            f"rows {done}/{total} done ({c.get('succeeded', 0)} succeeded, {c.get('failed', 0)} "
            f"failed, {c.get('skipped', 0)} skipped), {c.get('queued', 0)} {_queued_label(p)}, "
            f"{c.get('pending', 0)} pending | batches: {batches} | spent {fmt_usd(p.spent)} "
            f"| ETA {fmt_duration(self.eta())}"
        )

    def render(self) -> RenderableType:
        p = self.snapshot
        elapsed = fmt_duration(self.clock() - self.started)
        if p is None:
            return Text(f"starting … {elapsed}", style="dim")
        c = p.counts
        done, total = self.totals()
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text("rows", style="bold"),
            ProgressBar(total=max(total, 1), completed=done, width=40),
            Text(f"{done}/{total}"),
            Text(f"{100 * done / total:.0f}%" if total else "-"),
        )
        rows = Text()
        for label, n, style in (
            ("succeeded", c.get("succeeded", 0), "green"),
            ("failed", c.get("failed", 0), "red"),
            ("skipped", c.get("skipped", 0), "yellow"),
            (_queued_label(p), c.get("queued", 0), "cyan"),
            ("pending", c.get("pending", 0), "dim"),
        ):
            rows.append(f"{n} {label}", style=style if n else "dim")
            rows.append("  ")
        remote = ", ".join(f"{k} {v}" for k, v in sorted(p.remote.items())) or "none in flight"
        info = Text()
        info.append("batches ", style="bold")
        info.append(f"{remote}  ")
        info.append("spent ", style="bold")
        info.append(f"{fmt_usd(p.spent)}  ")
        info.append("elapsed ", style="bold")
        info.append(f"{elapsed}  ")
        info.append("ETA ", style="bold")
        info.append(fmt_duration(self.eta()))
        return Group(bar, rows, info)


# ---------------------------------------------------------------------------------- status


# ANSI escape sequences (CSI … final byte, OSC … BEL/ST) and every other C0/C1 control character
# but newline and tab: text from a remote server (model names, error messages) must not move the
# cursor, recolour or retitle the user's terminal.
_ANSI_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_control(value: Any) -> Any:
    """`value` with ANSI sequences and control characters removed from every string in it."""
    if isinstance(value, str):
        return _CONTROL_RE.sub("", _ANSI_RE.sub("", value))
    if isinstance(value, dict):
        return {strip_control(k): strip_control(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(strip_control(v) for v in value)
    return value


def _retry_text(r: dict[str, Any], cancelled: bool = False) -> Text:
    """Rows sent more than once. Rows put back in the queue and not sent again yet (after a
    cancel, say) are re-queued, not retried: they are counted apart."""
    requeued = r.get("requeued", 0)
    retried = r.get("rows", 0) - requeued
    text = Text.assemble(("retries ", "bold"), f"{retried} row(s) retried")
    if requeued:
        text.append(f", {requeued} row(s) re-queued")
        text.append(" after a cancel" if cancelled else "")
        text.append(" (not sent again yet)")
    if r.get("by_class"):
        last = ", ".join(f"{k} {v}" for k, v in sorted(r["by_class"].items()))
        text.append(f"; last error by class: {last}")
    return text


def _polled(batch: dict[str, Any], now: float) -> str:
    """How old the remote status shown is: the last poll of the batch (its stored view)."""
    at = batch.get("updated_at")
    return "-" if at is None else f"{fmt_duration(max(0.0, now - at))} ago"


def status_view(st: dict[str, Any], now: float | None = None) -> RenderableType:
    """`batchops status` as rich tables, from `api.status()`'s data (`now`: time.time())."""
    now = time.time() if now is None else now
    st = strip_control(st)
    parts: list[RenderableType] = [
        Text.assemble(
            ("run ", "bold"),
            f"{st['run_id']}  ",
            ("dir ", "bold"),
            f"{st['run_dir']}  ",
            ("source ", "bold"),
            f"{st['source']}  ",
            ("mode ", "bold"),
            str(st.get("mode", "batch")),
        )
    ]

    rows = Table(title="rows", title_justify="left", show_edge=False)
    rows.add_column("status")
    rows.add_column("rows", justify="right")
    total = sum(st["rows"].values()) or 1
    rows.add_column("share", justify="right")
    for k, v in st["rows"].items():
        rows.add_row(k, str(v), f"{100 * v / total:.1f}%")
    parts.append(rows)

    batches = Table(title="batches by remote status", title_justify="left", show_edge=False)
    for col, just in (("status", "left"), ("batches", "right"), ("oldest", "right")):
        batches.add_column(col, justify=just)  # type: ignore[arg-type]
    batches.add_column("newest", justify="right")
    for s, info in sorted(st.get("batch_ages", {}).items()):
        batches.add_row(
            s, str(info["count"]), fmt_duration(info["oldest_s"]), fmt_duration(info["newest_s"])
        )
    if not st.get("batch_ages"):
        batches.add_row("none", "0", "-", "-")
    parts.append(batches)

    live = [b for b in st["batches"] if b.get("collected_at") is None]
    if live:
        t = Table(title="batches not yet collected", title_justify="left", show_edge=False)
        for col in ("batch", "chunk", "model", "status", "polled", "requests", "age"):
            t.add_column(col)
        for b in live[:15]:
            done = b.get("request_completed") or 0
            failed = b.get("request_failed") or 0
            t.add_row(
                str(b["batch_id"]),
                str(b["chunk_id"]),
                str(b["model"]),
                str(b["status"]),
                _polled(b, now),
                f"{done + failed}/{b.get('request_total') or '?'}",
                fmt_duration(b.get("age_s")),
            )
        if len(live) > 15:
            t.add_row(f"… {len(live) - 15} more", "", "", "", "", "", "")
        parts.append(t)

    pool = Table(title="models and keys", title_justify="left", show_edge=False)
    pool.add_column("model")
    pool.add_column("key")
    pool.add_column("state (last invocation)")
    for entry in st.get("pool", []):
        style = "red" if entry["state"].startswith("exhausted") else ""
        pool.add_row(entry["model"], entry["key"], Text(entry["state"], style=style))
    if not st.get("pool"):
        for m in st["models"]:
            pool.add_row(m, "-", "not used yet")
    parts.append(pool)
    switches = st.get("switches", [])
    if switches:
        text = Text("switches:\n", style="bold")
        for e in switches[:5]:
            text.append(f"  {e['when']}  {e['message']}\n", style="")
        parts.append(text)

    parts.append(_retry_text(st.get("retries", {}), "cancelled" in st.get("batches_by_status", {})))

    cost = Table(title="cost so far", title_justify="left", show_edge=False)
    for col in ("model", "mode", "calls", "prompt", "cached", "completion", "cost"):
        cost.add_column(col, justify="left" if col in ("model", "mode") else "right")
    for m in st["cost_by_model"]:
        cost.add_row(
            str(m["model"]),
            str(m["mode"]),
            str(m["calls"]),
            str(m["prompt_tokens"]),
            str(m["cached_tokens"]),
            str(m["completion_tokens"]),
            fmt_usd(m["cost_usd"]),
        )
    cost.add_row("total", "", "", "", "", "", fmt_usd(st["spent_usd"]), style="bold")
    parts.append(cost)
    if (st.get("dedup") or {}).get("rows"):  # identical requests sent once (issue 18)
        from batchops.summaries import dedup_text

        parts.append(Text(dedup_text(st["dedup"])))
    parts.append(Text.assemble(("next ", "bold green"), st["next"]))
    return Group(*parts)
