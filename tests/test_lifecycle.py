"""Data lifecycle: schema migrations, online backup, retention of received CT."""
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.db import MIGRATIONS, SCHEMA, NodeDB
from dicom_node.migrations import SchemaTooNew, schema_version
from dicom_node.retention import purge_screened_instances
from dicom_node.store import InstanceStore

CT = "1.2.840.10008.5.1.4.1.1.2"
DAY = 86400.0


def test_an_older_state_database_is_migrated_with_a_copy_kept(tmp_path):
    path = tmp_path / "osteoscreen.sqlite"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.split("CREATE TABLE IF NOT EXISTS reports")[0])  # a release before `reports`
    old.execute("INSERT INTO series (series_uid, study_uid, patient_id, issuer, modality, calling_aet, first_received,"
                " last_received) VALUES ('1.2.3', '1.2', 'P', '', 'CT', 'CT1', 1, 1)")
    old.commit()
    old.close()
    db = NodeDB(path)
    assert schema_version(db._db) == MIGRATIONS[-1].version
    assert db.series("1.2.3").patient_id == "P"
    assert db._query("SELECT count(*) FROM reports") == [(0,)]  # the table a newer release needs
    db.close()
    backup = tmp_path / "osteoscreen.sqlite.pre-v1.bak"
    assert sqlite3.connect(backup).execute("SELECT series_uid FROM series").fetchall() == [("1.2.3",)]
    NodeDB(path).close()  # reopening at the current version changes nothing
    assert not (tmp_path / "osteoscreen.sqlite.pre-v2.bak").exists()


def test_a_database_from_a_newer_release_is_refused_with_advice(tmp_path):
    path = tmp_path / "osteoscreen.sqlite"
    NodeDB(path).close()
    c = sqlite3.connect(path)
    c.execute("PRAGMA user_version = 99")
    c.commit()
    c.close()
    with pytest.raises(SchemaTooNew, match="newer osteoscreen .* restore the backup"):
        NodeDB(path)


def test_backup_is_consistent_while_the_node_writes(tmp_path):
    state = tmp_path / "state"
    db = NodeDB(state / "osteoscreen.sqlite")
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            db.audit("test", f"s{i}", "x" * 200)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.3)
        toml = tmp_path / "node.toml"
        toml.write_text(f'[node]\nstate_dir = "{state}"\n')
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "backup", "--config", str(toml),
                            "--dest", str(tmp_path / "bk")], capture_output=True, text=True, timeout=120, check=False)
    finally:
        stop.set()
        t.join()
    db.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("backup ok: 1 database(s)")
    copy = next((tmp_path / "bk").glob("osteoscreen-*/osteoscreen.sqlite"))
    assert oct(copy.stat().st_mode & 0o777) == "0o600"
    c = sqlite3.connect(copy)
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert c.execute("SELECT count(*) FROM audit").fetchone()[0] > 0


def _store_series(store, files, **over):
    refs = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        kw = dict(sop_class=CT, sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
                  series_uid=ds.SeriesInstanceUID, transfer_syntax="1.2.840.10008.1.2.1", calling_aet="CT1",
                  patient_id="P", issuer="", modality="CT")
        kw.update(over)
        refs.append(store.store(f.read_bytes(), **kw))
    return refs


def test_retention_purges_only_screened_and_delivered_ct_past_its_days(tmp_path, sample_series):
    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    files = sample_series.files[:3]
    refs = _store_series(store, files)
    uid = refs[0].series_uid
    job = db.decide_series(uid, True, "CT axial")
    assert job is not None
    db.finish_job(job, "screened", {}, [("PACS", str(tmp_path / "sr.dcm"), "1.2", "1.2.3")])
    now = time.time()
    assert purge_screened_instances(db, store.root, 30, now=now + 31 * DAY).series == 0  # result not delivered
    db._query("UPDATE outbox SET state='sent'")
    assert purge_screened_instances(db, store.root, 30, now=now + 29 * DAY).series == 0  # too recent
    r = purge_screened_instances(db, store.root, 30, now=now + 31 * DAY)
    assert (r.series, r.instances, r.missing_files) == (1, 3, 0) and r.bytes_freed > 0
    assert not any(Path(x.path).exists() for x in refs)
    assert not list(store.root.rglob("*.dcm")) and not any(store.root.iterdir())  # empty folders removed
    assert db.series(uid).state == "purged"
    assert db._query("SELECT kind FROM audit WHERE subject=? AND kind='purged'", (uid,))
    assert db._query("SELECT state FROM jobs WHERE id=?", (job,)) == [("done",)]  # the record stays
    # A re-send after the purge is stored again (not taken for a duplicate) and the series reopens.
    again = _store_series(store, files[:1])
    assert not again[0].duplicate and Path(again[0].path).exists()
    s = db.series(uid)
    assert s.state == "receiving" and s.n_instances == 1
    db.close()


