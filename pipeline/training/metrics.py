"""Evaluation: AUC with bootstrap CIs, operating points, calibration."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc(y: np.ndarray, score: np.ndarray) -> float:
    y = np.asarray(y)
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def bootstrap_auc(y, score, *, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    y, score = np.asarray(y), np.asarray(score)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            vals.append(roc_auc_score(y[i], score[i]))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return auc(y, score), float(lo), float(hi)


def bootstrap_auc_difference(y, a, b, *, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same subjects, paired bootstrap 95% CI."""
    y, a, b = map(np.asarray, (y, a, b))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return auc(y, a) - auc(y, b), float(lo), float(hi)


def threshold_for_sensitivity(y, prob, target: float = 0.85) -> float:
    """The highest threshold whose sensitivity (prob >= t) is at least ``target``."""
    y, prob = np.asarray(y), np.asarray(prob)
    pos = np.sort(prob[y == 1])[::-1]
    if pos.size == 0:
        return 0.5
    k = int(np.ceil(target * pos.size)) - 1
    return float(pos[min(k, pos.size - 1)])


def at_threshold(y, prob, t: float) -> dict[str, float]:
    y, pred = np.asarray(y), np.asarray(prob) >= t
    tp, tn = int(np.sum(pred & (y == 1))), int(np.sum(~pred & (y == 0)))
    fp, fn = int(np.sum(pred & (y == 0))), int(np.sum(~pred & (y == 1)))
    return {
        "sensitivity": tp / max(1, tp + fn),
        "specificity": tn / max(1, tn + fp),
        "accuracy": (tp + tn) / max(1, len(y)),
        "ppv": tp / max(1, tp + fp),
        "flagged_fraction": float(pred.mean()),
    }


def bootstrap_at_threshold(y, prob, t: float, *, n: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """95 % bootstrap intervals (resampling subjects) of the operating-point figures at the fixed threshold ``t``
    (the threshold itself was chosen on the validation split, so it is not re-chosen per resample)."""
    y, prob = np.asarray(y), np.asarray(prob)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"sensitivity": [], "specificity": [], "ppv": []}
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            op = at_threshold(y[i], prob[i], t)
            for k in draws:
                draws[k].append(op[k])
    return {f"{k}_ci": [float(v) for v in np.percentile(vals, [2.5, 97.5])] for k, vals in draws.items()}


def brier(y, prob) -> float:
    return float(np.mean((np.asarray(prob) - np.asarray(y)) ** 2))


def calibration_bins(y, prob, n_bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean predicted, observed rate, count) per quantile bin."""
    y, prob = np.asarray(y), np.asarray(prob)
    edges = np.unique(np.quantile(prob, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, len(edges) - 2)
    out = []
    for b in range(len(edges) - 1):
        m = idx == b
        if m.any():
            out.append((float(prob[m].mean()), float(y[m].mean()), int(m.sum())))
    return out


def ece(y, prob, n_bins: int = 10) -> float:
    bins = calibration_bins(y, prob, n_bins)
    n = sum(c for _, _, c in bins)
    return float(sum(c * abs(p - o) for p, o, c in bins) / max(1, n))


def ci_text(v) -> str:
    """(estimate, low, high) as the reports print it."""
    return f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"


def roc_png(path, curves: dict, title: str) -> None:
    """One ROC figure for several held-out score sets ({label: (y, score)}), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
