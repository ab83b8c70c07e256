"""`osteoscreen eval tabular DIR`: the shipped bundle's tabular path and baselines on any NHANES folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import engines
from engines.bundle import load_bundle
from pipeline.features import FEATURE_NAMES
from pipeline.training import metrics as M
from pipeline.training.nhanes import load_cohort


def eval_tabular(nhanes_dir: str | Path, bundle: str = "fused_kdamm_v1", out=print) -> dict:
    b = load_bundle(bundle)
    card = b.card.raw
    cohort = load_cohort(nhanes_dir)
    d = cohort.frame
    x_raw = d[list(FEATURE_NAMES)].to_numpy(dtype=float)
    mask = ~np.isnan(x_raw)
    mean = np.array([f["mean"] for f in card["inputs"]["features"]])
    std = np.array([f["std"] for f in card["inputs"]["features"]])
    scaled = np.where(mask, (np.nan_to_num(x_raw) - mean) / std, 0.0).astype(np.float32)
    y = d["label"].to_numpy()
    head = engines.load(b.path, graph="head")
    n = len(y)
    logit = head(embedding=np.zeros((n, 64), np.float32), image_present=np.zeros((n, 1), np.float32),
                 tab_values=scaled, tab_mask=mask.astype(np.float32))["logit"][:, 0]
    lr = card["baseline_logreg"]
    lr_score = np.concatenate([scaled, (~mask).astype(np.float32)], axis=1) @ np.asarray(lr["coef"]) + lr["intercept"]
    age, weight = x_raw[:, FEATURE_NAMES.index("age")], x_raw[:, FEATURE_NAMES.index("weight")]
    ost = -0.2 * (weight - age)
    ok = ~np.isnan(ost)
    res = {
        "n": n, "prevalence": float(y.mean()), "cycles": sorted(d["cycle"].unique().tolist()),
        "auc_model": M.bootstrap_auc(y, logit, n=500), "auc_ost": M.bootstrap_auc(y[ok], ost[ok], n=500),
        "auc_logreg": M.bootstrap_auc(y, lr_score, n=500),
        "missing": {k: float(v) for k, v in zip(FEATURE_NAMES, (~mask).mean(axis=0))},
    }
    out(f"cohort: {nhanes_dir} cycles {','.join(res['cycles'])}, adults with femoral-neck DXA")
    seen = sorted(set(res["cycles"]) & set(card.get("cohort", {}).get("cycles", [])))
    if seen:  # the bundle was trained (and calibrated) on part of these rows: not unseen data
        out(f"note: cycle(s) {','.join(seen)} are the bundle's own training cohort (its train, validation and test "
            "splits): these AUCs are not on unseen data; the card's test-split figures are")
    out("feature missingness: " + ", ".join(f"{k} {v:.0%}" for k, v in res["missing"].items() if v > 0))
    for k in ("auc_model", "auc_ost", "auc_logreg"):
        a, lo, hi = res[k]
        out(f"{k}: {a:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    out(f"tabular eval: n={n} prevalence={res['prevalence']:.4f} auc_model={res['auc_model'][0]:.3f} "
        f"auc_ost={res['auc_ost'][0]:.3f} auc_logreg={res['auc_logreg'][0]:.3f}")
    return res
