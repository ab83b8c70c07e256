"""EXPERIMENTAL chest radiograph + clinical data model: image probability fused with the tabular probability.

After the published chest X-ray + clinical data study: a CNN (here the shipped CT image encoder,
transfer learning: frozen stem, fine-tuned last block) plus gradient-based wavelet features with
attention give an image probability; the tabular model's probability (the shipped fused model's
demographics + labs path, real NHANES data) is fused with it at probability level,
p = w p_image + (1 - w) p_tabular, w chosen on the validation split.

The images are SEMI-SYNTHETIC, derived from ONE real radiograph (pipeline.training.synth_xray).
Every figure on this path is a pipeline check, not an accuracy claim; the bundle, the SR and the
SC say EXPERIMENTAL.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.training import metrics as M
from pipeline.training.export import kernels_line
from pipeline.training.kernels import apply_runtime_pins
from pipeline.training.models import XrayNet
from pipeline.training.synth_xray import SyntheticRadiographs
from pipeline.training.train import TrainConfig, _batches, _bce, _platt, _seed_all, _sigmoid, prepare
from pipeline.xray.image import CNN_PX, GRID, N_WAVELET_FEATURES

BUNDLE_NAME = "osteoscreen-cxr-fusion"
BUNDLE_VERSION = "0.1.0"
EXPERIMENTAL = ("EXPERIMENTAL - RESEARCH AND PIPELINE VALIDATION ONLY: the chest radiograph model was trained only "
                "on semi-synthetic images derived from one real radiograph; no accuracy is claimed for it.")


@dataclass
class XrayConfig:
    seed: int = 20261123
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    pos_weight: float = 4.0
    target_sensitivity: float = 0.85
    bootstrap: int = 1000
    limit: int | None = None
    threads: int = 2


def _fused_bundle():
    from engines.bundle import load_bundle

    return load_bundle("fused_kdamm_v1")


def _tabular_prob(d, rows: np.ndarray) -> np.ndarray:
    """The shipped fused model's calibrated probability without an image (what the service computes)."""
    import engines

    bundle = _fused_bundle()
    head = engines.load(bundle.path, "onnxruntime-cpu", graph="head")
    a, b = (float(bundle.card.raw["calibration"][k]) for k in ("a", "b"))
    mask = d.m_hosp[rows]
    logit = head(embedding=np.zeros((len(rows), 64), np.float32), image_present=np.zeros((len(rows), 1), np.float32),
                 tab_values=d.scaled(d.m_hosp)[rows], tab_mask=mask.astype(np.float32))["logit"][:, 0]
    return _sigmoid(a * logit + b)


def _init_from_ct_encoder(net: XrayNet) -> None:
    state = torch.load(_fused_bundle().path / "student.pt", map_location="cpu")
    enc = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    net.encoder.load_state_dict(enc)
    for p in net.encoder.net[: XrayNet.STEM].parameters():
        p.requires_grad_(False)


def _stem(net: XrayNet, images: np.ndarray, batch: int = 512) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(net.encoder.net[: XrayNet.STEM](torch.from_numpy(images[i : i + batch])).numpy())
    return np.concatenate(out).astype(np.float16)


