"""A run's report: one self-contained HTML page (inline CSS and SVG; no script, no network) and
the same data as `report.json` next to it.

Everything that comes from the run (answers, errors, ids, file names) is escaped: answers are
arbitrary model text and may contain markup.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from batchops.atomic import write_text
from batchops.progress import fmt_usd
from batchops.rundir import RunDir

SAMPLE_ANSWERS = 20
ERROR_EXAMPLES = 3
ANSWER_CHARS = 1000  # longer answers are cut in the report (the merged table has them whole)
TIMELINE_MAX = 500  # batches drawn; more would make an unreadable picture and a huge page
STATUS_COLOURS = {
    "completed": "#2e7d32",
    "failed": "#c62828",
    "expired": "#ef6c00",
    "cancelled": "#757575",
    "cancelling": "#9e9e9e",
    "in_progress": "#1565c0",
    "finalizing": "#6a1b9a",
    "validating": "#00838f",
}


def collect(
    run: RunDir, *, sample: int = SAMPLE_ANSWERS, examples: int = ERROR_EXAMPLES
) -> dict[str, Any]:
    """The report's data (what report.json holds) from the run's database."""
    st = run.store
    now = time.time()
    counts = st.counts()
    by_batch = [dict(r) for r in st.cost_by_batch()]
    batches = [dict(b) for b in st.batches()]
    t0 = min((b["created_at"] for b in batches), default=now)
    timeline = []
    for b in batches:
        end = b["ended_at"] or now
        timeline.append(
            {
                "batch_id": b["batch_id"],
                "chunk_id": b["chunk_id"],
                "model": b["model"],
                "status": b["status"],
                "created_at": b["created_at"],
                "ended_at": b["ended_at"],
                "start_s": round(b["created_at"] - t0, 3),
                "end_s": round(end - t0, 3),
                "open": b["ended_at"] is None,
                "requests": b["request_total"],
            }
        )
    answers = []
    for r in st.sample_answers(sample):
        text = r["response"] or ""
        answers.append(
            {
                "row_idx": r["row_idx"],
                "row_id": r["row_id"],
                "model": r["model"],
                "response": text[:ANSWER_CHARS],
                "truncated": len(text) > ANSWER_CHARS,
                "prompt_tokens": r["prompt_tokens"],
                "completion_tokens": r["completion_tokens"],
                "cost_usd": r["cost_usd"],
            }
        )
    return {
        "run_id": run.run_id,
        "run_dir": str(run.path),
        "source": run.spec.source,
        "endpoint": run.spec.endpoint,
        "models": run.spec.model_names,
        "mode": run.spec.mode,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "rows": counts,
        "total_rows": sum(counts.values()),
        "cost": {
            "total_usd": st.spent(),
            # the same figure `batchops cost` calls the estimate
            "estimate_usd": sum(b["est_cost"] or 0 for b in by_batch) if by_batch else None,
            "by_model": [dict(r) for r in st.cost_by_model()],
            "by_batch": by_batch,
        },
        "timeline": timeline,
        "errors": st.error_classes(examples),
        "failed_attempts_by_class": st.failed_attempts_by_class(),
        "retries": st.retry_summary(),
        "dedup": st.dedup_savings(),  # identical requests sent once: rows, requests, $ saved
        "sample": answers,
    }


def write(run: RunDir, out: Path | None = None) -> tuple[Path, Path]:
    """Write the HTML page (default <run-dir>/report.html) and report.json next to it."""
    data = collect(run)
    out = Path(out or run.path / "report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_name("report.json")
    write_text(json_path, json.dumps(data, indent=2, default=str, ensure_ascii=False))
    write_text(out, render_html(data))
    return out, json_path


# ----------------------------------------------------------------------------------- HTML


def e(value: Any) -> str:
    """Escaped text for HTML content and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def usd(value: float | None) -> str:
    return fmt_usd(value)  # the one money format (progress.fmt_usd)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#222;background:#fff}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666}table{border-collapse:collapse;margin:.5rem 0}
