"""One writer per run dir: an exclusive `flock` on `<run-dir>/.lock`, which holds the writer's pid.

Every command that writes a run (run, retry-missing, merge, cancel, watch, monitor) holds it for
its whole life. A second writer does not wait: it exits 2 at once, naming the holder's pid, so a
scheduler that starts a command while the previous one still runs gets a clear answer instead of
a queue of processes. Read-only commands (status, cost, missing, report) never take it.

The kernel drops a flock when its process dies (kill -9 included), so a stale `.lock` of a dead
process is simply taken over: the file's content is only a hint for the message.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchops.errors import InputError

LOCK_NAME = ".lock"

# Re-entrant inside one process (flock locks are per open file, so a second open would block
# on itself): path → (fd, depth).
_held: dict[str, tuple[int, int]] = {}


class RunLocked(InputError):
    """Another process is writing this run dir (exit 2, nothing was sent)."""


def holder_pid(run_dir: Path) -> int | None:
    try:
        text = (run_dir / LOCK_NAME).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def hold(run_dir: Path, *, create: bool = False) -> Iterator[None]:
    """Hold the run dir's lock for the block. Without `create`, a run dir that does not exist is
    not created (the command then fails on its own with its usual message)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if not create:
            yield
            return
        run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            _release(key)
        return
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise InputError(
                f"{path}: cannot create the run's lock file ({exc.strerror}); "
                "the run dir must be writable for this command"
            ) from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder_pid(run_dir)
        who = f"pid {pid}" if pid else "pid unknown"
        raise RunLocked(
            f"{run_dir}: another batchops process ({who}) is writing this run; "
            "wait for it to end (or stop it), then run the command again"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        _release(key)


def _release(key: str) -> None:
    fd, depth = _held[key]
    if depth > 1:
        _held[key] = (fd, depth - 1)
        return
    del _held[key]
    os.close(fd)  # closing the only open file of the lock releases the flock