def _apply(net: XrayNet, stem: np.ndarray, wavelet: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    logits, atts = [], []
    net.eval()
    with torch.no_grad():
        for i in range(0, len(stem), batch):
            logit, att = net.head(torch.from_numpy(stem[i : i + batch].astype(np.float32)),
                                  torch.from_numpy(wavelet[i : i + batch]))
            logits.append(logit.squeeze(1).numpy().astype(float))
            atts.append(att.numpy())
    return np.concatenate(logits), np.concatenate(atts)


def _fusion_weight(y: np.ndarray, p_img: np.ndarray, p_tab: np.ndarray) -> float:
    grid = np.round(np.linspace(0.0, 1.0, 21), 2)
    aucs = [M.auc(y, w * p_img + (1 - w) * p_tab) for w in grid]
    return float(grid[int(np.argmax(aucs))])


def run(cfg: XrayConfig, bundle_dir: Path, report_dir: Path | None, log=print) -> dict:
    t0 = time.monotonic()
    _seed_all(cfg.seed, cfg.threads)
    kernels = apply_runtime_pins(log, "osteoscreen train xray")
    d = prepare(TrainConfig(seed=cfg.seed, limit=cfg.limit), log)
    rows = np.nonzero(d.has_image)[0]
    log(f"generating {rows.size} semi-synthetic chest radiographs (EXPERIMENTAL)")
    gen = SyntheticRadiographs()
    data = gen.samples(d.target_hu[rows], cfg.seed + 6, progress=lambda it: tqdm(it, desc="radiographs",
                                                                                    leave=False))
    y, split = d.y[rows], d.split[rows]
    tr, va, te = (np.nonzero(split == s)[0] for s in ("train", "val", "test"))
    log(f"rows train/val/test {tr.size}/{va.size}/{te.size} (positives {y[tr].sum()}/{y[va].sum()}/{y[te].sum()})")

    torch.manual_seed(cfg.seed)
    net = XrayNet(N_WAVELET_FEATURES)
    _init_from_ct_encoder(net)
    wav = data["wavelet"]
    net.wavelet_mean.copy_(torch.from_numpy(wav[tr].reshape(-1, N_WAVELET_FEATURES).mean(axis=0)))
    net.wavelet_std.copy_(torch.from_numpy(wav[tr].reshape(-1, N_WAVELET_FEATURES).std(axis=0) + 1e-6))
    stem = _stem(net, data["image"])
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=1e-4)
    loss_fn = _bce(cfg.pos_weight)
    rng = np.random.default_rng(cfg.seed)
    yt = torch.from_numpy(y.astype(np.float32))
    for _ in tqdm(range(cfg.epochs), desc="chest radiograph model", leave=False):
        net.train()
        for b in _batches(tr.size, cfg.batch_size, rng):
            idx = tr[b]
            logit, _ = net.head(torch.from_numpy(stem[idx].astype(np.float32)), torch.from_numpy(wav[idx]))
            loss = loss_fn(logit.squeeze(1), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    logit, att = _apply(net, stem, wav)
    platt = _platt(logit[va], y[va], cfg.seed)
    p_img = _sigmoid(platt[0] * logit + platt[1])
    p_tab = _tabular_prob(d, rows)
    w = _fusion_weight(y[va], p_img[va], p_tab[va])
    p_fused = w * p_img + (1 - w) * p_tab
    thr_fused = M.threshold_for_sensitivity(y[va], p_fused[va], cfg.target_sensitivity)
    thr_img = M.threshold_for_sensitivity(y[va], p_img[va], cfg.target_sensitivity)
    yt_, b, seed = y[te], cfg.bootstrap, cfg.seed
    res = {
        "test": {"n": int(te.size), "positives": int(yt_.sum())},
        "auc_image": list(M.bootstrap_auc(yt_, p_img[te], n=b, seed=seed)),
        "auc_tabular": list(M.bootstrap_auc(yt_, p_tab[te], n=b, seed=seed)),
        "auc_fused": list(M.bootstrap_auc(yt_, p_fused[te], n=b, seed=seed)),
        "fused_minus_tabular": list(M.bootstrap_auc_difference(yt_, p_fused[te], p_tab[te], n=b, seed=seed)),
        "fusion_weight_image": w,
        "operating_point_fused": {"threshold": thr_fused, **M.at_threshold(yt_, p_fused[te], thr_fused)},
        "operating_point_image_only": {"threshold": thr_img, **M.at_threshold(yt_, p_img[te], thr_img)},
        "brier_fused": M.brier(yt_, p_fused[te]),
        "region_attention_test_mean": att[te].mean(axis=0).round(4).tolist(),
    }
    summary = {"config": asdict(cfg), "generator": gen.describe(), "results": res,
               "calibration": {"method": "Platt", "a": platt[0], "b": platt[1]},
               "seconds": round(time.monotonic() - t0, 1), "kernels": kernels}
    _write_bundle(Path(bundle_dir), net, summary)
    if report_dir is not None:
        _write_report(Path(report_dir), summary, {"fused (image + tabular)": (yt_, p_fused[te]),
                                                  "image only (semi-synthetic)": (yt_, p_img[te]),
                                                  "tabular only (real NHANES)": (yt_, p_tab[te])},
                      gen, d.target_hu[rows][te[:4]])
    return summary


def _write_bundle(out: Path, net: XrayNet, summary: dict) -> None:
    from pipeline.training.export import screening_code, write_graph

    out.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, 3, CNN_PX, CNN_PX), torch.zeros(2, GRID * GRID, N_WAVELET_FEATURES))
    files = write_graph(net, example, ["image", "wavelet"], ["logit", "region_attention"], out, "image_model")
    r = summary["results"]
    categories = [
        {"id": "screen_positive", "label": "EXPERIMENTAL (chest radiograph): elevated osteoporosis risk",
         "code": screening_code("xr_screen_positive")},
        {"id": "screen_negative", "label": "EXPERIMENTAL (chest radiograph): below screening threshold",
         "code": screening_code("xr_screen_negative")},
    ]
    card = {
        "name": BUNDLE_NAME,
        "version": BUNDLE_VERSION,
        "kind": "chest_radiograph_screening",
        "experimental": True,
        "description": "Chest radiograph (CR/DX, PA/AP) image model: CT image encoder (transfer learning) + "
                       "gradient-based wavelet features with attention over a 4 x 4 region grid; its probability is "
                       "fused at probability level with the tabular probability of fused_kdamm_v1.",
        "intended_use": EXPERIMENTAL,
        "inputs": {"image": f"(3, {CNN_PX}, {CNN_PX}) pipeline.xray.image.model_inputs",
                   "wavelet": f"({GRID * GRID}, {N_WAVELET_FEATURES}) gradient-wavelet log energies per region"},
        "calibration": summary["calibration"],
        "fusion": {"rule": "p = w * p_image + (1 - w) * p_tabular", "weight_image": r["fusion_weight_image"],
                   "tabular_model": "fused_kdamm_v1 (demographics + labs path)"},
        "thresholds": {"fused": r["operating_point_fused"]["threshold"],
                       "image_only": r["operating_point_image_only"]["threshold"]},
        "categories": categories,
        "metrics": r,
        "training": summary["config"],
        "training_kernels": summary["kernels"],
        "generator": summary["generator"],
        "files": files,
        "inference": {"fp16": False, "note": "fp32 only"},
        "limitations": "Trained on semi-synthetic radiographs from one real image: it has seen one chest. Not "
                       "validated on any real radiograph cohort. Off by default ([xray] enabled = false). "
                       "Children are never screened.",
        "references": ["Chest X-ray + clinical data fusion for osteoporosis screening (CNN + gradient-based "
                       "wavelet features with attention; probability-level fusion with a tabular model)."],
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def _write_report(out: Path, summary: dict, curves: dict, gen: SyntheticRadiographs, targets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    M.roc_png(out / "xray_roc.png", curves, "EXPERIMENTAL chest radiograph path, held-out (semi-synthetic images)")
    fig, axes = plt.subplots(1, len(targets), figsize=(3 * len(targets), 3.3))
    rng = np.random.default_rng(0)
    for a, t in zip(np.atleast_1d(axes), targets):
        a.imshow(gen.image(float(t), rng), cmap="gray", vmin=0, vmax=1)
        a.set_title(f"target L1 {t:.0f} HU", fontsize=8)
        a.set_axis_off()
    fig.suptitle("Semi-synthetic radiographs from one real chest PA (held-out subjects)", fontsize=9)
    fig.savefig(out / "xray_examples.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    (out / "xray_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    r, c = summary["results"], summary["config"]

    ci = M.ci_text

    op, dd = r["operating_point_fused"], r["fused_minus_tabular"]
    lines = [
        "# Chest radiograph + clinical data path (EXPERIMENTAL) - training report",
        "",
        f"Generated by `osteoscreen train xray` (seed {c['seed']}) in {summary['seconds']:.0f} s on this machine's "
        "CPU. **EXPERIMENTAL.** The images are **semi-synthetic**, all derived from ONE real chest PA radiograph "
        "(bone contrast set from each subject's real L1 DXA through an assumed relation); the tabular part and the "
        "labels are real NHANES. These figures check that the path works end to end; they are not an accuracy "
        "claim for chest radiographs, and the path stays off by default.",
        "",
        kernels_line(summary["kernels"]),
        "",
        "Image model: the shipped CT image encoder (first two blocks frozen, last fine-tuned) + gradient-wavelet "
        "features (db2, 3 levels, 4 x 4 regions) with attention; Platt-calibrated on validation. Fusion: "
        f"p = w p_image + (1 - w) p_tabular with w = {r['fusion_weight_image']:.2f} (best validation AUC on a "
        "0.05 grid); the tabular probability is the shipped fused model's demographics + labs path.",
        "",
        f"Held-out test rows: n={r['test']['n']}, positives {r['test']['positives']}.",
        "",
        "| model (test AUC, bootstrap 95% CI) | AUC |",
        "|---|---|",
        f"| fused (image + tabular) | {ci(r['auc_fused'])} |",
        f"| image only (semi-synthetic radiographs) | {ci(r['auc_image'])} |",
        f"| tabular only (real demographics + labs) | {ci(r['auc_tabular'])} |",
        "",
        f"Fused minus tabular: {dd[0]:+.3f} (paired bootstrap 95% CI {dd[1]:+.3f} to {dd[2]:+.3f}).",
        "",
        f"Operating point (validation, sensitivity >= {c['target_sensitivity']}): threshold {op['threshold']:.4f}; "
        f"test sensitivity {op['sensitivity']:.2f}, specificity {op['specificity']:.2f}; Brier "
        f"{r['brier_fused']:.4f}.",
        "",
        "![ROC](xray_roc.png)",
        "",
        "![examples](xray_examples.png)",
        "",
    ]
    (out / "xray.md").write_text("\n".join(lines))
