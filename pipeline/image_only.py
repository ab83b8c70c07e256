"""The image-only student (privileged distillation, bundle mmpkd_v1) for studies with neither labs nor demographics.

The fused student handles such a study through its image-only path. The image-only student
replaces that path only where its card says it did better on the same held-out rows
(``use_instead_of_fused_image_only``, written by ``osteoscreen train privileged``); the
result then names this model, not the fused one.
"""
from __future__ import annotations

import numpy as np

import engines
from engines.bundle import ModelBundle


class ImageOnlyModel:
    def __init__(self, bundle: ModelBundle, backend: str = "auto") -> None:
        card = bundle.card.raw
        self.bundle = bundle
        self.engine = engines.load(bundle.path, backend, graph="image_student", threads=1)
        self.platt = (float(card["calibration"]["a"]), float(card["calibration"]["b"]))
        self.threshold = float(card["thresholds"]["operating_point"])
        self.categories = {c["id"]: c for c in card["categories"]}
        self.replaces_fused_image_only = bool(card.get("use_instead_of_fused_image_only", False))
        self.name = (bundle.card.name, bundle.card.version)

    def predict(self, patch: np.ndarray):
        from pipeline.fused import FusedOutput

        logit = float(self.engine(image=patch[None].astype(np.float32))["logit"][0, 0])
        prob = float(1.0 / (1.0 + np.exp(-(self.platt[0] * logit + self.platt[1]))))
        cid = "screen_positive" if prob >= self.threshold else "screen_negative"
        cat = self.categories[cid]
        return FusedOutput(prob, logit, cid, cat["label"], (cat["code"]["value"], cat["code"]["scheme"],
                                                            cat["code"]["meaning"]),
                           self.threshold, "image_only", ("image",), None, model=self.name)
