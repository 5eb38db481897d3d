"""Log sinks for the command line. The library only logs; the CLI decides where logs go.

A DEBUG file per invocation (`<log-dir>/batch_execution_YYYYMMDD_HHMMSS.log`) and INFO (or the
level -v/-q pick) on stderr. Every record passes a filter that masks API keys, so a key that
reached a message by accident still never lands in a log.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from loguru import logger

from batchops.classify import mask_key

# Anything shaped like an OpenAI-style secret key.
_KEY_RE = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
_CONSOLE_FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}"
_FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {name}:{function}:{line} | {message}"


def _secret_values() -> list[str]:
    values = [v.strip() for v in os.environ.get("OPENAI_API_KEYS", "").split(",") if v.strip()]
    if os.environ.get("OPENAI_API_KEY"):
        values.append(os.environ["OPENAI_API_KEY"])
    return [v for v in values if len(v) >= 6]


def mask_secrets(text: str, secrets: list[str] | None = None) -> str:
    for s in secrets if secrets is not None else _secret_values():
        text = text.replace(s, mask_key(s))
    return _KEY_RE.sub(lambda m: mask_key(m.group(0)), text)


def configure(log_dir: Path | None = Path("logs"), verbosity: int = 0, *, sink=None) -> Path | None:
    """Install the sinks; returns the log file's path (None when log_dir is None)."""
    logger.remove()
    logger.enable("batchops")
    secrets = _secret_values()

    def scrub(record) -> bool:
        record["message"] = mask_secrets(record["message"], secrets)
        return True

    level = {-2: "ERROR", -1: "WARNING", 0: "INFO", 1: "DEBUG"}.get(
        max(-2, min(1, verbosity)), "INFO"
    )
    colorize = None if not os.environ.get("NO_COLOR") else False
    logger.add(
        sink or sys.stderr, level=level, format=_CONSOLE_FORMAT, filter=scrub, colorize=colorize
    )
    if log_dir is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"batch_execution_{time.strftime('%Y%m%d_%H%M%S')}.log"
    logger.add(
        path, level="DEBUG", format=_FILE_FORMAT, filter=scrub, encoding="utf-8", enqueue=False
    )
    return path
