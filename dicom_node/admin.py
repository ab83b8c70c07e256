"""IT commands on a node's state: status, jobs, outbox, worklist, echo. They read and change SQLite (and write
the worklist files) only."""
from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import time
from pathlib import Path
from typing import Iterator

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from config.schema import WorklistSettings
from dicom_node.db import NodeDB


def _db(state_dir: Path) -> sqlite3.Connection:
    path = Path(state_dir) / "osteoscreen.sqlite"
    if not path.exists():
        raise FileNotFoundError(f"no node database at {path}")
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # a damaged file fails here, named
    except sqlite3.DatabaseError as exc:
        raise sqlite3.DatabaseError(f"node database {path}: {exc}") from None
    return db


@contextlib.contextmanager
def _node_db(state_dir: Path) -> Iterator[NodeDB]:
    """The node's database through NodeDB (schema checks and migrations), closed afterwards."""
    db_path = Path(state_dir) / "osteoscreen.sqlite"
    if not db_path.exists():
        raise FileNotFoundError(f"no node database at {db_path}")
    db = NodeDB(db_path)
    try:
        yield db
    finally:
        db.close()


def status(state_dir: Path, out=print) -> int:
    db = _db(state_dir)
    q = lambda sql: db.execute(sql).fetchall()  # noqa: E731
    series = dict(q("SELECT state, count(*) FROM series GROUP BY state"))
    jobs = dict(q("SELECT state, count(*) FROM jobs GROUP BY state"))
    outbox = dict(q("SELECT state, count(*) FROM outbox GROUP BY state"))
    n_inst = q("SELECT count(*) FROM instances")[0][0]
    out(f"state: {state_dir}")
    out(f"instances stored: {n_inst}; series: {series or 'none'}")
    out(f"jobs: {jobs or 'none'}")
    out(f"outbox: {outbox or 'none'}")
    for jid, err in q("SELECT id, last_error FROM jobs WHERE last_error IS NOT NULL ORDER BY updated_at DESC LIMIT 5"):
        out(f"  job {jid} last error: {err}")
    for oid, dest, err in q("SELECT id, destination, last_error FROM outbox WHERE last_error IS NOT NULL AND "
                            "state!='sent' ORDER BY id DESC LIMIT 5"):
        out(f"  outbox {oid} -> {dest}: {err}")
    skipped = q("SELECT reason, count(*) FROM series WHERE eligible=0 GROUP BY reason ORDER BY 2 DESC LIMIT 5")
    for reason, n in skipped:
        out(f"  skipped x{n}: {reason}")
    return 0


def jobs(state_dir: Path, action: str, job_id: int | None, out=print) -> int:
    db = _db(state_dir)
    if action == "list":
        for r in db.execute("SELECT id, series_uid, state, attempts, outcome, updated_at FROM jobs ORDER BY id"):
            out(f"{r[0]:6d} {r[2]:8s} attempts={r[3]} outcome={r[4] or '-'} "
                f"updated={dt.datetime.fromtimestamp(r[5]).isoformat(timespec='seconds')} series={r[1]}")
        return 0
    if job_id is None:
        out("a job id is required")
        return 2
    if action == "show":
        r = db.execute("SELECT id, series_uid, state, attempts, last_error, outcome, result_json FROM jobs WHERE id=?",
                       (job_id,)).fetchone()
        if not r:
            out(f"no job {job_id}")
            return 1
        out(f"job {r[0]}: {r[2]}, attempts {r[3]}, outcome {r[5]}, last error {r[4]}\nseries {r[1]}\n{r[6] or ''}")
        return 0
    if action == "retry":
        n = db.execute("UPDATE jobs SET state='pending', next_attempt_at=0, attempts=0 WHERE id=? AND "
                       "state IN ('failed','done','cancelled')", (job_id,)).rowcount
        out(f"job {job_id} queued again" if n else f"job {job_id} is not failed, done or cancelled")
        return 0 if n else 1
    if action == "cancel":
        n = db.execute("UPDATE jobs SET state='cancelled' WHERE id=? AND state='pending'", (job_id,)).rowcount
        out(f"job {job_id} cancelled" if n else f"job {job_id} is not pending")
        return 0 if n else 1
    return 2


def outbox(state_dir: Path, action: str, out=print) -> int:
    db = _db(state_dir)
    if action == "list":
        for r in db.execute("SELECT id, job_id, destination, state, attempts, last_error, sop_instance_uid "
                            "FROM outbox ORDER BY id"):
            out(f"{r[0]:6d} job {r[1]} -> {r[2]}: {r[3]} attempts={r[4]} {r[6]}" + (f"  ({r[5]})" if r[5] else ""))
        return 0
    if action == "retry":
        n = db.execute("UPDATE outbox SET state='pending', next_attempt_at=0 WHERE state IN ('pending','failed')"
                       ).rowcount
        out(f"{n} outbox item(s) due now (a running node picks them up within 5 s)")
        return 0
    return 2


