"""Durable file writes: temp file in the same directory, fsync, atomic rename, fsync the directory.

After ``write_durably`` returns, the file is complete on disk under its final
name, or absent: never half-written, even after a crash or power loss.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


class DurableFile:
    """A file written in pieces that appears under ``path`` only when committed, and then for good.

    The pieces go to a temporary file beside ``path``; ``commit`` fsyncs it,
    renames it into place and fsyncs the directory. ``discard`` (or an error)
    removes the temporary file, so ``path`` is never half-written.
    """

    def __init__(self, path: str | Path, *, prefix: str = ".tmp.") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=prefix, suffix=".tmp")

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> None:  # noqa: ANN001 - any bytes-like object
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self._fd, view):]

    def commit(self) -> None:
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._tmp, self.path)
        except BaseException:
            self.discard()
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        Path(self._tmp).unlink(missing_ok=True)


def write_durably(path: str | Path, write: Callable[[BinaryIO], object], *, prefix: str = ".tmp.") -> None:
    """Write ``path`` through ``write(file object)``, durably and atomically (see ``DurableFile``)."""
    target = DurableFile(path, prefix=prefix)
    try:
        with open(target.fileno(), "wb", closefd=False) as fh:
            write(fh)
    except BaseException:
        target.discard()
        raise
    target.commit()
