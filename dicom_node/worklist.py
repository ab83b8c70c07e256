"""The daily worklist of positive screens for care coordinators (CSV + JSON), written by APScheduler.

One file pair per day, `worklist-YYYY-MM-DD.csv/.json`, listing the screen-positive
results whose jobs finished in the 24 hours before the run time. The files hold
patient identifiers, so the folder is created 0700 and the files 0600; it is
the site's job to move them where coordinators work (a share, the EHR inbox).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from dicom_node.db import NodeDB
from pipeline.durable import write_durably
from pipeline.report.notice import SHORT_DISCLAIMER

log = logging.getLogger("osteoscreen.worklist")
COLUMNS = ("finished_at", "patient_id", "issuer", "accession_number", "study_uid", "study_date", "category",
           "probability", "level", "mean_hu", "model", "sr_sop_instance_uid", "job_id")


def positive_screens(db: NodeDB, start: float, end: float) -> list[dict]:
    """Screen-positive results of jobs finished in [start, end) (epoch seconds), oldest first, one per report."""
    rows = []
    for job_id, finished, result in db.finished_jobs(start, end):
        if result.get("category_id") != "screen_positive" or "duplicate_of" in result or result.get("experimental"):
            continue
        rows.append({
            "finished_at": dt.datetime.fromtimestamp(finished).isoformat(timespec="seconds"),
            "patient_id": result.get("patient_id", ""), "issuer": result.get("issuer", ""),
            "accession_number": result.get("accession_number", ""), "study_uid": result.get("study_uid", ""),
            "study_date": result.get("study_date", ""), "category": result.get("category", ""),
            "probability": result.get("probability"), "level": result.get("level", ""),
            "mean_hu": result.get("mean_hu", ""), "model": result.get("model", ""),
            "sr_sop_instance_uid": result.get("sr_sop_instance_uid", ""), "job_id": job_id,
        })
    return rows


def write_worklist(db: NodeDB, directory: Path, day: dt.date, *, at: dt.time = dt.time(0, 0)) -> tuple[Path, int]:
    """The worklist for the 24 hours before ``day`` at ``at``; returns the CSV path and the row count."""
    end = dt.datetime.combine(day, at)
    rows = positive_screens(db, (end - dt.timedelta(days=1)).timestamp(), end.timestamp())
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    csv_path = directory / f"worklist-{day.isoformat()}.csv"
    json_path = csv_path.with_suffix(".json")
    doc = {"notice": SHORT_DISCLAIMER, "period_end": end.isoformat(), "period_hours": 24, "positive_screens": rows}
    for path, data in ((csv_path, buf.getvalue().encode()), (json_path, json.dumps(doc, indent=1).encode())):
        write_durably(path, lambda fh, data=data: fh.write(data))
        os.chmod(path, 0o600)
    return csv_path, len(rows)


class WorklistScheduler:
    """Writes the worklist every day at ``at`` (local time)."""

    def __init__(self, db: NodeDB, directory: Path, at: dt.time) -> None:
        self.db, self.directory, self.at = db, directory, at
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "misfire_grace_time": 3600})

    def _run(self) -> None:
        try:
            path, n = write_worklist(self.db, self.directory, dt.date.today(), at=self.at)
            log.info("worklist %s written: %d positive screen(s)", path.name, n)
        except Exception:  # noqa: BLE001 - keep the schedule; the next day tries again
            log.exception("writing the daily worklist failed")

    def start(self) -> None:
        self._scheduler.add_job(self._run, CronTrigger(hour=self.at.hour, minute=self.at.minute), id="worklist")
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
