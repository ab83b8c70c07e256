"""The fused model: engines parity with PyTorch, exact SHAP, training on a slice, tabular eval."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engines
from engines.bundle import load_bundle
from pipeline.demographics import Demographics
from pipeline.explain import exact_shapley
from pipeline.features import FEATURES
from pipeline.fused import FusedModel, tabular_input
from pipeline.training.models import Student
from pipeline.training.kernels import numpy_dispatch_targets
from pipeline.training.nhanes import shipped_nhanes_dir
from hl7.panel import LabPanel

BUNDLE = load_bundle("fused_kdamm_v1")


def test_onnx_runtime_matches_pytorch():
    net = Student(len(FEATURES))
    net.load_state_dict(torch.load(BUNDLE.path / "student.pt"))
    net.eval()
    rng = np.random.default_rng(0)
    n = 64
    img = rng.normal(0, 1, (n, 3, 32, 32)).astype(np.float32)
    present = (rng.random((n, 1)) < 0.5).astype(np.float32)
    mask = (rng.random((n, len(FEATURES))) < 0.7).astype(np.float32)
    vals = (rng.normal(0, 1, (n, len(FEATURES))) * mask).astype(np.float32)
    with torch.no_grad():
        ref = net(*map(torch.from_numpy, (img, present, vals, mask))).numpy()
    enc = engines.load(BUNDLE.path, graph="image_encoder")
    head = engines.load(BUNDLE.path, graph="head")
    assert enc.backend == "onnxruntime-cpu" or enc.backend == "onnxruntime-cuda"
    emb = enc(image=img)["embedding"]
    got = head(embedding=emb, image_present=present, tab_values=vals, tab_mask=mask)["logit"]
    assert np.max(np.abs(got - ref)) < 1e-4


def test_forced_unavailable_backend_is_an_error():
    if "onnxruntime-cuda" in engines.available_backends():
        pytest.skip("CUDA execution provider present")
    with pytest.raises(engines.EngineError, match="not available"):
        engines.load(BUNDLE.path, "onnxruntime-cuda", graph="head")


def test_exact_shapley_is_additive_and_exact_on_a_linear_model():
    w = np.arange(1, 6, dtype=float)

    def f(values, mask):
        return (values * mask) @ w

    x = np.array([1.0, -2.0, 0.5, 3.0, 0.0])
    m = np.array([1, 1, 1, 1, 0], bool)
    bg_v = np.zeros((4, 5))
    bg_m = np.zeros((4, 5), bool)
    e = exact_shapley(f, x, m, bg_v, bg_m, tuple("abcde"))
    assert e.features == ("a", "b", "c", "d")
    assert np.allclose(e.contributions, (x * w)[:4])  # linear model: phi_i = w_i (x_i - E[bg_i])
    assert abs(e.base_value + sum(e.contributions) - e.output) < 1e-9


def test_fused_prediction_explains_tabular_inputs_additively():
    model = FusedModel(BUNDLE)
    tab = tabular_input(LabPanel("P", None, None, 90), Demographics(72, "F", 1.58, 51.0))
    out = model.predict(None, tab)
    assert out.modalities == ("demographics",) and out.subset == "demographics_only"
    e = out.explanation
    assert set(e.features) == {"age", "female", "height", "weight", "bmi"}
    assert abs(e.base_value + sum(e.contributions) - out.probability) < 1e-5
    older = model.predict(None, tabular_input(LabPanel("P", None, None, 90), Demographics(85, "F", 1.58, 45.0)))
    assert older.probability > out.probability  # older and lighter: higher risk
    with pytest.raises(ValueError, match="no modality"):
        model.predict(None, tabular_input(LabPanel("P", None, None, 90), Demographics(None, None, None, None)))


def test_a_changed_shap_background_or_head_is_refused_with_what_to_do(tmp_path):
    """The SHAP background and the networks are checked against the card's SHA-256 (before: np.load and the
    runtimes took whatever was in the folder)."""
    for name in ("shap_background.npz", "head.onnx"):
        bundle = tmp_path / name / "fused_kdamm_v1"
        shutil.copytree(BUNDLE.path, bundle)
        data = bytearray((bundle / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bundle / name).write_bytes(bytes(data))
        with pytest.raises((engines.BundleError, engines.EngineError),
                           match=rf"{re.escape(name)}: SHA-256 \w{{12}}\.\.\. does not match the model card's "
                                 r"\w{12}\.\.\.: .*reinstall the bundle .* or rerun the training that wrote it"):
            FusedModel(load_bundle(bundle), "onnxruntime-cpu")


def test_model_card_is_honest_about_data():
    card = BUNDLE.card.raw
    assert "SEMI-SYNTHETIC" in card["intended_use"] and "RESEARCH USE ONLY" in card["intended_use"]
    assert "NHANES" in card["data"]["real"] and "semi_synthetic" in card["data"]
    assert "Hendrickson" in card["generator"]["citation"]
    assert card["cohort"]["split"]["test"]["positives"] > 0


def test_student_complete_row_draws_need_the_teachers_complete_row_output():
    from pipeline.training.train import TrainConfig, train_student

    rows = np.arange(3)
    with pytest.raises(ValueError, match="complete rows"):
        train_student(None, rows, np.zeros(3), np.zeros(3), TrainConfig(complete_row_fraction=0.5), 0.5, 1, "x")


def test_training_report_renders_from_its_metrics_json():
    """docs/training/README.md is exactly what the report writer makes of docs/training/metrics.json, so the
    text, its student-training section included, cannot drift from the shipped run's figures."""
    from pipeline.training.export import report_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "training"
    summary = json.loads((docs / "metrics.json").read_text())
    assert report_markdown(summary) == (docs / "README.md").read_text()


