"""Privileged knowledge distillation (after MMPKD): an image-only student for CT patients without labs.

The teacher sees the CT patch *and* the demographics and labs, privileged information that
exists in training only; the student sees the image alone and learns from the labels and from
the teacher's softened output. The same image-only network trained on the labels alone, same
data, split and seed, is the comparison: the published finding is that the benefit does not
always transfer, so the report states the difference with its bootstrap CI whatever its sign.

Teacher signal for the training rows is cross-fitted (each row scored by a teacher that did not
train on it), as for the fused model's tabular teacher: an in-sample teacher is overconfident.
Images are the semi-synthetic L1 patches of pipeline.training.synth_ct; every figure here is on
them and says so.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn
from tqdm.auto import tqdm

from pipeline.features import FEATURES
from pipeline.image_input import PATCH_PX
from pipeline.training import metrics as M
from pipeline.training.export import kernels_line
from pipeline.training.kernels import apply_runtime_pins
from pipeline.training.models import ImageTeacher, Student
from pipeline.training.train import TrainConfig, _batches, _bce, _platt, _seed_all, _sigmoid, prepare

BUNDLE_NAME = "osteoscreen-mmpkd-image"
BUNDLE_VERSION = "1.0.0"


@dataclass
class PrivilegedConfig:
    seed: int = 20261123
    teacher_epochs: int = 25
    student_epochs: int = 25
    folds: int = 3
    alpha: float = 0.5
    temperature: float = 2.0
    batch_size: int = 256
    lr: float = 2e-3
    pos_weight: float = 4.0
    target_sensitivity: float = 0.85
    bootstrap: int = 1000
    limit: int | None = None
    threads: int = 2


def _train_teacher(d, rows: np.ndarray, cfg: PrivilegedConfig, seed: int) -> Student:
    """The privileged teacher: image + every demographic and lab value NHANES measured."""
    torch.manual_seed(seed)
    net = Student(len(FEATURES))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = _bce(cfg.pos_weight)
    rng = np.random.default_rng(seed)
    img = torch.from_numpy(d.images[rows])
    x = torch.from_numpy(d.scaled(d.m_real)[rows])
    m = torch.from_numpy(d.m_real[rows].astype(np.float32))
    y = torch.from_numpy(d.y[rows].astype(np.float32))
    present = torch.ones(len(rows), 1)
    for _ in tqdm(range(cfg.teacher_epochs), desc="privileged teacher", leave=False):
        net.train()
        for b in _batches(len(rows), cfg.batch_size, rng):
            opt.zero_grad()
            loss_fn(net(img[b], present[b], x[b], m[b]).squeeze(1), y[b]).backward()
            opt.step()
    return net.eval()


def _teacher_logits(net: Student, d, rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(d.images[rows]), torch.ones(len(rows), 1),
                   torch.from_numpy(d.scaled(d.m_real)[rows]),
                   torch.from_numpy(d.m_real[rows].astype(np.float32))).squeeze(1).numpy().astype(float)


def _train_image_student(images: np.ndarray, y: np.ndarray, teacher: np.ndarray | None, cfg: PrivilegedConfig,
                         seed: int, desc: str) -> ImageTeacher:
    """Image-only network; with ``teacher`` logits: (1 - a) BCE(label) + a T^2 BCE(soft student, soft teacher)."""
    torch.manual_seed(seed)
    net = ImageTeacher()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = _bce(cfg.pos_weight)
    rng = np.random.default_rng(seed)
    xi, yt = torch.from_numpy(images), torch.from_numpy(y.astype(np.float32))
    tt = torch.from_numpy(teacher.astype(np.float32)) if teacher is not None else None
    T, a = cfg.temperature, cfg.alpha
    for _ in tqdm(range(cfg.student_epochs), desc=desc, leave=False):
        net.train()
        for b in _batches(len(y), cfg.batch_size, rng):
            logit = net(xi[b]).squeeze(1)
            loss = loss_fn(logit, yt[b])
            if tt is not None:
                kd = nn.functional.binary_cross_entropy(torch.sigmoid(logit / T), torch.sigmoid(tt[b] / T))
                loss = (1 - a) * loss + a * T * T * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _logits(net: ImageTeacher, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(images)).squeeze(1).numpy().astype(float)


def run(cfg: PrivilegedConfig, bundle_dir: Path, report_dir: Path | None, log=print) -> dict:
    t0 = time.monotonic()
    _seed_all(cfg.seed, cfg.threads)
    kernels = apply_runtime_pins(log, "osteoscreen train privileged")
    # The fused model's data preparation with the same seed: the same cohort, split and images.
    d = prepare(TrainConfig(seed=cfg.seed, limit=cfg.limit), log)
    tr, va, te = (np.nonzero((d.split == s) & d.has_image)[0] for s in ("train", "val", "test"))
    log(f"image rows train/val/test {tr.size}/{va.size}/{te.size} "
        f"(positives {d.y[tr].sum()}/{d.y[va].sum()}/{d.y[te].sum()})")

    teacher_tr = np.full(len(d.y), np.nan)
    folds = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    for k, (a, b) in enumerate(folds.split(tr, d.y[tr])):
        net = _train_teacher(d, tr[a], cfg, cfg.seed + 11 * k)
        teacher_tr[tr[b]] = _teacher_logits(net, d, tr[b])
    teacher = _train_teacher(d, tr, cfg, cfg.seed)

    plain = _train_image_student(d.images[tr], d.y[tr], None, cfg, cfg.seed, "image-only (labels)")
    pkd = _train_image_student(d.images[tr], d.y[tr], teacher_tr[tr], cfg, cfg.seed, "image-only (PKD)")

    platt = _platt(_logits(pkd, d.images[va]), d.y[va], cfg.seed)

    def prob(logit):
        return _sigmoid(platt[0] * np.asarray(logit) + platt[1])

    threshold = M.threshold_for_sensitivity(d.y[va], prob(_logits(pkd, d.images[va])), cfg.target_sensitivity)
    y = d.y[te]
    s_pkd, s_plain = _logits(pkd, d.images[te]), _logits(plain, d.images[te])
    s_teacher = _teacher_logits(teacher, d, te)
    res = {
        "test": {"n": int(te.size), "positives": int(y.sum())},
        "auc_pkd": list(M.bootstrap_auc(y, s_pkd, n=cfg.bootstrap, seed=cfg.seed)),
        "auc_plain": list(M.bootstrap_auc(y, s_plain, n=cfg.bootstrap, seed=cfg.seed)),
        "pkd_minus_plain": list(M.bootstrap_auc_difference(y, s_pkd, s_plain, n=cfg.bootstrap, seed=cfg.seed)),
        "auc_teacher_privileged": list(M.bootstrap_auc(y, s_teacher, n=cfg.bootstrap, seed=cfg.seed)),
        "operating_point": {"threshold": threshold, **M.at_threshold(y, prob(s_pkd), threshold)},
        "brier": M.brier(y, prob(s_pkd)),
        "validation_auc": M.auc(d.y[va], _logits(pkd, d.images[va])),
    }
    if cfg.limit is None:  # same seed, split and test rows as the shipped fused model (full cohort only)
        fused_image_only = _fused_card()["metrics"]["subsets"]["image_only"]
        res["fused_image_only_auc"] = fused_image_only["auc"]
        res["fused_image_only_validation_auc"] = fused_image_only.get("validation_auc")
    summary = {"config": asdict(cfg), "results": res, "calibration": {"method": "Platt", "a": platt[0], "b": platt[1]},
               "seconds": round(time.monotonic() - t0, 1), "kernels": kernels}
    _write_bundle(Path(bundle_dir), pkd, summary)
    if report_dir is not None:
        _write_report(Path(report_dir), summary, {"PKD student": (y, s_pkd), "labels only": (y, s_plain),
                                                  "privileged teacher (image+labs+demographics)": (y, s_teacher)})
    return summary


def _fused_card() -> dict:
    from engines.bundle import bundled_models_dir

    return json.loads((bundled_models_dir() / "fused_kdamm_v1" / "card.json").read_text())


def _write_bundle(out: Path, net: ImageTeacher, summary: dict) -> None:
    from pipeline.training.export import write_graph

    out.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, 3, PATCH_PX, PATCH_PX),)
    files = write_graph(net, example, ["image"], ["logit"], out, "image_student")
    r = summary["results"]
    fused = r.get("fused_image_only_validation_auc")  # chosen on validation, never on the test split
    card = {
        "name": BUNDLE_NAME,
        "version": BUNDLE_VERSION,
        "kind": "image_only_screening",
        "description": "Image-only student distilled from a privileged teacher that also saw demographics and labs "
                       "(MMPKD); for CT studies without labs.",
        "intended_use": "RESEARCH AND PIPELINE VALIDATION ONLY: trained and tested on semi-synthetic L1 CT patches; "
                        "not for clinical use until validated at a site.",
        "inputs": {"image": "(3, 32, 32) 2.5D L1 patch, as fused_kdamm_v1's image encoder takes it"},
        "calibration": summary["calibration"],
        "thresholds": {"operating_point": r["operating_point"]["threshold"]},
        "categories": _fused_card()["categories"],  # the same coded categories as the fused model's
        "metrics": r,
        "use_instead_of_fused_image_only": bool(fused is not None and r["validation_auc"] > fused),
        "training": summary["config"],
        "training_kernels": summary["kernels"],
        "files": files,
        "inference": {"fp16": False, "note": "fp32 only: a screening probability against an operating point"},
        "references": ["Privileged knowledge distillation for multimodal medical image screening (MMPKD): a teacher "
                       "with privileged modalities guides an image-only student."],
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def _write_report(out: Path, summary: dict, curves: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    M.roc_png(out / "privileged_roc.png", curves, "Image-only screening, held-out (semi-synthetic CT)")
    (out / "privileged_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    r, c = summary["results"], summary["config"]

    ci = M.ci_text

    op = r["operating_point"]
    lines = [
        "# Privileged knowledge distillation (image-only student) - training report",
        "",
        f"Generated by `osteoscreen train privileged` (seed {c['seed']}) in {summary['seconds']:.0f} s on this "
        "machine's CPU. Images are **semi-synthetic** (real CT anatomy, attenuation from each subject's real L1 "
        "DXA); labels are real NHANES femoral-neck DXA. Same cohort, split and images as the fused model.",
        "",
        f"Held-out test rows with an image: n={r['test']['n']}, positives {r['test']['positives']}.",
        "",
        "| model (test AUC, bootstrap 95% CI) | AUC |",
        "|---|---|",
        f"| image-only student with privileged teacher (PKD, alpha {c['alpha']}, T {c['temperature']}) | "
        f"{ci(r['auc_pkd'])} |",
        f"| same image-only network, labels only | {ci(r['auc_plain'])} |",
        f"| privileged teacher (image + demographics + labs; not usable without labs) | "
        f"{ci(r['auc_teacher_privileged'])} |",
    ]
    if "fused_image_only_auc" in r:
        lines.append(f"| fused student's image-only path (fused_kdamm_v1 card, same test rows) | "
                     f"{r['fused_image_only_auc']:.3f} |")
    d = r["pkd_minus_plain"]
    lines += [
        "",
        f"PKD minus labels-only: {d[0]:+.3f} (paired bootstrap 95% CI {d[1]:+.3f} to {d[2]:+.3f}). "
        + ("The CI includes zero: no demonstrated benefit from the privileged teacher on these data."
           if d[1] <= 0 <= d[2] else
           ("The privileged teacher helped on these data." if d[1] > 0 else
            "The privileged teacher hurt on these data.")),
        "",
        f"Operating point (validation, sensitivity >= {c['target_sensitivity']}): threshold {op['threshold']:.4f}; "
        f"test sensitivity {op['sensitivity']:.2f}, specificity {op['specificity']:.2f}; Brier {r['brier']:.4f}.",
        "",
        kernels_line(summary["kernels"]),
        "",
        "![ROC](privileged_roc.png)",
        "",
    ]
    (out / "privileged.md").write_text("\n".join(lines))
