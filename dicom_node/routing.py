"""Routing rules: which completed series are screened, with the reason for each decision."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from config.schema import RoutingSettings, XraySettings
from pipeline.demographics import age_years
from pipeline.volume import first_item, functional_group
from pipeline.xray.image import XRAY_SOP_CLASSES

CT_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    image_type: tuple[str, ...]
    tilt_from_axial_deg: float | None  # angle between the slice normal and the patient z axis
    slice_thickness_mm: float | None
    n_slices: int
    calling_aet: str
    age_years: float | None
    sop_classes: tuple[str, ...]
    body_part: str = ""
    view_positions: tuple[str, ...] = ()  # of the sampled headers, e.g. a PA and a lateral in one series
    # (SOP class, body part, view position) of each sampled header: one image must be a chest PA/AP on its own
    images: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Decision:
    eligible: bool
    reason: str
    path: str = "ct"  # which screening path: "ct", or "xray" (the EXPERIMENTAL chest radiograph path)

    @property
    def rule(self) -> str:
        """The rule that decided (a metrics label: no numbers, no PHI); reasons are written by ``decide``."""
        if self.eligible:
            return "eligible"
        for prefix, rule in _RULES:
            if prefix in self.reason:
                return rule
        return "other"


def _most_common(values: list) -> object:
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None


class UnreadableSeries(Exception):
    """A header the routing rules cannot read: the series is skipped with this reason, never left pending."""


def series_facts(paths: Sequence[str], calling_aet: str, sample: int = 7) -> SeriesFacts:
    """Facts from a spread of headers (pixel data not read); frames count for multi-frame objects."""
    try:
        return _series_facts(paths, calling_aet, sample)
    except Exception as exc:  # noqa: BLE001 - malformed DICOM from a sender: a recorded skip, not a stuck series
        raise UnreadableSeries(f"unreadable DICOM header ({type(exc).__name__}: {exc})"[:300]) from None


def _series_facts(paths: Sequence[str], calling_aet: str, sample: int) -> SeriesFacts:
    idx = np.unique(np.linspace(0, len(paths) - 1, num=min(sample, len(paths))).astype(int)) if paths else []
    headers = [pydicom.dcmread(Path(paths[i]), stop_before_pixels=True) for i in idx]
    n_slices = len(paths)
    frames = [int(h.get("NumberOfFrames", 1) or 1) for h in headers]
    if headers and max(frames) > 1:
        n_slices = sum(frames) if len(paths) == len(headers) else int(np.mean(frames) * len(paths))
    tilts, thick, types = [], [], []
    for h in headers:
        shared = first_item(h, "SharedFunctionalGroupsSequence")
        per_frame = first_item(h, "PerFrameFunctionalGroupsSequence")  # the first frame's groups
        iop = h.get("ImageOrientationPatient")
        if iop is None:  # multi-frame: shared functional groups, else the first frame's
            orient = functional_group(shared, per_frame, "PlaneOrientationSequence")
            iop = orient.get("ImageOrientationPatient") if orient is not None else None
        if iop is not None and len(iop) == 6:
            n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            tilts.append(round(float(np.degrees(np.arccos(min(1.0, abs(n[2]) / (np.linalg.norm(n) or 1))))), 1))
        t = h.get("SliceThickness")
        if t in (None, ""):
            measures = functional_group(shared, per_frame, "PixelMeasuresSequence")
            t = measures.get("SliceThickness") if measures is not None else None
        thick.append(float(t) if t not in (None, "") else None)
        types.append(tuple(str(v).upper() for v in h.get("ImageType", [])))
    first = headers[0] if headers else pydicom.Dataset()
    return SeriesFacts(
        modality=str(first.get("Modality", "") or ""),
        image_type=_most_common(types) or (),  # type: ignore[arg-type]
        tilt_from_axial_deg=_most_common(tilts),  # type: ignore[arg-type]
        slice_thickness_mm=_most_common(thick),  # type: ignore[arg-type]
        n_slices=n_slices,
        calling_aet=calling_aet,
        age_years=age_years(first),
        sop_classes=tuple(sorted({str(h.get("SOPClassUID", "")) for h in headers})),
        body_part=str(first.get("BodyPartExamined", "") or "").upper(),
        view_positions=tuple(sorted({str(h.get("ViewPosition", "") or "").upper() for h in headers})),
        images=tuple((str(h.get("SOPClassUID", "")), str(h.get("BodyPartExamined", "") or "").upper(),
                      str(h.get("ViewPosition", "") or "").upper()) for h in headers),
    )


_RULES = (("unreadable DICOM header", "unreadable"), ("sent by", "calling_ae"), ("modality", "modality"),
          ("no CT image", "sop_class"), ("no CR/DX image", "sop_class"), ("body part", "body_part"),
          ("view position", "view"),
          ("ImageType", "image_type"), ("slice orientation", "orientation"), ("not axial", "orientation"),
          ("slice thickness", "slice_thickness"), ("slices, fewer", "slice_count"), ("patient age", "age"))


def _age_refusal(facts: SeriesFacts, rules: RoutingSettings) -> Decision | None:
    """Adults only: children are never screened, on any path."""
    if facts.age_years is None:
        if not rules.screen_unknown_age:
            return Decision(False, "patient age unknown (PatientAge and PatientBirthDate missing)")
    elif facts.age_years < rules.min_patient_age_years:
        return Decision(False, f"patient age {int(facts.age_years)} below {rules.min_patient_age_years}")
    return None


def decide_xray(facts: SeriesFacts, rules: RoutingSettings, xray: XraySettings) -> Decision:
    """The EXPERIMENTAL chest radiograph path: CR/DX, chest, PA or AP, an adult."""
    if not set(facts.sop_classes) & set(XRAY_SOP_CLASSES):
        return Decision(False, "no CR/DX image objects in the series (DX For Processing is not screened)", "xray")
    refusal = _age_refusal(facts, rules)
    if refusal is not None:
        return Decision(False, refusal.reason, "xray")
    parts, wanted = {b.upper() for b in xray.body_parts}, {v.upper() for v in xray.views}
    images = [i for i in facts.images if i[0] in XRAY_SOP_CLASSES] or \
        [(s, facts.body_part, v) for s in facts.sop_classes for v in facts.view_positions]  # facts without images
    if not any(part in parts for _, part, _ in images):
        seen = "/".join(sorted({part or "(none)" for _, part, _ in images}))
        return Decision(False, f"body part {seen} is not a chest ({xray.body_parts})", "xray")
    if not any(view in wanted for _, _, view in images):
        seen = "/".join(sorted({view or "(none)" for _, _, view in images})) or "(none)"
        return Decision(False, f"view position {seen} is not one of {xray.views}", "xray")
    # The job screens one image that is a chest PA/AP itself: a lateral chest beside a PA without a body part
    # is not one.
    views = sorted({view for _, part, view in images if part in parts and view in wanted})
    if not views:
        return Decision(False, f"view position {'/'.join(xray.views)} only on images that are not a chest "
                               "(BodyPartExamined) For Presentation CR/DX: no single image to screen", "xray")
    age = f"age {int(facts.age_years)}" if facts.age_years is not None else "age unknown (allowed)"
    return Decision(True, f"{facts.modality} chest {'/'.join(views)}, {facts.n_slices} image(s), {age} "
                          "(EXPERIMENTAL chest radiograph path)", "xray")


def decide(facts: SeriesFacts, rules: RoutingSettings, xray: XraySettings | None = None) -> Decision:
    if rules.calling_aets and facts.calling_aet not in rules.calling_aets:
        return Decision(False, f"sent by {facts.calling_aet}, not one of the routed AEs {rules.calling_aets}")
    if xray is not None and xray.enabled and facts.modality in xray.modalities:
        return decide_xray(facts, rules, xray)
    if facts.modality not in rules.modalities:
        return Decision(False, f"modality {facts.modality or '(none)'} is not in {rules.modalities}")
    if not set(facts.sop_classes) & CT_CLASSES:
        return Decision(False, "no CT image objects in the series")
    missing = [t for t in rules.image_type if t.upper() not in facts.image_type]
    if missing:
        return Decision(False, f"ImageType {'/'.join(facts.image_type) or '(none)'} lacks {'/'.join(missing)}")
    if rules.require_axial:
        if facts.tilt_from_axial_deg is None:
            return Decision(False, "slice orientation unknown")
        if facts.tilt_from_axial_deg > rules.max_axial_tilt_deg:
            return Decision(False, f"not axial: slice normal {facts.tilt_from_axial_deg:.0f} deg from the patient "
                                   f"z axis (max {rules.max_axial_tilt_deg:g})")
    lo, hi = rules.slice_thickness_mm
    if facts.slice_thickness_mm is None:
        return Decision(False, "slice thickness unknown")
    if not lo <= facts.slice_thickness_mm <= hi:
        return Decision(False, f"slice thickness {facts.slice_thickness_mm:g} mm outside {lo:g}-{hi:g} mm")
    if facts.n_slices < rules.min_slices:
        return Decision(False, f"{facts.n_slices} slices, fewer than {rules.min_slices}")
    refusal = _age_refusal(facts, rules)
    if refusal is not None:
        return refusal
    age = f"age {int(facts.age_years)}" if facts.age_years is not None else "age unknown (allowed)"
    return Decision(True, f"CT, axial, {facts.slice_thickness_mm:g} mm, {facts.n_slices} slices, {age}")