def _quick_train(tmp_path, name):
    out = subprocess.run([sys.executable, "-c", (
        "from pathlib import Path; from pipeline.training.train import TrainConfig, run; import json;"
        "s = run(TrainConfig(limit=1200, teacher_epochs=2, student_epochs=2, bootstrap=30), "
        f"Path({str(tmp_path / name)!r}), Path({str(tmp_path / (name + '_report'))!r}), log=lambda *a: None);"
        "print(json.dumps(s['results'], default=float))")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_on_a_slice_is_reproducible(tmp_path):
    a = _quick_train(tmp_path, "a")
    b = _quick_train(tmp_path, "b")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert (tmp_path / "a" / "head.onnx").exists() and (tmp_path / "a_report" / "roc.png").exists()
    assert set(a["subsets"]) == {"all", "image_only", "image_demographics", "tabular", "labs_only",
                                 "demographics_only"}


# What another x86-64 CPU would pick by itself: ATen's unvectorised kernels, MKL and oneDNN at SSE4, numpy
# at its baseline, OpenBLAS's Nehalem kernels.
OTHER_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                     "ONEDNN_MAX_CPU_ISA": "SSE41", "OPENBLAS_CORETYPE": "Nehalem",
                     "NPY_DISABLE_CPU_FEATURES": " ".join(numpy_dispatch_targets())}


def _cli_quick_train(tmp_path, name, env):
    out = tmp_path / name
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "--quick", "--out", str(out / "bundle"),
                        "--report", str(out / "report")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "bundle" / "card.json").read_text()), torch.load(out / "bundle" / "student.pt")