th,td{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:.8rem;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;
padding:.5rem .9rem;min-width:7rem}.card b{display:block;font-size:1.4rem}
.succeeded b{color:#2e7d32}.failed b{color:#c62828}.skipped b{color:#ef6c00}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.4 ui-monospace,monospace}
svg text{font:11px ui-monospace,monospace;fill:#333}.note{color:#666;font-size:.9em}
"""


def _table(head: list[str], rows: list[list[str]], num: set[int] | None = None) -> str:
    num = num or set()
    ths = "".join(f"<th{' class=num' if i in num else ''}>{e(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in num else ''}>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>"


def _timeline_svg(items: list[dict[str, Any]]) -> str:
    if not items:
        return '<p class="note">no batches yet</p>'
    shown = items[:TIMELINE_MAX]
    width, label, row_h, top = 1000, 260, 18, 20
    area = width - label - 20
    span = max((t["end_s"] for t in shown), default=0.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="batch timeline" '
        f'width="{width}" height="{top + row_h * len(shown) + 10}">',
        f'<text x="{label}" y="12">0 s</text>',
        f'<text x="{width - 20}" y="12" text-anchor="end">{e(f"{span:.1f}")} s</text>',
    ]
    for i, t in enumerate(shown):
        y = top + i * row_h
        x = label + t["start_s"] / span * area
        w = max(2.0, (t["end_s"] - t["start_s"]) / span * area)
        colour = STATUS_COLOURS.get(t["status"], "#607d8b")
        tip = (
            f"{t['batch_id']} (chunk {t['chunk_id']}, {t['model']}): {t['status']}, "
            f"{t['start_s']:.1f} s → {t['end_s']:.1f} s{' (still running)' if t['open'] else ''}"
        )
        parts.append(f'<text x="4" y="{y + 12}">{e(t["batch_id"])}</text>')
        parts.append(
            f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_h - 5}" '
            f'fill="{colour}"{" fill-opacity=0.5" if t["open"] else ""}><title>{e(tip)}</title></rect>'
        )
    parts.append("</svg>")
    more = (
        f'<p class="note">first {TIMELINE_MAX} of {len(items)} batches shown</p>'
        if len(items) > TIMELINE_MAX
        else ""
    )
    legend = " ".join(
        f'<span style="color:{c}">■</span> {e(s)}'
        for s, c in STATUS_COLOURS.items()
        if any(t["status"] == s for t in shown)
    )
    return "".join(parts) + f'<p class="note">{legend}</p>' + more


def render_html(d: dict[str, Any]) -> str:
    rows = d["rows"]
    cards = "".join(
        f'<div class="card {e(k)}"><span>{e(k)}</span><b id="rows-{e(k)}">{e(v)}</b></div>'
        for k, v in rows.items()
    )
    cost = d["cost"]
    by_model = _table(
        ["model", "mode", "calls", "prompt", "cached", "completion", "cost"],
        [
            [
                e(m["model"]),
                e(m["mode"]),
                e(m["calls"]),
                e(m["prompt_tokens"]),
                e(m["cached_tokens"]),
                e(m["completion_tokens"]),
                e(usd(m["cost_usd"])),
            ]
            for m in cost["by_model"]
        ],
        num={2, 3, 4, 5, 6},
    )
    by_batch = _table(
        ["batch", "chunk", "model", "status", "requests", "estimate", "cost"],
        [
            [
                e(b["batch_id"]),
                e(b["chunk_id"]),
                e(b["model"]),
                e(b["status"]),
                e(b["request_total"]),
                e(usd(b["est_cost"])),
                e(usd(b["cost_usd"])),
            ]
            for b in cost["by_batch"]
        ],
        num={1, 4, 5, 6},
    )
    if d["errors"]:
        errors = _table(
            ["error class", "rows", "examples (row id: error)"],
            [
                [
                    e(c["error_class"]),
                    e(c["rows"]),
                    "".join(
                        f"<pre>{e(x['row_id'])} ({e(x['status'])}, {e(x['attempts'])} "
                        f"attempt(s)): {e(x['error'])}</pre>"
                        for x in c["examples"]
                    ),
                ]
                for c in d["errors"]
            ],
            num={1},
        )
    else:
        errors = '<p class="note">no row is without an answer because of an error</p>'
    fa = d["failed_attempts_by_class"]
    attempts = (
        '<p class="note">failed requests over the whole run (including ones a retry fixed): '
        + ", ".join(f"{e(k)} {e(v)}" for k, v in sorted(fa.items()))
        + "</p>"
        if fa
        else ""
    )
    r = d["retries"]
    sample = (
        _table(
            ["row id", "model", "answer", "tokens in/out", "cost"],
            [
                [
                    e(a["row_id"]),
                    e(a["model"]),
                    f"<pre>{e(a['response'])}{' …' if a['truncated'] else ''}</pre>",
                    f"{e(a['prompt_tokens'])}/{e(a['completion_tokens'])}",
                    e(usd(a["cost_usd"])),
                ]
                for a in d["sample"]
            ],
            num={4},
        )
        if d["sample"]
        else '<p class="note">no answers yet</p>'
    )
    est = cost["estimate_usd"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchops report {e(d["run_id"])}</title>
<style>{CSS}</style></head>
<body>
<h1>batchops run {e(d["run_id"])}</h1>
<p class="meta">source {e(d["source"])} · endpoint {e(d["endpoint"])} · models {e(", ".join(d["models"]))}
 · mode {e(d["mode"])} · run dir {e(d["run_dir"])} · generated {e(d["generated_at"])}</p>
<h2>Rows</h2>
<div class="cards"><div class="card"><span>total</span><b id="rows-total">{e(d["total_rows"])}</b></div>{cards}</div>
<p>retried rows: <span id="retried-rows">{e(r["rows"])}</span> ({e(r["attempts"])} extra attempt(s))</p>
<h2>Cost</h2>
<p>spent <b id="cost-total">{e(usd(cost["total_usd"]))}</b>{f" · estimated <span id=cost-estimate>{e(usd(est))}</span>" if est is not None else ""}</p>
{_dedup_html(d.get("dedup"))}
<h3>per model</h3>{by_model}
<h3>per batch</h3>{by_batch}
<h2>Timeline of batches (created → ended)</h2>
{_timeline_svg(d["timeline"])}
<h2>Errors</h2>
{errors}{attempts}
<h2>Sample of answers</h2>
{sample}
</body></html>
"""


def _dedup_html(saved: dict[str, Any] | None) -> str:
    """Identical requests sent once: the rows that shared one and what that saved."""
    if not saved or not saved["rows"]:
        return ""
    rows, requests = f"{saved['rows']:,}", f"{saved['requests']:,}"
    return (
        f'<p id="dedup">Identical requests sent once: {html.escape(rows)} row(s) took the '
        f"answer of an identical row&#39;s request: {html.escape(requests)} request(s) and "
        f"{html.escape(fmt_usd(saved['cost_usd']))} saved (the cost is on the row sent)</p>"
    )
