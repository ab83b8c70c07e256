"""Failures inside the service's own loops: a database error or a PACS that cannot take an object must not
stop the node (no hang, no dead thread), and must not undo a recorded result."""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt

from config.schema import Destination
from dicom_node.db import NodeDB
from dicom_node.export import Exporter
from tests.conftest import wait_for


def _in_thread(fn, timeout: float = 5.0):
    """Run ``fn`` in another thread (the connection lock is re-entrant for the thread that leaked it)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the database call hung: the connection lock was left held"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_a_busy_database_at_begin_releases_the_connection_lock(tmp_path):
    db = NodeDB(tmp_path / "n.sqlite")
    db._db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(tmp_path / "n.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock past our timeout
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db.audit("test", "x", "while locked")
    other.execute("ROLLBACK")
    other.close()
    _in_thread(lambda: db.audit("test", "x", "after the lock was freed"))
    assert len(db._query("SELECT 1 FROM audit WHERE kind='test'")) == 1
    db.close()


def test_a_failed_commit_ends_its_transaction_and_releases_the_lock(tmp_path):
    db = NodeDB(tmp_path / "n.sqlite")
    conn = db._db
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError):  # the deferred check fails at COMMIT, like a full disk would
        with db._tx() as tx:
            tx.execute("INSERT INTO child VALUES (1)")
    assert not conn.in_transaction
    _in_thread(lambda: db.audit("test", "x", "next transaction"))
    assert db._query("SELECT COUNT(*) FROM child") == [(0,)]
    db.close()


def _running_job(tmp_path) -> tuple[NodeDB, int]:
    """A database with series 1.2 (patient OLD) decided for screening and its job claimed by a worker."""
    db = NodeDB(tmp_path / "n.sqlite")
    with db._tx() as tx:
        tx.execute("INSERT INTO series (series_uid, study_uid, patient_id, issuer, modality, calling_aet,"
                   " first_received, last_received) VALUES ('1.2', '1.1', 'OLD', 'H', 'CT', 'CT1', 0, 0)")
    job = db.decide_series("1.2", True, "CT axial")
    assert job is not None and db.claim_job().id == job
    return db, job


def test_a_job_whose_result_was_recorded_is_not_failed_afterwards(tmp_path):
    db, job = _running_job(tmp_path)
    db.finish_job(job, "screened", {"category": "x"}, [])
    assert not db.fail_job(job, "a step after recording failed", time.time() + 60)
    assert db.job(job).state == "done"
    db.close()


def _file(tmp_path, name: str, sop_class: str) -> tuple[str, str]:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "P1", "SR" if sop_class == ComprehensiveSRStorage else "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return str(path), ds.SOPInstanceUID


def test_a_pacs_without_the_sr_class_fails_that_row_and_the_exporter_goes_on(tmp_path):
    """pynetdicom raises when no accepted context carries the object: that once killed the exporter thread."""
    received: list[str] = []

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp_ae = AE("PACS")
    scp_ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)  # no SR storage
    server = scp_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    port = server.socket.getsockname()[1]
    db = NodeDB(tmp_path / "n.sqlite")
    sr_path, sr_uid = _file(tmp_path, "sr.dcm", ComprehensiveSRStorage)
    sc_path, sc_uid = _file(tmp_path, "sc.dcm", SecondaryCaptureImageStorage)
    with db._tx() as tx:  # the SR first, as the node queues it
        tx.executemany("INSERT INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid)"
                       " VALUES (1, 'pacs', ?, ?, ?)", [(sr_path, ComprehensiveSRStorage, sr_uid),
                                                        (sc_path, SecondaryCaptureImageStorage, sc_uid)])
    exporter = Exporter(db, [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)],
                        calling_aet="OSTEOSCREEN", retry_initial_s=60, retry_max_s=60, timeout_s=5)
    exporter.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = {r.sop_instance_uid: r for r in db.outbox()}
            if rows[sc_uid].state == "sent" and rows[sr_uid].attempts >= 1:
                break
            time.sleep(0.1)
        rows = {r.sop_instance_uid: r for r in db.outbox()}
        assert rows[sc_uid].state == "sent" and received == [sc_uid]
        assert rows[sr_uid].state == "pending" and "does not accept" in rows[sr_uid].last_error
        assert "Comprehensive SR" in rows[sr_uid].last_error
        assert exporter.alive()
    finally:
        exporter.stop()
        server.shutdown()
        db.close()


def test_a_permanent_refusal_is_given_up_and_a_replaced_file_is_never_sent_as_another_object(tmp_path):
    """0xA900 (does not match the SOP class) and 0x0122 (SOP class not supported) cannot be cured by sending the
    same bytes again: given up, audited, instead of retried for ever; 0xC211 (a PACS store handler that failed,
    on a full disk say) and 0xA700 are retried. A row whose file now holds another SOP
    Instance UID (a file replaced after it was queued) is never sent under the row's UID."""
    received: list[str] = []
    status_for: dict[str, int] = {}

    def on_store(event):
        uid = str(event.dataset.SOPInstanceUID)
        received.append(uid)
        return status_for.get(uid, 0x0000)

    scp_ae = AE("PACS")
    scp_ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    scp_ae.add_supported_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    server = scp_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    port = server.socket.getsockname()[1]
    db = NodeDB(tmp_path / "n.sqlite")
    rows = []
    for name, status in (("c211", 0xC211), ("a900", 0xA900), ("a700", 0xA700), ("ok", 0x0000)):
        path, uid = _file(tmp_path, f"{name}.dcm", SecondaryCaptureImageStorage)
        status_for[uid] = status
        rows.append((path, SecondaryCaptureImageStorage, uid))
    replaced_path, _ = _file(tmp_path, "replaced.dcm", ComprehensiveSRStorage)
    rows.append((replaced_path, ComprehensiveSRStorage, "1.2.826.0.1.3680043.8.498.999"))  # queued under another UID
    with db._tx() as tx:
        tx.executemany("INSERT INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid)"
                       " VALUES (1, 'pacs', ?, ?, ?)", rows)
    exporter = Exporter(db, [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)],
                        calling_aet="OSTEOSCREEN", retry_initial_s=60, retry_max_s=60, timeout_s=5)
    exporter.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(r.attempts == 0 and r.state == "pending" for r in db.outbox()):
            time.sleep(0.1)
        state = {r.sop_instance_uid: r for r in db.outbox()}
    finally:
        exporter.stop()
        server.shutdown()
    by_name = dict(zip(("c211", "a900", "a700", "ok", "replaced"), (r[2] for r in rows)))
    assert state[by_name["a900"]].state == "failed"
    assert "0xA900" in state[by_name["a900"]].last_error and "outbox retry" in state[by_name["a900"]].last_error
    assert state[by_name["c211"]].state == state[by_name["a700"]].state == "pending"  # retried with back-off
    assert state[by_name["ok"]].state == "sent"
    assert state[by_name["replaced"]].state == "failed" and "replaced after it was queued" in \
        state[by_name["replaced"]].last_error
    assert by_name["replaced"] not in received and len(received) == 4
    db.close()


