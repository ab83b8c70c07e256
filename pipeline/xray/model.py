"""The chest radiograph model in service: image probability fused with the tabular model's probability.

p = w p_image + (1 - w) p_tabular (probability-level fusion, the bundle card's weight), where
p_tabular is the fused screening model's demographics + labs path with its SHAP values. With no
demographics and no labs the image probability stands alone, against its own operating point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import engines
from engines.bundle import ModelBundle


@dataclass(frozen=True)
class XrayOutput:
    probability: float
    image_probability: float
    tabular_probability: float | None
    weight_image: float
    threshold: float
    category_id: str
    category_label: str
    category_code: tuple[str, str, str]
    region_attention: np.ndarray  # (4, 4), sums to 1: the image model's attention over the wavelet regions


class XrayModel:
    def __init__(self, bundle: ModelBundle, backend: str = "auto") -> None:
        card = bundle.card.raw
        if card.get("kind") != "chest_radiograph_screening":
            raise engines.BundleError(f"{bundle.path}: not a chest radiograph bundle (kind {card.get('kind')!r})")
        self.bundle = bundle
        self.name = (bundle.card.name, bundle.card.version)
        self.engine = engines.load(bundle.path, backend, graph="image_model", threads=1)
        self.platt = (float(card["calibration"]["a"]), float(card["calibration"]["b"]))
        self.weight = float(card["fusion"]["weight_image"])
        self.thresholds = {k: float(v) for k, v in card["thresholds"].items()}
        self.categories = {c["id"]: c for c in card["categories"]}
        self.intended_use = str(card["intended_use"])

    def predict(self, feeds: dict[str, np.ndarray], tabular_probability: float | None) -> XrayOutput:
        out = self.engine(**{k: v[None].astype(np.float32) for k, v in feeds.items()})
        logit = float(out["logit"][0, 0])
        p_img = float(1.0 / (1.0 + np.exp(-(self.platt[0] * logit + self.platt[1]))))
        if tabular_probability is None:
            prob, threshold, w = p_img, self.thresholds["image_only"], 1.0
        else:
            w = self.weight
            prob, threshold = w * p_img + (1 - w) * tabular_probability, self.thresholds["fused"]
        cid = "screen_positive" if prob >= threshold else "screen_negative"
        cat = self.categories[cid]
        att = np.asarray(out["region_attention"][0], dtype=np.float32)
        side = int(round(np.sqrt(att.size)))
        return XrayOutput(prob, p_img, tabular_probability, w, threshold, cid, cat["label"],
                          (cat["code"]["value"], cat["code"]["scheme"], cat["code"]["meaning"]),
                          att.reshape(side, side))
