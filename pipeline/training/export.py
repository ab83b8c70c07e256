"""Write the model bundle (ONNX + card) and the training report (markdown + PNG plots)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.features import FEATURES
from pipeline.image_input import PATCH_MM, PATCH_PX, SLICE_OFFSETS_MM
from pipeline.training import metrics as M
from pipeline.training.models import EMBED, Student

BUNDLE_NAME = "osteoscreen-fused-kdamm"
BUNDLE_VERSION = "1.0.0"
SHAP_BACKGROUND_ROWS = 8


def _export(module: torch.nn.Module, args: tuple, names_in: list[str], names_out: list[str], path: Path) -> None:
    dyn = {n: {0: "batch"} for n in names_in + names_out}
    torch.onnx.export(module, args, str(path), input_names=names_in, output_names=names_out, dynamic_axes=dyn,
                      opset_version=17, dynamo=False)


def trace_script(module: torch.nn.Module, example: tuple, path: Path) -> None:
    """Save a TorchScript copy (the PyTorch reference backend of engines; no model code needed to load it).

    Tracing bakes the global ``cudnn.allow_tf32`` flag into every convolution of the graph (default: on), so a
    copy traced as is runs its convolutions in TF32 on a GPU whatever the runtime asks: trace with it off.
    """
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.jit.trace(module, example).save(str(path))
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def write_graph(module: torch.nn.Module, example: tuple, names_in: list[str], names_out: list[str], out: Path,
                stem: str) -> dict[str, str]:
    """One network of a bundle: ``stem``.onnx (the engines' input), .ts (the PyTorch reference) and .pt (weights).

    Returns the SHA-256 of the .onnx and .ts files, for the card."""
    _export(module, example, names_in, names_out, out / f"{stem}.onnx")
    trace_script(module, example, out / f"{stem}.ts")
    torch.save(module.state_dict(), out / f"{stem}.pt")
    return {n: _sha(out / n) for n in (f"{stem}.onnx", f"{stem}.ts")}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_range(x_raw: np.ndarray, split: np.ndarray) -> list[tuple[float, float]]:
    """Per feature, the smallest and largest value in the training split (the range the network was fitted on;
    the service clips its inputs to it, pipeline.fused)."""
    train = x_raw[split == "train"]
    return [(float(np.nanmin(col)), float(np.nanmax(col))) for col in train.T]


def write_bundle(bundle_dir: Path, student: Student, d, summary: dict, logreg: dict) -> None:
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    n_f = len(FEATURES)
    student.eval()
    _export(student.image_encoder, (torch.zeros(2, 3, PATCH_PX, PATCH_PX),), ["image"], ["embedding"],
            bundle_dir / "image_encoder.onnx")
    _export(student.head, (torch.zeros(2, EMBED), torch.ones(2, 1), torch.zeros(2, n_f), torch.ones(2, n_f)),
            ["embedding", "image_present", "tab_values", "tab_mask"], ["logit"], bundle_dir / "head.onnx")
    torch.save(student.state_dict(), bundle_dir / "student.pt")
    trace_script(student.image_encoder, (torch.zeros(2, 3, PATCH_PX, PATCH_PX),), bundle_dir / "image_encoder.ts")
    trace_script(student.head, (torch.zeros(2, EMBED), torch.ones(2, 1), torch.zeros(2, n_f), torch.ones(2, n_f)),
                 bundle_dir / "head.ts")
    rng = np.random.default_rng(summary["config"]["seed"] + 7)
    tr = np.nonzero(d.split == "train")[0]
    bg = rng.choice(tr, SHAP_BACKGROUND_ROWS, replace=False)
    np.savez(bundle_dir / "shap_background.npz", tab_values=d.scaled(d.m_hosp)[bg], tab_mask=d.m_hosp[bg])
    r = summary["results"]
    card = {
        "name": BUNDLE_NAME,
        "version": BUNDLE_VERSION,
        "kind": "fused-kd-student",
        "description": "Multimodal osteoporosis screening student (KDAMM-style): image, demographics and lab "
                       "encoders with attention fusion over the modalities present, trained with knowledge "
                       "distillation from a tabular teacher and an image teacher.",
        "intended_use": "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE. Pipeline validation and research. The "
                        "tabular path is trained and tested on real NHANES data; the image path only on "
                        "SEMI-SYNTHETIC CT patches and has never been validated on real patients' CT.",
        "data": {
            "real": "NHANES cycles " + ",".join(summary["cohort"]["cycles"]) + " (CDC, public domain): "
                    "demographics, body measures, standard biochemistry, CBC, 25-OH vitamin D; label WHO "
                    "osteoporosis at the femoral neck (T <= -2.5, NHANES III young-adult reference 0.858 +- "
                    "0.120 g/cm2, Looker 1998: non-Hispanic white women 20-29, applied to men and women alike). "
                    "Real missingness kept. The metrics assume the measured height and weight NHANES has for "
                    "nearly every row; see metrics.without_body_size for studies without them.",
            "semi_synthetic": "CT image patches generated from one real CT anatomy with attenuation set from "
                              "each subject's real L1 DXA BMD (never the femoral-neck label). See generator.",
            "hospital_availability": "simulated: images for a random share of subjects with L1 DXA, 'no recent "
                                     "labs' and 'no height/weight in the DICOM header' at random (config).",
        },
        "generator": summary["generator"],
        "cohort": summary["cohort"],
        "inputs": {
            "features": [{"name": f.name, "label": f.label, "unit": f.unit, "group": f.group,
                          "loinc": list(f.loinc), "nhanes": list(f.nhanes), "mean": float(m), "std": float(s),
                          "train_min": lo, "train_max": hi}
                         for f, m, s, (lo, hi) in zip(FEATURES, d.mean, d.std, training_range(d.x_raw, d.split))],
            "image": {"slices_mm": list(SLICE_OFFSETS_MM), "pixels": PATCH_PX, "pixel_mm": PATCH_MM,
                      "scaling": "(HU - 100) / 200, clipped to [-3, 5]", "centre": "L1 vertebral body"},
        },
        "files": {n: _sha(bundle_dir / n) for n in ("image_encoder.onnx", "head.onnx", "image_encoder.ts", "head.ts",
                                                    "shap_background.npz")},
        "calibration": summary["calibration"],
        "inference": {"fp16": False, "note": "fp32 only: the screening probability is compared with an operating "
                                             "point, and at batch 1 the network is too small for fp16 to save time"},
        "thresholds": {f"operating_point_{k}": v for k, v in summary["thresholds"].items()},
        "operating_point": f"per modality subset: calibrated probability giving sensitivity >= "
                           f"{summary['config']['target_sensitivity']} on the validation split",
        "categories": [
            {"id": "screen_positive", "label": "Elevated osteoporosis risk - consider DXA",
             "code": screening_code("screen_positive")},
            {"id": "screen_negative", "label": "Below screening threshold",
             "code": screening_code("screen_negative")},
        ],
        "baseline_logreg": logreg,
        "metrics": r,
        "training_seconds": summary["seconds"],
        "training_kernels": summary["kernels"],
        "limitations": [
            "Image path trained and evaluated on semi-synthetic patches from a single real anatomy.",
            "Label is femoral-neck DXA osteoporosis in a US survey population; prevalence differs in CT patients.",
            "Operating points are chosen on a validation split of a few dozen positives per subset.",
            "Not validated on any hospital's data.",
            "A value outside the training split's range (inputs.features train_min/train_max) is used at the "
            "range's edge, and the report says so: the network was never fitted beyond it.",
            "Image + labs without age and sex (only with [routing] screen_unknown_age and a header without sex) "
            "uses the 'all' operating point, which was chosen on rows with demographics: its sensitivity there "
            "was not checked.",
            f"SHAP values are exact Shapley values of the tabular path against a background of "
            f"{SHAP_BACKGROUND_ROWS} training rows (shap_background.npz), not the whole training population: the "
            "base value and the contributions depend on that sample.",
            "The teacher and student design was revised after earlier versions were evaluated on the test split "
            "(see the training report); the repeated participant splits are the better evidence.",
        ],
        "references": [
            "Looker AC et al. Updated data on proximal femur bone mineral levels of US adults. Osteoporos Int "
            "1998;8:468-489.",
            "Hendrickson NR, Pickhardt PJ, et al. Bone mineral density T-scores derived from CT attenuation "
            "numbers. Iowa Orthop J 2018;38:25-31.",
            "Koh LK et al. A simple tool to identify Asian women at increased risk of osteoporosis (OST). "
            "Osteoporos Int 2001;12:699-705.",
        ],
    }
    (bundle_dir / "card.json").write_text(json.dumps(card, indent=2))


def _plots(report_dir: Path, curves: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.training.metrics import calibration_bins

    M.roc_png(report_dir / "roc.png", {s: (y, p) for s, (y, p) in curves.items() if 0 < y.sum() < len(y)},
              "Student ROC on the held-out split")
    fig, ax = plt.subplots(figsize=(6, 6))
    for s in ("all", "tabular", "image_only"):
        y, p = curves[s]
        b = calibration_bins(y, p)
        ax.plot([x[0] for x in b], [x[1] for x in b], "o-", label=s)
    ax.plot([0, 0.3], [0, 0.3], "k:", lw=0.8)
    ax.set(xlabel="predicted probability", ylabel="observed rate", title="Calibration (held-out, quantile bins)")
    ax.legend(fontsize=8)
    fig.savefig(report_dir / "calibration.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ["roc.png", "calibration.png"]


_ci = M.ci_text


OTHER_REPORTS = [
    "",
    "## The other models trained here",
    "",
    "Each has its own command and report in this folder:",
    "",
    "- DRLIS slice selector: `osteoscreen train selector CASES_DIR` -> [drlis.md](drlis.md)",
    "- Image-only student with a privileged teacher (MMPKD): `osteoscreen train privileged` -> "
    "[privileged.md](privileged.md)",
    "- Crop teacher -> full-slice student with attention alignment: `osteoscreen train cropkd` -> "
    "[cropkd.md](cropkd.md)",
    "- EXPERIMENTAL chest radiograph + clinical data model: `osteoscreen train xray` -> [xray.md](xray.md)",
    "",
    "And one analysis of this model without a bundle: the tabular teacher against OST and the logistic "
    "regression, and the student against the teacher, over repeated participant splits: `osteoscreen train "
    "splits` -> [repeated_splits.md](repeated_splits.md)",
]


def kernels_line(k: dict) -> str:
    """The report's sentence on the CPU kernels a training ran with."""
    used = (f"ATen {k.get('aten')}, MKL_CBWR {k.get('mkl_cbwr') or 'unset'}, oneDNN "
            f"{'on' if k.get('onednn') else 'off'}, {k.get('threads')} threads")
    if k.get("pinned"):
        return (f"CPU kernels pinned ({used}), so the same seed rebuilds these figures whichever vector kernels "
                "(AVX2, AVX-512, FMA) another x86-64 CPU would pick (pipeline/training/kernels.py; "
                "docs/validation.md, \"Reproducing the fused bundle\").")
    return f"CPU kernels NOT pinned ({used}): these figures reproduce on this CPU type only."


def write_report(report_dir: Path, summary: dict, curves: dict) -> None:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    _plots(report_dir, curves)
    (report_dir / "README.md").write_text(report_markdown(summary))
    (report_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))


