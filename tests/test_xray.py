"""The EXPERIMENTAL chest radiograph path: routing, preprocessing, training, and real DICOM through the node."""
from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pydicom
import pytest

import engines
from config.schema import RoutingSettings, XraySettings
from dicom_node.cli import main
from dicom_node.routing import decide, series_facts
from dicom_node.sample import sample_data_dir

ADULT = sample_data_dir() / "RG1_J2KR.dcm"  # real chest PA CR, 64-year-old woman, PixelSpacing "0\0"
CHILD = sample_data_dir() / "dx_image.dcm"  # real DX lateral thorax of a dog, PatientAge 5 years


def test_routing_sends_adult_chest_pa_to_the_xray_path_only_when_enabled():
    rules, on, off = RoutingSettings(), XraySettings(enabled=True), XraySettings()
    facts = series_facts([str(ADULT)], "CR1")
    assert (facts.modality, facts.body_part, facts.view_positions) == ("CR", "CHEST", ("PA",))
    d = decide(facts, rules, on)
    assert d.eligible and d.path == "xray" and "EXPERIMENTAL" in d.reason
    assert not decide(facts, rules, off).eligible and "modality CR" in decide(facts, rules, off).reason
    child = decide(series_facts([str(CHILD)], "DX1"), rules, on)
    assert not child.eligible and child.reason == "patient age 5 below 50" and child.rule == "age"
    import dataclasses

    cr, dx_raw = facts.sop_classes[0], "1.2.840.10008.5.1.4.1.1.1.1.1"  # CR; DX For Processing

    def with_images(*images):
        return dataclasses.replace(facts, images=images, sop_classes=tuple(sorted({i[0] for i in images})),
                                   view_positions=tuple(sorted({i[2] for i in images})), body_part=images[0][1])

    lateral = decide(with_images((cr, "CHEST", "LL")), rules, on)
    assert not lateral.eligible and lateral.rule == "view"
    assert decide(with_images((cr, "CHEST", "LL"), (cr, "CHEST", "PA")), rules, on).eligible  # PA + lateral
    raw = decide(with_images((dx_raw, "CHEST", "PA")), rules, on)
    assert not raw.eligible and raw.rule == "sop_class"
    abdomen = decide(with_images((cr, "ABDOMEN", "PA")), rules, on)
    assert not abdomen.eligible and abdomen.rule == "body_part"
    # One image must be a chest PA itself: a lateral chest beside a PA without a body part, or a For
    # Processing PA beside a lateral, is not one (both were screened as a chest PA, the lateral or the raw image).
    for split in (with_images((cr, "CHEST", "LL"), (cr, "", "PA")), with_images((dx_raw, "CHEST", "PA"),
                                                                                  (cr, "CHEST", "LL"))):
        d = decide(split, rules, on)
        assert not d.eligible and d.rule == "view", d.reason
    ct_unaffected = decide(dataclasses.replace(facts, modality="CT"), rules, on)
    assert ct_unaffected.path == "ct" and not ct_unaffected.eligible