def test_retention_keeps_failed_jobs_ct(tmp_path, sample_series):
    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    refs = _store_series(store, sample_series.files[:2])
    job = db.decide_series(refs[0].series_uid, True, "CT axial")
    assert db.claim_job().id == job
    assert db.fail_job(job, "decoder crashed", None)
    assert purge_screened_instances(db, store.root, 1, now=time.time() + 10 * DAY).series == 0
    assert all(Path(x.path).exists() for x in refs)
    db.close()



def _screened_and_delivered(db, store, files):
    refs = _store_series(store, files)
    job = db.decide_series(refs[0].series_uid, True, "CT axial")
    db.claim_job()
    db.finish_job(job, "screened", {}, [])
    return refs


def test_an_instance_re_sent_while_its_series_is_purged_is_refused_for_the_moment_not_lost(tmp_path, sample_series):
    """Retention and the receivers run side by side: a re-sent instance must never be acknowledged as a
    duplicate of a file that the purge is deleting, and a new one must never be deleted by it."""
    from dicom_node.retention import claim_series, delete_files, release_series
    from dicom_node.store import InstanceRefused

    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    files = sample_series.files[:4]
    refs = _screened_and_delivered(db, store, files[:3])
    uid = refs[0].series_uid
    rows = claim_series(db, uid, time.time() + 10 * DAY)
    assert len(rows) == 3 and db.series(uid).state == "purging"
    with pytest.raises(InstanceRefused, match="being deleted by the retention rule") as refused:
        _store_series(store, files[:1])  # a duplicate now would be acknowledged and then deleted
    assert refused.value.status == 0xA700
    late = _store_series(store, files[3:4])  # an instance the series never had: stored, and it reopens it
    assert not late[0].duplicate and db.series(uid).state == "receiving"
    delete_files([p for _, p in rows], store.root)
    release_series(db, uid, rows, "test purge")
    assert Path(late[0].path).exists()
    s = db.series(uid)
    assert s.state == "receiving" and s.n_instances == 1 and db.instance_paths(uid) == [late[0].path]
    again = _store_series(store, files[:1])  # after the purge, the re-send is stored anew
    assert not again[0].duplicate and Path(again[0].path).exists()
    db.close()


def test_a_purge_interrupted_by_a_crash_is_finished_by_the_next_run(tmp_path, sample_series):
    from dicom_node.retention import claim_series

    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    refs = _screened_and_delivered(db, store, sample_series.files[:3])
    uid = refs[0].series_uid
    rows = claim_series(db, uid, time.time() + 10 * DAY)
    Path(rows[0][1]).unlink()  # the crash came after the first file
    r = purge_screened_instances(db, store.root, 30)  # the series was decided just now: only 'purging' qualifies
    assert (r.series, r.instances, r.missing_files) == (1, 3, 1)
    assert db.series(uid).state == "purged" and db.instance_paths(uid) == []
    assert not list(store.root.rglob("*.dcm"))
    db.close()


