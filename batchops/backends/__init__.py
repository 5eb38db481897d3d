"""Remote APIs behind one seam: the engine speaks `Backend`, never a provider SDK.

A new provider is its own module here, one line in `make_backend`, its emulator dialect and
its tests. SDK modules are imported lazily: `import batchops` stays light.
"""

from __future__ import annotations

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
    if entry.provider == "anthropic":
        # Its own base_url or the SDK's default (api.anthropic.com): never the OpenAI --base-url.
        try:
            from batchops.backends.anthropic import DEFAULT_TIMEOUT as ANTHROPIC_TIMEOUT
            from batchops.backends.anthropic import AnthropicBackend
        except ImportError as exc:  # the SDK is an extra: pip install 'batchops[anthropic]'
            raise ConfigError(
                f"model {entry.name}: provider anthropic needs the anthropic SDK "
                f"(pip install 'batchops[anthropic]'): {exc}"
            ) from None
        return AnthropicBackend(
            entry,
            api_key,
            policy=policy,
            scrub=scrub,
            timeout=timeout or ANTHROPIC_TIMEOUT,
            rules=rules or [],
        )
    if entry.provider == "gemini":
        try:
            from batchops.backends.gemini import DEFAULT_TIMEOUT as GEMINI_TIMEOUT
            from batchops.backends.gemini import GeminiBackend
        except ImportError as exc:  # the SDK is an extra: pip install 'batchops[gemini]'
            raise ConfigError(
                f"model {entry.name}: provider gemini needs google-genai "
                f"(pip install 'batchops[gemini]'): {exc}"
            ) from None
        return GeminiBackend(
            entry,
            api_key,
            policy=policy,
            scrub=scrub,
            timeout=timeout or GEMINI_TIMEOUT,
            rules=rules or [],
        )
    raise ConfigError(f"model {entry.name}: provider {entry.provider!r} has no backend")
