"""Faults of downloaded output files: dropped, duplicated, failure-first, malformed, truncated lines.

The stored file stays whole (its batch's `request_counts` tell the truth); only what a download
returns is damaged, and only on the first `result_fault_downloads` downloads of each file, so a
client that checks the file against the counts and downloads it again can recover.
"""

from __future__ import annotations

import random

import orjson

from batchops.emulator import errors as E
from batchops.emulator.executor import chosen
from batchops.emulator.ids import hex_id
from batchops.emulator.scenario import Scenario

# Not JSON: what a cut connection or a bad proxy leaves in the middle of a file.
MALFORMED_LINE = b'{"id": "batch_req_malformed", "custom_id": "'


def active(sc: Scenario) -> bool:
    return bool(
        sc.output_drop_fraction
        or sc.output_truncate_last
        or sc.output_duplicate_fraction
        or sc.output_failure_first_fraction
        or sc.output_malformed_lines
    )


def applies(sc: Scenario, download: int) -> bool:
    """`download` counts from 1; faults hit downloads 1..result_fault_downloads (0 = all)."""
    return active(sc) and (sc.result_fault_downloads == 0 or download <= sc.result_fault_downloads)


def _custom_id(line: bytes) -> str | None:
    try:
        cid = orjson.loads(line).get("custom_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return cid if isinstance(cid, str) else None


def _failure_line(custom_id: str) -> bytes:
    err = E.server_error(500)
    line = {
        "id": hex_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": 500, "request_id": hex_id("req_"), "body": err.body()},
        "error": None,
    }
    return orjson.dumps(line)


def damage(data: bytes, sc: Scenario, file_id: str) -> bytes:
    """The output file as a faulty download returns it."""
    seed = sc.seed
    out: list[bytes] = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        cid = _custom_id(line)
        if cid is not None and chosen(seed, "output_drop", cid, sc.output_drop_fraction):
            continue
        if cid is not None and chosen(
            seed, "output_failure_first", cid, sc.output_failure_first_fraction
        ):
            out.append(_failure_line(cid))
        out.append(line)
        if cid is not None and chosen(seed, "output_duplicate", cid, sc.output_duplicate_fraction):
            out.append(line)
    rng = random.Random(f"{seed}:{file_id}:malformed")
    for _ in range(sc.output_malformed_lines):
        out.insert(rng.randint(0, len(out)), MALFORMED_LINE)
    if sc.output_truncate_last and out:
        out[-1] = out[-1][: max(1, len(out[-1]) // 2)]
        return b"\n".join(out)  # cut mid-line: no final newline either
    return b"\n".join(out) + b"\n" if out else b""