def test_an_instance_re_sent_under_another_series_is_moved_and_its_old_series_decided_again(tmp_path, sample_series):
    """A study split or merge on the PACS re-sends instances with new Study/Series UIDs: the instance is re-filed
    (never an orphan file acknowledged while the index still names the old copy) and both series are decided again."""
    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    refs = _screened_and_delivered(db, store, sample_series.files[:3])
    old_series = refs[0].series_uid
    moved = _store_series(store, sample_series.files[:1], series_uid="1.2.826.0.1.3680043.8.498.99",
                          study_uid="1.2.826.0.1.3680043.8.498.98")[0]
    assert not moved.duplicate and moved.moved_from_series == old_series and not moved.identity_update
    assert Path(moved.path).exists() and not Path(refs[0].path).exists()
    assert db.instance_paths("1.2.826.0.1.3680043.8.498.99") == [moved.path]
    assert sorted(db.instance_paths(old_series)) == sorted(r.path for r in refs[1:])
    old = db.series(old_series)
    assert old.state == "receiving" and old.n_instances == 2  # to be decided (and screened) again without it
    assert db.decide_series(old_series, True, "CT axial") is not None  # its finished job runs again
    assert db.series("1.2.826.0.1.3680043.8.498.99").n_instances == 1
    assert db._query("SELECT kind FROM audit WHERE subject=? AND kind='moved'", (old_series,))
    again = _store_series(store, sample_series.files[:1], series_uid="1.2.826.0.1.3680043.8.498.99",
                          study_uid="1.2.826.0.1.3680043.8.498.98")[0]
    assert again.duplicate  # the same re-send twice is a plain duplicate
    db.close()


def test_a_late_instance_reopens_a_decided_series(tmp_path, sample_series):
    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    refs = _screened_and_delivered(db, store, sample_series.files[:2])
    uid = refs[0].series_uid
    late = _store_series(store, sample_series.files[2:3])[0]
    assert not late.duplicate
    s = db.series(uid)
    assert s.state == "receiving" and s.n_instances == 3
    job = db.decide_series(uid, True, "CT axial")
    assert job is not None and db.job(job).state == "pending"
    db.close()


def test_retention_keeps_ct_of_results_the_pacs_refused_for_good_and_purges_cancelled_jobs(tmp_path, sample_series):
    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    refused = _store_series(store, sample_series.files[:2])
    job = db.decide_series(refused[0].series_uid, True, "CT axial")
    db.claim_job()
    db.finish_job(job, "screened", {}, [("PACS", str(tmp_path / "sr.dcm"), "1.2", "9.9")])
    db.mark_send_failed(db.outbox()[0].id, "0xA900 refused", 0, give_up=True)  # undelivered for good
    cancelled = _store_series(store, sample_series.files[2:4], series_uid="1.2.826.0.1.3680043.99.2")
    job2 = db.decide_series(cancelled[0].series_uid, True, "CT axial")
    db._query("UPDATE jobs SET state='cancelled' WHERE id=?", (job2,))  # `osteoscreen jobs cancel`
    r = purge_screened_instances(db, store.root, 30, now=time.time() + 31 * DAY)
    assert r.series == 1 and db.series(cancelled[0].series_uid).state == "purged"
    assert all(Path(x.path).exists() for x in refused) and db.series(refused[0].series_uid).state == "decided"
    db._query("UPDATE outbox SET state='sent'")  # fixed at the PACS, `osteoscreen outbox retry`, delivered
    assert purge_screened_instances(db, store.root, 30, now=time.time() + 31 * DAY).series == 1
    db.close()


def _filled_state(state: Path, rows: int) -> Path:
    path = state / "osteoscreen.sqlite"
    NodeDB(path).close()
    c = sqlite3.connect(path)
    c.executemany("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)",
                  ((time.time(), "x", "1.2.3", "y" * 400) for _ in range(rows)))
    c.commit()
    c.close()
    return path


def test_backup_ends_while_another_process_commits_fifty_times_a_second(tmp_path):
    state = tmp_path / "state"
    db = _filled_state(state, 100000)  # ~48 MB: a dozen steps of the old stepwise copy
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sqlite3, time
c = sqlite3.connect({str(db)!r}, isolation_level=None); c.execute('PRAGMA journal_mode=WAL')
while True:
    c.execute("INSERT INTO audit (at, kind, subject, detail) VALUES (?,?,?,?)", (time.time(), 'w', 's', 'd'))
    time.sleep(0.02)
