"""The fused screening model in service: inputs from the study, prediction through engines, SHAP.

Image (2.5D L1 patch), demographics (DICOM header) and labs (LabPanel) are each
optional; the model takes any subset. Probabilities are calibrated with the
card's Platt parameters; the operating point is the card's threshold for the
subset of modalities present.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import engines
from engines.bundle import ModelBundle, read_verified
from hl7.mapping import DEFAULT as DEFAULT_MAPPING
from hl7.panel import LabPanel
from pipeline.demographics import Demographics
from pipeline.explain import Explanation, exact_shapley
from pipeline.features import DEMOGRAPHIC_IDX, FEATURES, LAB_IDX
from pipeline.timing import StageClock

if TYPE_CHECKING:
    from pipeline.attention import ModelAttention

SHAP_BACKGROUND_ROWS = 8
SUBSET_BY_MODALITIES = {
    (True, True, True): "all",
    (True, True, False): "all",
    (True, False, True): "image_demographics",
    (True, False, False): "image_only",
    (False, True, True): "tabular",
    (False, True, False): "labs_only",
    (False, False, True): "demographics_only",
}


@dataclass(frozen=True)
class TabularInput:
    values: np.ndarray  # raw, canonical units, NaN where missing (F,)
    used: dict[str, tuple[float, str]]  # feature -> (value, source)


@dataclass(frozen=True)
class FusedOutput:
    probability: float
    logit: float
    category_id: str
    category_label: str
    category_code: tuple[str, str, str]
    threshold: float
    subset: str
    modalities: tuple[str, ...]
    explanation: Explanation | None
    model: tuple[str, str] | None = None  # (name, version) when another model than the fused one answered
    attention: ModelAttention | None = None  # of the model that answered, if it computes one
    input_notes: tuple[str, ...] = ()  # inputs outside the training range, used at its edge


def lab_unit_problems(mapping) -> list[str]:
    """Lab features whose codes the mapping table (hl7.mapping.LabMapping) lacks, or keeps in a unit that cannot
    be converted to the one the model was trained on (``tabular_input`` converts with the shipped table's
    factors). Checked at start and by ``config check``."""
    problems = []
    for f in FEATURES:
        for code in f.loinc if f.group == "labs" else ():
            analyte = mapping.analytes.get(code)
            if analyte is None:
                problems.append(f"{f.label}: LOINC {code} is not in the lab mapping table (the model needs it)")
            elif DEFAULT_MAPPING.convert(code, 1.0, analyte.unit, f.unit) is None:
                problems.append(f"{f.label}: LOINC {code} is kept in {analyte.unit}, which cannot be converted to "
                                f"the model's {f.unit}: use a unit of the shipped table for it ({mapping.source})")
    return problems


def _in_feature_unit(feature, lab) -> float | None:
    """A lab value in the unit the model was trained on (the lab store keeps each code's own unit: vitamin D
    in ng/mL under its Mass/volume LOINC, nmol/L for the model)."""
    return DEFAULT_MAPPING.convert(lab.loinc, lab.value, lab.unit, feature.unit)


def model_lab(feature, labs: LabPanel):
    """The lab value the model takes for a lab ``feature``: the first of its LOINC codes present in ``labs``."""
    return next((labs.get(code) for code in feature.loinc if labs.get(code)), None)


def tabular_input(labs: LabPanel, demo: Demographics) -> TabularInput:
    values = np.full(len(FEATURES), np.nan)
    used: dict[str, tuple[float, str]] = {}
    header = {
        "age": demo.age_years,
        "female": None if demo.sex is None else float(demo.sex == "F"),
        "height": demo.height_m * 100 if demo.height_m else None,
        "weight": demo.weight_kg,
        "bmi": demo.bmi,
    }
    for i, f in enumerate(FEATURES):
        if f.group == "demographics":
            v = header.get(f.name)
            if v is not None:
                values[i] = float(v)
                used[f.name] = (float(v), "DICOM header")
        else:
            lab = model_lab(f, labs)
            value = _in_feature_unit(f, lab) if lab is not None else None
            if value is not None:
                values[i] = value
                used[f.name] = (value, f"LOINC {lab.loinc}, {lab.observed_at:%Y-%m-%d}" if lab.observed_at
                                else f"LOINC {lab.loinc}")
    return TabularInput(values, used)


def shap_background(bundle: ModelBundle) -> np.lib.npyio.NpzFile:
    """The SHAP background rows, checked against the card's SHA-256 (a changed file would change every
    explanation); a BundleError that says what to do otherwise."""
    return np.load(io.BytesIO(read_verified(bundle.path / "shap_background.npz").data))


class FusedModel:
    def __init__(self, bundle: ModelBundle, backend: str = "auto", image_only=None) -> None:
        self.bundle = bundle
        self.image_only = image_only  # pipeline.image_only.ImageOnlyModel, or None
        card = bundle.card.raw
        self.card = card
        self.image_engine = engines.load(bundle.path, backend, graph="image_encoder", threads=1)
        self.head_engine = engines.load(bundle.path, backend, graph="head", threads=2)
        feats = card["inputs"]["features"]
        if [f["name"] for f in feats] != [f.name for f in FEATURES]:
            raise engines.BundleError(f"{bundle.path}: feature list differs from this software's")
        self.mean = np.array([f["mean"] for f in feats], dtype=np.float32)
        self.std = np.array([f["std"] for f in feats], dtype=np.float32)
        # The training split's range; a bundle without one (older cards) is not clipped.
        self.train_min = np.array([f.get("train_min", -np.inf) for f in feats], dtype=float)
        self.train_max = np.array([f.get("train_max", np.inf) for f in feats], dtype=float)
        self.platt = (float(card["calibration"]["a"]), float(card["calibration"]["b"]))
        bg = shap_background(bundle)
        rows = slice(0, SHAP_BACKGROUND_ROWS)  # exact Shapley costs 2^p x rows evaluations
        self.bg_values, self.bg_mask = bg["tab_values"][rows].astype(np.float32), bg["tab_mask"][rows].astype(bool)
        self.categories = {c["id"]: c for c in card["categories"]}

    @property
    def backend(self) -> str:
        return self.head_engine.backend

    def _prob(self, logit: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.platt[0] * logit + self.platt[1])))

    def embed(self, patch: np.ndarray | None) -> np.ndarray:
        if patch is None:
            return np.zeros((1, 64), dtype=np.float32)
        return self.image_engine(image=patch[None].astype(np.float32))["embedding"]

    def predict(self, patch: np.ndarray | None, tab: TabularInput, explain: bool = True,
                clock: StageClock | None = None, full_slice=None) -> FusedOutput:
        """Probability and category from any subset of modalities; ``clock`` gets ``model`` and ``shap``.

        ``full_slice``: (input, SliceGrid) of pipeline.full_slice, for an image-only student that takes it.
        """
        clock = clock or StageClock()
        mask = ~np.isnan(tab.values)
        has_img = patch is not None
        has_labs, has_demo = bool(mask[list(LAB_IDX)].any()), bool(mask[list(DEMOGRAPHIC_IDX)].any())
        if not (has_img or has_labs or has_demo):
            raise ValueError("no modality available: nothing to screen")
        subset = SUBSET_BY_MODALITIES[(has_img, has_labs, has_demo)]
        if subset == "image_only" and self.image_only is not None and self.image_only.replaces_fused_image_only:
            with clock.stage("model"):
                out = self.image_only.predict(patch, full_slice)
            if out is not None:
                return out
        values, input_notes = self.within_training_range(tab.values)
        with clock.stage("model"):
            scaled = np.where(mask, (np.nan_to_num(values) - self.mean) / self.std, 0.0).astype(np.float32)
            emb = self.embed(patch)
            img_present = np.array([[1.0 if has_img else 0.0]], dtype=np.float32)
            logit = float(self.head_engine(embedding=emb, image_present=img_present, tab_values=scaled[None],
                                           tab_mask=mask[None].astype(np.float32))["logit"][0, 0])
            prob = float(self._prob(np.array(logit)))

        def f(values: np.ndarray, m: np.ndarray) -> np.ndarray:
            n = values.shape[0]
            logit = self.head_engine(embedding=np.repeat(emb, n, axis=0), image_present=np.repeat(img_present, n, 0),
                                     tab_values=values * m, tab_mask=m)["logit"][:, 0]
            return self._prob(logit)

        threshold = float(self.card["thresholds"][f"operating_point_{subset}"])
        cid = "screen_positive" if prob >= threshold else "screen_negative"
        cat = self.categories[cid]
        expl = None
        if explain:
            with clock.stage("shap"):
                expl = exact_shapley(f, scaled, mask, self.bg_values, self.bg_mask, tuple(x.name for x in FEATURES))
        modalities = tuple(m for m, ok in (("image", has_img), ("demographics", has_demo), ("labs", has_labs)) if ok)
        return FusedOutput(prob, logit, cid, cat["label"],
                           (cat["code"]["value"], cat["code"]["scheme"], cat["code"]["meaning"]),
                           threshold, subset, modalities, expl, input_notes=input_notes)

    def within_training_range(self, values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
        """``values`` clipped to the training split's range, and a note per clipped input.

        The network was fitted on that range only: an alkaline phosphatase of 1,500 U/L (Paget's disease,
        metastases) is 58 SD above the training mean, where an MLP's output is an extrapolation, not a risk.
        At the edge the input still says "very high" without leaving what the model has seen.
        """
        clipped = np.clip(values, self.train_min, self.train_max)
        notes = []
        for f, raw, used in zip(FEATURES, values, clipped):
            if np.isfinite(raw) and raw != used:
                side = "above the largest" if raw > used else "below the smallest"
                unit = "y" if f.unit == "a" else f.unit
                notes.append(f"{f.label} {raw:.4g} {unit} is {side} value the model was trained on; "
                             f"used as {used:.4g} {unit}")
        return clipped, tuple(notes)
