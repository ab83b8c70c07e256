"""Routing decisions and the durable instance store."""
from pathlib import Path

import pydicom
import pytest

from config.schema import RoutingSettings
from dicom_node.db import NodeDB
from dicom_node.routing import SeriesFacts, decide, series_facts
from dicom_node.store import InstanceRefused, InstanceStore

CT = "1.2.840.10008.5.1.4.1.1.2"


def facts(**kw) -> SeriesFacts:
    base = dict(modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"), tilt_from_axial_deg=0.0,
                slice_thickness_mm=3.0, n_slices=112, calling_aet="CT1", age_years=67.0, sop_classes=(CT,))
    base.update(kw)
    return SeriesFacts(**base)


@pytest.mark.parametrize("change,fragment", [
    ({"modality": "MR"}, "modality MR"),
    ({"image_type": ("DERIVED", "SECONDARY")}, "lacks ORIGINAL/PRIMARY"),
    ({"tilt_from_axial_deg": 90.0}, "not axial"),
    ({"slice_thickness_mm": 10.0}, "slice thickness 10"),
    ({"n_slices": 12}, "12 slices"),
    ({"age_years": 12.0}, "age 12 below 50"),
    ({"age_years": None}, "age unknown"),
])
def test_refusals_have_reasons(change, fragment):
    d = decide(facts(**change), RoutingSettings())
    assert not d.eligible and fragment in d.reason


def test_eligible_series_and_calling_ae_rule():
    assert decide(facts(), RoutingSettings()).eligible
    d = decide(facts(calling_aet="OTHER"), RoutingSettings(calling_aets=["CT1"]))
    assert not d.eligible and "OTHER" in d.reason


def test_series_facts_from_real_headers(sample_series):
    f = series_facts([str(p) for p in sample_series.files], "CT1")
    assert f.modality == "CT" and f.n_slices == 112 and f.tilt_from_axial_deg == 0.0
    assert f.slice_thickness_mm == 3.0 and 66 <= f.age_years <= 68
    assert decide(f, RoutingSettings()).eligible


def test_store_is_durable_idempotent_and_refuses_bad_uids(tmp_path, sample_series):
    db = NodeDB(tmp_path / "db.sqlite")
    store = InstanceStore(tmp_path / "instances", db)
    raw = sample_series.files[0].read_bytes()
    ds = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    kw = dict(sop_class=CT, sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
              series_uid=ds.SeriesInstanceUID, transfer_syntax="1.2.840.10008.1.2.1", calling_aet="CT1",
              patient_id="P", issuer="", modality="CT")
    first = store.store(raw, **kw)
    assert not first.duplicate
    with open(first.path, "rb") as fh:
        assert fh.read() == raw  # bytes as received, no re-encode
    assert store.store(raw, **kw).duplicate
    assert db.series(ds.SeriesInstanceUID).n_instances == 1
    for bad in ("", "1.2.abc", "../../etc", "1.02.3"):
        with pytest.raises(InstanceRefused) as exc:
            store.store(raw, **{**kw, "study_uid": bad})
        assert exc.value.status == 0xA900
    assert not list((tmp_path / "instances").rglob(".incoming.*"))
    db.close()


def _store_fields(path) -> dict:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return dict(sop_class=str(ds.SOPClassUID), sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                calling_aet="", patient_id=str(ds.get("PatientID", "")), issuer=str(ds.get("IssuerOfPatientID", "")),
                modality=str(ds.get("Modality", "")))


def test_an_unsynced_index_commit_leaves_the_connection_synced(tmp_path, sample_series):
    """The service's instance rows skip the disk wait; every other commit on the connection still waits."""
    db = NodeDB(tmp_path / "db.sqlite")
    store = InstanceStore(tmp_path / "instances", db, index_synced=False)
    synchronous = lambda: db._db.execute("PRAGMA synchronous").fetchone()[0]  # noqa: E731 - 2 = FULL, 1 = NORMAL
    assert synchronous() == 2
    store.store(sample_series.files[0].read_bytes(), **_store_fields(sample_series.files[0]))
    assert synchronous() == 2
    with pytest.raises(RuntimeError):
        with db._tx(synced=False) as tx:
            assert tx.execute("PRAGMA synchronous").fetchone()[0] == 1
            raise RuntimeError("a failed transaction")
    assert synchronous() == 2 and not db._db.in_transaction
    db.close()


def test_index_rows_a_power_loss_took_are_rebuilt_from_the_instance_files(tmp_path, sample_series):
    import sqlite3

    from dicom_node.index_recovery import reindex_unindexed

    db = NodeDB(tmp_path / "db.sqlite")
    store = InstanceStore(tmp_path / "instances", db, index_synced=False)
    files = sample_series.files[:5]
    refs = [store.store(f.read_bytes(), **_store_fields(f)) for f in files]
    series_uid = refs[0].series_uid
    columns = "sop_instance_uid, sop_class_uid, study_uid, series_uid, path, transfer_syntax"
    before = sorted(db._query(f"SELECT {columns} FROM instances"))
    # What a power loss can take: the last unsynced rows (3 instances) and their counts in the series row.
    lost = [r.sop_instance_uid for r in refs[2:]]
    with sqlite3.connect(db.path) as c:
        c.executemany("DELETE FROM instances WHERE sop_instance_uid=?", [(u,) for u in lost])
        c.execute("UPDATE series SET n_instances=2 WHERE series_uid=?", (series_uid,))
    series_dir = tmp_path / "instances" / refs[0].study_uid / series_uid
    garbage = series_dir / "1.2.3.4.dcm"  # unreadable: left as it is, never indexed
    garbage.write_bytes(b"not a DICOM file")
    moved = pydicom.dcmread(files[0])  # a stale copy of an instance now filed under another series
    moved.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    stale = store.path_for(refs[0].study_uid, moved.SeriesInstanceUID, refs[0].sop_instance_uid)
    Path(stale).parent.mkdir(parents=True)
    moved.save_as(stale)

    report = reindex_unindexed(store)
    assert report.reindexed == 3 and report.files == 7
    assert sorted(report.left) == sorted([str(garbage), stale])
    assert sorted(db._query(f"SELECT {columns} FROM instances")) == before
    assert db.series(series_uid).n_instances == 5
    assert db._query("SELECT count(*) FROM audit WHERE kind='recovered'") == [(1,)]
    assert reindex_unindexed(store).reindexed == 0  # idempotent
    db.close()