# A screening result is a risk flag, not a diagnosis: coded with osteoscreen's private codes (as in the HL7
# result message), never SNOMED CT "Osteoporosis" / "Normal", which a TID 1500 viewer or registry would show
# as a finding.
SCREENING_CODES = {
    "screen_positive": {"value": "screen_positive", "scheme": "99OSTEOSCREEN",
                        "meaning": "Osteoporosis screen positive (elevated risk)"},
    "screen_negative": {"value": "screen_negative", "scheme": "99OSTEOSCREEN",
                        "meaning": "Osteoporosis screen negative (below threshold)"},
    # The EXPERIMENTAL chest radiograph path: its own codes, so that a rule or a site's validation keyed on codes
    # never mixes it with the CT path's results. At most 16 characters: a longer one is written as Long Code Value
    # (UC), which many SR readers do not read.
    "xr_screen_positive": {"value": "xr_screen_pos", "scheme": "99OSTEOSCREEN",
                           "meaning": "EXPERIMENTAL chest radiograph osteoporosis screen positive"},
    "xr_screen_negative": {"value": "xr_screen_neg", "scheme": "99OSTEOSCREEN",
                           "meaning": "EXPERIMENTAL chest radiograph osteoporosis screen negative"},
}


def screening_code(category_id: str) -> dict:
    return dict(SCREENING_CODES[category_id])