def test_the_exporter_survives_an_error_in_its_own_loop(tmp_path, monkeypatch):
    db = NodeDB(tmp_path / "n.sqlite")
    calls = {"n": 0}
    real = db.due_outbox

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(db, "due_outbox", flaky)
    exporter = Exporter(db, [], calling_aet="OSTEOSCREEN", retry_initial_s=0.05, retry_max_s=1, timeout_s=1)
    exporter.start()
    try:
        deadline = time.monotonic() + 10
        while calls["n"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls["n"] >= 2 and exporter.alive()
    finally:
        exporter.stop()
        db.close()


def test_an_unexpected_error_sending_a_batch_backs_its_rows_off(tmp_path, monkeypatch):
    """A fault inside one destination's send (it was a calling AE title pynetdicom refused) must back the rows off
    like any failed send: it was retried 20 times a second, a traceback each time."""
    db = NodeDB(tmp_path / "n.sqlite")
    sr_path, sr_uid = _file(tmp_path, "sr.dcm", ComprehensiveSRStorage)
    with db._tx() as tx:
        tx.execute("INSERT INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid)"
                   " VALUES (1, 'pacs', ?, ?, ?)", (sr_path, ComprehensiveSRStorage, sr_uid))
    exporter = Exporter(db, [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=9)],
                        calling_aet="OSTEOSCREEN", retry_initial_s=60, retry_max_s=60, timeout_s=1)
    calls = {"n": 0}

    def broken(name, rows):
        calls["n"] += 1
        raise ValueError("Invalid 'ae_title' value")

    monkeypatch.setattr(exporter, "_send_batch", broken)
    exporter.start()
    try:
        row = wait_for(lambda: (lambda r: r if r.attempts >= 1 else None)(db.outbox()[0]), 10, "the row backed off")
        time.sleep(1.0)
        assert calls["n"] == 1 and row.state == "pending" and "ae_title" in row.last_error
    finally:
        exporter.stop()
        db.close()


