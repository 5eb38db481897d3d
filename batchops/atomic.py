"""The one way batchops writes a file that a reader (or a crash) must never see half written:
a temp file beside the target, fsynced, renamed over it, and the rename made durable."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: Path, tmp: Path | None = None) -> Iterator[IO[bytes]]:
    """Yield a temp file beside `path`; on success fsync + rename over it, else delete it.

    Temp names carry the pid (`.<name>.<pid>.<hex>.tmp`): a killed writer's leftovers are
    recognised and removed on the next start (rundir.clean_stale_temps). A file only one writer
    ever writes (under the run lock) may name its own fixed `tmp`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    # os.open with 0o666 (not mkstemp's 0o600) so the result gets the usual umask permissions.
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text(path: Path, text: str) -> None:
    """A whole text file, atomically."""
    with atomic_write(path) as fh:
        fh.write(text.encode("utf-8"))
