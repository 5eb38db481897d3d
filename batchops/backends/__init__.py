"""Remote APIs behind one seam: the engine speaks `Backend`, never a provider SDK.

A new provider is its own module here, one line in `make_backend`, its emulator dialect and
its tests. SDK modules are imported lazily: `import batchops` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from batchops.backends.base import (
    Backend,
    BatchProblem,
    RemoteBatch,
    RemoteError,
    RemoteFile,
    SubmitRequest,
)
from batchops.errors import ConfigError
from batchops.policy import Rule
from batchops.spec import ModelEntry, RetryPolicy

__all__ = [
    "Backend",
    "BackendFactory",
    "BatchProblem",
    "RemoteBatch",
    "RemoteError",
    "RemoteFile",
    "SubmitRequest",
    "make_backend",
]

# (model entry, api key, default base URL) → a backend for that endpoint and key.
BackendFactory = Callable[[ModelEntry, str, "str | None"], Backend]

OPENAI_DIALECT = ("openai", "azure", "dashscope", "vllm")
# provider → (backend module, class, pip extra): imported on first use, so `import batchops`
# never loads an SDK it does not need.
OTHER_SDKS = {
    "anthropic": ("batchops.backends.anthropic", "AnthropicBackend", "anthropic"),
    "gemini": ("batchops.backends.gemini", "GeminiBackend", "gemini"),
}


def make_backend(
    entry: ModelEntry,
    api_key: str,
    base_url: str | None,
    *,
    policy: RetryPolicy,
    scrub: Callable[[str], str] = str,
    timeout: float | None = None,
    rules: list[Rule] | None = None,
) -> Backend:
    """The backend that speaks a model entry's provider dialect."""
    if entry.provider in OPENAI_DIALECT:
        from batchops.backends.openai import DEFAULT_TIMEOUT, OpenAIBackend

        return OpenAIBackend(
            entry,
            api_key,
            base_url=base_url,
            policy=policy,
            scrub=scrub,
            timeout=timeout or DEFAULT_TIMEOUT,
            rules=rules or [],
        )
    if entry.provider in OTHER_SDKS:
        # Its own base_url or the SDK's default: never the OpenAI --base-url.
        module_name, class_name, extra = OTHER_SDKS[entry.provider]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # the SDK is an extra: pip install 'batchops[...]'
            raise ConfigError(
                f"model {entry.name}: provider {entry.provider} needs its SDK "
                f"(pip install 'batchops[{extra}]'): {exc}"
            ) from None
        backend: Backend = getattr(module, class_name)(
            entry,
            api_key,
            policy=policy,
            scrub=scrub,
            timeout=timeout or module.DEFAULT_TIMEOUT,
            rules=rules or [],
        )
        return backend
    raise ConfigError(f"model {entry.name}: provider {entry.provider!r} has no backend")