"""])
    try:
        time.sleep(1)
        toml = tmp_path / "node.toml"
        toml.write_text(f'[node]\nstate_dir = "{state}"\n')
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "backup", "--config", str(toml),
                            "--dest", str(tmp_path / "bk")], capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
    finally:
        writer.kill()
        writer.wait()
    assert r.returncode == 0 and r.stdout.startswith("backup ok"), r.stdout + r.stderr
    assert took < 30  # the stepwise copy of before never ended at this rate
    copy = next((tmp_path / "bk").glob("osteoscreen-*/osteoscreen.sqlite"))
    assert sqlite3.connect(copy).execute("SELECT count(*) FROM audit WHERE kind='x'").fetchone()[0] == 100000


def test_restore_puts_a_backup_back_without_replaying_an_old_wal_and_refuses_while_the_node_runs(tmp_path):
    from dicom_node.backup import backup_state
    from dicom_node.service import lock_state_dir
    from hl7.privacy import SECRET_NAME, load_site_key

    state = tmp_path / "state"
    db = NodeDB(state / "osteoscreen.sqlite")
    db.audit("test", "before", "in the backup")
    db.close()
    secret = load_site_key(state)
    folder = backup_state(state, tmp_path / "bk")[0].parent
    assert (folder / SECRET_NAME).read_bytes() == secret
    db = NodeDB(state / "osteoscreen.sqlite")
    db.audit("test", "after", "not in the backup")
    wal = (state / "osteoscreen.sqlite-wal").read_bytes()  # the -wal a crash would leave
    db.close()
    (state / "osteoscreen.sqlite-wal").write_bytes(wal)
    (state / SECRET_NAME).unlink()
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\nstate_dir = "{state}"\n')
    restore = [sys.executable, "-m", "dicom_node.cli", "restore", str(folder), "--config", str(toml)]
    lock = lock_state_dir(state)  # a running node holds this
    try:
        r = subprocess.run(restore, capture_output=True, text=True, timeout=60)
    finally:
        os.close(lock)
    assert r.returncode == 1 and f"(pid {os.getpid()}) is running" in r.stdout and "stop it first" in r.stdout
    r = subprocess.run(restore, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "restored osteoscreen.sqlite" in r.stdout, r.stdout + r.stderr
    assert not (state / "osteoscreen.sqlite-wal").exists()
    kept = list(state.glob("osteoscreen.sqlite.replaced-*"))
    assert len(kept) == 2  # the replaced file and its -wal, together
    db = NodeDB(state / "osteoscreen.sqlite")
    assert [s for (s,) in db._query("SELECT subject FROM audit WHERE kind='test'")] == ["before"]
    db.close()
    assert (state / SECRET_NAME).read_bytes() == secret
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "restore", str(tmp_path / "nothing"), "--config",
                        str(toml)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not a folder" in r.stdout and "Traceback" not in r.stderr


def test_after_a_restore_the_next_start_indexes_the_instances_received_since_the_backup(node_factory, tmp_path,
                                                                                      sample_series):
    """The restored index predates the series received after the backup; their files are still on disk. The
    restore asks for a store check, and the next start indexes them again from their headers."""
    from dicom_node.sample import write_sample_series
    from tests.conftest import storescu

    later = write_sample_series(tmp_path / "later", tag="after-backup")
    node = node_factory(quiet_s=3600).start()
    assert storescu(sample_series.files, node.port).returncode == 0
    backup = subprocess.run([sys.executable, "-m", "dicom_node.cli", "backup", "--dest", str(tmp_path / "bk"),
                             "--config", str(node.config)], capture_output=True, text=True, timeout=60)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert storescu(later.files, node.port).returncode == 0
    node.stop()
    folder = next((tmp_path / "bk").iterdir())
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "restore", str(folder), "--config", str(node.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "indexes again" in r.stdout, r.stdout + r.stderr
    count = "SELECT count(*) FROM instances"
    with sqlite3.connect(node.state_dir / "osteoscreen.sqlite") as c:
        assert c.execute(count).fetchone()[0] == len(sample_series.files)  # the backup's index
    node.start()
    node.stop()
    with sqlite3.connect(node.state_dir / "osteoscreen.sqlite") as c:
        assert c.execute(count).fetchone()[0] == len(sample_series.files) + len(later.files)
    log = node.log()
    assert f"the state databases were restored from {folder.name}: checking the instance store" in log
    assert f"indexed {len(later.files)} received instance file(s) again" in log
    assert not (node.state_dir / ".check-instance-store").exists()
