"""Model bundles on disk: a directory with a JSON card (and, for learned models, ONNX files).

The card carries everything the code must not hard-code: inputs, thresholds,
calibration, the data it was derived from, its metrics and its version.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CARD_NAME = "card.json"


class BundleError(Exception):
    """A model bundle that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    kind: str
    description: str
    intended_use: str
    thresholds: dict[str, float]
    categories: list[dict[str, Any]]
    references: list[str]
    raw: dict[str, Any]

    @property
    def display_name(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class ModelBundle:
    path: Path
    card: ModelCard


def bundled_models_dir() -> Path:
    return Path(__file__).resolve().parent / "models"


def resolve_bundle_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_dir():
        return p
    candidate = bundled_models_dir() / str(name_or_path)
    if candidate.is_dir():
        return candidate
    known = sorted(d.name for d in bundled_models_dir().iterdir() if (d / CARD_NAME).is_file())
    raise BundleError(
        f"model bundle {str(name_or_path)!r} not found: give a bundle directory or one of {known}"
    )


def load_bundle(name_or_path: str | Path) -> ModelBundle:
    path = resolve_bundle_path(name_or_path)
    card_path = path / CARD_NAME
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{card_path}: model card missing") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{card_path}: not valid JSON: {exc}") from None
    missing = [k for k in ("name", "version", "kind", "thresholds", "categories") if k not in raw]
    if missing:
        raise BundleError(f"{card_path}: missing keys {missing}")
    card = ModelCard(
        name=str(raw["name"]),
        version=str(raw["version"]),
        kind=str(raw["kind"]),
        description=str(raw.get("description", "")),
        intended_use=str(raw.get("intended_use", "")),
        thresholds={k: float(v) for k, v in raw["thresholds"].items()},
        categories=list(raw["categories"]),
        references=list(raw.get("references", [])),
        raw=raw,
    )
    return ModelBundle(path=path, card=card)
