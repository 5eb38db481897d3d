"""batchops: run large tables through the OpenAI Batch API (and compatible APIs), unattended."""

from batchops.errors import BatchopsError, ConfigError, InputError, RunIncomplete, StateError

__version__ = "0.1.0"

__all__ = ["BatchopsError", "ConfigError", "InputError", "RunIncomplete", "StateError", "__version__"]
