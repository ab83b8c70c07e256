"""The screening job on the real sample CT: SR and SC are valid DICOM and say what they must."""
import datetime as dt
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image

from engines.bundle import load_bundle
from hl7.panel import LabPanel, LabValue
from pipeline.job import JobRequest, run_screening
from pipeline.report.sr import NodeIdentity
from pipeline.screening import classify_attenuation
from tests.conftest import need_tool

NODE = NodeIdentity("osteoscreen project", "osteoscreen", "0.1.0", "0001", "1.2.826.0.1.3680043.8.498.77")


@pytest.fixture(scope="module")
def screened(sample_series, tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    labs = LabPanel("OS-DEMO-0001", "OSTEOSCREEN-DEMO", dt.date(2026, 1, 5), 90, (
        LabValue("17861-6", "Calcium", 9.1, "mg/dL", dt.datetime(2026, 1, 4, 8, 30), "LIS 1"),))
    req = JobRequest(1, sample_series.series_uid, tuple(map(str, sample_series.files)), labs, str(out),
                     "fused_kdamm_v1", NODE)
    return run_screening(req), out


def test_job_screens_the_sample(screened):
    result, out = screened
    assert result.status == "screened", result.reason
    assert {o.kind for o in result.outputs} == {"sr", "sc"}
    s = result.summary
    assert s["modalities"] == ["image", "demographics", "labs"]
    assert 0.0 < s["probability"] < 1.0 and s["category_id"] in ("screen_positive", "screen_negative")
    assert set(s["shap"]) >= {"age", "female", "calcium"}
    assert abs(s["shap_base"] + sum(s["shap"].values()) - s["probability"]) < 1e-4  # additivity
    assert s["attenuation_category"] == "Osteoporosis likely"  # Pickhardt stays a reported measurement
    assert (out / "sc.png").exists() and (out / "result.json").exists()
    img = Image.open(out / "sc.png")
    assert img.mode == "RGB" and min(img.size) >= 512


@pytest.mark.parametrize("name", ["sr.dcm", "sc.dcm"])
def test_outputs_pass_dciodvfy(screened, name):
    exe = need_tool("dciodvfy")
    _, out = screened
    r = subprocess.run([exe, str(out / name)], capture_output=True, text=True)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_results_are_deterministic_for_idempotent_resend(screened, sample_series, tmp_path):
    result, out = screened
    again = run_screening(JobRequest(2, sample_series.series_uid, tuple(map(str, sample_series.files)),
                                     LabPanel("OS-DEMO-0001", None, None, 90), str(tmp_path), "fused_kdamm_v1",
                                     NODE))
    assert [o.sop_instance_uid for o in again.outputs] == [o.sop_instance_uid for o in result.outputs]

    def tracking_uids(path):
        found, todo = [], [pydicom.dcmread(path)]
        while todo:
            item = todo.pop()
            if item.get("ValueType") == "UIDREF":
                found.append(str(item.UID))
            todo += list(item.get("ContentSequence", []))
        return sorted(found)

    # the same job run again: the same SOP Instance UID must carry the same content (was: random tracking UIDs)
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    run_screening(JobRequest(1, sample_series.series_uid, tuple(map(str, sample_series.files)), LabPanel(
        "OS-DEMO-0001", "OSTEOSCREEN-DEMO", dt.date(2026, 1, 5), 90, (
            LabValue("17861-6", "Calcium", 9.1, "mg/dL", dt.datetime(2026, 1, 4, 8, 30), "LIS 1"),)), str(rerun),
        "fused_kdamm_v1", NODE))
    first = tracking_uids(out / "sr.dcm")
    assert first and first == tracking_uids(rerun / "sr.dcm")


def test_sr_marks_the_labs_the_model_used_and_names_shap_inputs_by_label(screened):
    _, out = screened
    texts, todo = [], [pydicom.dcmread(out / "sr.dcm")]
    while todo:
        item = todo.pop()
        if item.get("ValueType") == "TEXT":
            texts.append(str(item.TextValue))
        todo += list(item.get("ContentSequence", []))
    texts = " ".join(texts)
    assert "Laboratory values found (* = an input of the screening model): Calcium* 9.1 mg/dL" in texts
    assert "held as it is, so its effect is part of the base value" in texts and "alp " not in texts
    assert "Model card (" in texts and "SEMI-SYNTHETIC CT patches" in texts


def test_sc_is_in_the_source_study_with_legible_panel(screened, sample_series):
    _, out = screened
    src = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    sc = pydicom.dcmread(out / "sc.dcm")
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.PatientID == src.PatientID
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID
    rgb = sc.pixel_array
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    panel = rgb[:, 512:]
    assert (panel > 200).any(), "text panel is empty"
    assert np.any((rgb[..., 0] > 200) & (rgb[..., 1] < 100)), "red ROI outline missing"


def test_thresholds_come_from_the_model_card():
    card = load_bundle("pickhardt_l1_2013").card
    assert classify_attenuation(110.0, card).category_id == "osteoporosis_likely"
    assert classify_attenuation(110.1, card).category_id == "low_bmd_indeterminate"
    assert classify_attenuation(160.0, card).category_id == "low_bmd_indeterminate"
    assert classify_attenuation(160.1, card).category_id == "normal"
    assert "RESEARCH USE ONLY" in card.intended_use


def test_job_without_usable_image_still_screens(sample_series, tmp_path):
    # Too few slices to find L1: the image path fails with a reason, demographics remain.
    req = JobRequest(3, sample_series.series_uid, tuple(map(str, sample_series.files[90:110])),
                     LabPanel("OS-DEMO-0001", None, None, 90), str(tmp_path), "fused_kdamm_v1", NODE)
    result = run_screening(req)
    assert result.status == "screened"
    assert result.summary["modalities"] == ["demographics"]
    assert result.summary["image_note"]
    assert [o.kind for o in result.outputs] == ["sr"]
    exe = need_tool("dciodvfy")
    r = subprocess.run([exe, str(tmp_path / "sr.dcm")], capture_output=True, text=True)
    assert not [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("Error")]


def test_sr_carries_probability_category_and_shap(screened):
    _, out = screened
    sr = pydicom.dcmread(out / "sr.dcm")

    def walk(seq):
        for item in seq:
            yield item
            if "ContentSequence" in item:
                yield from walk(item.ContentSequence)

    items = list(walk(sr.ContentSequence))
    codes = {i.ConceptNameCodeSequence[0].CodeValue: i for i in items if "ConceptNameCodeSequence" in i}
    prob = codes["OS0002"]
    assert prob.ValueType == "NUM" and 0 < float(prob.MeasuredValueSequence[0].NumericValue) < 1
    assert prob.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "{ratio}"
    assert codes["OS0001"].ValueType == "CODE"
    shap = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue.startswith("OS-SHAP")]
    assert len(shap) >= 3
    assert all(np.isfinite(float(i.MeasuredValueSequence[0].NumericValue)) for i in shap)