def test_osteoscreen_train_gives_the_same_bundle_with_another_cpus_kernels(tmp_path):
    """`osteoscreen train --check` must hold on a CPU other than the one the bundle was trained on. The command
    pins the CPU kernels (pipeline/training/kernels.py). Without the pins this test fails (checked): the quick
    training's metrics differ, its weights by about 4e-5 with AVX2 kernels forced, and the full training's
    metrics by up to 0.003 between an AMD EPYC and an Intel Xeon."""
    card_a, weights_a = _cli_quick_train(tmp_path, "this_cpu", {})
    card_b, weights_b = _cli_quick_train(tmp_path, "other_cpu", OTHER_CPU_KERNELS)
    assert card_a["training_kernels"]["pinned"] and card_a["training_kernels"]["aten"] == "DEFAULT"
    assert card_a["metrics"] == card_b["metrics"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "weights differ"


def test_eval_tabular_on_one_cycle(tmp_path):
    for f in shipped_nhanes_dir().glob("*_H.csv.xz"):
        if not f.name.startswith("BIOPRO"):  # a missing table means that modality is missing
            shutil.copy(f, tmp_path / f.name)
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "eval", "tabular", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    m = re.match(r"tabular eval: n=(\d+) prevalence=([0-9.]+) auc_model=([0-9.]+) auc_ost=([0-9.]+) "
                 r"auc_logreg=([0-9.]+)$", last)
    assert m, last
    assert int(m.group(1)) > 1000 and 0.5 < float(m.group(3)) <= 1.0
    assert "calcium 100%" in r.stdout  # BIOPRO absent: the labs it carries are missing


def test_a_femoral_neck_t_score_of_exactly_minus_2_5_is_osteoporosis(tmp_path):
    """WHO: T <= -2.5. BMD 0.558 gives (0.558 - 0.858) / 0.120 = -2.4999999999999996 in floating point; those
    participants were labelled negative. Also: the 2017-March 2020 files (P_DEMO, P_DXXFEM, ...) are read."""
    import pandas as pd

    from pipeline.training.nhanes import load_cohort

    pd.DataFrame({"SEQN": [1, 2, 3], "RIDAGEYR": [60, 60, 60], "RIAGENDR": [2, 2, 2]}).to_csv(
        tmp_path / "P_DEMO.csv", index=False)
    pd.DataFrame({"SEQN": [1, 2, 3], "DXXNKBMD": [0.557, 0.558, 0.559]}).to_csv(tmp_path / "P_DXXFEM.csv", index=False)
    frame = load_cohort(tmp_path).frame.sort_values("seqn")
    assert frame["cycle"].tolist() == ["P", "P", "P"]
    assert frame["label"].tolist() == [1, 1, 0]


def test_operating_point_intervals_resample_subjects_at_the_fixed_threshold():
    from pipeline.training.metrics import at_threshold, bootstrap_at_threshold

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.2).astype(int)
    p = np.clip(0.3 * y + 0.7 * rng.random(400), 0, 1)
    point = at_threshold(y, p, 0.5)
    ci = bootstrap_at_threshold(y, p, 0.5, n=200, seed=1)
    for key in ("sensitivity", "specificity", "ppv"):
        lo, hi = ci[f"{key}_ci"]
        assert lo <= point[key] <= hi and hi - lo > 0.01


def test_backends_agree_onnxruntime_vs_pytorch_reference():
    """Stated tolerance: 1e-4 on logits and embeddings (fp32 on CPU)."""
    rng = np.random.default_rng(1)
    n = 32
    img = rng.normal(0, 1, (n, 3, 32, 32)).astype(np.float32)
    mask = (rng.random((n, len(FEATURES))) < 0.6).astype(np.float32)
    vals = (rng.normal(0, 1, (n, len(FEATURES))) * mask).astype(np.float32)
    present = np.ones((n, 1), np.float32)
    outs = {}
    for backend in ("onnxruntime-cpu", "pytorch"):
        enc = engines.load(BUNDLE.path, backend, graph="image_encoder")
        head = engines.load(BUNDLE.path, backend, graph="head")
        assert (enc.backend, head.backend, head.device, head.precision) == (backend, backend, "cpu", "fp32")
        emb = enc(image=img)["embedding"]
        outs[backend] = (emb, head(embedding=emb, image_present=present, tab_values=vals, tab_mask=mask)["logit"])
    assert np.max(np.abs(outs["pytorch"][0] - outs["onnxruntime-cpu"][0])) < 1e-4
    assert np.max(np.abs(outs["pytorch"][1] - outs["onnxruntime-cpu"][1])) < 1e-4


def test_every_shipped_supervised_bundle_was_trained_with_the_pinned_kernels():
    """Its --check then holds on any x86-64 CPU; a bundle retrained without the pins (calling run() directly)
    must not be shipped. The DRLIS selector is not pinned (its exploration does not reproduce anyway)."""
    from dicom_node.cli import PINNED_TRAINING
    from engines.bundle import bundled_models_dir

    assert set(PINNED_TRAINING) == {"fused", "xray", "privileged", "cropkd", "splits"}  # splits: a report only
    for name in ("fused_kdamm_v1", "cxr_fusion_v1", "mmpkd_v1", "cropkd_v1"):
        kernels = json.loads((bundled_models_dir() / name / "card.json").read_text())["training_kernels"]
        assert kernels["pinned"] and kernels["aten"] == "DEFAULT" and not kernels["onednn"], (name, kernels)
    splits = Path(__file__).resolve().parents[1] / "docs" / "training" / "repeated_splits.json"
    kernels = json.loads(splits.read_text())["kernels"]
    assert kernels["pinned"] and kernels["aten"] == "DEFAULT" and not kernels["onednn"], kernels


