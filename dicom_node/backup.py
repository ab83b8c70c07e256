"""``osteoscreen backup``: a consistent copy of the node's state databases while it runs.

SQLite's online backup API copies a consistent snapshot even while the service writes
(WAL mode); each copy is checked with ``PRAGMA integrity_check`` and fsynced before the
command reports success. Received CT and results are files: back them up with the
site's file backup (their paths are in the database).
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
from pathlib import Path

DATABASES = ("osteoscreen.sqlite", "labs.sqlite")


class BackupError(RuntimeError):
    pass


def _copy(src: Path, dst: Path) -> None:
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dst)
    try:
        source.backup(target, pages=1024)
        ok = target.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            raise BackupError(f"{dst}: integrity check failed after the copy ({ok})")
    finally:
        target.close()
        source.close()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_state(state_dir: Path, dest: Path | None = None, *, now: dt.datetime | None = None) -> list[Path]:
    """Copy every state database of ``state_dir`` into a new timestamped folder under ``dest``."""
    state_dir = Path(state_dir)
    found = [state_dir / n for n in DATABASES if (state_dir / n).is_file()]
    if not found:
        raise BackupError(f"no state database in {state_dir}: is node.state_dir right (see `osteoscreen status`)?")
    stamp = (now or dt.datetime.now()).strftime("%Y%m%dT%H%M%S")
    folder = Path(dest or state_dir / "backups") / f"osteoscreen-{stamp}"
    folder.mkdir(parents=True, exist_ok=False, mode=0o700)  # holds PHI
    out = []
    try:
        for src in found:
            dst = folder / src.name
            try:
                _copy(src, dst)
            except sqlite3.Error as exc:
                raise BackupError(f"{src}: {exc}") from None
            os.chmod(dst, 0o600)
            out.append(dst)
    except BaseException:  # no half backup that looks like a whole one
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return out
