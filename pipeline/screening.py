"""The screening decision from the bone measurement, with thresholds from the model card."""
from __future__ import annotations

from dataclasses import dataclass

from engines.bundle import ModelCard


@dataclass(frozen=True)
class Prediction:
    category_id: str
    category_label: str
    category_code: tuple[str, str, str]  # (value, scheme, meaning)
    probability: float | None  # None for a threshold rule: it gives a category, not a probability
    model_name: str
    model_version: str
    thresholds: dict[str, float]
    modalities_used: tuple[str, ...]
    intended_use: str


def _category(card: ModelCard, category_id: str) -> dict:
    for c in card.categories:
        if c["id"] == category_id:
            return c
    raise KeyError(f"model card {card.name} has no category {category_id!r}")


def classify_attenuation(mean_hu: float, card: ModelCard) -> Prediction:
    """Pickhardt-style three-way rule on mean L1 trabecular HU."""
    if card.kind != "threshold-rule":
        raise ValueError(f"model {card.name} is a {card.kind}, not a threshold rule")
    low = card.thresholds["osteoporosis_max_hu"]
    high = card.thresholds["normal_min_hu"]
    if mean_hu <= low:
        cid = "osteoporosis_likely"
    elif mean_hu <= high:
        cid = "low_bmd_indeterminate"
    else:
        cid = "normal"
    cat = _category(card, cid)
    code = cat["code"]
    return Prediction(
        category_id=cid,
        category_label=cat["label"],
        category_code=(code["value"], code["scheme"], code["meaning"]),
        probability=None,
        model_name=card.name,
        model_version=card.version,
        thresholds=dict(card.thresholds),
        modalities_used=("image",),
        intended_use=card.intended_use,
    )
