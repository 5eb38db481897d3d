"""Log sinks for the command line. The library only logs; the CLI decides where logs go.

A DEBUG file per invocation (`<log-dir>/batch_execution_YYYYMMDD_HHMMSS.log`, `_2`, `_3` … added
when another process started in the same second) and INFO (or the
level -v/-q pick) on stderr, through the rich Console of the progress display when there is one.
The file shows the run, chunk and batch ids the engine attaches to each record. Every record passes a filter that masks API keys, so a key that
reached a message by accident still never lands in a log.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger
from rich.console import Console
from rich.text import Text

from batchops.masking import mask_secrets as _mask

if TYPE_CHECKING:
    from loguru import Message, Record

# Anything shaped like an OpenAI-style secret key.
_CONSOLE_FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}"
_FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {name}:{function}:{line} | {extra[_ids]}{message}"
# Ids the engine attaches with logger.contextualize/bind; shown in the file as [run=… chunk=… batch=…].
ID_FIELDS = ("run", "chunk", "batch")


def _file_format(record: Record) -> str:
    extra = record["extra"]
    ids = " ".join(f"{k}={extra[k]}" for k in ID_FIELDS if extra.get(k) is not None)
    extra["_ids"] = f"[{ids}] " if ids else ""
    return _FILE_FORMAT + "\n{exception}"


def rich_sink(console: Console, secrets: list[str] | None = None) -> Callable[[Message], None]:
    """A loguru sink that prints through a rich Console, so log lines appear above a live
    progress display instead of tearing it. Colours are loguru's, rendered (or dropped, under
    NO_COLOR or without a terminal) by rich. The whole text is masked, traceback included."""

    def write(message: Message) -> None:
        text = mask_secrets(str(message).rstrip("\n"), secrets)
        console.print(Text.from_ansi(text), soft_wrap=True, highlight=False)

    return write


class MaskedFile:
    """The DEBUG log file, written through mask_secrets as a whole: a filter only reaches the
    message, not an exception's text in the traceback."""

    def __init__(
        self,
        path: Path,
        secrets: list[str] | None = None,
        *,
        name: Callable[[], Path] | None = None,
    ) -> None:
        self.path = path
        self._secrets = secrets
        # Picks this process's own file name (unique even when two start in the same second).
        self._name = name
        # Opened on the first record: a command that fails before logging anything (bad input)
        # leaves no empty log file (and no log folder) behind.
        self._fh: TextIO | None = None

    def write(self, text: str) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._name is not None:
                self.path = self._name()
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(mask_secrets(text, self._secrets))

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def stop(self) -> None:  # loguru calls this on logger.remove()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _MaskedStream:
    def __init__(self, stream: Any, secrets: list[str] | None) -> None:
        self._stream, self._secrets = stream, secrets

    def write(self, text: str) -> None:
        self._stream.write(mask_secrets(text, self._secrets))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._stream, "isatty", lambda: False)())


def _secret_values() -> list[str]:
    values = [v.strip() for v in os.environ.get("OPENAI_API_KEYS", "").split(",") if v.strip()]
    if os.environ.get("OPENAI_API_KEY"):
        values.append(os.environ["OPENAI_API_KEY"])
    return [v for v in values if len(v) >= 6]


def mask_secrets(text: str, secrets: list[str] | None = None) -> str:
    """`text` without any key: the given ones (default: the environment's) and anything
    shaped like a key."""
    return _mask(text, secrets if secrets is not None else _secret_values())


def new_log_path(log_dir: Path, stamp: str | None = None) -> Path:
    """A log file of this invocation alone: `batch_execution_YYYYMMDD_HHMMSS.log`, or with `_2`,
    `_3` … when another process (or invocation) took that name in the same second. Created
    with O_EXCL, so two processes never share a file."""
    stamp = stamp or time.strftime("%Y%m%d_%H%M%S")
    n = 1
    while True:
        path = log_dir / f"batch_execution_{stamp}{'' if n == 1 else f'_{n}'}.log"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return path
        except FileExistsError:
            n += 1


def configure(
    log_dir: Path | None = Path("logs"),
    verbosity: int = 0,
    *,
    sink: Any = None,
    console: Console | None = None,
) -> Path | None:
    """Install the sinks; returns the log file's path (None when log_dir is None).

    The console sink prints through `console` (a rich Console shared with the progress display)
    when given, else to `sink` or stderr.
    """
    logger.remove()
    logger.enable("batchops")
    secrets = _secret_values()

    def scrub(record: Record) -> bool:
        record["message"] = mask_secrets(record["message"], secrets)
        return True

    level = {-2: "ERROR", -1: "WARNING", 0: "INFO", 1: "DEBUG"}.get(
        max(-2, min(1, verbosity)), "INFO"
    )
    if console is not None:
        # rich decides about colour (NO_COLOR, terminal or not); loguru always emits ANSI to it.
        logger.add(
            rich_sink(console, secrets),
            level=level,
            format=_CONSOLE_FORMAT,
            filter=scrub,
            colorize=True,
            diagnose=False,
        )
    else:
        colorize = None if not os.environ.get("NO_COLOR") else False
        stream = sink or sys.stderr
        logger.add(
            _MaskedStream(stream, secrets) if hasattr(stream, "write") else stream,
            level=level,
            format=_CONSOLE_FORMAT,
            filter=scrub,
            colorize=colorize,
            diagnose=False,
        )
    if log_dir is None:
        return None
    stamp = time.strftime("%Y%m%d_%H%M%S")  # the invocation's start, named when first written
    path = log_dir / f"batch_execution_{stamp}.log"
    # diagnose=False: tracebacks must not show local variables (a client holds its API key).
    logger.add(
        MaskedFile(path, secrets, name=lambda: new_log_path(log_dir, stamp)),
        level="DEBUG",
        format=_file_format,
        filter=scrub,
        colorize=False,
        enqueue=False,
        diagnose=False,
    )
    return path