def test_an_identity_update_while_screening_discards_that_result_and_screens_again(tmp_path):
    db, job = _running_job(tmp_path)  # screening the old patient (with the old patient's labs)
    assert db.identity_update("1.2", "NEW", "H", "identity changed on re-send")
    assert db.decide_series("1.2", True, "CT axial") is None  # nothing new to start while it runs
    assert db.job(job).state == "rerun" and db.claim_job() is None
    sr = ("pacs", str(tmp_path / "sr.dcm"), "1.2.840.10008.5.1.4.1.1.88.34", "9.9")
    assert not db.finish_job(job, "screened", {"category": "old patient"}, [sr])
    assert db.job(job).state == "pending" and db.outbox() == []
    again = db.claim_job()
    assert again.id == job and again.attempts == 1
    assert db.finish_job(job, "screened", {"category": "new patient"}, [sr])
    assert db.job(job).state == "done" and len(db.outbox()) == 1


def test_a_job_that_fails_while_marked_for_a_rerun_runs_again_from_scratch(tmp_path):
    db, job = _running_job(tmp_path)
    db.identity_update("1.2", "NEW", "H", "identity changed on re-send")
    db.decide_series("1.2", True, "CT axial")
    assert db.fail_job(job, "decoder crashed", None)
    row = db.job(job)
    assert row.state == "pending" and row.attempts == 0
    assert db.requeue_running_jobs() == 0


def test_an_identity_update_whose_index_step_fails_is_redone_by_the_retry(tmp_path, sample_series, monkeypatch):
    """The index is updated before the file is replaced, so a failure between them cannot leave the new
    identity on disk with the series never reopened (the retry would then look like a duplicate)."""
    from dicom_node.store import InstanceStore
    from pipeline.demographics import identity_of

    db = NodeDB(tmp_path / "n.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    path = sample_series.files[0]
    ds = pydicom.dcmread(path)
    kw = dict(sop_class=str(ds.SOPClassUID), sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
              series_uid=ds.SeriesInstanceUID, transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
              calling_aet="CT1", issuer="", modality="CT")
    store.store(path.read_bytes(), patient_id=ds.PatientID, identity=identity_of(ds), **kw)
    db.decide_series(ds.SeriesInstanceUID, False, "test")
    ds.PatientID = "CORRECTED-1"
    resend = tmp_path / "resend.dcm"
    ds.save_as(resend, enforce_file_format=True)

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(db, "identity_update", broken)
    with pytest.raises(sqlite3.OperationalError):
        store.store(resend.read_bytes(), patient_id="CORRECTED-1", identity=identity_of(ds), **kw)
    monkeypatch.undo()
    assert pydicom.dcmread(store.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)).PatientID \
        != "CORRECTED-1"  # the file was not replaced
    ref = store.store(resend.read_bytes(), patient_id="CORRECTED-1", identity=identity_of(ds), **kw)
    assert ref.identity_update and not ref.duplicate
    row = db.series(ds.SeriesInstanceUID)
    assert row.patient_id == "CORRECTED-1" and row.state == "receiving"
    assert not list((tmp_path / "instances").rglob(".incoming.*"))
    db.close()


def test_result_files_half_written_by_a_killed_run_are_swept_at_start(node_factory):
    from pipeline.durable import DurableFile, sweep_temporaries

    node = node_factory()
    job_dir = node.state_dir / "results" / "job-000001"
    job_dir.mkdir(parents=True)
    (job_dir / "sr.dcm").write_bytes(b"committed")
    (job_dir / "notes.tmp").write_bytes(b"not ours")  # a name DurableFile never makes
    half = DurableFile(job_dir / "sc.dcm")  # a worker killed before commit leaves its temporary file
    half.write(b"half")
    os.close(half.fileno())
    assert [p.name for p in job_dir.glob(".tmp.*")]
    node.start()
    assert not list(job_dir.glob(".tmp.*"))
    assert sorted(p.name for p in job_dir.iterdir()) == ["notes.tmp", "sr.dcm"]
    assert "removed 1 half-written result file(s)" in node.log()
    assert sweep_temporaries(node.state_dir / "nowhere") == 0  # no results yet: nothing to do


