"""The state directory's lock: one node (or one restore) at a time on a state directory."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StateDirBusy(Exception):
    """Another process holds the lock; ``holder`` is the pid it wrote, or "unknown"."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def acquire(state_dir: Path) -> int:
    """An exclusive lock on ``state_dir/.lock`` (released by the kernel when the process ends, however it ends);
    StateDirBusy naming the holder's pid when another process has it."""
    fd = os.open(Path(state_dir) / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirBusy(holder) from None
    return fd
