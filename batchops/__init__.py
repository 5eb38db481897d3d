"""batchops: run large tables through the OpenAI Batch API (and compatible APIs), unattended.

    import batchops
    out = batchops.run(df, prompt="Classify: {text}", model="gpt-4o-mini", run_dir="runs/demo")

The functions below are imported on first use, so `import batchops` stays light (no pandas,
polars or openai until a function needs them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loguru import logger

from batchops.errors import BatchopsError, ConfigError, InputError, RunIncomplete, StateError

__version__ = "0.1.0"

# A library does not print logs unless asked: the CLI (or the user) enables "batchops".
logger.disable("batchops")

# public name → module that defines it
_LAZY = {
    "run": "batchops.api",
    "run_job": "batchops.api",
    "build_spec": "batchops.api",
    "status": "batchops.api",
    "merge": "batchops.merge",  # the module, callable as the API function (see merge.py)
    "missing": "batchops.api",
    "retry_missing": "batchops.api",
    "cancel": "batchops.api",
    "cost": "batchops.api",
    "RunReport": "batchops.api",
    "JobSpec": "batchops.spec",
    "ModelEntry": "batchops.spec",
    "RetryPolicy": "batchops.spec",
    "PriceOverride": "batchops.spec",
}

if TYPE_CHECKING:
    from batchops.api import (
        RunReport,
        build_spec,
        cancel,
        cost,
        missing,
        retry_missing,
        run,
        run_job,
        status,
    )
    from batchops.merge import _CallableModule
    from batchops.spec import JobSpec, ModelEntry, PriceOverride, RetryPolicy

    merge: _CallableModule


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchops' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module == f"batchops.{name}" else getattr(imported, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "BatchopsError",
    "ConfigError",
    "InputError",
    "JobSpec",
    "ModelEntry",
    "PriceOverride",
    "RetryPolicy",
    "RunIncomplete",
    "RunReport",
    "StateError",
    "__version__",
    "build_spec",
    "cancel",
    "cost",
    "merge",
    "missing",
    "retry_missing",
    "run",
    "run_job",
    "status",
]