def student_training_lines(config: dict) -> list[str]:
    """How the student was trained: the report's section, from the training configuration."""
    return [
        "## Student training",
        "",
        f"- Each training row is drawn {config['student_epochs']} times (epochs). In "
        f"{config['complete_row_fraction']:.0%} of the draws the student sees the row as NHANES measured it, with "
        "the tabular teacher's out-of-fold output on exactly those inputs as the KD target; in the others it sees "
        f"the simulated hospital availability ({config['no_labs_fraction']:.0%} without labs, "
        f"{config['no_body_size_fraction']:.0%} without height and weight) with the teacher's output on that. "
        f"Modality dropout on top (image {config['dropout_image']}, labs {config['dropout_labs']}, demographics "
        f"{config['dropout_demographics']}), keeping at least one modality.",
        f"- KD: (1 - alpha) x label loss + alpha x T^2 x soft-target loss, alpha {config['kd_alpha']}, T "
        f"{config['kd_temperature']}; the image teacher's target where the row has an image.",
        "- The share of complete-row draws was chosen on the validation split, never the test split, in a one-off "
        "seeded sweep that this command does not rerun (2026-12, `complete_row_fraction` in "
        "pipeline/training/train.py): student demographics + labs AUC 0.8774 with none (the earlier bundle), "
        "0.8773 at 30%, 0.8793 at 50%, against the teacher's 0.8779.",
        "",
    ]


