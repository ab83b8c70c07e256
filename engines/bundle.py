"""Model bundles on disk: a directory with a JSON card (and, for learned models, ONNX files).

The card carries everything the code must not hard-code: inputs, thresholds,
calibration, the data it was derived from, its metrics and its version.
"""
from __future__ import annotations

import hashlib
import json
import os
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


def _known_bundles() -> list[str]:
    return sorted(d.name for d in bundled_models_dir().iterdir() if (d / CARD_NAME).is_file())


def _is_bare_name(text: str) -> bool:
    """A name without a path separator names a shipped bundle, never a folder that happens to be in the
    current directory (a ``fused_kdamm_v1`` folder beside the operator must not replace the shipped one)."""
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    return text not in (".", "..") and not any(s in text for s in seps)


def resolve_bundle_path(name_or_path: str | Path) -> Path:
    """A shipped bundle's name (no path separator) or a bundle directory (``./mine``, ``/opt/models/mine``)."""
    text = str(name_or_path)
    if _is_bare_name(text):
        candidate = bundled_models_dir() / text
        if candidate.is_dir():
            return candidate.resolve()
        raise BundleError(f"model bundle {text!r} is not a shipped bundle: name one of {_known_bundles()}, or give "
                          f"a bundle directory as a path (./{text} for one in the current directory)")
    p = Path(text).expanduser()
    if p.is_dir():
        return p.resolve()
    raise BundleError(f"model bundle directory {text!r} not found: give an existing bundle directory or one of "
                      f"the shipped bundles {_known_bundles()}")


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


@dataclass(frozen=True)
class VerifiedFile:
    """A bundle file's bytes, read once and checked against the SHA-256 its model card lists: hand these bytes
    (never the path) to the runtime, so that what was checked is what runs."""
    path: Path
    data: bytes
    sha256: str


def _reinstall_hint(bundle_dir: Path) -> str:
    return (f"reinstall the bundle (the shipped ones come with osteoscreen) or rerun the training that wrote it "
            f"({bundle_dir})")


def card_file_hashes(bundle_dir: Path) -> dict[str, str]:
    """The card's ``files`` table (file name -> SHA-256) of a bundle directory."""
    card_path = bundle_dir / CARD_NAME
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{card_path}: model card missing, so the bundle's files cannot be checked: "
                          f"{_reinstall_hint(bundle_dir)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{card_path}: unreadable model card ({exc}): {_reinstall_hint(bundle_dir)}") from None
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict):
        raise BundleError(f"{card_path}: the card has no 'files' table of SHA-256 hashes, so the bundle's files "
                          f"cannot be checked: {_reinstall_hint(bundle_dir)}")
    return {str(k): str(v).lower() for k, v in files.items()}


def read_verified(path: str | Path) -> VerifiedFile:
    """Read a bundle file once and check it against its card's SHA-256 (card.json ``files``).

    Refuses (BundleError) a file that differs from the card, one the card does not list, and a bundle without a
    card: a changed network would otherwise load and silently change every answer."""
    path = Path(path)
    expected = card_file_hashes(path.parent).get(path.name)
    if expected is None:
        raise BundleError(f"{path}: not listed in the model card's 'files' table, so it cannot be checked: "
                          f"{_reinstall_hint(path.parent)}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror or exc}): {_reinstall_hint(path.parent)}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise BundleError(f"{path}: SHA-256 {actual[:12]}... does not match the model card's {expected[:12]}...: "
                          f"the file was changed or damaged after the bundle was written; "
                          f"{_reinstall_hint(path.parent)}")
    return VerifiedFile(path=path, data=data, sha256=actual)


def verify_bundle_files(bundle_dir: str | Path) -> list[Path]:
    """Check every file a learned bundle's card lists (its networks, TorchScript copies, SHAP background)
    against its SHA-256; returns them. A BundleError names the first that fails and what to do."""
    bundle_dir = resolve_bundle_path(bundle_dir)
    checked = [read_verified(bundle_dir / name).path for name in sorted(card_file_hashes(bundle_dir))]
    return checked
