"""The node's SQLite index: instances, series decisions, jobs, outbox and audit.

One connection guarded by a lock (SQLite serialises writers anyway), WAL mode,
synchronous=FULL so a commit that returned is on disk. The one exception is the
index row of a received instance written by the running service
(``index_instance(synced=False)``): its file is already durable and names
everything the row holds, so the row is committed without waiting for the disk.
Any later synced commit (a routing decision, a job, the clean-stop mark) makes
it durable too, since the WAL is written in order; after a power loss the rows
that had not become durable are rebuilt from the files (``index_recovery``).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.migrations import Migration, migrate, sql_step

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL,
    modality TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'receiving',
    eligible INTEGER,
    reason TEXT,
    decided_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL UNIQUE REFERENCES series(series_uid),
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    outcome TEXT,
    result_json TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    result_key TEXT NOT NULL,
    sr_series_uid TEXT NOT NULL,
    sr_sop_uid TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_study ON reports(study_uid);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


# Append steps; never edit a released one. Step 1 is the schema of the releases before versioning
# (CREATE ... IF NOT EXISTS: a no-op on their files).
MIGRATIONS: list[Migration] = [
    sql_step(1, "baseline: instances, series, jobs, outbox, reports, audit", SCHEMA),
    sql_step(2, "indexes for retention and audit queries",
             "CREATE INDEX IF NOT EXISTS series_state_decided ON series(state, decided_at);"
             "CREATE INDEX IF NOT EXISTS audit_at ON audit(at);"
             "CREATE INDEX IF NOT EXISTS outbox_job ON outbox(job_id)"),
    sql_step(3, "worklist periods written (a restart across the worklist time catches up)",
             "CREATE TABLE IF NOT EXISTS worklist_periods (period_end REAL PRIMARY KEY, period_start REAL NOT NULL,"
             " written_at REAL NOT NULL, path TEXT NOT NULL, n_rows INTEGER NOT NULL)"),
    sql_step(4, "service runs (a run without a clean stop has its unsynced instance rows rebuilt from the files)",
             "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, started_at REAL NOT NULL,"
             " boot_id TEXT NOT NULL, pid INTEGER NOT NULL, stopped_at REAL)"),
]


# A new instance counts in its series and reopens one already decided (a late instance: the series is decided
# and screened again with it) or purged by retention (a re-send).
_SERIES_UPSERT = (
    "INSERT INTO series (series_uid, study_uid, patient_id, issuer, modality, calling_aet, first_received,"
    " last_received, n_instances) VALUES (?,?,?,?,?,?,?,?,1)"
    " ON CONFLICT(series_uid) DO UPDATE SET last_received=excluded.last_received, n_instances=n_instances+1,"
    " state=CASE WHEN state IN ('decided', 'purged', 'purging') THEN 'receiving' ELSE state END")


class SeriesChanged(Exception):
    """The series received another instance while it was being routed: decided later, with it."""


class SeriesPurging(Exception):
    """The series is being deleted by the retention rule: an instance for it must be sent again."""


@dataclass(frozen=True)
class RunRow:
    """One start of the service; ``stopped_at`` None: it ended without a clean stop (or is running)."""

    id: int
    started_at: float
    boot_id: str
    pid: int
    stopped_at: float | None


@dataclass(frozen=True)
class StoredInstance:
    series_state: str
    study_uid: str
    series_uid: str
    path: str
    sop_class_uid: str = ""


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    patient_id: str
    issuer: str
    modality: str
    calling_aet: str
    n_instances: int
    state: str
    eligible: bool | None
    reason: str | None


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    state: str
    attempts: int
    last_error: str | None
    outcome: str | None
    result: dict | None


@dataclass(frozen=True)
class ReportRow:
    """The SR sent for a study (the latest one is what a new result is compared with)."""

    study_uid: str
    job_id: int
    result_key: str
    sr_series_uid: str
    sr_sop_uid: str


@dataclass(frozen=True)
class OutboxRow:
    id: int
    job_id: int
    destination: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_error: str | None


class NodeDB:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            migrate(self._db, self.path, MIGRATIONS)
        except sqlite3.Error as exc:
            raise sqlite3.DatabaseError(f"node database {self.path}: {exc}{open_hint(exc)}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, *, synced: bool = True) -> "_Tx":
        return _Tx(self, synced=synced)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- instances and series -------------------------------------------------
    def stored_instance(self, sop_uid: str) -> StoredInstance | None:
        """Where an indexed instance is filed, and its series' state ('purging' while retention deletes it)."""
        rows = self._query("SELECT s.state, i.study_uid, i.series_uid, i.path, i.sop_class_uid FROM instances i"
                           " JOIN series s ON s.series_uid = i.series_uid WHERE i.sop_instance_uid=?", (sop_uid,))
        return StoredInstance(*rows[0]) if rows else None

    def stored_series_state(self, sop_uid: str) -> str | None:
        stored = self.stored_instance(sop_uid)
        return stored.series_state if stored is not None else None

    def index_instance(self, *, sop_uid: str, sop_class: str, study_uid: str, series_uid: str, path: str,
                       transfer_syntax: str, calling_aet: str, patient_id: str, issuer: str, modality: str,
                       synced: bool = True) -> bool:
        """Index a stored instance; False when the SOP Instance UID was already indexed.

        ``synced=False``: commit without waiting for the disk (see the module docstring); only for a caller
        whose unsynced rows are rebuilt after a power loss, i.e. the service (``Service.start``)."""
        now = time.time()
        with self._tx(synced=synced) as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?)",
                (sop_uid, sop_class, study_uid, series_uid, path, transfer_syntax, calling_aet, now),
            )
            if cur.rowcount == 0:
                return False
            db.execute(_SERIES_UPSERT, (series_uid, study_uid, patient_id, issuer, modality, calling_aet, now, now))
        return True

    def move_instance(self, *, sop_uid: str, sop_class: str, study_uid: str, series_uid: str, path: str,
                      transfer_syntax: str, calling_aet: str, patient_id: str, issuer: str,
                      modality: str) -> StoredInstance | None:
        """Re-file an indexed instance that was re-sent under another study or series (a study split or merge
        on the PACS): its row names the new file and series, the new series counts it, and the old series is
        reopened so that it is decided (and screened) again without it. Returns where it was filed before
        (None: it was not indexed any more, and is indexed now as a new instance)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT s.state, i.study_uid, i.series_uid, i.path FROM instances i JOIN series s"
                             " ON s.series_uid = i.series_uid WHERE i.sop_instance_uid=?", (sop_uid,)).fetchone()
            if row is None:
                db.execute("INSERT INTO instances VALUES (?,?,?,?,?,?,?,?)",
                           (sop_uid, sop_class, study_uid, series_uid, path, transfer_syntax, calling_aet, now))
            else:
                db.execute("UPDATE instances SET sop_class_uid=?, study_uid=?, series_uid=?, path=?, transfer_syntax=?,"
                           " calling_aet=?, received_at=? WHERE sop_instance_uid=?",
                           (sop_class, study_uid, series_uid, path, transfer_syntax, calling_aet, now, sop_uid))
                db.execute("UPDATE series SET n_instances=MAX(0, n_instances-1),"
                           " state=CASE WHEN state IN ('decided', 'purged', 'purging') THEN 'receiving' ELSE state END"
                           " WHERE series_uid=?", (row[2],))
                db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                           (now, "moved", row[2], f"instance {sop_uid} re-sent under study {study_uid}, series "
                                                  f"{series_uid}: moved there; this series is decided again"))
            db.execute(_SERIES_UPSERT, (series_uid, study_uid, patient_id, issuer, modality, calling_aet, now, now))
        return StoredInstance(*row) if row is not None else None

    def series(self, series_uid: str) -> SeriesRow | None:
        rows = self._query(
            "SELECT series_uid, study_uid, patient_id, issuer, modality, calling_aet, n_instances, state, eligible,"
            " reason FROM series WHERE series_uid=?", (series_uid,))
        if not rows:
            return None
        r = rows[0]
        return SeriesRow(*r[:8], None if r[8] is None else bool(r[8]), r[9])

    def series_in_state(self, state: str) -> list[str]:
        return [r[0] for r in self._query("SELECT series_uid FROM series WHERE state=?", (state,))]

    def instance_paths(self, series_uid: str) -> list[str]:
        return [r[0] for r in self._query(
            "SELECT path FROM instances WHERE series_uid=? ORDER BY received_at", (series_uid,))]

    def decide_series(self, series_uid: str, eligible: bool, reason: str, routed_instances: int | None = None
                      ) -> int | None:
        """Record the routing decision; an eligible series gets a job. Returns the job id if one was created.

        ``routed_instances``: how many instances the decision looked at. When the series holds another number by
        now (an instance indexed while routing ran), nothing is recorded (SeriesChanged): that instance's own
        quiet period decides the series with it."""
        now = time.time()
        with self._tx() as db:
            guard, args = "", ()
            if routed_instances is not None:
                guard = " AND state='receiving' AND (SELECT COUNT(*) FROM instances WHERE series_uid=?)=?"
                args = (series_uid, routed_instances)
            cur = db.execute("UPDATE series SET state='decided', eligible=?, reason=?, decided_at=? WHERE series_uid=?"
                             + guard, (int(eligible), reason, now, series_uid, *args))
            if routed_instances is not None and cur.rowcount == 0:
                raise SeriesChanged(series_uid)
            db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                       (now, "routing", series_uid, ("screen: " if eligible else "skip: ") + reason))
            if not eligible:
                return None
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, created_at, updated_at) VALUES (?,?,?)",
                (series_uid, now, now))
            if cur.rowcount:
                return int(cur.lastrowid)
            # A reopened series (a patient identity update, a late or moved instance): its finished job runs
            # again. One still running screens what the series was (for an identity update, with the old
            # patient's labs): it becomes 'rerun', so its result is discarded when it ends and it runs again.
            row = db.execute("SELECT id, state FROM jobs WHERE series_uid=?", (series_uid,)).fetchone()
            if row is None or row[1] not in ("done", "failed", "running"):
                return None  # pending: it has not read the patient yet
            if row[1] == "running":
                db.execute("UPDATE jobs SET state='rerun', updated_at=? WHERE id=?", (now, row[0]))
                db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                           (now, "job", str(row[0]), "the series changed while it was screened: that result "
                                                     "will be discarded and the series screened again"))
                return None
            db.execute("UPDATE jobs SET state='pending', attempts=0, next_attempt_at=0, updated_at=? WHERE id=?",
                       (now, row[0]))
            return int(row[0])

    def identity_update(self, series_uid: str, patient_id: str, issuer: str, detail: str) -> bool:
        """Follow a PACS patient identity update: new identity on the series, and decide it again.

        True (and audited) for the first instance that reopens the series; the rest of the re-send finds it
        already reopened with this identity.
        """
        with self._tx() as db:
            row = db.execute("SELECT patient_id, issuer, state FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if row is not None and row[2] in ("purging", "purged"):
                # retention is deleting the stored copy (or has): the sender must send the instance again, then
                # it is stored anew (store.begin: not a duplicate any more)
                raise SeriesPurging(series_uid)
            first = row is None or row[2] != "receiving" or (row[0], row[1]) != (patient_id, issuer)
            db.execute("UPDATE series SET patient_id=?, issuer=?, state='receiving' WHERE series_uid=?",
                       (patient_id, issuer, series_uid))
            if first:
                db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                           (time.time(), "identity", series_uid, detail))
        return first

    # --- jobs -------------------------------------------------------------------
    def claim_job(self) -> JobRow | None:
        now = time.time()
        with self._tx() as db:
            # only for a series decided as it is: one reopened by a late instance waits for its new decision
            row = db.execute(
                "SELECT j.id FROM jobs j JOIN series s ON s.series_uid=j.series_uid WHERE j.state='pending'"
                " AND j.next_attempt_at<=? AND s.state='decided' ORDER BY j.id LIMIT 1", (now,)
            ).fetchone()
            if not row:
                return None
            db.execute("UPDATE jobs SET state='running', attempts=attempts+1, updated_at=? WHERE id=?", (now, row[0]))
        return self.job(row[0])

    def job(self, job_id: int) -> JobRow | None:
        rows = self._query(
            "SELECT id, series_uid, state, attempts, last_error, outcome, result_json FROM jobs WHERE id=?", (job_id,))
        if not rows:
            return None
        r = rows[0]
        return JobRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None)

    def jobs(self) -> list[JobRow]:
        return [self.job(r[0]) for r in self._query("SELECT id FROM jobs ORDER BY id")]  # type: ignore[misc]

    def next_job_due(self) -> float | None:
        rows = self._query("SELECT min(next_attempt_at) FROM jobs WHERE state='pending'")
        return rows[0][0] if rows and rows[0][0] is not None else None

    def finished_jobs(self, start: float, end: float) -> list[tuple[int, float, dict]]:
        """(job id, finished at, result) of jobs done in [start, end), oldest first."""
        return [(r[0], r[1], json.loads(r[2])) for r in self._query(
            "SELECT id, updated_at, result_json FROM jobs WHERE state='done' AND updated_at>=? AND updated_at<?"
            " AND result_json IS NOT NULL ORDER BY updated_at", (start, end))]

    def latest_report(self, study_uid: str) -> ReportRow | None:
        rows = self._query("SELECT study_uid, job_id, result_key, sr_series_uid, sr_sop_uid FROM reports"
                           " WHERE study_uid=? ORDER BY id DESC LIMIT 1", (study_uid,))
        return ReportRow(*rows[0]) if rows else None

    def report_count(self, study_uid: str) -> int:
        """How many SRs were recorded as sent for the study (each new one is the next version)."""
        return int(self._query("SELECT count(*) FROM reports WHERE study_uid=?", (study_uid,))[0][0])

    # --- worklist --------------------------------------------------------------
    def last_worklist_end(self) -> float | None:
        """The end (epoch seconds) of the last worklist period written by the scheduler; None before the first."""
        rows = self._query("SELECT max(period_end) FROM worklist_periods")
        return rows[0][0] if rows and rows[0][0] is not None else None

    def record_worklist(self, start: float, end: float, path: str, n_rows: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO worklist_periods (period_end, period_start, written_at, path, n_rows)"
                       " VALUES (?,?,?,?,?)", (end, start, time.time(), path, n_rows))

    def result_messages(self, study_uid: str, destination: str) -> list[tuple[str, str]]:
        """(control ID, outbox state) of the result messages queued to ``destination`` for any series of the
        study, oldest first (the outbox's sop_instance_uid column holds an HL7 row's control ID)."""
        return [(r[0], r[1]) for r in self._query(
            "SELECT o.sop_instance_uid, o.state FROM outbox o JOIN jobs j ON j.id=o.job_id JOIN series s ON "
            "s.series_uid=j.series_uid WHERE s.study_uid=? AND o.destination=? ORDER BY o.id",
            (study_uid, destination))]

    def finish_job(self, job_id: int, outcome: str, result: dict[str, Any],
                   outputs: list[tuple[str, str, str, str]], report: ReportRow | None = None) -> bool:
        """Mark a job done and queue its outputs: (destination, path, sop_class, sop_instance) per row.

        ``report`` records the SR as the study's latest, in the same transaction as its outbox rows.
        False, with nothing recorded or sent, when the series changed while the job ran (state 'rerun', see
        ``decide_series``): the job is pending again.
        """
        now = time.time()
        with self._tx() as db:
            state = db.execute("SELECT j.state, s.state FROM jobs j LEFT JOIN series s ON s.series_uid=j.series_uid"
                               " WHERE j.id=?", (job_id,)).fetchone()
            # 'rerun': decided again while this ran; series not 'decided': reopened (a late or moved instance, a
            # patient identity update) and waiting for its quiet period. Either way this result screens what the
            # series was, perhaps another patient's: never recorded or sent.
            if state is not None and (state[0] == "rerun" or state[1] == "receiving"):
                db.execute("UPDATE jobs SET state='pending', attempts=0, next_attempt_at=0, updated_at=? WHERE id=?",
                           (now, job_id))
                db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                           (now, "job", str(job_id), f"{outcome} result discarded (the series changed while it was "
                                                     "screened): screening again"))
                return False
            if report is not None:
                db.execute("INSERT INTO reports (study_uid, job_id, result_key, sr_series_uid, sr_sop_uid, created_at)"
                           " VALUES (?,?,?,?,?,?)", (report.study_uid, report.job_id, report.result_key,
                                                    report.sr_series_uid, report.sr_sop_uid, now))
            db.execute("UPDATE jobs SET state='done', outcome=?, result_json=?, last_error=NULL, updated_at=?"
                       " WHERE id=?", (outcome, json.dumps(result), now, job_id))
            db.executemany(
                "INSERT OR IGNORE INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid)"
                " VALUES (?,?,?,?,?)", [(job_id, *o) for o in outputs])
            db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                       (now, "job", str(job_id), f"{outcome}: {result.get('reason') or result.get('category', '')}"))
        return True

    def fail_job(self, job_id: int, error: str, retry_at: float | None) -> bool:
        """Fail a running job (to retry at ``retry_at``, or for good); False if it is no longer running: a job
        whose result was recorded stays done even when a later step failed, or its results would be made twice."""
        now = time.time()
        with self._tx() as db:
            if db.execute("UPDATE jobs SET state='pending', attempts=0, next_attempt_at=0, updated_at=?"
                          " WHERE id=? AND state='rerun'", (now, job_id)).rowcount:
                return True  # it failed on the old identity: the new one gets a fresh set of attempts
            if retry_at is None:
                cur = db.execute("UPDATE jobs SET state='failed', last_error=?, updated_at=?"
                                 " WHERE id=? AND state='running'", (error, now, job_id))
            else:
                cur = db.execute("UPDATE jobs SET state='pending', last_error=?, next_attempt_at=?, updated_at=?"
                                 " WHERE id=? AND state='running'", (error, retry_at, now, job_id))
            if cur.rowcount == 0:
                return False
            db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                       (now, "job", str(job_id), ("retry: " if retry_at else "failed: ") + error))
        return True

    def return_job(self, job_id: int, reason: str) -> bool:
        """Put a running job back in the queue without counting its attempt (it was stopped for another job's
        fault); False if it is no longer running."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state='pending', attempts=CASE WHEN state='rerun' THEN 0 ELSE "
                             "max(attempts-1, 0) END, next_attempt_at=0, updated_at=? WHERE id=? AND state IN "
                             "('running', 'rerun')", (now, job_id))
            if cur.rowcount:
                db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                           (now, "job", str(job_id), f"queued again (no attempt counted): {reason}"))
        return bool(cur.rowcount)

    def requeue_running_jobs(self) -> int:
        """At start: the jobs a crash interrupted run again. Their attempt counts: a study that brings the whole
        node down must not loop for ever (a clean stop returns its jobs without counting, JobRunner.stop)."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state='pending', next_attempt_at=0"
                              " WHERE state IN ('running', 'rerun')").rowcount

    # --- service runs ---------------------------------------------------------------
    def begin_run(self, boot_id: str, pid: int) -> tuple[int, RunRow | None]:
        """Record this start (synced); returns its id and the run before it (None: the first recorded)."""
        with self._tx() as db:
            row = db.execute("SELECT id, started_at, boot_id, pid, stopped_at FROM runs ORDER BY id DESC"
                             " LIMIT 1").fetchone()
            run_id = db.execute("INSERT INTO runs (started_at, boot_id, pid) VALUES (?,?,?)",
                                (time.time(), boot_id, pid)).lastrowid
        return int(run_id), RunRow(*row) if row is not None else None

    def end_run(self, run_id: int) -> None:
        """The clean-stop mark. Synced, so every unsynced instance row committed before it is durable too."""
        with self._tx() as db:
            db.execute("UPDATE runs SET stopped_at=? WHERE id=?", (time.time(), run_id))

    # --- outbox -----------------------------------------------------------------
    def due_outbox(self, limit: int = 100) -> list[OutboxRow]:
        """Pending rows whose time has come. An HL7 result message waits while an earlier one to the same
        receiver waits for its retry: a correction must never reach the RIS before the result it corrects
        (which, arriving last, would stand)."""
        now = time.time()
        rows = self._query(
            "SELECT id, job_id, destination, path, sop_class_uid, sop_instance_uid, state, attempts, last_error"
            " FROM outbox o WHERE state='pending' AND next_attempt_at<=?"
            " AND NOT (destination LIKE 'hl7:%' AND EXISTS (SELECT 1 FROM outbox p WHERE p.destination=o.destination"
            " AND p.state='pending' AND p.id<o.id AND p.next_attempt_at>?)) ORDER BY id LIMIT ?", (now, now, limit))
        return [OutboxRow(*r) for r in rows]

    def outbox(self) -> list[OutboxRow]:
        return [OutboxRow(*r) for r in self._query(
            "SELECT id, job_id, destination, path, sop_class_uid, sop_instance_uid, state, attempts, last_error"
            " FROM outbox ORDER BY id")]

    def next_outbox_due(self) -> float | None:
        rows = self._query("SELECT min(next_attempt_at) FROM outbox WHERE state='pending'")
        return rows[0][0] if rows and rows[0][0] is not None else None

    def mark_sent(self, outbox_id: int, detail: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1, last_error=NULL WHERE id=?",
                       (now, outbox_id))
            db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                       (now, "export", str(outbox_id), detail))

    def mark_send_failed(self, outbox_id: int, error: str, retry_at: float, give_up: bool = False) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE outbox SET state=?, attempts=attempts+1, last_error=?, next_attempt_at=? WHERE id=?",
                       ("failed" if give_up else "pending", error, retry_at, outbox_id))
            db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                       (now, "export", str(outbox_id), ("gave up: " if give_up else "retry: ") + error))

    def audit(self, kind: str, subject: str, detail: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                       (time.time(), kind, subject, detail))


def open_hint(exc: sqlite3.Error) -> str:
    """What to do about a state database that cannot be opened."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return " (another process holds it: is a second node or a long admin command running?)"
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return " (the directory or file is not writable by the service user)"
    return " (a full disk, or a damaged file: stop the node and `osteoscreen restore BACKUP_DIR` the latest backup)"


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT under the connection lock.

    Whatever fails (BEGIN busy past the timeout, a COMMIT refused for a full disk), the lock is released
    and no transaction is left open on the shared connection: otherwise every later caller in the process
    would hang on the lock or fail on "cannot start a transaction within a transaction".
    ``synced=False``: this one commit does not wait for the disk (synchronous=NORMAL); the connection is
    back to synchronous=FULL afterwards, whatever happened."""

    def __init__(self, owner: NodeDB, *, synced: bool = True) -> None:
        self.owner = owner
        self.synced = synced

    def __enter__(self) -> sqlite3.Connection:
        self.owner._lock.acquire()
        try:
            if not self.synced:
                self.owner._db.execute("PRAGMA synchronous=NORMAL")
            self.owner._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._restore_sync()
            self.owner._lock.release()
            raise
        return self.owner._db

    def _restore_sync(self) -> None:
        if not self.synced:
            try:
                self.owner._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error:  # pragma: no cover - a closed connection; nothing commits on it any more
                pass

    def __exit__(self, exc_type, exc, tb) -> None:
        db = self.owner._db
        try:
            db.execute("ROLLBACK" if exc_type else "COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT keeps the transaction open: end it, the caller sees the error
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        finally:
            self._restore_sync()
            self.owner._lock.release()
