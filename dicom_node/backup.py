"""``osteoscreen backup`` and ``osteoscreen restore``: the node's state databases, copied safely.

Backup: SQLite's online backup API copies a consistent snapshot even while the service
writes (WAL mode). It copies in one step (``pages=-1``): a stepwise copy starts over
whenever another connection writes, so it never ended on a node receiving a study.
Each copy is checked with ``PRAGMA integrity_check`` and fsynced before the command
reports success. The site's patient-key secret (``hl7.privacy``) is copied beside the
databases, so that a restored node writes the same log keys. Received CT and results
are files: back them up with the site's file backup (their paths are in the database).

Restore: only while the node is stopped (it takes the state directory's lock, the one
``osteoscreen serve`` holds). Each database of the backup is checked, copied with the
backup API into a new file beside the live one and moved in place; the file it
replaces is kept, with its ``-wal`` and ``-shm`` files, as ``NAME.replaced-STAMP``
(a leftover ``-wal`` beside a copied-in database would be replayed into it).
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
from pathlib import Path

from dicom_node.index_recovery import CHECK_REQUEST, request_store_check
from dicom_node.state_lock import StateDirBusy, acquire
from hl7.privacy import SECRET_NAME

DATABASES = ("osteoscreen.sqlite", "labs.sqlite")
SIDE_FILES = ("-wal", "-shm", "-journal")


class BackupError(RuntimeError):
    pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check(db: sqlite3.Connection, name: Path, when: str) -> None:
    ok = db.execute("PRAGMA integrity_check").fetchone()[0]
    if ok != "ok":
        raise BackupError(f"{name}: integrity check failed {when} ({ok})")


def _copy(src: Path, dst: Path) -> None:
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dst)
    try:
        source.backup(target, pages=-1)  # one step: a snapshot, never restarted by the node's commits
        _check(target, dst, "after the copy")
    finally:
        target.close()
        source.close()
    _fsync(dst)


def _new_folder(parent: Path, stamp: str) -> Path:
    """``parent/osteoscreen-STAMP``, or ``-2``, ``-3``... when a backup of the same second exists."""
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for n in range(1, 1000):
        folder = parent / (f"osteoscreen-{stamp}" if n == 1 else f"osteoscreen-{stamp}-{n}")
        try:
            folder.mkdir(mode=0o700)  # holds PHI
            return folder
        except FileExistsError:
            continue
    raise BackupError(f"{parent}: 999 backups named osteoscreen-{stamp}* already: remove old ones")


def backup_state(state_dir: Path, dest: Path | None = None, *, now: dt.datetime | None = None) -> list[Path]:
    """Copy every state database of ``state_dir`` into a new timestamped folder under ``dest``."""
    state_dir = Path(state_dir)
    found = [state_dir / n for n in DATABASES if (state_dir / n).is_file()]
    if not found:
        raise BackupError(f"no state database in {state_dir}: is node.state_dir right (see `osteoscreen status`)?")
    dest = Path(dest or state_dir / "backups")
    if dest.exists() and not dest.is_dir():
        raise BackupError(f"--dest {dest} is a file: give a folder (the backup is a new folder inside it)")
    folder = _new_folder(dest, (now or dt.datetime.now()).strftime("%Y%m%dT%H%M%S"))
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
        secret = state_dir / SECRET_NAME
        if secret.is_file():
            shutil.copyfile(secret, folder / SECRET_NAME)
            os.chmod(folder / SECRET_NAME, 0o600)
            _fsync(folder / SECRET_NAME)
    except BaseException:  # no half backup that looks like a whole one
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return out


# --- restore ------------------------------------------------------------------------------------------------
def lock_stopped_node(state_dir: Path) -> int:
    """The state directory's lock (``dicom_node.service.lock_state_dir``), taken so that the node cannot run
    during a restore; BackupError naming the running node when it holds it."""
    try:
        return acquire(state_dir)
    except StateDirBusy as exc:
        raise BackupError(f"osteoscreen (pid {exc.holder}) is running on {state_dir}: stop it first "
                          "(systemctl stop osteoscreen), then restore") from None


def _backup_databases(backup_dir: Path) -> list[Path]:
    if not backup_dir.is_dir():
        raise BackupError(f"{backup_dir} is not a folder: give the osteoscreen-YYYYMMDDTHHMMSS folder made by "
                          "`osteoscreen backup`")
    found = [backup_dir / n for n in DATABASES if (backup_dir / n).is_file()]
    if not (backup_dir / DATABASES[0]).is_file():
        raise BackupError(f"no {DATABASES[0]} in {backup_dir}: give the osteoscreen-YYYYMMDDTHHMMSS folder made by "
                          "`osteoscreen backup`")
    for path in found:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                _check(db, path, "in the backup: take an older backup")
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise BackupError(f"{path}: {exc} (take an older backup)") from None
    return found


def _move_aside(live: Path, stamp: str) -> Path | None:
    """Rename the live database and its -wal/-shm/-journal to ``NAME.replaced-STAMP...``; the new name, if any."""
    kept = None
    for suffix in ("", *SIDE_FILES):
        path = live.with_name(live.name + suffix)
        if path.exists():
            target = live.with_name(f"{live.name}.replaced-{stamp}{suffix}")
            path.rename(target)
            kept = kept or target
    return kept


def _restore_one(src: Path, state_dir: Path, stamp: str) -> Path | None:
    live = state_dir / src.name
    incoming = state_dir / f".{src.name}.restoring"
    incoming.unlink(missing_ok=True)
    try:
        _copy(src, incoming)
    except sqlite3.Error as exc:
        incoming.unlink(missing_ok=True)
        raise BackupError(f"{src}: {exc}") from None
    os.chmod(incoming, 0o600)
    kept = _move_aside(live, stamp)
    os.replace(incoming, live)
    return kept


def _own_like(state_dir: Path, files: list[Path]) -> None:
    """Restored files owned as the state directory is: run as root (sudo), a restore left root-owned 0600
    databases that the service user could not open, and the node would not start."""
    if os.geteuid() != 0:
        return
    st = os.stat(state_dir)
    for f in files:
        if f.exists():
            os.chown(f, st.st_uid, st.st_gid)


def restore_state(backup_dir: Path, state_dir: Path, *, now: dt.datetime | None = None) -> list[tuple[Path, Path | None]]:
    """Put the databases of ``backup_dir`` in ``state_dir`` (the node stopped); (restored, file kept aside) each."""
    backup_dir, state_dir = Path(backup_dir), Path(state_dir)
    found = _backup_databases(backup_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_stopped_node(state_dir)
    try:
        stamp = (now or dt.datetime.now()).strftime("%Y%m%dT%H%M%S")
        done = [(state_dir / src.name, _restore_one(src, state_dir, stamp)) for src in found]
        secret = backup_dir / SECRET_NAME
        if secret.is_file():
            shutil.copyfile(secret, state_dir / SECRET_NAME)
            os.chmod(state_dir / SECRET_NAME, 0o600)
        # the instances received after the backup are on disk but not in the restored index: the next start
        # indexes them again from their headers
        request_store_check(state_dir, f"the state databases were restored from {backup_dir.name}")
        _own_like(state_dir, [p for p, _ in done] + [state_dir / CHECK_REQUEST]
                  + ([state_dir / SECRET_NAME] if secret.is_file() else []))
        _fsync(state_dir)
        return done
    finally:
        os.close(lock)
