"""Durable file writes: temp file in the same directory, fsync, atomic rename, fsync the directory.

After ``write_durably`` returns, the file is complete on disk under its final
name, or absent: never half-written, even after a crash or power loss.
"""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable


class DurableFile:
    """A file written in pieces that appears under ``path`` only when committed, and then for good.

    The pieces go to a temporary file beside ``path``; ``commit`` fsyncs it,
    renames it into place and fsyncs the directory. ``discard`` (or an error)
    removes the temporary file, so ``path`` is never half-written.
    """

    _names = itertools.count()  # with the pid, a temporary name no other writer is using (O_EXCL checks it)

    def __init__(self, path: str | Path, *, prefix: str = ".tmp.") -> None:
        self.path = Path(path)
        self._dir = os.path.dirname(os.fspath(path)) or "."
        try:
            self._fd, self._tmp = self._create(prefix)
        except FileNotFoundError:  # the directory is new: made here, not checked on every write (the ingest path)
            os.makedirs(self._dir, exist_ok=True)
            self._fd, self._tmp = self._create(prefix)

    def _create(self, prefix: str) -> tuple[int, str]:
        """A new temporary file beside ``path``, like ``tempfile.mkstemp`` (mode 0600) without its random names."""
        while True:
            tmp = os.path.join(self._dir, f"{prefix}{os.getpid()}.{next(self._names)}.tmp")
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
            except FileExistsError:  # left by an earlier process with the same pid
                continue

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
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


def disk_shortage(directory: str | Path, min_free_bytes: int, incoming: int = 0) -> str | None:
    """What is short when writing ``incoming`` more bytes would leave ``directory``'s filesystem under the
    ``min_free_bytes`` watermark (None: enough, or no watermark)."""
    if min_free_bytes <= 0:
        return None
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free - incoming >= min_free_bytes:
        return None
    return f"low disk space: {free // 2**20} MB free in {directory}, watermark {min_free_bytes // 2**20} MB"


def sweep_temporaries(root: str | Path, *, prefix: str = ".tmp.") -> int:
    """Remove the temporary files that writers killed before ``commit`` left under ``root``; return how many.

    Only files named as ``DurableFile`` names them (``{prefix}{pid}.{n}.tmp``) are removed. Call it only
    while no writer is at work under ``root`` (at start, before the workers run): a live writer's
    temporary file has the same name.
    """
    pattern = re.compile(re.escape(prefix) + r"\d+\.\d+\.tmp")
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if pattern.fullmatch(name):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


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