def test_radiograph_preprocessing_handles_monochrome1_and_a_zero_pixel_spacing():
    from pipeline.xray.image import CNN_PX, GRID, N_WAVELET_FEATURES, load_radiograph, model_inputs, square_image

    rad = load_radiograph(ADULT)
    assert rad.pixel_mm is None and "not a valid spacing" in rad.notes[0]
    h, w = rad.display.shape
    lung = rad.display[h // 3 : h // 2, w // 8 : w // 3].mean()
    spine = rad.display[h // 3 : h // 2, w // 2 - w // 40 : w // 2 + w // 40].mean()
    assert spine > lung + 0.1  # MONOCHROME1 inverted: mediastinum and spine bright, lungs dark
    feeds = model_inputs(square_image(rad.display))
    assert feeds["image"].shape == (3, CNN_PX, CNN_PX)
    assert feeds["wavelet"].shape == (GRID * GRID, N_WAVELET_FEATURES) and np.isfinite(feeds["wavelet"]).all()
    child = load_radiograph(CHILD)
    assert child.pixel_mm == pytest.approx((1.2, 1.2012))


def test_a_broken_radiograph_is_refused_with_a_reason(tmp_path):
    from pipeline.xray.image import RadiographError, load_radiograph

    ds = pydicom.dcmread(CHILD)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    with pytest.raises(RadiographError, match="cannot be decoded"):
        load_radiograph(bad)


@pytest.mark.parametrize("change,reason", [
    (lambda a: np.zeros_like(a), "no contrast"),
    (lambda a: a[:40, :40], "at least 64 x 64"),
])
def test_odd_radiographs_are_refused_with_a_reason(tmp_path, change, reason):
    from pipeline.xray.image import RadiographError, load_radiograph

    ds = pydicom.dcmread(CHILD)
    arr = np.ascontiguousarray(change(ds.pixel_array))
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "odd.dcm")
    with pytest.raises(RadiographError, match=reason):
        load_radiograph(tmp_path / "odd.dcm")


def test_an_undecodable_radiograph_is_not_screened_and_the_sr_says_why(tmp_path):
    from hl7.panel import LabPanel
    from pipeline.job import JobRequest, run_screening
    from tests.test_end_to_end import dciodvfy_errors
    from tests.test_report import NODE

    ds = pydicom.dcmread(CHILD)
    ds.PatientAge, ds.PatientBirthDate = "070Y", "19500101"
    ds.save_as(tmp_path / "lateral.dcm")  # no ViewPosition: not a chest PA/AP, never screened as one
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(tmp_path / "bad.dcm")
    for name, reason in (("bad.dcm", "cannot be decoded"), ("lateral.dcm", "no For Presentation chest PA/AP image")):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        req = JobRequest(1, str(ds.SeriesInstanceUID), (str(tmp_path / name),), LabPanel("123456", None, None, 90),
                         str(out), "fused_kdamm_v1", NODE, pipeline="xray", report_not_screened=True)
        result = run_screening(req)
        assert result.status == "not_screened" and reason in result.reason
        assert result.summary["experimental"] is True
        sr = pydicom.dcmread(out / "sr.dcm")
        text = json.dumps(sr.to_json_dict())
        assert "43468-8" in text and "EXPERIMENTAL: chest radiograph path" in text
        assert dciodvfy_errors(out / "sr.dcm") == []


def test_train_xray_quick_writes_an_experimental_bundle_that_runs_on_every_cpu_backend(tmp_path, capsys):
    bundle, report = tmp_path / "bundle", tmp_path / "report"
    assert main(["train", "xray", "--quick", "--out", str(bundle), "--report", str(report)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"train xray ok: auc_fused=\d\.\d{3} auc_image=\d\.\d{3} auc_tabular=\d\.\d{3} "
                        r"weight_image=\d\.\d{2} experimental=yes seed=\d+", last), last
    card = json.loads((bundle / "card.json").read_text())
    assert card["experimental"] is True and card["intended_use"].startswith("EXPERIMENTAL")
    assert all(c["label"].startswith("EXPERIMENTAL") for c in card["categories"])
    assert 0.0 <= card["fusion"]["weight_image"] <= 1.0
    text = (report / "xray.md").read_text()
    assert "EXPERIMENTAL" in text and "semi-synthetic" in text
    assert (report / "xray_roc.png").stat().st_size > 10_000 and (report / "xray_examples.png").exists()
    rng = np.random.default_rng(4)
    feeds = {"image": rng.standard_normal((6, 3, 64, 64)).astype(np.float32),
             "wavelet": rng.normal(-2, 1.5, (6, 16, 10)).astype(np.float32)}
    outs = {b: engines.load(bundle, b, graph="image_model")(**feeds) for b in ("onnxruntime-cpu", "pytorch")}
    assert outs["pytorch"]["logit"].shape == (6, 1) and outs["pytorch"]["region_attention"].shape == (6, 16)
    for name in ("logit", "region_attention"):
        assert np.allclose(outs["onnxruntime-cpu"][name], outs["pytorch"][name], atol=1e-5, rtol=1e-4)


def test_the_shipped_model_fuses_image_and_tabular_probabilities_as_its_card_says():
    from engines.bundle import load_bundle
    from pipeline.xray.image import load_radiograph, model_inputs, square_image
    from pipeline.xray.model import XrayModel

    model = XrayModel(load_bundle("cxr_fusion_v1"), "onnxruntime-cpu")
    feeds = model_inputs(square_image(load_radiograph(ADULT).display))
    alone = model.predict(feeds, None)
    assert alone.probability == alone.image_probability and alone.threshold == model.thresholds["image_only"]
    fused = model.predict(feeds, 0.3)
    w = model.weight
    assert fused.probability == pytest.approx(w * fused.image_probability + (1 - w) * 0.3)
    assert fused.threshold == model.thresholds["fused"] and fused.category_label.startswith("EXPERIMENTAL")
    assert fused.region_attention.shape == (4, 4) and fused.region_attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_real_chest_radiographs_through_the_node(node_factory, tmp_path):
    """Real CR (adult chest PA) and DX (a child) through the running node with [xray] on: the adult is screened on
    the EXPERIMENTAL path, SR and SC in its study (dciodvfy clean, EXPERIMENTAL everywhere); the child is not."""
    from tests.conftest import storescu, wait_for
    from tests.test_end_to_end import dciodvfy_errors

    lateral = pydicom.dcmread(ADULT)  # the same series also holds a lateral view, sent first: not the one screened
    lateral.ViewPosition = "LL"
    lateral.SOPInstanceUID = lateral.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    lateral.InstanceNumber = 2
    lateral.save_as(tmp_path / "lateral.dcm")
    node = node_factory(extra="[xray]\nenabled = true\n").start()
    r = storescu([tmp_path / "lateral.dcm", ADULT, CHILD], node.port, extra=("-xv",))  # JPEG 2000 as received
    assert r.returncode == 0, r.stderr
    db = node.state_dir / "osteoscreen.sqlite"

    def settled():
        with sqlite3.connect(db) as c:
            series = c.execute("SELECT state, reason FROM series").fetchall()
            jobs = c.execute("SELECT state, result_json FROM jobs").fetchall()
        done = len(series) == 2 and all(s[0] != "receiving" for s in series) and jobs and \
            all(j[0] in ("done", "failed") for j in jobs)
        return (series, jobs) if done else None

    series, jobs = wait_for(settled, 180, "both series routed and the job finished")
    assert any(s[1] == "patient age 5 below 50" for s in series), series  # children are never screened
    assert len(jobs) == 1 and jobs[0][0] == "done", jobs
    summary = json.loads(jobs[0][1])
    assert summary["path"] == "xray" and summary["experimental"] is True and summary["images_in_series"] == 2
    assert summary["source_sop_instance_uid"] == pydicom.dcmread(ADULT, stop_before_pixels=True).SOPInstanceUID
    assert summary["model"].startswith("osteoscreen-cxr-fusion")
    assert summary["modalities"][0] == "radiograph" and "demographics" in summary["modalities"]
    assert summary["category"].startswith("EXPERIMENTAL") and 0 < summary["probability"] < 1
    results = node.state_dir / "results"
    sr_path, sc_path = next(results.rglob("sr.dcm")), next(results.rglob("sc.dcm"))
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(sc_path) == []
    sr, sc = pydicom.dcmread(sr_path), pydicom.dcmread(sc_path)
    source = pydicom.dcmread(ADULT, stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID == sc.StudyInstanceUID
    assert "EXPERIMENTAL" in sr.SeriesDescription and "EXPERIMENTAL" in sc.SeriesDescription
    text = json.dumps(sr.to_json_dict())
    assert "EXPERIMENTAL: chest radiograph path" in text and "43468-8" in text  # LOINC XR procedure


def test_the_xray_result_says_which_inputs_were_beyond_the_training_range(tmp_path):
    import datetime as dt

    from hl7.panel import LabPanel, LabValue
    from pipeline.job import JobRequest, run_screening
    from tests.test_report import NODE

    ds = pydicom.dcmread(ADULT)
    ds.PatientAge, ds.StudyDate = "064Y", "20260105"
    ds.save_as(tmp_path / "pa.dcm")
    labs = LabPanel("123456", None, dt.date(2026, 1, 5), 90,
                    (LabValue("6768-6", "Alkaline phosphatase", 1500.0, "U/L", dt.datetime(2026, 1, 4), "LAB"),))
    req = JobRequest(1, str(ds.SeriesInstanceUID), (str(tmp_path / "pa.dcm"),), labs, str(tmp_path),
                     "fused_kdamm_v1", NODE, pipeline="xray")
    result = run_screening(req)
    assert result.status == "screened", result.reason
    assert result.summary["input_notes"] and "Alkaline phosphatase 1500 U/L is above" in result.summary["input_notes"][0]
    sr = json.dumps(pydicom.dcmread(tmp_path / "sr.dcm").to_json_dict())
    assert "Outside the training range: Alkaline phosphatase 1500 U/L" in sr


def test_a_radiograph_stored_turned_or_mirrored_is_read_upright(tmp_path):
    """PatientOrientation was ignored: the same chest stored rotated by 90 degrees scored 16 times lower. A view
    with A/P along the rows or columns (a lateral) is refused."""
    from pydicom.uid import ExplicitVRLittleEndian

    from pipeline.xray.image import RadiographError, load_radiograph

    ds = pydicom.dcmread(ADULT)
    pixels = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    reference = None
    for orientation, stored in ((["L", "F"], pixels), (["R", "F"], pixels[:, ::-1]), (["H", "L"], pixels[::-1].T),
                                (["R", "H"], pixels[::-1, ::-1]), (["F", "R"], pixels[:, ::-1].T)):
        ds.PatientOrientation = orientation
        ds.Rows, ds.Columns = stored.shape
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(tmp_path / "r.dcm", enforce_file_format=True)
        rad = load_radiograph(tmp_path / "r.dcm")
        assert rad.orientation == ("L", "F")
        if reference is None:
            reference = rad.display
            assert len(rad.notes) == 1 and "is not a valid spacing" in rad.notes[0]
        else:
            assert np.array_equal(rad.display, reference), orientation
            assert any("to L\\F for the model" in n for n in rad.notes)
    ds.PatientOrientation = ["P", "F"]
    ds.save_as(tmp_path / "r.dcm", enforce_file_format=True)
    with pytest.raises(RadiographError, match="not a frontal view"):
        load_radiograph(tmp_path / "r.dcm")
