"""One screening job, run in a worker process: series files + labs -> SR + SC files.

Everything here is deterministic for a given input: the SR/SC UIDs derive from
the series UID and the model version, so a job re-run after a crash produces
the same objects and a re-send is idempotent at the PACS.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from engines.bundle import load_bundle
from hl7.panel import LabPanel
from pipeline.bone import MeasurementError, measure_trabecular
from pipeline.demographics import demographics_from_header
from pipeline.durable import write_durably
from pipeline.report.notice import SHORT_DISCLAIMER
from pipeline.report.render import render_key_image
from pipeline.report.sc import build_sc
from pipeline.report.sr import NodeIdentity, build_sr
from pipeline.screening import classify_attenuation
from pipeline.selection import SelectionError, select_level_slices
from pipeline.volume import VolumeError, load_volume

SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class JobRequest:
    job_id: int
    series_uid: str
    instance_paths: tuple[str, ...]
    labs: LabPanel
    output_dir: str
    model: str
    node: NodeIdentity
    max_tilt_deg: float = 10.0


@dataclass(frozen=True)
class OutputObject:
    kind: str  # "sr" or "sc"
    path: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class ScreeningResult:
    status: str  # "screened" or "not_screened"
    reason: str | None
    series_uid: str
    summary: dict
    outputs: tuple[OutputObject, ...] = ()


def _uid(series_uid: str, kind: str, model_version: str) -> str:
    return generate_uid(entropy_srcs=["osteoscreen-result", series_uid, kind, model_version])


def run_screening(req: JobRequest) -> ScreeningResult:
    """Screen one series. Data that cannot be trusted gives ``not_screened`` with the reason."""
    bundle = load_bundle(req.model)
    out = Path(req.output_dir)
    try:
        volume = load_volume(req.instance_paths, max_tilt_deg=req.max_tilt_deg)
        selection, loc = select_level_slices(volume, "L1")
        slab = (int(np.ceil(selection.z_range[0])), int(np.floor(selection.z_range[1])))
        measurement = measure_trabecular(volume, loc, selection.centre_index, slab, level="L1")
    except (VolumeError, SelectionError, MeasurementError) as exc:
        result = ScreeningResult("not_screened", exc.reason, req.series_uid, {"reason": exc.reason})
        write_durably(out / "result.json", lambda fh: fh.write(json.dumps(asdict(result), indent=2).encode()))
        return result

    prediction = classify_attenuation(measurement.mean_hu, bundle.card)
    demo = demographics_from_header(volume.header)
    versions = f"{bundle.card.version}/{selection.method}"
    sr_series, sc_series = _uid(req.series_uid, "sr-series", versions), _uid(req.series_uid, "sc-series", versions)
    sr_uid, sc_uid = _uid(req.series_uid, "sr", versions), _uid(req.series_uid, "sc", versions)
    src_header = volume.header.copy()
    src_header.SOPInstanceUID = measurement.sop_instance_uid

    sr = build_sr(source_header=src_header, demographics=demo, selection=selection, measurement=measurement, prediction=prediction,
                  labs=req.labs, node=req.node, series_uid=sr_series, sop_uid=sr_uid)

    labs_text = (
        "; ".join(f"{v.name} {v.value:g} {v.unit}" for v in req.labs.values) if req.labs.values else "none found"
    )
    lines = [
        f"{measurement.level} trabecular attenuation: {measurement.mean_hu:.0f} HU "
        f"(SD {measurement.sd_hu:.0f}, ROI {measurement.area_mm2:.0f} mm2)",
        f"Category: {prediction.category_label}",
        "Thresholds: <= {:g} HU osteoporosis likely; > {:g} HU normal".format(
            prediction.thresholds["osteoporosis_max_hu"], prediction.thresholds["normal_min_hu"]),
        f"Rule: {prediction.model_name} {prediction.model_version}",
        f"Level: {selection.level} by {selection.method} (anchor {selection.anchor}, "
        f"confidence {selection.confidence:.2f}), slice {selection.centre_index + 1} of {volume.shape[0]}",
        f"Labs (reported, not used by the rule): {labs_text}",
        "Patient: " + ", ".join(
            x for x in (
                f"{demo.age_years:.0f} y" if demo.age_years is not None else "",
                demo.sex or "",
            ) if x
        ),
    ]
    rgb, _ = render_key_image(
        volume.hu[selection.centre_index],
        (volume.spacing[1], volume.spacing[2]),
        measurement.roi_polygon_rc,
        title="osteoscreen - L1 bone screening",
        lines=lines,
        footer=SHORT_DISCLAIMER,
    )
    sc = build_sc(source_header=src_header, source_sop_instance_uid=measurement.sop_instance_uid, rgb=rgb,
                  node=req.node, series_uid=sc_series, sop_uid=sc_uid)

    write_durably(out / "sr.dcm", lambda fh: sr.save_as(fh, enforce_file_format=True))
    write_durably(out / "sc.dcm", lambda fh: sc.save_as(fh, enforce_file_format=True))
    write_durably(out / "sc.png", lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))
    summary = {
        "study_uid": str(volume.header.get("StudyInstanceUID", "")),
        "patient_id": str(volume.header.get("PatientID", "")),
        "level": measurement.level,
        "slice_index": measurement.slice_index,
        "source_sop_instance_uid": measurement.sop_instance_uid,
        "mean_hu": round(measurement.mean_hu, 1),
        "sd_hu": round(measurement.sd_hu, 1),
        "roi_area_mm2": round(measurement.area_mm2, 1),
        "category": prediction.category_label,
        "category_id": prediction.category_id,
        "model": f"{prediction.model_name} {prediction.model_version}",
        "selection": {"method": selection.method, "anchor": selection.anchor, "confidence": selection.confidence},
        "labs_used": [{"loinc": v.loinc, "name": v.name, "value": v.value, "unit": v.unit,
                       "observed_at": v.observed_at.isoformat() if v.observed_at else None} for v in req.labs.values],
        "labs_excluded": [asdict(e) for e in req.labs.excluded],
        "volume_notes": list(volume.notes),
        "localiser_notes": list(loc.notes),
    }
    result = ScreeningResult(
        "screened",
        None,
        req.series_uid,
        summary,
        (
            OutputObject("sr", str(out / "sr.dcm"), SR_SOP_CLASS, sr_uid),
            OutputObject("sc", str(out / "sc.dcm"), SC_SOP_CLASS, sc_uid),
        ),
    )
    write_durably(out / "result.json", lambda fh: fh.write(json.dumps(asdict(result), indent=2).encode()))
    return result
