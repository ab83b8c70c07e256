"""Exact Shapley values for the tabular inputs of the fused model.

Interventional Shapley values against a stored background sample from the
training data: for a coalition S of the study's present features, the value is
the mean model output over background rows with S taken from the study and the
other present features from the background row (value and missing-mask both).
Features absent in the study stay absent. The image embedding is held fixed.

Exact: all 2^p coalitions of the p present features are evaluated (p <= 16),
so base value + contributions = model output up to float rounding. Exact relative
to the background the service uses: the first 8 rows of the bundle's stored
training sample (``pipeline.fused.SHAP_BACKGROUND_ROWS``), a trade of background
size for the 1 s latency budget. Explained quantity: the calibrated probability.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import factorial
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Explanation:
    features: tuple[str, ...]  # the present features that were explained
    contributions: tuple[float, ...]  # signed, in probability units
    base_value: float  # expected output with none of the study's features (background)
    output: float  # model output for the study
    method: str = "exact interventional Shapley (all coalitions) against a stored background sample of training rows"

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.features, self.contributions))


def exact_shapley(f: Callable[[np.ndarray, np.ndarray], np.ndarray], values: np.ndarray, mask: np.ndarray,
                  bg_values: np.ndarray, bg_mask: np.ndarray, names: tuple[str, ...],
                  chunk: int = 131072) -> Explanation:
    """``f(values[N,F], mask[N,F]) -> output[N]``; ``values``/``mask`` describe the study (F,)."""
    present = np.nonzero(mask)[0]
    p = present.size
    n_bg = bg_values.shape[0]
    full = float(f(values[None, :], mask[None, :].astype(np.float32))[0])
    if p == 0:
        return Explanation((), (), full, full)
    coalitions = np.arange(2**p, dtype=np.int64)
    bits = ((coalitions[:, None] >> np.arange(p)) & 1).astype(bool)  # (2^p, p)
    v = np.empty(2**p)
    rows_per = max(1, chunk // n_bg)
    for start in range(0, 2**p, rows_per):
        b = bits[start : start + rows_per]  # (c, p)
        c = b.shape[0]
        vals = np.repeat(bg_values[None, :, :], c, axis=0).copy()  # (c, B, F)
        msk = np.repeat(bg_mask[None, :, :], c, axis=0).astype(np.float32)
        absent = np.setdiff1d(np.arange(values.size), present)
        vals[:, :, absent] = 0.0
        msk[:, :, absent] = 0.0
        take = b[:, None, :].repeat(n_bg, axis=1)  # (c, B, p)
        vals[:, :, present] = np.where(take, values[present][None, None, :], vals[:, :, present])
        msk[:, :, present] = np.where(take, 1.0, msk[:, :, present])
        out = f(vals.reshape(c * n_bg, -1), msk.reshape(c * n_bg, -1)).reshape(c, n_bg)
        v[start : start + c] = out.mean(axis=1)
    sizes = bits.sum(axis=1)
    weights = np.array([factorial(s) * factorial(p - s - 1) / factorial(p) for s in range(p)])
    phi = np.empty(p)
    for j in range(p):
        without = coalitions[~bits[:, j]]
        phi[j] = float(np.sum(weights[sizes[without]] * (v[without | (1 << j)] - v[without])))
    return Explanation(tuple(names[i] for i in present), tuple(float(x) for x in phi), float(v[0]), float(v[-1]))