def test_a_job_stopped_because_another_overran_is_queued_again_without_losing_an_attempt(tmp_path):
    """Two workers share a pool; job 1 hangs (a FIFO nobody writes stands in for a hung decoder) and overruns the
    time limit, so the pool's processes are killed. Job 2, running beside it, did nothing wrong: it must go back
    to the queue with its attempt intact, not fail as "worker process died" (with max_attempts=1: for good)."""
    from hl7.panel import LabPanel
    from pipeline.job import JobRequest
    from pipeline.report.sr import NodeIdentity

    from dicom_node.jobs import JobRunner

    db = NodeDB(tmp_path / "n.sqlite")
    fifos = {}
    with db._tx() as tx:
        for s in ("1.2.1", "1.2.2"):
            tx.execute("INSERT INTO series (series_uid, study_uid, patient_id, issuer, modality, calling_aet,"
                       " first_received, last_received) VALUES (?, '1.1', 'P', 'H', 'CT', 'CT1', 0, 0)", (s,))
            fifos[s] = tmp_path / f"{s}.fifo"
            os.mkfifo(fifos[s])
    node = NodeIdentity("test", "osteoscreen", "0", "1", "1.2.3")

    def build(job):
        return JobRequest(job.id, job.series_uid, (str(fifos[job.series_uid]),), LabPanel("P", None, None, 90),
                          str(tmp_path / f"out{job.id}"), "fused_kdamm_v1", node, selector="")

    runner = JobRunner(db, workers=2, max_attempts=1, retry_delay_s=0.2, build_request=build,
                       on_result=lambda job, result: None, timeout_s=4.0)
    runner.start()
    try:
        db.decide_series("1.2.1", True, "test")
        runner.wake()
        time.sleep(1.5)
        db.decide_series("1.2.2", True, "test")
        runner.wake()

        def both_failed():
            jobs = {j.series_uid: j for j in db.jobs()}
            return jobs if len(jobs) == 2 and all(j.state == "failed" for j in jobs.values()) else None

        deadline = time.monotonic() + 60
        while not (jobs := both_failed()) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert jobs, [(j.id, j.state, j.last_error) for j in db.jobs()]
    finally:
        runner.stop()
    assert "time limit" in jobs["1.2.1"].last_error
    # job 2 was queued again once (no attempt counted), then overran on its own: its own reason, not job 1's
    assert "time limit" in jobs["1.2.2"].last_error and "worker process died" not in jobs["1.2.2"].last_error
    audit = [r[0] for r in db._query("SELECT detail FROM audit WHERE kind='job' AND subject=?",
                                     (str(jobs["1.2.2"].id),))]
    assert any("queued again (no attempt counted)" in a and "overran the time limit" in a for a in audit), audit


def test_stopping_the_node_kills_a_running_job_instead_of_waiting_for_it(tmp_path):
    """systemd gives a stop 90 s; a job may run for [jobs] timeout_s (600 s). The job's worker is killed and the
    job is queued again without counting the attempt, to be run at the next start, with nothing recorded meanwhile
    (three restarts during a job used to fail it for good)."""
    from hl7.panel import LabPanel
    from pipeline.job import JobRequest
    from pipeline.report.sr import NodeIdentity

    from dicom_node.jobs import JobRunner

    db = NodeDB(tmp_path / "n.sqlite")
    with db._tx() as tx:
        tx.execute("INSERT INTO series (series_uid, study_uid, patient_id, issuer, modality, calling_aet,"
                   " first_received, last_received) VALUES ('1.2.1', '1.1', 'P', 'H', 'CT', 'CT1', 0, 0)")
    fifo = tmp_path / "hang.fifo"
    os.mkfifo(fifo)
    node = NodeIdentity("test", "osteoscreen", "0", "1", "1.2.3")
    runner = JobRunner(db, workers=1, max_attempts=3, retry_delay_s=0.2, timeout_s=600.0,
                       build_request=lambda job: JobRequest(job.id, job.series_uid, (str(fifo),),
                                                            LabPanel("P", None, None, 90), str(tmp_path / "out"),
                                                            "fused_kdamm_v1", node, selector=""),
                       on_result=lambda job, result: None)
    runner.start()
    db.decide_series("1.2.1", True, "test")
    runner.wake()
    deadline = time.monotonic() + 30
    while runner.busy() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runner.busy() == 1
    worker_pids = list(runner._pool._processes)
    t0 = time.monotonic()
    runner.stop()

    def ended(pid: int) -> bool:
        # read from /proc, not Process.is_alive(): the pool's own thread also reaps its killed workers, and a
        # second waitpid on a reaped child reports 'alive' (seen once in CI)
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        except (FileNotFoundError, ProcessLookupError):
            return True

    for pid in worker_pids:
        wait_for(lambda: ended(pid), 10, f"worker {pid} to be killed")
    assert time.monotonic() - t0 < 15
    job = db.jobs()[0]
    # queued again without counting the attempt (a stop is not the job's fault), run at the next start
    assert job.state == "pending" and job.attempts == 0 and job.last_error is None
    assert db.requeue_running_jobs() == 0
