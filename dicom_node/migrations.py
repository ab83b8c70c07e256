"""Versioned schema migrations for the node's state database (SQLite ``PRAGMA user_version``).

A newer release opens an older state directory by applying, in order, each step whose
version is above the file's, each in its own transaction with the version bump; before
the first step it copies the file (``<name>.pre-v<N>.bak``, SQLite backup API), so an
upgrade can be undone by restoring that copy. A file written by a newer release is
refused with a message that says what to do: this release does not know its schema.
"""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("osteoscreen.migrations")


class SchemaTooNew(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


def sql_step(version: int, description: str, sql: str) -> Migration:
    def run(db: sqlite3.Connection) -> None:
        for statement in (s.strip() for s in sql.split(";")):
            if statement:
                db.execute(statement)
    return Migration(version, description, run)


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _has_tables(db: sqlite3.Connection) -> bool:
    return bool(db.execute("SELECT 1 FROM sqlite_master WHERE type='table' LIMIT 1").fetchone())


def migrate(db: sqlite3.Connection, path: Path, steps: list[Migration]) -> int:
    """Bring ``db`` (opened on ``path``, autocommit mode) to the last step's version; returns it."""
    latest = steps[-1].version
    current = schema_version(db)
    if current > latest:
        raise SchemaTooNew(
            f"{path}: schema version {current} was written by a newer osteoscreen (this release knows up to "
            f"{latest}). Run the newer release, or restore the backup taken before that upgrade "
            f"({path.name}.pre-v{latest + 1}.bak or an `osteoscreen backup`).")
    pending = [m for m in steps if m.version > current]
    if not pending:
        return current
    if _has_tables(db):
        backup = path.with_name(f"{path.name}.pre-v{pending[0].version}.bak")
        target = sqlite3.connect(backup)
        try:
            db.backup(target)
        finally:
            target.close()
        log.info("%s: schema version %d -> %d; copy of the old file in %s", path, current, latest, backup)
    for m in pending:
        db.execute("BEGIN IMMEDIATE")
        try:
            m.apply(db)
            db.execute(f"PRAGMA user_version = {int(m.version)}")
            db.execute("COMMIT")
        except Exception:
            db.execute("ROLLBACK")
            raise
        log.info("%s: applied schema step %d (%s)", path, m.version, m.description)
    return latest