def test_sr_reads_back_with_highdicom_and_renders_with_dcmtk(screened, sample_series):
    import highdicom as hd

    result, out = screened
    sr = hd.sr.srread(out / "sr.dcm")
    report = sr.content
    all_roi = report.get_planar_roi_measurement_groups()
    by_level = {str(g.tracking_identifier).split()[0]: g for g in all_roi}
    adjacent = {a["level"]: a for a in result.summary["adjacent_levels"]}
    assert set(by_level) == {"L1", *adjacent}  # T12 / L2 only when confidently found
    for level, a in adjacent.items():
        vals = {(m.name.value, m.derivation.value if m.derivation else None): m.value
                for m in by_level[level].get_measurements()}
        assert vals[("112031", "373098007")] == pytest.approx(a["mean_hu"], abs=0.05)
        assert by_level[level].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            a["source_sop_instance_uid"]
    roi = [by_level["L1"]]
    values = {(m.name.value, m.derivation.value if m.derivation else None): m.value for m in roi[0].get_measurements()}
    assert values[("112031", "373098007")] == pytest.approx(result.summary["mean_hu"], abs=0.05)
    assert values[("42798000", None)] == pytest.approx(result.summary["roi_area_mm2"], abs=0.05)
    assert values[("112031", "373099004")] == pytest.approx(result.summary["median_hu"], abs=0.05)  # median
    assert values[("OS0011", None)] == result.summary["roi_voxels"] > 0
    assert len(result.summary["roi_slices"]) >= 1 and result.summary["slice_index"] in result.summary["roi_slices"]
    assert roi[0].roi.GraphicType == "POLYLINE"
    assert roi[0].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        result.summary["source_sop_instance_uid"]
    groups = {str(g.tracking_identifier): g for g in report.get_image_measurement_groups()}
    fused = {m.name.value: m.value for m in groups["Fused screening model"].get_measurements()}
    assert fused["OS0002"] == pytest.approx(result.summary["probability"], abs=1e-4)
    shap = {m.name.value: m.value for m in groups["Model explanation (SHAP)"].get_measurements()}
    for name, v in result.summary["shap"].items():
        assert shap[f"OS-SHAP-{name}"[:16]] == pytest.approx(v, abs=1e-5)
    labs = {m.name.value: m.value for m in groups["Laboratory values found"].get_measurements()}
    assert labs == {"17861-6": pytest.approx(9.1)}
    library = [i for i in report[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert library, "no Image Library in the SR"
    entries = [i for group in library[0].ContentSequence for i in group.ContentSequence if i.ValueType == "IMAGE"]
    assert entries and entries[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        result.summary["source_sop_instance_uid"]
    for tool in ("dsrdump", "dsr2html"):
        exe = need_tool(tool)
        r = subprocess.run([exe, str(out / "sr.dcm")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "RESEARCH USE ONLY" in r.stdout and f"{result.summary['mean_hu']:g}" in r.stdout


def test_key_image_layout(screened):
    """Golden layout: image area 512 px high, 420 px panel, title, disclaimer and SHAP bars present."""
    _, out = screened
    img = np.asarray(Image.open(out / "sc.png"))
    h, w, _ = img.shape
    assert h == 512 and w == 512 + 420  # 366 x 303 mm slice scaled to 512 px wide, plus the 420 px panel
    panel = img[:, w - 420 :]
    yellow = (panel[..., 0] > 200) & (panel[..., 1] > 150) & (panel[..., 2] < 80)
    assert yellow[-40:].any(), "disclaimer footer missing"
    red_bars = (panel[..., 0] > 200) & (panel[..., 1] < 100) & (panel[..., 2] < 100)
    assert red_bars.sum() > 100, "SHAP bar chart missing"
    assert (panel[:40] > 200).any(), "title missing"


@pytest.mark.parametrize("multiframe", [False, True])
def test_key_object_selection_and_presentation_state(sample_series, tmp_path, multiframe):
    """The optional KOS and GSPS: valid (dciodvfy), pointing at the measured slice (frame) and the key image."""
    import dataclasses

    from dicom_node.sample import write_multiframe_series

    series = write_multiframe_series(sample_series, tmp_path / "mf", tag="kos-mf") if multiframe else sample_series
    labs = LabPanel("OS-DEMO-0001", "OSTEOSCREEN-DEMO", dt.date(2026, 1, 5), 90)
    req = JobRequest(7, series.series_uid, tuple(map(str, series.files)), labs, str(tmp_path / "out"),
                     "fused_kdamm_v1", NODE)
    req = dataclasses.replace(req, key_object_selection=True, presentation_state=True)
    result = run_screening(req)
    assert {o.kind for o in result.outputs} == {"sr", "sc", "kos", "gsps"}
    out = tmp_path / "out"
    exe = need_tool("dciodvfy")
    for name in ("kos.dcm", "gsps.dcm"):
        r = subprocess.run([exe, str(out / name)], capture_output=True, text=True)
        assert [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")] == [], name
    source = result.summary["source_sop_instance_uid"]
    sc_uid = next(o.sop_instance_uid for o in result.outputs if o.kind == "sc")
    kos = pydicom.dcmread(out / "kos.dcm")
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"
    referenced = {s.ReferencedSOPInstanceUID for series_item in kos.CurrentRequestedProcedureEvidenceSequence[0]
                  .ReferencedSeriesSequence for s in series_item.ReferencedSOPSequence}
    assert referenced == {source, sc_uid}
    gsps = pydicom.dcmread(out / "gsps.dcm")
    image_ref = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert image_ref.ReferencedSOPInstanceUID == source
    ann = gsps.GraphicAnnotationSequence[0]
    if multiframe:
        assert int(ann.ReferencedImageSequence[0].ReferencedFrameNumber) == result.summary["source_frame_number"]
    poly = ann.GraphicObjectSequence[0]
    assert poly.GraphicType == "POLYLINE" and poly.NumberOfGraphicPoints >= 4
    assert list(poly.GraphicData[:2]) == list(poly.GraphicData[-2:])  # closed
    assert "HU" in ann.TextObjectSequence[0].UnformattedTextValue
    assert float(gsps.SoftcopyVOILUTSequence[0].WindowWidth) == 1800.0
    assert gsps.SoftcopyVOILUTSequence[0].WindowCenterWidthExplanation == "bone"  # one value, not b\\o\\n\\e
    # the measured frame of a multi-frame CT is the key image, not the whole object
    image_items = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: i.ReferencedSOPSequence[0]
                   for i in kos.ContentSequence if i.ValueType == "IMAGE"}
    frame = image_items[source].get("ReferencedFrameNumber")
    assert (int(frame) if frame is not None else None) == (result.summary["source_frame_number"] if multiframe
                                                           else None)
    assert "ReferencedFrameNumber" not in image_items[sc_uid]
    # every object names the node the same way (General Equipment)
    for name in ("sr.dcm", "sc.dcm", "kos.dcm", "gsps.dcm"):
        ds = pydicom.dcmread(out / name, stop_before_pixels=True)
        assert (ds.ManufacturerModelName, ds.DeviceSerialNumber) == (NODE.model_name, NODE.serial_number), name
    if not multiframe:  # (the multi-frame sample names no body part: Laterality stays, empty)
        r = subprocess.run([exe, str(out / "gsps.dcm")], capture_output=True, text=True)
        assert "Laterality" not in r.stdout + r.stderr  # the body part is named and unpaired: no empty Laterality


def test_a_replacing_report_is_numbered_in_the_same_series(sample_series, tmp_path):
    """A new version of a study's result (a re-run, a corrected identity): new instances in the same series as
    the ones they replace, numbered by version, and the key image says it replaces an earlier one."""
    import dataclasses

    labs = LabPanel("OS-DEMO-0001", "OSTEOSCREEN-DEMO", dt.date(2026, 1, 5), 90)
    req = dataclasses.replace(JobRequest(7, sample_series.series_uid, tuple(map(str, sample_series.files)), labs,
                                         str(tmp_path / "v1"), "fused_kdamm_v1", NODE),
                              key_object_selection=True, presentation_state=True)
    first = run_screening(req)
    sr1 = pydicom.dcmread(tmp_path / "v1" / "sr.dcm")
    second = run_screening(dataclasses.replace(
        req, output_dir=str(tmp_path / "v2"), report_version=2,
        predecessor_sr=(str(sr1.StudyInstanceUID), str(sr1.SeriesInstanceUID), str(sr1.SOPInstanceUID))))
    assert first.status == second.status == "screened"
    for kind in ("sr", "sc", "kos", "gsps"):
        a, b = (pydicom.dcmread(tmp_path / v / f"{kind}.dcm", stop_before_pixels=True) for v in ("v1", "v2"))
        assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID, kind
        assert (int(a.InstanceNumber), int(b.InstanceNumber)) == (1, 2), kind
    before, after = (np.asarray(Image.open(tmp_path / v / "sc.png")) for v in ("v1", "v2"))
    assert before.shape != after.shape or (before != after).any()


def test_a_not_screened_sr_for_a_corrected_identity_is_a_new_instance(sample_series, tmp_path):
    """The same series, not screened, before and after a patient identity correction: the SR naming the corrected
    patient must get its own SOP Instance UID (the outbox drops a UID it has sent, and the PACS kept the SR naming
    the old patient); the same identity again gives the same SR."""
    import dataclasses

    uids = {}
    for tag, pid in (("a", "OS-DEMO-0001"), ("b", "OS-DEMO-0002"), ("c", "OS-DEMO-0001")):
        files = _relabelled(sample_series, tmp_path / f"src-{tag}", ContrastBolusAgent="IOHEXOL", PatientID=pid)
        req = JobRequest(9, sample_series.series_uid, files, LabPanel(pid, None, None, 90),
                         str(tmp_path / f"out-{tag}"), "fused_kdamm_v1", NODE)
        result = run_screening(dataclasses.replace(req, contrast_policy="skip", report_not_screened=True))
        assert result.status == "not_screened"
        uids[tag] = result.outputs[0].sop_instance_uid
        assert pydicom.dcmread(result.outputs[0].path).PatientID == pid
    assert uids["a"] != uids["b"] and uids["a"] == uids["c"]


@pytest.mark.parametrize("report_it", [True, False])
def test_not_screened_series_gets_an_sr_saying_why_when_configured(sample_series, tmp_path, report_it):
    import dataclasses

    src = tmp_path / "contrast"
    src.mkdir()
    for f in sample_series.files[90:110]:
        ds = pydicom.dcmread(f)
        ds.ContrastBolusAgent = "IOPAMIDOL"
        ds.save_as(src / f.name, enforce_file_format=True)
    req = JobRequest(5, sample_series.series_uid, tuple(str(p) for p in sorted(src.iterdir())),
                     LabPanel("OS-DEMO-0001", None, None, 90), str(tmp_path / "out"), "fused_kdamm_v1", NODE)
    result = run_screening(dataclasses.replace(req, contrast_policy="skip", report_not_screened=report_it))
    assert result.status == "not_screened" and "contrast" in result.reason
    if not report_it:
        assert result.outputs == ()
        return
    assert [o.kind for o in result.outputs] == ["sr"]
    sr_path = tmp_path / "out" / "sr.dcm"
    r = subprocess.run([need_tool("dciodvfy"), str(sr_path)], capture_output=True, text=True)
    assert not [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("Error")]
    r = subprocess.run([need_tool("dsr2html"), str(sr_path)], capture_output=True, text=True)
    assert "did not screen it: contrast-enhanced study" in r.stdout and "RESEARCH USE ONLY" in r.stdout


def test_metal_in_l1_screens_without_the_image_and_reports_l2_instead(tmp_path):
    """The real CT with a metal rod in its L1 body: no L1 HU, the neighbour measured and the reason in the SR."""
    import nibabel as nib

    from dicom_node.sample import sample_data_dir, write_sample_series

    img = nib.as_closest_canonical(nib.load(str(sample_data_dir() / "example_ct.nii.gz")))
    lab = np.asanyarray(nib.as_closest_canonical(nib.load(str(sample_data_dir() / "totalseg_v2_labels.nii.gz"))).dataobj)
    data = np.asanyarray(img.dataobj).astype(np.int16)
    i, j, k = np.nonzero(lab == 31)
    front = j > np.median(j)  # canonical RAS: j grows anteriorly, so this is the vertebral body
    ci, cj, ck = (int(np.median(a[front])) for a in (i, j, k))
    data[ci - 2 : ci + 3, cj - 1 : cj + 2, ck - 3 : ck + 6] = 3071  # a cement-like column through the body
    metal = tmp_path / "metal.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(metal))
    series = write_sample_series(tmp_path / "dcm", tag="metal", nifti=metal)
    out = tmp_path / "job"
    req = JobRequest(9, series.series_uid, tuple(map(str, series.files)), LabPanel("OS-DEMO-0001",
                     "OSTEOSCREEN-DEMO", dt.date(2026, 1, 5), 90, ()), str(out), "fused_kdamm_v1", NODE)
    result = run_screening(req)
    s = result.summary
    assert result.status == "screened" and "image" not in s["modalities"]
    assert "metal or cement in the L1 body" in s["image_note"] and "measured instead" in s["image_note"]
    assert "mean_hu" not in s  # no L1 value from a streaked slice
    assert [m["level"] for m in s["adjacent_levels"]] == ["L2"]  # T12 is cut by the top of this scan
    assert 50 < s["adjacent_levels"][0]["mean_hu"] < 250
    sr = pydicom.dcmread(out / "sr.dcm")
    from tests.test_end_to_end import _walk

    texts = " ".join(str(x.get("TextValue", "")) for x in _walk(sr.ContentSequence))
    assert "metal or cement in the L1 body" in texts and "L2 trabecular mean" in texts
    exe = need_tool("dciodvfy")
    r = subprocess.run([exe, str(out / "sr.dcm")], capture_output=True, text=True)
    assert not [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("Error")]


def test_a_compressed_l1_is_reported_as_a_finding_and_l2_is_measured_instead(tmp_path):
    """The real CT with its L1 body lowered by 30 % (the column above moved down onto it): the SR states
    the suspected fracture as a finding of its own (coded group and text), L1 gets no HU, L2 is measured."""
    from dicom_node.sample import load_lps_volume, sample_data_dir, sample_labels_lps, write_array_series
    from pipeline.validation import compress_vertebra, volume_from_array

    hu, origin, spacing = load_lps_volume(sample_data_dir() / "example_ct.nii.gz")
    compressed, _ = compress_vertebra(volume_from_array(hu, spacing, origin), sample_labels_lps(), 0.30)
    series = write_array_series(tmp_path / "dcm", compressed.hu, origin, spacing, tag="fracture")
    out = tmp_path / "job"
    req = JobRequest(9, series.series_uid, tuple(map(str, series.files)), LabPanel("OS-DEMO-0001",
                     "OSTEOSCREEN-DEMO", dt.date(2026, 1, 5), 90, ()), str(out), "fused_kdamm_v1", NODE)
    result = run_screening(req)
    s = result.summary
    assert result.status == "screened" and "image" not in s["modalities"] and "mean_hu" not in s
    assert [f["level"] for f in s["vertebral_fractures"]] == ["L1"] and s["vertebral_fractures"][0]["ratio"] < 0.8
    assert "suspected compression fracture of L1" in s["image_note"] and "measured instead" in s["image_note"]
    assert "L2" in [m["level"] for m in s["adjacent_levels"]]
    sr = pydicom.dcmread(out / "sr.dcm")
    from tests.test_end_to_end import _walk

    items = list(_walk(sr.ContentSequence))
    texts = " ".join(str(x.get("TextValue", "")) for x in items)
    assert "FINDING: suspected compression fracture of L1" in texts and "indication for osteoporosis" in texts
    assert "Suspected compression fracture L1" in texts
    codes_used = {x.ConceptCodeSequence[0].CodeValue for x in items if "ConceptCodeSequence" in x}
    assert "OS0014" in codes_used  # the finding type
    r = subprocess.run([need_tool("dciodvfy"), str(out / "sr.dcm")], capture_output=True, text=True)
    assert not [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("Error")]


def _relabelled(series, out, **attrs):
    """The sample series with header attributes replaced (None: removed)."""
    out.mkdir(parents=True)
    files = []
    for f in series.files:
        ds = pydicom.dcmread(f)
        for kw, value in attrs.items():
            if value is None:
                if kw in ds:
                    delattr(ds, kw)
            else:
                setattr(ds, kw, value)
        ds.save_as(out / f.name, enforce_file_format=True)
        files.append(str(out / f.name))
    return tuple(files)


@pytest.mark.parametrize("charset,name", [
    ("ISO_IR 100", "Müller^Jürgen"),
    ("ISO_IR 192", "Müller^Jürgen"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),  # the default repertoire as an empty first value
], ids=["latin1", "utf8", "iso2022-jis"])
def test_every_result_names_the_patient_as_the_image_does(sample_series, tmp_path, charset, name):
    """SR, SC, KOS and GSPS keep the source's character set, so a non-ASCII name stays the same name."""
    import dataclasses

    files = _relabelled(sample_series, tmp_path / "src", SpecificCharacterSet=charset, PatientName=name)
    req = JobRequest(8, sample_series.series_uid, files, LabPanel("OS-DEMO-0001", None, None, 90),
                     str(tmp_path / "out"), "fused_kdamm_v1", NODE)
    result = run_screening(dataclasses.replace(req, key_object_selection=True, presentation_state=True))
    assert result.status == "screened", result.reason
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    exe = need_tool("dciodvfy")
    for kind in ("sr", "sc", "kos", "gsps"):
        path = tmp_path / "out" / f"{kind}.dcm"
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == str(source.PatientName) == name, kind
        if kind != "gsps":
            assert ds.IssuerOfPatientID == source.IssuerOfPatientID, kind  # PACS patient key: ID + issuer
        r = subprocess.run([exe, str(path)], capture_output=True, text=True)
        assert [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")] == [], kind


def test_not_screened_sr_from_a_sparse_header(sample_series, tmp_path):
    """A contrast study skipped by policy, its header anonymised (no birth date, no study ID): the SR saying
    so is still made, and valid."""
    import dataclasses

    files = _relabelled(sample_series, tmp_path / "src", ContrastBolusAgent="IOHEXOL", PatientBirthDate=None,
                        StudyID=None, ReferringPhysicianName=None)
    req = JobRequest(9, sample_series.series_uid, files, LabPanel("OS-DEMO-0001", None, None, 90),
                     str(tmp_path / "out"), "fused_kdamm_v1", NODE)
    result = run_screening(dataclasses.replace(req, contrast_policy="skip", report_not_screened=True))
    assert result.status == "not_screened" and "contrast" in result.reason
    assert [o.kind for o in result.outputs] == ["sr"]
    r = subprocess.run([need_tool("dciodvfy"), result.outputs[0].path], capture_output=True, text=True)
    assert [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")] == []


def test_a_busy_key_image_grows_rather_than_draw_over_the_research_use_footer():
    """Contrast and calibration flags, a fracture and ten labs: the SHAP chart used to run over the
    RESEARCH USE ONLY footer and off the 512 px canvas."""
    from pipeline.report.render import IMAGE_PX, render_key_image

    lines = [f"line {i}: a long enough sentence to wrap once in the panel of the key image, twice maybe" for i in
             range(14)]
    bars = [(f"feature {i}", (-1) ** i * 0.01 * (i + 1)) for i in range(6)]
    img = render_key_image(np.zeros((256, 256)), (1.0, 1.0), None, "title", lines, "RESEARCH USE ONLY - not for "
                           "diagnostic use", bars=bars, bars_title="SHAP")
    assert img.shape[0] > IMAGE_PX
    panel = img[:, 512:]
    rows = np.arange(panel.shape[0])
    yellow = rows[((panel[..., 0] > 200) & (panel[..., 1] > 150) & (panel[..., 2] < 80)).any(axis=1)]
    bar = rows[(((panel[..., 0] > 200) & (panel[..., 1] < 100) & (panel[..., 2] < 100))
                | ((panel[..., 0] < 100) & (panel[..., 1] > 120) & (panel[..., 2] > 200))).any(axis=1)]
    assert yellow.size and bar.size and yellow.min() > bar.max()  # the footer below the last bar


def test_every_shipped_code_value_fits_a_short_code_value():
    """Code values over 16 characters go out as Long Code Value (UC), which many SR readers do not read."""
    import json
    from pathlib import Path

    from pipeline.training.export import SCREENING_CODES

    values = [c["value"] for c in SCREENING_CODES.values()]
    for card in Path("engines/models").glob("*/card.json"):
        for category in json.loads(card.read_text()).get("categories", []):
            values.append(category["code"]["value"])
    assert len(values) > 4 and all(len(v) <= 16 for v in values), [v for v in values if len(v) > 16]