def parse_target(target: str) -> tuple[str, str, int]:
    """(AE title, host, port) of ``AE@host:port``; ValueError saying what is wrong."""
    aet, _, hostport = target.partition("@")
    host, _, port = hostport.rpartition(":")
    if not aet or not host or not port:
        raise ValueError(f"{target!r}: give the peer as AE@host:port, e.g. PACS@10.0.0.5:104")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{target!r}: port {port!r} is not a number from 1 to 65535")
    return aet, host, int(port)


def echo(target: str, calling_aet: str = "OSTEOSCREEN", out=print) -> int:
    """C-ECHO to AE@host:port."""
    try:
        aet, host, port = parse_target(target)
    except ValueError as exc:
        out(f"echo: {exc}")
        return 2
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    t0 = time.monotonic()
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        out(f"echo {target}: association {'rejected' if assoc.is_rejected else 'failed'}")
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    ok = bool(status) and status.Status == 0
    out(f"echo {target}: {'OK' if ok else 'failed'} ({(time.monotonic() - t0) * 1000:.0f} ms)")
    return 0 if ok else 1


def worklist(state_dir: Path, settings: WorklistSettings, day: dt.date | None, out=print, *,
             shadow: bool = False) -> int:
    """Write the worklist on demand (the scheduler does it daily when enabled); never in shadow mode."""
    from dicom_node.worklist import write_worklist

    if shadow:
        out("worklist: not written: this node is in shadow mode ([shadow] enabled = true), whose results are for "
            "site validation only and never go on a worklist; use `osteoscreen predictions --out F.csv` to compare "
            "them with DXA")
        return 2
    directory = Path(settings.directory or state_dir / "worklist")
    with _node_db(state_dir) as db:
        at = dt.datetime.strptime(settings.at, "%H:%M").time()
        try:
            path, n = write_worklist(db, directory, day or dt.date.today(), at=at)
        except OSError as exc:
            out(f"worklist: cannot write into {directory}: {exc.strerror or exc} (check [worklist] directory: a "
                "folder the node's user may write)")
            return 2
    out(f"worklist: {path} ({n} positive screen(s); also {path.with_suffix('.json').name})")
    return 0


def patient_key(state_dir: Path, patient_id: str, issuer: str | None, out=print) -> int:
    """The log key (pk-...) of a known patient ID, so that IT can find that patient's log lines."""
    from hl7.privacy import PatientKeyError, load_site_key
    from hl7.privacy import patient_key as key_of

    try:
        key = load_site_key(state_dir, create=False)
    except PatientKeyError as exc:
        out(f"patient-key: {exc}")
        return 2
    out(key_of(patient_id, issuer, key=key))
    return 0


def restore(state_dir: Path, backup_dir: Path, out=print) -> int:
    from dicom_node.backup import BackupError, restore_state

    try:
        done = restore_state(backup_dir, state_dir)
    except BackupError as exc:
        out(f"restore failed: {exc}")
        return 1
    for live, kept in done:
        out(f"restored {live.name} from {backup_dir} (integrity checked)"
            + (f"; the file it replaced is kept as {kept.name} (delete it once the node runs well)" if kept else ""))
    out("start the node (systemctl start osteoscreen): at its start it indexes again, from their headers, the "
        "received instances on disk that the restored index does not name (those received after the backup). "
        "Received CT and results are not in the backup: restore them from the site's file backup")
    return 0


def backup(state_dir: Path, dest: Path | None, out=print) -> int:
    from dicom_node.backup import BackupError, backup_state

    try:
        paths = backup_state(state_dir, dest)
    except BackupError as exc:
        out(f"backup failed: {exc}")
        return 1
    except OSError as exc:
        out(f"backup failed: {exc.filename or dest or state_dir / 'backups'}: {exc.strerror or exc} (give --dest "
            "a folder the node's user may write, on a disk with room)")
        return 2
    total = sum(p.stat().st_size for p in paths)
    out(f"backup ok: {len(paths)} database(s), {total / 1e6:.1f} MB, integrity checked, in {paths[0].parent}")
    return 0


def purge(state_dir: Path, days: float, dry_run: bool, out=print) -> int:
    from dicom_node.retention import purge_screened_instances

    if days <= 0:
        out("retention is off ([retention] instances_days = 0): nothing purged; give --days to purge anyway")
        return 0
    with _node_db(state_dir) as db:
        r = purge_screened_instances(db, state_dir / "instances", days, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    out(f"purge: {verb} {r.instances} instance(s) of {r.series} series, {r.bytes_freed / 1e6:.1f} MB "
        f"(screened or skipped over {days:g} days ago)" + (f"; {r.missing_files} file(s) already gone"
                                                          if r.missing_files else ""))
    return 0


def predictions(state_dir: Path, out: Path, since: dt.date | None, out_fn=print) -> int:
    from dicom_node.predictions import export_predictions

    out = Path(out)
    if out.is_dir():
        out_fn(f"predictions: --out {out} is a folder: give a file name, e.g. {out / 'predictions.csv'}")
        return 2
    with _node_db(state_dir) as db:
        try:
            n = export_predictions(db, out, since)
        except OSError as exc:
            out_fn(f"predictions: cannot write {out}: {exc.strerror or exc} (a missing or non-folder parent, or "
                   "permissions)")
            return 2
    out_fn(f"predictions: {n} result(s) written to {out} (0600: it holds patient identifiers)")
    return 0