def test_training_called_without_the_pinned_environment_says_its_result_is_per_cpu(monkeypatch):
    from pipeline.training.kernels import MARK, apply_runtime_pins

    monkeypatch.delenv(MARK, raising=False)
    onednn = torch.backends.mkldnn.enabled
    lines: list[str] = []
    try:
        used = apply_runtime_pins(lines.append, "osteoscreen train cropkd")
    finally:
        torch.backends.mkldnn.enabled = onednn
    assert used["pinned"] is False and used["onednn"] is False
    assert lines == ["note: CPU kernels not pinned (use `osteoscreen train cropkd`): the result reproduces on this "
                     "CPU type only"]


def test_implausible_header_height_and_weight_are_left_out_with_a_note():
    """A height typed in cm into the metres field (PatientSize 165) read as 165 m made a screen-positive
    patient screen-negative; such values are now left out, and the report says which and why."""
    from pydicom.dataset import Dataset

    from pipeline.demographics import demographics_from_header
    from pipeline.report.sr import _demographics_text

    def header(size, weight):
        ds = Dataset()
        ds.PatientAge, ds.PatientSex, ds.PatientSize, ds.PatientWeight = "067Y", "F", size, weight
        return ds

    good = demographics_from_header(header("1.65", "60"))
    assert (good.height_m, good.weight_kg, good.notes) == (1.65, 60.0, ())
    bad = demographics_from_header(header("165", "60000"))
    assert bad.height_m is None and bad.weight_kg is None and bad.age_years == 67
    text = _demographics_text(bad)
    assert "PatientSize 165 not used" in text and "entered in cm?" in text and "PatientWeight 60000 not used" in text
    model = FusedModel(BUNDLE)
    as_typed = model.predict(None, tabular_input(LabPanel("P", None, None, 90), bad))
    age_and_sex = model.predict(None, tabular_input(LabPanel("P", None, None, 90), Demographics(67.0, "F", None, None)))
    assert as_typed.probability == pytest.approx(age_and_sex.probability)


def test_inputs_beyond_the_training_range_are_used_at_its_edge_with_a_note():
    """ALP 1,500 U/L (Paget's disease) is 58 SD above the training mean: the MLP's answer there is an
    extrapolation. The value is used at the training split's maximum, and the result says so."""
    import datetime as dt

    from hl7.panel import LabValue

    def panel(alp):
        when = dt.datetime(2026, 1, 2)
        return LabPanel("P", None, dt.date(2026, 1, 3), 90,
                        (LabValue("6768-6", "Alkaline phosphatase", alp, "U/L", when, "LAB"),))

    card_max = {f["name"]: f["train_max"] for f in BUNDLE.card.raw["inputs"]["features"]}
    model = FusedModel(BUNDLE)
    demo = Demographics(72, "F", 1.58, 51.0)
    extreme, edge = (model.predict(None, tabular_input(panel(v), demo)) for v in (1500.0, card_max["alp"]))
    assert extreme.probability == pytest.approx(edge.probability) and edge.input_notes == ()
    assert extreme.input_notes == (f"Alkaline phosphatase 1500 U/L is above the largest value the model was trained "
                                   f"on; used as {card_max['alp']:.4g} U/L",)
    assert abs(extreme.explanation.base_value + sum(extreme.explanation.contributions) - extreme.probability) < 1e-5
    old = model.predict(None, tabular_input(LabPanel("P", None, None, 90), Demographics(95, "F", 1.58, 51.0)))
    assert old.input_notes == ("Age 95 y is above the largest value the model was trained on; used as 85 y",)


def test_card_training_range_is_the_training_splits():
    from pipeline.features import FEATURE_NAMES
    from pipeline.training.export import training_range
    from pipeline.training.nhanes import load_cohort, split_participants
    from pipeline.training.train import TrainConfig

    cfg = TrainConfig()
    frame = load_cohort(cfg.data_dir).frame
    ranges = training_range(frame[list(FEATURE_NAMES)].to_numpy(dtype=float), split_participants(frame, cfg.seed))
    assert [(f["train_min"], f["train_max"]) for f in BUNDLE.card.raw["inputs"]["features"]] == ranges
