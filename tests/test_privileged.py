"""Privileged knowledge distillation (MMPKD): the training command on a small slice of the real cohort."""
from __future__ import annotations

import json
import re

import numpy as np

import engines
from dicom_node.cli import main


def test_train_privileged_quick_writes_a_bundle_that_runs_on_every_cpu_backend(tmp_path, capsys):
    bundle, report = tmp_path / "bundle", tmp_path / "report"
    assert main(["train", "privileged", "--quick", "--out", str(bundle), "--report", str(report)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"train privileged ok: auc_pkd=0\.\d{3} auc_labels_only=0\.\d{3} diff=[+-]0\.\d{3} "
                        r"ci=[+-]0\.\d{3}\.\.[+-]0\.\d{3} seed=\d+", last), last
    card = json.loads((bundle / "card.json").read_text())
    assert "RESEARCH" in card["intended_use"] and "semi-synthetic" in card["intended_use"]
    r = card["metrics"]
    assert r["pkd_minus_plain"][1] <= r["pkd_minus_plain"][0] <= r["pkd_minus_plain"][2]
    assert 0.5 < r["auc_teacher_privileged"][0] <= 1.0
    assert card["training_kernels"]["pinned"] is True  # the command re-ran itself with fixed CPU kernels
    text = (report / "privileged.md").read_text()
    assert "semi-synthetic" in text and "PKD minus labels-only" in text and "CPU kernels pinned" in text
    assert (report / "privileged_roc.png").stat().st_size > 10_000
    image = np.random.default_rng(3).standard_normal((9, 3, 32, 32)).astype(np.float32)
    outs = {b: engines.load(bundle, b)(image=image)["logit"] for b in ("onnxruntime-cpu", "pytorch")}
    assert outs["pytorch"].shape == (9, 1)
    assert np.allclose(outs["onnxruntime-cpu"], outs["pytorch"], atol=1e-4, rtol=1e-4)


def _image_only_bundle(tmp_path, replaces: bool):
    import shutil

    from engines.bundle import bundled_models_dir, load_bundle

    dst = tmp_path / ("mmpkd_on" if replaces else "mmpkd_off")
    shutil.copytree(bundled_models_dir() / "mmpkd_v1", dst)
    card = json.loads((dst / "card.json").read_text())
    card["use_instead_of_fused_image_only"] = replaces
    (dst / "card.json").write_text(json.dumps(card))
    return load_bundle(dst)


def test_the_image_only_student_answers_only_image_only_studies_and_only_where_its_card_says(tmp_path):
    from engines.bundle import load_bundle
    from hl7.panel import LabPanel
    from pipeline.demographics import Demographics
    from pipeline.fused import FusedModel, tabular_input
    from pipeline.image_only import ImageOnlyModel

    patch = np.random.default_rng(5).normal(0, 1, (3, 32, 32)).astype(np.float32)
    nothing = tabular_input(LabPanel("P", None, None, 90), Demographics(None, None, None, None))
    demo = tabular_input(LabPanel("P", None, None, 90), Demographics(70.0, "F", None, None))
    fused_bundle = load_bundle("fused_kdamm_v1")
    on = FusedModel(fused_bundle, "onnxruntime-cpu", image_only=ImageOnlyModel(_image_only_bundle(tmp_path, True)))
    off = FusedModel(fused_bundle, "onnxruntime-cpu", image_only=ImageOnlyModel(_image_only_bundle(tmp_path, False)))
    out = on.predict(patch, nothing)
    assert out.model == ("osteoscreen-mmpkd-image", "1.0.0") and out.subset == "image_only"
    assert out.modalities == ("image",) and out.explanation is None and 0 < out.probability < 1
    assert out.category_id == ("screen_positive" if out.probability >= out.threshold else "screen_negative")
    assert on.predict(patch, demo).model is None  # demographics present: the fused model answers
    fused_only = off.predict(patch, nothing)
    assert fused_only.model is None and fused_only.subset == "image_only"


def test_a_study_without_labs_or_demographics_is_screened_by_the_image_only_student_through_the_node(
        node_factory, sample_series, tmp_path):
    """Real DICOM through the running node: no labs received, no age/sex/size in the header (a site that
    screens unknown ages: [routing] screen_unknown_age)."""
    from tests.conftest import screen_image_only

    bundle = _image_only_bundle(tmp_path, True)
    node, summary = screen_image_only(node_factory, sample_series.files, tmp_path, bundle.path)
    assert summary["model"] == "osteoscreen-mmpkd-image 1.0.0"
    assert summary["modalities"] == ["image"] and summary["labs_used"] == [] and summary["shap"] == {}
    sr = next((node.state_dir / "results").rglob("sr.dcm"), None) or next((node.state_dir / "results").rglob("*.dcm"))
    assert b"osteoscreen-mmpkd-image" in sr.read_bytes()  # the SR names the model that made the result
