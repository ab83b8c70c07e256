"""Image-only students for studies with neither labs nor demographics.

Two kinds, named by the card's ``input``:
- ``l1_patch`` (bundle mmpkd_v1, privileged distillation): the 2.5D L1 patch the fused model takes;
- ``full_slice`` (bundle cropkd_v1, crop teacher -> full-slice student): the whole selected slice,
  no crop or segmentation; it also returns its Grad-CAM attention, which becomes the result's
  overlay and outlined region.

The fused student handles such a study through its image-only path. An image-only student
replaces that path only where its card says it did better on the same held-out rows
(``use_instead_of_fused_image_only``, written by its training command); the result then names
this model, not the fused one.
"""
from __future__ import annotations

import numpy as np

import engines
from engines.bundle import ModelBundle
from pipeline.attention import ModelAttention
from pipeline.full_slice import SliceGrid

INPUT_KINDS = ("l1_patch", "full_slice")


class ImageOnlyModel:
    def __init__(self, bundle: ModelBundle, backend: str = "auto") -> None:
        card = bundle.card.raw
        self.bundle = bundle
        self.input_kind = str(card.get("input", "l1_patch"))
        if self.input_kind not in INPUT_KINDS:
            raise engines.BundleError(f"{bundle.path}: card input {self.input_kind!r} is not one of {INPUT_KINDS}")
        self.engine = engines.load(bundle.path, backend, graph="image_student", threads=1)
        self.platt = (float(card["calibration"]["a"]), float(card["calibration"]["b"]))
        self.threshold = float(card["thresholds"]["operating_point"])
        self.categories = {c["id"]: c for c in card["categories"]}
        self.replaces_fused_image_only = bool(card.get("use_instead_of_fused_image_only", False))
        self.attention_method = str(card.get("attention", {}).get("name", "")) or "attention"  # full method: card
        self.name = (bundle.card.name, bundle.card.version)

    def predict(self, patch: np.ndarray | None, full_slice: tuple[np.ndarray, SliceGrid] | None = None):
        """Screen from the input this student takes; ``None`` when the job could not build that input."""
        from pipeline.fused import FusedOutput

        if self.input_kind == "full_slice":
            if full_slice is None:
                return None
            image, grid = full_slice
        else:
            if patch is None:
                return None
            image, grid = patch, None
        out = self.engine(image=image[None].astype(np.float32))
        logit = float(out["logit"][0, 0])
        prob = float(1.0 / (1.0 + np.exp(-(self.platt[0] * logit + self.platt[1]))))
        cid = "screen_positive" if prob >= self.threshold else "screen_negative"
        cat = self.categories[cid]
        attention = None
        if "attention" in out and grid is not None:
            attention = ModelAttention(np.asarray(out["attention"][0], dtype=np.float32), grid,
                                       self.attention_method)
        return FusedOutput(prob, logit, cid, cat["label"], (cat["code"]["value"], cat["code"]["scheme"],
                                                            cat["code"]["meaning"]),
                           self.threshold, "image_only", ("image",), None, model=self.name, attention=attention)
