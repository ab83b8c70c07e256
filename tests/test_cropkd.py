"""Crop teacher -> full-slice student: Grad-CAM, the crop-to-slice mapping, training, and the node's use of it."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import engines
from dicom_node.cli import main


def test_the_attention_output_is_grad_cam_of_the_logit():
    """The exported map is the Grad-CAM computed by autograd (channel weights = mean gradient), magnitude, sum 1."""
    from pipeline.training.models import full_slice_student

    torch.manual_seed(0)
    net = full_slice_student().eval()
    x = torch.randn(3, 3, 96, 96)
    feats = net.features(x).detach().requires_grad_(True)
    logit = net.out(feats.mean(dim=(2, 3)))
    (grad,) = torch.autograd.grad(logit.sum(), feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # Grad-CAM: global-average-pooled gradients
    cam = (weights * feats).sum(dim=1).abs()
    cam = cam / cam.sum(dim=(1, 2), keepdim=True)
    out_logit, att = net(x)
    assert att.shape == (3, 24, 24)
    assert torch.allclose(out_logit, logit, atol=1e-6)
    assert torch.allclose(att, cam.detach(), atol=1e-7, rtol=1e-4)
    assert torch.allclose(att.sum(dim=(1, 2)), torch.ones(3), atol=1e-5)


def test_crop_attention_lands_on_the_crop_in_full_slice_coordinates():
    from pipeline.training.synth_slice import CROP_MM, CROP_PX, crop_map_to_grid

    peak = np.zeros((8, 8), np.float32)
    peak[3:5, 3:5] = 0.25  # the crop's centre
    grid = crop_map_to_grid(peak, np.array([40.0, 60.0]), 24)
    assert grid.sum() == pytest.approx(1.0, abs=1e-3)
    i, j = np.unravel_index(grid.argmax(), grid.shape)
    assert (i, j) == (40 // 4, 60 // 4)
    uniform = crop_map_to_grid(np.full((8, 8), 1 / 64, np.float32), np.array([40.0, 60.0]), 24)
    extent_px = CROP_PX * CROP_MM / 4.0  # the crop covers 12 full-slice pixels = 3 cells
    assert np.count_nonzero(uniform > 1e-3) <= (extent_px / 4 + 1) ** 2


def test_the_full_slice_grid_maps_both_ways_and_samples_where_it_says():
    from pipeline.full_slice import FULL_PX, SliceGrid, full_slice_input

    hu = np.full((9, 200, 180), -1000, np.int16)
    hu[:, 130:134, 60:64] = 1500  # a dense marker off centre
    planes, grid = full_slice_input(hu, (3.0, 0.8, 0.8), 4.0)
    assert planes.shape == (3, FULL_PX, FULL_PX) and planes.dtype == np.float32
    ij = np.unravel_index(planes[1].argmax(), planes[1].shape)
    back = grid.to_slice_rc(np.array(ij, float))
    assert abs(back[0] - 131.5) < 4 and abs(back[1] - 61.5) < 4  # within a 4 mm grid pixel (5 source pixels)
    g = SliceGrid((50.0, 60.0), 4.0, (0.7, 0.9), rotation_deg=7.0)
    pts = np.array([[0.0, 0.0], [95.0, 10.0], [47.5, 47.5]])
    assert np.allclose(g.to_grid_ij(g.to_slice_rc(pts)), pts)


def test_the_attention_region_holds_half_the_mass_and_its_peak():
    from pipeline.attention import attention_region

    rr, cc = np.indices((100, 120))
    m = np.exp(-((rr - 40) ** 2 + (cc - 70) ** 2) / 50.0)
    region = attention_region(m / m.sum(), (0.5, 0.5))
    assert region is not None and region.mass >= 0.5
    assert abs(region.centroid_rc[0] - 40) < 0.5 and abs(region.centroid_rc[1] - 70) < 0.5
    from matplotlib.path import Path

    assert Path(region.polygon_rc).contains_point((40, 70))
    assert 0 < region.area_mm2 < 100 * 120 * 0.25 / 4


def test_train_cropkd_quick_writes_a_bundle_that_runs_on_every_cpu_backend(tmp_path, capsys):
    bundle, report = tmp_path / "bundle", tmp_path / "report"
    assert main(["train", "cropkd", "--quick", "--out", str(bundle), "--report", str(report)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"train cropkd ok: auc_student=\d\.\d{3} auc_kd_only=\d\.\d{3} auc_teacher=\d\.\d{3} "
                        r"inside_body=\d\.\d{3} inside_body_kd_only=\d\.\d{3} seed=\d+", last), last
    card = json.loads((bundle / "card.json").read_text())
    assert card["input"] == "full_slice" and "semi-synthetic" in card["intended_use"]
    r = card["metrics"]
    for key in ("student_attention_loss", "student_kd_only", "teacher_mapped"):
        mean, lo, hi = r["attention_inside_body"][key]
        assert 0.0 <= lo <= mean <= hi <= 1.0
    assert card["training_kernels"]["pinned"] is True  # the command re-ran itself with fixed CPU kernels
    text = (report / "cropkd.md").read_text()
    assert "semi-synthetic" in text and "mass inside the body" in text and "CPU kernels pinned" in text
    assert (report / "cropkd_attention.png").stat().st_size > 10_000
    image = np.random.default_rng(3).standard_normal((5, 3, 96, 96)).astype(np.float32)
    outs = {b: engines.load(bundle, b)(image=image) for b in ("onnxruntime-cpu", "pytorch")}
    assert outs["pytorch"]["logit"].shape == (5, 1) and outs["pytorch"]["attention"].shape == (5, 24, 24)
    for name in ("logit", "attention"):
        assert np.allclose(outs["onnxruntime-cpu"][name], outs["pytorch"][name], atol=1e-5, rtol=1e-4)


def _cropkd_bundle(tmp_path, replaces: bool):
    from engines.bundle import bundled_models_dir, load_bundle

    dst = tmp_path / ("cropkd_on" if replaces else "cropkd_off")
    shutil.copytree(bundled_models_dir() / "cropkd_v1", dst)
    card = json.loads((dst / "card.json").read_text())
    card["use_instead_of_fused_image_only"] = replaces
    (dst / "card.json").write_text(json.dumps(card))
    return load_bundle(dst)


def test_only_the_model_that_made_the_result_brings_an_attention_map(tmp_path):
    from engines.bundle import load_bundle
    from hl7.panel import LabPanel
    from pipeline.demographics import Demographics
    from pipeline.full_slice import full_slice_input
    from pipeline.fused import FusedModel, tabular_input
    from pipeline.image_only import ImageOnlyModel

    rng = np.random.default_rng(5)
    patch = rng.normal(0, 1, (3, 32, 32)).astype(np.float32)
    full = full_slice_input(rng.normal(0, 200, (12, 128, 128)).astype(np.int16), (3.0, 3.0, 3.0), 6.0)
    nothing = tabular_input(LabPanel("P", None, None, 90), Demographics(None, None, None, None))
    demo = tabular_input(LabPanel("P", None, None, 90), Demographics(70.0, "F", None, None))
    fused_bundle = load_bundle("fused_kdamm_v1")
    on = FusedModel(fused_bundle, "onnxruntime-cpu", image_only=ImageOnlyModel(_cropkd_bundle(tmp_path, True)))
    out = on.predict(patch, nothing, full_slice=full)
    assert out.model == ("osteoscreen-cropkd-fullslice", "1.0.0") and out.attention is not None
    assert out.attention.grid_map.shape == (24, 24) and abs(out.attention.grid_map.sum() - 1) < 1e-4
    assert on.predict(patch, demo, full_slice=full).attention is None  # the fused model answered: no map
    assert on.predict(patch, nothing).model is None  # no full slice built: the fused image-only path answers
    off = FusedModel(fused_bundle, "onnxruntime-cpu", image_only=ImageOnlyModel(_cropkd_bundle(tmp_path, False)))
    assert off.predict(patch, nothing, full_slice=full).attention is None


def test_the_full_slice_student_screens_real_dicom_through_the_node_and_its_attention_is_the_overlay(
        node_factory, sample_series, tmp_path):
    """Real CT through the running node, no labs and no demographics: the full-slice student makes the result, its
    Grad-CAM is drawn on the Secondary Capture and outlined in the SR (dciodvfy clean)."""
    import pydicom
    from PIL import Image

    from tests.conftest import screen_image_only
    from tests.test_end_to_end import dciodvfy_errors

    node, summary = screen_image_only(node_factory, sample_series.files, tmp_path, _cropkd_bundle(tmp_path, True).path)
    assert summary["model"] == "osteoscreen-cropkd-fullslice 1.0.0" and summary["modalities"] == ["image"]
    att = summary["attention"]
    assert att["region_share"] >= 0.5 and att["region_area_mm2"] > 0 and att["roi_distance_mm"] is not None
    results = node.state_dir / "results"
    sr_path, sc_png = next(results.rglob("sr.dcm")), next(results.rglob("sc.png"))
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    text = json.dumps(sr.to_json_dict())
    assert "Model attention region" in text and "OS0012" in text and "not a finding" in text
    rgb = np.asarray(Image.open(sc_png).convert("RGB")).astype(int)
    image = rgb[:, :512]
    roi_line = (image == (255, 60, 60)).all(axis=-1)  # the ROI outline is drawn in this red
    coloured = ((image[..., 0] - image[..., 2] > 60) & ~roi_line).sum()  # heat map: red/yellow over a grey slice
    assert coloured > 200, coloured


def test_eval_attention_on_the_shipped_case(tmp_path):
    """The shipped CT is the student's training anatomy (in-sample): its attention must sit on the L1 body there."""
    from dicom_node.sample import sample_data_dir

    case = tmp_path / "cases" / "example_ct"
    case.mkdir(parents=True)
    shutil.copy(sample_data_dir() / "example_ct.nii.gz", case / "ct.nii.gz")
    shutil.copy(sample_data_dir() / "totalseg_v2_labels.nii.gz", case / "labels.nii.gz")
    lines: list[str] = []
    from pipeline.attention_eval import run_attention_eval

    rows = run_attention_eval(tmp_path / "cases", out=lines.append)
    m = re.fullmatch(r"attention eval: cases=1 inside_body=(\d\.\d{3}) uniform=(\d\.\d{4})", lines[-1])
    assert m, lines[-1]
    assert rows[0][0] == "example_ct" and float(m.group(1)) > 20 * float(m.group(2))
