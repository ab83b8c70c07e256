"""Retention: received CT is deleted once it has served its purpose and ``instances_days`` have passed.

A series qualifies when it was decided (routed) that many days ago and either it was
skipped by routing, or its job finished ('done') or was cancelled by an operator (not
screened on purpose, like a skipped series) and every result of that job was delivered:
none is still waiting in the outbox ('pending') or was given up on ('failed': refused for
good by the PACS, or the RIS; `osteoscreen outbox retry` once the cause is fixed). Failed
jobs keep their CT (an operator may retry them). Results, reports,
jobs and the audit log stay: they are small and they are the record. The instance rows go
with the files, so a later re-send of the same study is stored and screened again (an
unchanged result is recognised as a duplicate and not sent twice).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from dicom_node.db import NodeDB

log = logging.getLogger("osteoscreen.retention")

PURGEABLE = """
SELECT s.series_uid FROM series s
LEFT JOIN jobs j ON j.series_uid = s.series_uid
WHERE s.state = 'purging'
   OR (s.state = 'decided' AND s.decided_at < ?
       AND (s.eligible = 0 OR (j.state IN ('done', 'cancelled')
            AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id AND o.state IN ('pending', 'failed')))))
"""


@dataclass(frozen=True)
class PurgeReport:
    series: int
    instances: int
    bytes_freed: int
    missing_files: int


def purge_screened_instances(db: NodeDB, instances_root: Path, older_than_days: float, *,
                             now: float | None = None, dry_run: bool = False) -> PurgeReport:
    """Delete the received CT of every qualifying series (see the module docstring).

    A series is purged in three steps so that the receivers, which run beside this, lose nothing:
    ``claim_series`` marks it 'purging' (an instance of it re-sent now is refused for the moment, not
    taken for a duplicate of a file about to go), then the files go, then ``release_series`` drops their
    index rows and marks it 'purged' unless a new instance reopened it meanwhile. A series left 'purging' by
    a crash is finished by the next run.
    """
    cutoff = (now if now is not None else time.time()) - older_than_days * 86400.0
    n_series = n_inst = freed = missing = 0
    for (series_uid,) in db._query(PURGEABLE, (cutoff,)):
        if dry_run:
            rows = [(None, p) for p in db.instance_paths(series_uid)]
        else:
            claimed = claim_series(db, series_uid, cutoff)
            if claimed is None:  # reopened since the query
                continue
            rows = claimed
        f, m = delete_files([p for _, p in rows], instances_root, dry_run=dry_run)
        freed, missing = freed + f, missing + m
        if not dry_run:
            release_series(db, series_uid, rows,
                           f"retention: {len(rows)} instance(s) deleted, {older_than_days:g} days after routing")
        n_series += 1
        n_inst += len(rows)
    return PurgeReport(n_series, n_inst, freed, missing)


def claim_series(db: NodeDB, series_uid: str, cutoff: float) -> list[tuple[str, str]] | None:
    """Mark the series 'purging' if it still qualifies; its instances as (SOP Instance UID, path)."""
    with db._tx() as tx:
        if not tx.execute(f"SELECT 1 FROM ({PURGEABLE}) WHERE series_uid=?", (cutoff, series_uid)).fetchone():
            return None
        tx.execute("UPDATE series SET state='purging' WHERE series_uid=?", (series_uid,))
        return tx.execute("SELECT sop_instance_uid, path FROM instances WHERE series_uid=?", (series_uid,)).fetchall()


def delete_files(paths: list[str], instances_root: Path, *, dry_run: bool = False) -> tuple[int, int]:
    """(bytes freed, files already missing); empty series and study folders are removed too."""
    freed = missing = 0
    for p in map(Path, paths):
        try:
            size = p.stat().st_size
            if not dry_run:
                p.unlink()
            freed += size
        except FileNotFoundError:
            missing += 1
    if not dry_run:
        _remove_empty_dirs({Path(p).parent for p in paths}, instances_root)
    return freed, missing


def release_series(db: NodeDB, series_uid: str, rows: list[tuple[str, str]], detail: str) -> None:
    """Drop the deleted instances' rows; the series is 'purged', or stays 'receiving' if an instance that
    arrived during the purge reopened it."""
    with db._tx() as tx:
        tx.executemany("DELETE FROM instances WHERE sop_instance_uid=? AND series_uid=?",
                       [(sop, series_uid) for sop, _ in rows])
        tx.execute("UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?),"
                   " state=CASE WHEN state='purging' THEN 'purged' ELSE state END WHERE series_uid=?",
                   (series_uid, series_uid))
        tx.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                   (time.time(), "purged", series_uid, detail))


def _remove_empty_dirs(dirs: set[Path], root: Path) -> None:
    for d in dirs:
        for parent in (d, d.parent):  # series folder, then study folder
            if parent == root or root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty: other series of the study are still kept
                break


class RetentionScheduler:
    """Purges every ``every_h`` hours (and once at start) when ``instances_days`` > 0."""

    def __init__(self, db: NodeDB, instances_root: Path, instances_days: float, every_h: float = 6.0) -> None:
        self.db, self.root, self.days = db, Path(instances_root), instances_days
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "misfire_grace_time": 3600})
        self.every_h = every_h

    def run_once(self) -> PurgeReport:
        r = purge_screened_instances(self.db, self.root, self.days)
        if r.series:
            log.info("retention: purged %d series (%d instances, %.1f MB) screened or skipped over %g days ago",
                     r.series, r.instances, r.bytes_freed / 1e6, self.days)
        return r

    def start(self) -> None:
        self._scheduler.add_job(self.run_once, IntervalTrigger(hours=self.every_h), id="retention",
                                next_run_time=dt.datetime.now())  # once now, then every every_h hours
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:  # stop() also runs after a start that failed before this one started
            self._scheduler.shutdown(wait=True)