def report_markdown(summary: dict) -> str:
    """The training report's text (docs/training/README.md) from a training summary (its metrics.json)."""
    from pipeline.training.train import SUBSET_TEXT

    r, c = summary["results"], summary["cohort"]
    lines = [
        "# Fused screening model - training report",
        "",
        "Generated by `osteoscreen train` (seed {}) in {:.0f} s on this machine's CPU. "
        "RESEARCH USE ONLY.".format(summary["config"]["seed"], summary["seconds"]),
        "",
        kernels_line(summary["kernels"]),
        "",
        "**Real data**: NHANES cycles {} tabular cohort. **Semi-synthetic data**: every CT image "
        "(generated from one real CT anatomy, attenuation from each subject's real L1 DXA).".format(
            ", ".join(c["cycles"])),
        "",
        "## Cohort",
        "",
        f"- Adults (>= 20 y) with a valid femoral-neck DXA: n = {c['n']}, osteoporosis prevalence "
        f"{c['prevalence']:.3%}. Excluded: {c['excluded']}.",
        "- Split by participant, seed {}: ".format(summary["config"]["seed"])
        + ", ".join(f"{k} {v['n']} ({v['positives']} positives)" for k, v in c["split"].items()) + ".",
        "- Label: WHO osteoporosis, femoral-neck T-score <= -2.5 against the NHANES III young-adult reference "
        "(non-Hispanic white women aged 20-29: 0.858 / 0.120 g/cm2, Looker 1998), applied to men and women alike "
        "(the ISCD convention).",
        "- Femoral-neck reference check (non-Hispanic white women 20-29 in this cohort): "
        "mean {mean:.3f}, SD {sd:.3f} g/cm2 (n={n}) vs NHANES III 0.858 / 0.120.".format(**c["fn_reference_check"]),
        f"- Subjects with a semi-synthetic CT patch: {c['images']}.",
        "",
        *student_training_lines(summary["config"]),
        "## Held-out results of the shipped student (test split)",
        "",
        "| modalities | n | positives | AUC (95% CI) | sens | spec | acc | Brier | ECE | AUC without KD |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def with_ci(v: dict, key: str) -> str:  # the bootstrap interval where the metrics have one (older bundles not)
        ci = v.get(f"{key}_ci")
        return f"{v[key]:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")

    for s, v in r["subsets"].items():
        lines.append(f"| {SUBSET_TEXT[s]} | {v['n']} | {v['positives']} | {v['auc']:.3f} ({v['auc_ci'][0]:.3f}-"
                     f"{v['auc_ci'][1]:.3f}) | {with_ci(v, 'sensitivity')} | {with_ci(v, 'specificity')} | "
                     f"{v['accuracy']:.2f} | {v['brier']:.4f} | {v['ece']:.4f} | "
                     f"{r['ablation_kd'][s]['auc_no_kd']:.3f} |")
    comp = r["comparisons"]
    lines += [
        "",
        "Operating points: calibrated probability with sensitivity >= {} on validation, per modality subset. "
        "Sensitivity and specificity with 95 % bootstrap intervals (test rows resampled, the threshold fixed): "
        "with a few dozen test positives per subset, the interval of the sensitivity reaches below the target. "
        "\"demographics + labs\" counts rows with at least one lab (the service screens a row without one as "
        "demographics only).".format(summary["config"]["target_sensitivity"]),
        "",
        "How the design was reached: the teacher candidates (trees, then the masked MLP ensemble, then its "
        "average with the logistic model) and the student's complete-row training were added in turn after "
        "earlier versions had been evaluated on this test split. Each final choice is made on cross-validation "
        "or validation, but the candidate set grew after test results were seen, so the single-split comparisons "
        "below are not clean held-out figures: the repeated splits are the better evidence.",
        "",
        "One split (seed above). Over repeated splits (`docs/training/repeated_splits.md`) the absolute AUCs are "
        "lower on average: this test split is a favourable one. Differences between models are paired on the same "
        "rows and are the figures to compare.",
        "",
    ]
    no_body = r.get("without_body_size") or {}
    if no_body:
        lines += [
            "Every row above has NHANES's measured height and weight. A CT header often has neither; then the "
            "service screens with age and sex (and labs), at the operating point of the subset above:",
            "",
            "| inputs (no height, weight or BMI) | n | positives | AUC (95% CI) | sens | spec |",
            "|---|---|---|---|---|---|",
            *(f"| {SUBSET_TEXT[s].replace('demographics', 'age + sex')} | {v['n']} | {v['positives']} | "
              f"{_ci([v['auc'], *v['auc_ci']])} | {v['sensitivity']:.2f} | {v['specificity']:.2f} |"
              for s, v in no_body.items()),
            "",
        ]
    lines += [
        "## Teachers and baselines (test split, same run)",
        "",
        f"- Tabular teacher: {r['teachers']['tabular']['kind']}, chosen by 5-fold cross-validated AUC on the "
        "training split (" + ", ".join(f"{c} {a:.3f}" for c, a in r['teachers']['tabular']['cv_auc'].items())
        + "; validation split: " + ", ".join(f"{c} {a:.3f}" for c, a in r['teachers']['tabular']['val_auc'].items())
        + f"): test AUC {_ci(r['teachers']['tabular']['auc'])}",
        f"- OST 0.2 x (weight - age): AUC {_ci(r['baselines']['ost']['auc'])}",
        f"- Logistic regression, same features (standardised, mean-imputed, missing indicators): AUC "
        f"{_ci(r['baselines']['logreg']['auc'])}. When the teacher is the MLP + logistic average, this is its "
        "linear member alone, so teacher minus logistic is what the MLP adds.",
        f"- Teacher minus OST: {_ci(comp['teacher_minus_ost'])}; teacher minus logistic: "
        f"{_ci(comp['teacher_minus_logreg'])} ("
        + ("at least the logistic regression on this split" if comp["teacher_minus_logreg"][0] >= 0 else
           "below the logistic regression on this split, so 'teacher AUC >= logistic' is not met here; the "
           "difference is within its CI, see the repeated splits")
        + ")",
        f"- What the labs add (trees, demographics + labs minus demographics only): {_ci(comp['labs_added_trees'])}; "
        f"(logistic, same comparison): {_ci(comp['labs_added_logreg'])}",
        f"- Student (demographics + labs path) minus tabular teacher: {_ci(comp['student_tabular_minus_teacher'])}",
        f"- Image teacher (semi-synthetic): AUC {_ci(r['teachers']['image']['auc'])}",
        f"- Pickhardt L1 HU on the semi-synthetic images: AUC {_ci(r['baselines']['pickhardt_l1_hu']['auc'])}; "
        f"at <= 110 HU sensitivity {r['baselines']['pickhardt_l1_hu']['at_110_hu']['sensitivity']:.2f}, "
        f"specificity {r['baselines']['pickhardt_l1_hu']['at_110_hu']['specificity']:.2f}",
        "",
        "Student against the tabular teacher on the same inputs (test split, no image). Every NHANES participant "
        "has demographics, so the teacher saw every training row's real tabular data and KD cannot give the "
        "student more of it; what the student gains from KD and modality dropout is a usable answer when a "
        "modality is missing. For the same reason the teacher never saw a row without demographics: its labs-only "
        "AUC is out of its training distribution, not a labs-only reference (a model fitted on labs alone scores "
        "about as well as the student, or better; figures in the README):",
        "",
        "| inputs | student AUC | teacher AUC | student minus teacher (95% CI) |",
        "|---|---|---|---|",
        *(f"| {SUBSET_TEXT[s]} | {v['auc_student']:.3f} | {v['auc_teacher']:.3f} | {_ci(v['difference'])} |"
          for s, v in comp["student_minus_teacher_by_subset"].items()),
        "",
        "![ROC](roc.png)",
        "",
        "![Calibration](calibration.png)",
        "",
        "## Semi-synthetic image generator",
        "",
        "```json",
        json.dumps(summary["generator"], indent=2),
        "```",
        "",
        "CI: bootstrap, {} resamples, percentile 95%.".format(summary["config"]["bootstrap"]),
    ] + OTHER_REPORTS
    return "\n".join(lines) + "\n"
