"""Routing decisions and the durable instance store."""
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
