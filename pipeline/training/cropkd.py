"""Crop teacher -> full-slice student, with attention alignment: screening without a crop or a segmentation.

The teacher sees a tight 48 mm crop of the L1 vertebral body (the segmentation places it; it
exists in training only). The student sees the whole selected slice (pipeline.full_slice) and
learns from three things: the label; the teacher's softened logit (KD); and the teacher's
Grad-CAM attention, mapped from crop to full-slice coordinates (both share pose and zoom, so
the map is a scale and a shift), which the student's own Grad-CAM should match. The attention
term is the total-variation distance between the two normalised maps (0 = the same map,
1 = no overlap).

The comparison the issue asks for is the same student trained without the attention term
(labels + KD only), same data, split and seed: how much of its attention mass falls inside the
vertebral body, and what it costs or gains in AUC. Images are the semi-synthetic slices of
pipeline.training.synth_slice; every figure here is on them and says so.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.full_slice import FULL_PX
from pipeline.training import metrics as M
from pipeline.training.export import kernels_line
from pipeline.training.kernels import apply_runtime_pins
from pipeline.training.models import GradCamNet, crop_teacher, full_slice_student
from pipeline.training.synth_slice import SyntheticSlices, crop_map_to_grid
from pipeline.training.train import TrainConfig, _batches, _bce, _platt, _seed_all, _sigmoid, prepare

BUNDLE_NAME = "osteoscreen-cropkd-fullslice"
BUNDLE_VERSION = "1.0.0"
ATTENTION_CELLS = 24  # the student's Grad-CAM grid (16 mm cells)
LIMITATIONS = ("All training slices are posed, re-attenuated copies of one real non-contrast CT: the student has "
               "seen one anatomy. On an unseen, contrast-enhanced real CT its attention inside the L1 body fell from "
               "about 0.6 to about 0.1 (docs/validation.md, osteoscreen eval attention): check the overlay before "
               "trusting it, and validate on local cases before any use.")


@dataclass
class CropKDConfig:
    seed: int = 20261123
    teacher_epochs: int = 20
    student_epochs: int = 15
    alpha: float = 0.5  # weight of the logit KD term
    temperature: float = 2.0
    beta: float = 1.0  # weight of the attention alignment term
    batch_size: int = 128
    lr: float = 2e-3
    pos_weight: float = 4.0
    target_sensitivity: float = 0.85
    bootstrap: int = 1000
    limit: int | None = None
    threads: int = 2


def _train(net: GradCamNet, x: np.ndarray, y: np.ndarray, cfg: CropKDConfig, *, epochs: int, seed: int, desc: str,
           teacher_logit: np.ndarray | None = None, teacher_att: np.ndarray | None = None,
           beta: float = 0.0) -> GradCamNet:
    """(1 - a) BCE(label) [+ a T^2 BCE(soft student, soft teacher)] [+ beta TV(student attention, teacher's)]."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = _bce(cfg.pos_weight)
    rng = np.random.default_rng(seed)
    yt = torch.from_numpy(y.astype(np.float32))
    tl = torch.from_numpy(teacher_logit.astype(np.float32)) if teacher_logit is not None else None
    ta = torch.from_numpy(teacher_att.astype(np.float32)) if teacher_att is not None and beta > 0 else None
    T, a = cfg.temperature, cfg.alpha
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        net.train()
        for b in _batches(len(y), cfg.batch_size, rng):
            logit, att = net(torch.from_numpy(x[b].astype(np.float32)))
            logit = logit.squeeze(1)
            loss = loss_fn(logit, yt[b])
            if tl is not None:
                kd = nn.functional.binary_cross_entropy(torch.sigmoid(logit / T), torch.sigmoid(tl[b] / T))
                loss = (1 - a) * loss + a * T * T * kd
            if ta is not None:
                loss = loss + beta * 0.5 * (att - ta[b]).abs().sum(dim=(1, 2)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _apply(net: GradCamNet, x: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    logits, atts = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logit, att = net(torch.from_numpy(x[i : i + batch].astype(np.float32)))
            logits.append(logit.squeeze(1).numpy().astype(float))
            atts.append(att.numpy())
    return np.concatenate(logits), np.concatenate(atts)


def inside_body(att: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Fraction of each map's mass inside the body mask; a cell's mass is spread evenly over its pixels."""
    n, h, w = att.shape
    f = FULL_PX // h
    cover = body.reshape(n, h, f, w, f).mean(axis=(2, 4))
    return (att * cover).sum(axis=(1, 2)) / att.sum(axis=(1, 2))


def _bootstrap_mean(v: np.ndarray, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    means = np.array([v[rng.integers(0, len(v), len(v))].mean() for _ in range(n)])
    return [float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def run(cfg: CropKDConfig, bundle_dir: Path, report_dir: Path | None, log=print) -> dict:
    t0 = time.monotonic()
    _seed_all(cfg.seed, cfg.threads)
    kernels = apply_runtime_pins(log, "osteoscreen train cropkd")
    # The fused model's data preparation with the same seed: the same cohort, split and target HU per subject.
    d = prepare(TrainConfig(seed=cfg.seed, limit=cfg.limit), log)
    rows = np.nonzero(d.has_image)[0]
    log(f"generating {rows.size} semi-synthetic full slices and body crops")
    gen = SyntheticSlices()
    data = gen.samples(d.target_hu[rows], cfg.seed + 5, progress=lambda it: tqdm(it, desc="slices", leave=False))
    y, split = d.y[rows], d.split[rows]
    tr, va, te = (np.nonzero(split == s)[0] for s in ("train", "val", "test"))
    log(f"image rows train/val/test {tr.size}/{va.size}/{te.size} (positives {y[tr].sum()}/{y[va].sum()}/"
        f"{y[te].sum()})")

    teacher = _train(crop_teacher(), data["crop"][tr], y[tr], cfg, epochs=cfg.teacher_epochs, seed=cfg.seed,
                     desc="crop teacher")
    t_logit, t_att_crop = _apply(teacher, data["crop"])
    t_att = np.stack([crop_map_to_grid(t_att_crop[i], data["crop_centre_ij"][i], ATTENTION_CELLS)
                      for i in range(len(rows))])
    t_att /= t_att.sum(axis=(1, 2), keepdims=True) + 1e-12

    student = _train(full_slice_student(), data["full"][tr], y[tr], cfg, epochs=cfg.student_epochs, seed=cfg.seed,
                     desc="student (KD + attention)", teacher_logit=t_logit[tr], teacher_att=t_att[tr], beta=cfg.beta)
    plain = _train(full_slice_student(), data["full"][tr], y[tr], cfg, epochs=cfg.student_epochs, seed=cfg.seed,
                   desc="student (KD only)", teacher_logit=t_logit[tr])

    s_val, _ = _apply(student, data["full"][va])
    platt = _platt(s_val, y[va], cfg.seed)

    def prob(logit):
        return _sigmoid(platt[0] * np.asarray(logit) + platt[1])

    threshold = M.threshold_for_sensitivity(y[va], prob(s_val), cfg.target_sensitivity)
    s_att, a_att = _apply(student, data["full"][te])
    s_plain, a_plain = _apply(plain, data["full"][te])
    yt, body = y[te], data["body"][te]
    inside = {"student_attention_loss": inside_body(a_att, body), "student_kd_only": inside_body(a_plain, body),
              "teacher_mapped": inside_body(t_att[te], body)}
    b, seed = cfg.bootstrap, cfg.seed
    res = {
        "test": {"n": int(te.size), "positives": int(yt.sum())},
        "auc_teacher_crop": list(M.bootstrap_auc(yt, t_logit[te], n=b, seed=seed)),
        "auc_student": list(M.bootstrap_auc(yt, s_att, n=b, seed=seed)),
        "auc_student_kd_only": list(M.bootstrap_auc(yt, s_plain, n=b, seed=seed)),
        "student_minus_kd_only": list(M.bootstrap_auc_difference(yt, s_att, s_plain, n=b, seed=seed)),
        "attention_inside_body": {k: _bootstrap_mean(v, b, seed) for k, v in inside.items()},
        "attention_inside_body_difference": _bootstrap_mean(
            inside["student_attention_loss"] - inside["student_kd_only"], b, seed),
        "body_area_fraction": float(body.mean()),  # what a uniform map would put inside the body
        "operating_point": {"threshold": threshold, **M.at_threshold(yt, prob(s_att), threshold)},
        "brier": M.brier(yt, prob(s_att)),
        "validation_auc": M.auc(y[va], s_val),
    }
    if cfg.limit is None:  # same seed, split and test rows as the shipped fused model (full cohort only)
        from pipeline.training.privileged import _fused_card

        fused_image_only = _fused_card()["metrics"]["subsets"]["image_only"]
        res["fused_image_only_auc"] = fused_image_only["auc"]
        res["fused_image_only_validation_auc"] = fused_image_only.get("validation_auc")
    summary = {"config": asdict(cfg), "generator": gen.describe(), "results": res,
               "calibration": {"method": "Platt", "a": platt[0], "b": platt[1]},
               "seconds": round(time.monotonic() - t0, 1), "kernels": kernels}
    _write_bundle(Path(bundle_dir), student, summary)
    if report_dir is not None:
        examples = te[np.argsort(-yt, kind="stable")[:2].tolist() + np.nonzero(yt == 0)[0][:2].tolist()]
        _write_report(Path(report_dir), summary,
                      {"student (KD + attention)": (yt, s_att), "student (KD only)": (yt, s_plain),
                       "crop teacher (needs the segmentation)": (yt, t_logit[te])},
                      {"full": data["full"][examples], "body": data["body"][examples], "teacher": t_att[examples],
                       "student": _apply(student, data["full"][examples])[1],
                       "kd_only": _apply(plain, data["full"][examples])[1]})
    return summary


def _write_bundle(out: Path, net: GradCamNet, summary: dict) -> None:
    from pipeline.training.export import write_graph
    from pipeline.training.privileged import _fused_card

    out.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, 3, FULL_PX, FULL_PX),)
    files = write_graph(net, example, ["image"], ["logit", "attention"], out, "image_student")
    r = summary["results"]
    fused = r.get("fused_image_only_validation_auc")  # chosen on validation, never on the test split
    card = {
        "name": BUNDLE_NAME,
        "version": BUNDLE_VERSION,
        "kind": "image_only_screening",
        "description": "Full-slice image-only student distilled from a teacher that saw tight crops of the L1 body, "
                       "with its Grad-CAM attention aligned to the teacher's; needs no crop or segmentation.",
        "intended_use": "RESEARCH AND PIPELINE VALIDATION ONLY: trained and tested on semi-synthetic CT slices; "
                        "not for clinical use until validated at a site.",
        "input": "full_slice",
        "inputs": {"image": "(3, 96, 96) the selected slice and its +-3 mm neighbours, 4 mm pixels, centred on the "
                            "field of view (pipeline.full_slice)"},
        "attention": {"output": "attention", "name": "Grad-CAM", "grid": [ATTENTION_CELLS, ATTENTION_CELLS],
                      "method": "Grad-CAM of the logit (exact for this global-average-pool + linear head), "
                                "magnitude, normalised to sum 1",
                      "inside_body_test": r["attention_inside_body"]["student_attention_loss"][0]},
        "calibration": summary["calibration"],
        "thresholds": {"operating_point": r["operating_point"]["threshold"]},
        "categories": _fused_card()["categories"],
        "metrics": r,
        "use_instead_of_fused_image_only": bool(fused is not None and r["validation_auc"] > fused),
        "training": summary["config"],
        "training_kernels": summary["kernels"],
        "generator": summary["generator"],
        "files": files,
        "inference": {"fp16": False, "note": "fp32 only: a screening probability against an operating point"},
        "limitations": LIMITATIONS,
        "references": ["Crop-teacher to full-image-student knowledge distillation with attention alignment "
                       "(logit KD plus Grad-CAM attention transfer)."],
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def _write_report(out: Path, summary: dict, curves: dict, ex: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    M.roc_png(out / "cropkd_roc.png", curves, "Full-slice screening, held-out (semi-synthetic CT)")

    n = len(ex["full"])
    fig, axes = plt.subplots(3, n, figsize=(3 * n, 9))
    up = np.ones((FULL_PX // ATTENTION_CELLS, FULL_PX // ATTENTION_CELLS))
    for j in range(n):
        for i, (key, title) in enumerate((("teacher", "teacher (crop, mapped)"), ("student", "student, attention loss"),
                                          ("kd_only", "student, KD only"))):
            a = axes[i, j]
            a.imshow(ex["full"][j, 1].astype(np.float32), cmap="gray", vmin=-1.5, vmax=2.5)
            m = np.kron(ex[key][j], up)
            a.imshow(np.ma.masked_less(m, 0.05 * m.max()), cmap="inferno", alpha=0.6)
            a.contour(ex["body"][j], levels=[0.5], colors="cyan", linewidths=0.8)
            a.set_axis_off()
            a.set_title(title, fontsize=8)
    fig.suptitle("Grad-CAM attention on held-out semi-synthetic slices (cyan: vertebral body)", fontsize=10)
    fig.savefig(out / "cropkd_attention.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    (out / "cropkd_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")

    r, c = summary["results"], summary["config"]

    ci = M.ci_text

    ins, op, dd = r["attention_inside_body"], r["operating_point"], r["student_minus_kd_only"]
    lines = [
        "# Crop teacher -> full-slice student (attention alignment) - training report",
        "",
        f"Generated by `osteoscreen train cropkd` (seed {c['seed']}) in {summary['seconds']:.0f} s on this machine's "
        "CPU. Images are **semi-synthetic** full axial slices through L1 (real CT anatomy, attenuation from each "
        "subject's real L1 DXA, pose varied: shift +-30 mm, rotation +-10 deg, zoom 0.85-1.15); labels are real "
        "NHANES femoral-neck DXA. Same cohort, split and target attenuation per subject as the fused model.",
        "",
        "Teacher: a CNN on a tight 48 mm crop of the L1 body (placed by the segmentation, so it exists in training "
        "only). Student: a CNN on the whole slice (96 x 96 px of 4 mm), trained on "
        f"(1 - {c['alpha']}) BCE(label) + {c['alpha']} T^2 KD(teacher logit, T {c['temperature']}) + {c['beta']} "
        "TV(student Grad-CAM, teacher Grad-CAM mapped to the slice). The comparison is the same student without "
        "the attention term.",
        "",
        f"Held-out test rows with an image: n={r['test']['n']}, positives {r['test']['positives']}.",
        "",
        "| model (test AUC, bootstrap 95% CI) | AUC |",
        "|---|---|",
        f"| full-slice student, KD + attention alignment (shipped) | {ci(r['auc_student'])} |",
        f"| full-slice student, KD only | {ci(r['auc_student_kd_only'])} |",
        f"| crop teacher (needs the L1 segmentation at inference) | {ci(r['auc_teacher_crop'])} |",
    ]
    if "fused_image_only_auc" in r:
        lines.append(f"| fused student's image-only path (fused_kdamm_v1 card, same test rows) | "
                     f"{r['fused_image_only_auc']:.3f} |")
    lines += [
        "",
        f"Attention minus KD only: AUC {dd[0]:+.3f} (paired bootstrap 95% CI {dd[1]:+.3f} to {dd[2]:+.3f}).",
        "",
        "## Where the attention goes",
        "",
        "Fraction of the Grad-CAM mass inside the vertebral body mask (the L1 label in the anterior half of its "
        "antero-posterior extent), test rows, mean (bootstrap 95% CI):",
        "",
        "| attention map | mass inside the body |",
        "|---|---|",
        f"| student with the attention loss | {ci(ins['student_attention_loss'])} |",
        f"| student without it (KD only) | {ci(ins['student_kd_only'])} |",
        f"| crop teacher, mapped to the slice | {ci(ins['teacher_mapped'])} |",
        f"| a uniform map (body area / slice area) | {r['body_area_fraction']:.3f} |",
        "",
        f"Difference (with minus without): {ci(r['attention_inside_body_difference'])}. All slices come from one "
        "real anatomy, posed and re-attenuated: the intervals reflect the test rows, not anatomical variety, and a "
        "real spine the model never saw may draw its attention less well.",
        "",
        "![attention](cropkd_attention.png)",
        "",
        f"Operating point (validation, sensitivity >= {c['target_sensitivity']}): threshold {op['threshold']:.4f}; "
        f"test sensitivity {op['sensitivity']:.2f}, specificity {op['specificity']:.2f}; Brier {r['brier']:.4f}.",
        "",
        kernels_line(summary["kernels"]),
        "",
        "![ROC](cropkd_roc.png)",
        "",
        "In service the student's attention map is the overlay on the Secondary Capture and the outlined region "
        "in the SR, only when this student made the result (`[screening] image_only_model = \"cropkd_v1\"` and its "
        "card's `use_instead_of_fused_image_only`); the card sets that flag only where its validation AUC beats "
        "the fused student's image-only path on the same validation rows (the test split chooses nothing).",
        "",
    ]
    (out / "cropkd.md").write_text("\n".join(lines))
