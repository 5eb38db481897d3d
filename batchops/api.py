"""The library behind every command: one small function per command, in modules by job.

The CLI parses flags, calls one function here, prints, exits. This module only gathers them:

- `batchops.config`: `build_spec` (flags + batchops.toml → JobSpec)
- `batchops.driver`: runs — `run_job`, `dry_run_job`, `retry_missing`, `watch`, `cancel`, `merge`
- `batchops.overview`: reading a run — `status`, `missing`, `cost`, `report`, the pool
- `batchops.estimates`, `batchops.summaries`: what a run costs and comes to
- `batchops.frames`: the Python API, `batchops.run(df, …)`
"""

from __future__ import annotations

from batchops.config import (
    build_spec,
)
from batchops.driver import (
    cancel,
    drive,
    dry_run_job,
    make_pool,
    merge,
    merge_run,
    retry_missing,
    run_job,
    validate_inputs,
    watch,
)
from batchops.estimates import (
    estimate,
    online_estimate,
)
from batchops.frames import (
    API_POLL_INTERVAL,
    FRAME_SOURCE,
    run,
)
from batchops.overview import (
    cost,
    missing,
    pool_reset,
    pool_status,
    report,
    status,
    status_of,
)
from batchops.summaries import (
    Estimate,
    RunReport,
)

__all__ = [
    "API_POLL_INTERVAL",
    "Estimate",
    "FRAME_SOURCE",
    "RunReport",
    "drive",
    "build_spec",
    "cancel",
    "cost",
    "dry_run_job",
    "estimate",
    "make_pool",
    "merge",
    "merge_run",
    "missing",
    "online_estimate",
    "pool_reset",
    "pool_status",
    "report",
    "retry_missing",
    "run",
    "run_job",
    "status",
    "status_of",
    "validate_inputs",
    "watch",
]
