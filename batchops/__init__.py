"""batchops: run large tables through the OpenAI Batch API (and compatible APIs), unattended."""

from loguru import logger

from batchops.errors import BatchopsError, ConfigError, InputError, RunIncomplete, StateError

__version__ = "0.1.0"

# A library does not print logs unless asked: the CLI (or the user) enables "batchops".
logger.disable("batchops")

__all__ = [
    "BatchopsError",
    "ConfigError",
    "InputError",
    "RunIncomplete",
    "StateError",
    "__version__",
]
