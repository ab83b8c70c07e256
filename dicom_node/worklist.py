"""The daily worklist of positive screens for care coordinators (CSV + JSON), written by APScheduler.

One file pair per day, `worklist-YYYY-MM-DD.csv/.json`, listing the screen-positive
results whose jobs finished in the period before the run time: from the end of the
last list written (normally 24 hours). The end of each period written is stored in
the node database, so a node that was down at the worklist time writes every missed
day's list at its next start (up to MAX_CATCH_UP_DAYS; older ones are named in the
log with the command that writes them). Results of shadow mode (site validation) are
never listed. The files hold patient identifiers, so the folder is created 0700 and
the files 0600; it is the site's job to move them where coordinators work (a share,
the EHR inbox). CSV cells that a spreadsheet would run as a formula are prefixed
with ``'`` (see ``dicom_node.csvcells``).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from dicom_node.csvcells import csv_text
from dicom_node.db import NodeDB
from pipeline.durable import write_durably
from pipeline.report.notice import SHORT_DISCLAIMER

log = logging.getLogger("osteoscreen.worklist")
COLUMNS = ("finished_at", "patient_id", "issuer", "accession_number", "study_uid", "study_date", "category",
           "probability", "level", "mean_hu", "model", "sr_sop_instance_uid", "job_id", "notice")
MAX_CATCH_UP_DAYS = 14  # missed lists written at a start; a node down longer names the rest in its log


def _listed(result: dict) -> bool:
    """A new positive screen for coordinators: not a duplicate of a report sent, not EXPERIMENTAL, not shadow."""
    return (result.get("category_id") == "screen_positive" and "duplicate_of" not in result
            and not result.get("experimental") and not result.get("shadow"))


def positive_screens(db: NodeDB, start: float, end: float) -> list[dict]:
    """Screen-positive results of jobs finished in [start, end) (epoch seconds), oldest first, one per report."""
    rows = []
    for job_id, finished, result in db.finished_jobs(start, end):
        if not _listed(result):
            continue
        rows.append({
            "finished_at": dt.datetime.fromtimestamp(finished).isoformat(timespec="seconds"),
            "patient_id": result.get("patient_id", ""), "issuer": result.get("issuer", ""),
            "accession_number": result.get("accession_number", ""), "study_uid": result.get("study_uid", ""),
            "study_date": result.get("study_date", ""), "category": result.get("category", ""),
            "probability": result.get("probability"), "level": result.get("level", ""),
            "mean_hu": result.get("mean_hu", ""), "model": result.get("model", ""),
            "sr_sop_instance_uid": result.get("sr_sop_instance_uid", ""), "job_id": job_id,
            "notice": SHORT_DISCLAIMER,  # on every row: coordinators open the CSV, not the JSON
        })
    return rows


def write_worklist(db: NodeDB, directory: Path, day: dt.date, *, at: dt.time = dt.time(0, 0),
                   start: dt.datetime | None = None) -> tuple[Path, int]:
    """The worklist for the period ending on ``day`` at ``at`` (from ``start``, default 24 hours before);
    returns the CSV path and the row count."""
    end = dt.datetime.combine(day, at)
    start = start or end - dt.timedelta(days=1)
    rows = positive_screens(db, start.timestamp(), end.timestamp())
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    csv_path = directory / f"worklist-{day.isoformat()}.csv"
    json_path = csv_path.with_suffix(".json")
    doc = {"notice": SHORT_DISCLAIMER, "period_start": start.isoformat(), "period_end": end.isoformat(),
           "period_hours": round((end - start).total_seconds() / 3600, 2), "positive_screens": rows}
    for path, data in ((csv_path, csv_text(COLUMNS, rows).encode()), (json_path, json.dumps(doc, indent=1).encode())):
        write_durably(path, lambda fh, data=data: fh.write(data))
        os.chmod(path, 0o600)
    return csv_path, len(rows)


def last_due_end(now: dt.datetime, at: dt.time) -> dt.datetime:
    """The latest worklist time at or before ``now``."""
    today = dt.datetime.combine(now.date(), at)
    return today if today <= now else today - dt.timedelta(days=1)


def missed_periods(last_end: dt.datetime | None, now: dt.datetime, at: dt.time,
                   max_days: int = MAX_CATCH_UP_DAYS) -> tuple[list[tuple[dt.datetime, dt.datetime]], list[dt.date]]:
    """(start, end) of every worklist due by ``now`` and not written yet, oldest first, each starting where the
    one before ended (one list per day: after a change of ``at`` the first period is longer or shorter than
    24 h, never a second file for a day already written); and the days left out as older than ``max_days``.
    Before the first list ever written, only the latest one is due."""
    due = last_due_end(now, at)
    if last_end is None:
        return [(due - dt.timedelta(days=1), due)], []
    ends = [due - dt.timedelta(days=n) for n in range((due.date() - last_end.date()).days)][::-1]
    cut = max(0, len(ends) - max_days)
    skipped, kept = ends[:cut], ends[cut:]
    starts = [skipped[-1] if skipped else last_end] + kept[:-1]
    return list(zip(starts, kept)), [e.date() for e in skipped]


def catch_up(db: NodeDB, directory: Path, at: dt.time, now: dt.datetime | None = None) -> list[tuple[Path, int]]:
    """Write every worklist due and not written yet (see ``missed_periods``), recording each as written."""
    last = db.last_worklist_end()
    periods, skipped = missed_periods(dt.datetime.fromtimestamp(last) if last is not None else None,
                                      now or dt.datetime.now(), at)
    if skipped:
        log.warning("the node was down for %d worklist day(s) before the last %d: not written now; write them with "
                    "`osteoscreen worklist --date D` for D from %s to %s", len(skipped), MAX_CATCH_UP_DAYS,
                    skipped[0].isoformat(), skipped[-1].isoformat())
    written = []
    for start, end in periods:
        path, n = write_worklist(db, directory, end.date(), at=end.time(), start=start)
        db.record_worklist(start.timestamp(), end.timestamp(), str(path), n)
        written.append((path, n))
    return written


class WorklistScheduler:
    """Writes the worklist every day at ``at`` (local time), and at start every list missed while it was down."""

    def __init__(self, db: NodeDB, directory: Path, at: dt.time) -> None:
        self.db, self.directory, self.at = db, directory, at
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "misfire_grace_time": 3600})
        self._running = threading.Lock()  # the start's catch-up and the daily run never write at once

    def _run(self) -> None:
        try:
            with self._running:
                written = catch_up(self.db, self.directory, self.at)
        except Exception:  # noqa: BLE001 - keep the schedule; the next run writes what is still missing
            log.exception("writing the daily worklist failed (the next run writes every list still missing)")
            return
        for path, n in written:
            log.info("worklist %s written: %d positive screen(s)", path.name, n)

    def start(self) -> None:
        self._scheduler.add_job(self._run, CronTrigger(hour=self.at.hour, minute=self.at.minute), id="worklist")
        self._scheduler.add_job(self._run, id="worklist-catch-up")  # now: lists missed while the node was down
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
