"""One screening job, run in a worker process: series files + labs -> SR + SC files.

Everything here is deterministic for a given input: the SR/SC UIDs derive from
the series UID and the model version, so a job re-run after a crash produces
the same objects and a re-send is idempotent at the PACS.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from PIL import Image
from pydicom.uid import generate_uid

from engines.bundle import load_bundle
from hl7.panel import LabPanel
from pipeline.attention import report_attention
from pipeline.bone import BoneMeasurement, MeasurementError, measure_mid_body
from pipeline.calibration import CalibrationCheck, check_calibration
from pipeline.contrast import ContrastAssessment, assess_contrast
from pipeline.demographics import demographics_from_header, identity_of
from pipeline.durable import write_durably
from pipeline.features import FEATURES
from pipeline.fused import FusedModel, tabular_input
from pipeline.full_slice import full_slice_input
from pipeline.image_input import extract_patch
from pipeline.localiser import TRANSITIONAL_NOTE
from pipeline.report.notice import SHORT_DISCLAIMER
from pipeline.report.render import render_key_image
from pipeline.report.sc import build_sc
from pipeline.report.source import report_source
from pipeline.report.sr import NodeIdentity, build_sr
from pipeline.screening import classify_attenuation
from pipeline.selection import SelectionError, select_level_slices
from pipeline.timing import StageClock, peak_rss_mb
from pipeline.volume import Volume, VolumeError, load_volume

SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


@dataclass(frozen=True)
class JobRequest:
    job_id: int
    series_uid: str
    instance_paths: tuple[str, ...]
    labs: LabPanel
    output_dir: str
    model: str  # fused screening bundle
    node: NodeIdentity
    max_tilt_deg: float = 10.0
    attenuation_rule: str = "pickhardt_l1_2013"  # reported measurement category
    backend: str = "auto"
    selector: str = "drlis_v1"  # learned slice selector bundle; "" for the anatomical localiser alone
    image_only_model: str = ""  # image-only student bundle for studies without labs and demographics; "" off
    contrast_policy: str = "flag"  # "flag": screen and say so; "skip": not screened
    # The latest SR already sent for this study (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID): a new SR
    # for the study is a new version of it and says so (Predecessor Documents Sequence).
    predecessor_sr: tuple[str, str, str] | None = None
    # 1 + the number of SRs already sent for the study: every result object's InstanceNumber, so a viewer tells a
    # replacing key image from the one it replaces (they share a series)
    report_version: int = 1
    key_object_selection: bool = False  # also a KOS flagging the measured slice and the key image
    presentation_state: bool = False  # also a GSPS with the ROI on the measured slice
    report_not_screened: bool = False  # an SR saying why, when the series could not be screened
    patient_key: str = ""  # hashed pseudonym for log lines (never the patient ID)
    pipeline: str = "ct"  # "ct", or "xray": the EXPERIMENTAL chest radiograph path (pipeline.xray.job)
    xray_model: str = "cxr_fusion_v1"  # chest radiograph bundle (xray path only)
    xray_body_parts: tuple[str, ...] = ("CHEST", "THORAX")
    xray_views: tuple[str, ...] = ("PA", "AP")


def _companions(req: JobRequest, out: Path, versions: str, series_versions: str, measurement, volume, sc,
                attenuation) -> list[OutputObject]:
    """The optional KOS and GSPS (config switches), next to the SR and SC; their series, like the SR's and SC's,
    stay the same across report versions (``series_versions``), their instances do not (``versions``)."""
    if not (req.key_object_selection or req.presentation_state):
        return []
    from pipeline.report.keyobjects import build_gsps, build_kos

    ref = volume.slice_refs[measurement.slice_index]
    image = report_source(pydicom.dcmread(ref.path, stop_before_pixels=True))
    made = []
    if req.key_object_selection:
        uid = _uid(req.series_uid, "kos", versions)
        kos = build_kos(key_images=[image, sc], frame_numbers=[ref.frame_number, None], node=req.node,
                        series_uid=_uid(req.series_uid, "kos-series", series_versions), sop_uid=uid,
                        instance_number=req.report_version, description=f"{measurement.level} slice measured by osteoscreen and its key image "
                                                 "(research use only)")
        write_durably(out / "kos.dcm", lambda fh: kos.save_as(fh, enforce_file_format=True))
        made.append(OutputObject("kos", str(out / "kos.dcm"), KOS_SOP_CLASS, uid))
    if req.presentation_state:
        uid = _uid(req.series_uid, "gsps", versions)
        gsps = build_gsps(image=image, frame_number=ref.frame_number,
                          roi_rc=volume.to_source_rc(measurement.roi_polygon_rc),
                          label=f"{measurement.level} {measurement.mean_hu:.1f} HU ({attenuation.category_label}) "
                                "- research use only",  # drawn on the diagnostic image itself
                          node=req.node, series_uid=_uid(req.series_uid, "gsps-series", series_versions), sop_uid=uid,
                          instance_number=req.report_version)
        write_durably(out / "gsps.dcm", lambda fh: gsps.save_as(fh, enforce_file_format=True))
        made.append(OutputObject("gsps", str(out / "gsps.dcm"), GSPS_SOP_CLASS, uid))
    return made


def identity_key(header) -> str:
    """A digest of the patient identity in the header: a corrected identity makes a new report version."""
    return hashlib.sha256("|".join(identity_of(header)).encode()).hexdigest()[:16]


def result_fields(req: JobRequest, header, fused, model: tuple[str, str], backend: str, sr_series: str,
                  sr_uid: str) -> dict:
    """The result record's fields that every screening path writes: study and patient keys, the screening result,
    the labs used and left out, and the SR's identity."""
    return {
        "study_uid": str(header.get("StudyInstanceUID", "")),
        "study_date": str(header.get("StudyDate", "") or ""),
        "accession_number": str(header.get("AccessionNumber", "") or ""),
        "patient_id": str(header.get("PatientID", "")),
        "issuer": str(header.get("IssuerOfPatientID", "") or ""),
        "identity_key": identity_key(header),
        "probability": round(fused.probability, 4),
        "threshold": round(fused.threshold, 4),
        "category": fused.category_label,
        "category_id": fused.category_id,
        "modalities": list(fused.modalities),
        "model": " ".join(model),
        "backend": backend,
        "shap": fused.explanation.as_dict() if fused.explanation else {},
        "shap_base": fused.explanation.base_value if fused.explanation else None,
        "labs_used": [{"loinc": v.loinc, "name": v.name, "value": v.value, "unit": v.unit,
                       "observed_at": v.observed_at.isoformat() if v.observed_at else None} for v in req.labs.values],
        "labs_excluded": [asdict(e) for e in req.labs.excluded],
        "labs_notes": list(req.labs.notes),
        "input_notes": list(fused.input_notes),
        "sr_series_uid": sr_series,
        "sr_sop_instance_uid": sr_uid,
        "predecessor_sr": req.predecessor_sr[2] if req.predecessor_sr else None,
    }


def probability_text(p: float) -> str:
    """A probability as the reports print it: three significant figures, so that a probability and an operating
    point of 0.0227 never both read "0.02" on either side of the cut-off."""
    return f"{p:.3g}"


def slice_label(volume: Volume, index: int) -> str:
    """Where a radiologist finds the slice: its InstanceNumber (or frame) in the series as sent, and its place
    counted from the feet (the order the node sorts slices in, whatever the series' own numbering)."""
    place = f"slice {index + 1} of {volume.shape[0]} from the feet"
    ref = volume.slice_refs[index] if index < len(volume.slice_refs) else None
    if ref is None:
        return place
    if ref.frame_number:
        return f"frame {ref.frame_number} ({place})"
    try:
        number = pydicom.dcmread(ref.path, stop_before_pixels=True, specific_tags=["InstanceNumber"]).get(
            "InstanceNumber")
    except Exception:  # noqa: BLE001 - a label, never a reason to fail the job
        number = None
    return f"image {number} ({place})" if number not in (None, "") else place


def result_key(summary: dict) -> str:
    """What makes two reports of one study the same: vertebra, models, categories and the lab values used.

    A second series of the same study (or the same series sent again) that gives
    the same key produces no second SR; any difference (corrected patient identity,
    another vertebra, a new model version, another category, corrected labs) is a new
    version of the report.
    """
    key = {
        "identity": summary.get("identity_key"),
        "level": summary.get("level"),
        "model": summary.get("model"),
        "attenuation_rule": summary.get("attenuation_rule"),
        "category_id": summary.get("category_id"),
        "attenuation_category": summary.get("attenuation_category"),
        "labs": sorted((v["loinc"], round(float(v["value"]), 3), v.get("observed_at")) for v in summary["labs_used"]),
    }
    return json.dumps(key, sort_keys=True)


@dataclass(frozen=True)
class OutputObject:
    kind: str  # "sr", "sc", "kos" or "gsps"
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


@functools.lru_cache(maxsize=4)
def _fused_model_cached(bundle_path: str, backend: str, image_only: str = "") -> FusedModel:
    from pipeline.image_only import ImageOnlyModel

    alt = ImageOnlyModel(load_bundle(image_only), backend) if image_only else None
    return FusedModel(load_bundle(bundle_path), backend, image_only=alt)


@functools.lru_cache(maxsize=4)
def slice_selector(bundle: str, backend: str):
    """One DRLIS selector (ONNX session) per bundle and backend per worker process; None when disabled."""
    if not bundle:
        return None
    from pipeline.drlis.selector import DrlisSelector

    return DrlisSelector(bundle, backend)


def fused_model(bundle, backend: str, image_only: str = "") -> FusedModel:
    """One FusedModel (ONNX sessions) per bundle and backend per worker process, kept between jobs."""
    return _fused_model_cached(str(bundle.path), backend, image_only)


def _uid(series_uid: str, kind: str, model_version: str) -> str:
    return generate_uid(entropy_srcs=["osteoscreen-result", series_uid, kind, model_version])


def _write_result(out: Path, result: ScreeningResult) -> ScreeningResult:
    write_durably(out / "result.json", lambda fh: fh.write(json.dumps(asdict(result), indent=2, default=str).encode()))
    return result


ADJACENT_MIN_CONFIDENCE = 0.7  # T12/L2 are reported only when the localiser is at least this sure


def _adjacent_levels(volume, loc) -> list[BoneMeasurement]:
    """T12 and L2 measured like L1 when confidently found (both neighbours fully in view), else nothing."""
    if loc.confidence < ADJACENT_MIN_CONFIDENCE:
        return []
    found = []
    for level in ("T12", "L2"):
        try:
            sel, _ = select_level_slices(volume, level, localisation=loc)
            lo, hi = sel.z_range
            if lo <= 0 or hi >= volume.shape[0] - 1:  # cut by the field of view: not a whole body
                continue
            found.append(measure_mid_body(volume, loc, sel.z_range, level=level))
        except (SelectionError, MeasurementError):
            continue
    return found


def _not_screened(req: JobRequest, out: Path, header, reason: str, summary: dict, procedure=None,
                  title_note: str | None = None) -> ScreeningResult:
    """The result of a series that could not be screened; with ``report_not_screened``, an SR that says why.

    ``procedure`` and ``title_note``: the SR's procedure code and first statement where it is not a CT (the
    EXPERIMENTAL chest radiograph path)."""
    outputs: list[OutputObject] = []
    if req.report_not_screened:
        # The identity is part of the UIDs: a corrected patient identity makes a new SR (the same UID would be
        # dropped by the outbox as already sent, and the PACS would keep the one naming the old patient).
        versions = f"not-screened/{reason}/{identity_key(header)}"
        sr_uid, sr_series = _uid(req.series_uid, "sr", versions), _uid(req.series_uid, "sr-series", versions)
        sr = build_sr(source_header=report_source(header), source_sop_instance_uid=str(header.SOPInstanceUID),
                      demographics=demographics_from_header(header), labs=req.labs, node=req.node,
                      series_uid=sr_series, sop_uid=sr_uid, not_screened_reason=reason, procedure=procedure,
                      title_note=title_note)
        write_durably(out / "sr.dcm", lambda fh: sr.save_as(fh, enforce_file_format=True))
        outputs.append(OutputObject("sr", str(out / "sr.dcm"), SR_SOP_CLASS, sr_uid))
        summary = {**summary, "sr_series_uid": sr_series, "sr_sop_instance_uid": sr_uid}
    return _write_result(out, ScreeningResult("not_screened", reason, req.series_uid, summary, tuple(outputs)))


def _image_checks(volume, header, measurement) -> tuple[ContrastAssessment, CalibrationCheck | None]:
    """Contrast phase (header, then the aorta at L1) and the air/fat HU calibration check."""
    contrast = assess_contrast(header, volume, measurement)
    if volume is None:
        return contrast, None
    return contrast, check_calibration(volume, measurement.slice_index if measurement is not None else None)


def _quality_notes(contrast: ContrastAssessment, calibration: CalibrationCheck | None) -> list[str]:
    notes = [f"Contrast: {contrast.text}."
             + (" Contrast raises trabecular attenuation (typically 10-20 HU in the portal venous phase), so a "
                "normal value is less reassuring than on an unenhanced scan; a low value remains meaningful."
                if contrast.contrast else "")]
    if calibration is not None:
        notes.append(f"HU calibration check: {calibration.text}.")
    return notes


def _panel_flags(contrast: ContrastAssessment, calibration: CalibrationCheck | None) -> list[str]:
    flags = []
    if contrast.contrast:
        flags.append(f"CONTRAST: {contrast.phase} ({contrast.source}) - HU raised by contrast")
    if calibration is not None and calibration.flag:
        flags.append(f"CALIBRATION FLAG: {calibration.text}")
    return flags


def run_screening(req: JobRequest) -> ScreeningResult:
    """Screen one series with whatever modalities are usable; give up only when none is.

    The image path (volume -> L1 -> trabecular ROI -> 2.5D patch) may fail with a
    reason; labs may be missing; demographics come from the header. The fused model
    takes any subset. The Pickhardt L1 category stays a reported measurement.
    """
    if req.pipeline == "xray":
        from pipeline.xray.job import run_xray_screening

        return run_xray_screening(req)
    started_at = time.time()
    clock = StageClock()
    bundle = load_bundle(req.model)
    rule = load_bundle(req.attenuation_rule)
    out = Path(req.output_dir)
    volume = selection = loc = measurement = None
    adjacent: list = []
    image_note = None
    try:
        volume = load_volume(req.instance_paths, max_tilt_deg=req.max_tilt_deg, clock=clock)
        with clock.stage("selection"):
            selection, loc = select_level_slices(volume, "L1", agent=slice_selector(req.selector, req.backend))
        with clock.stage("measurement"):
            measurement = measure_mid_body(volume, loc, selection.z_range, level="L1")
            adjacent = _adjacent_levels(volume, loc)
    except (VolumeError, SelectionError, MeasurementError) as exc:
        image_note = exc.reason
        if isinstance(exc, MeasurementError) and volume is not None and loc is not None:
            # L1 found but not measurable (metal, cement): measure its neighbours instead and say so.
            adjacent = _adjacent_levels(volume, loc)
            if adjacent:
                image_note += ("; " + " and ".join(m.level for m in adjacent) + " measured instead, for reference "
                               "(the L1 threshold rule and the model's image input do not apply to them)")
    header = volume.header if volume is not None else pydicom.dcmread(req.instance_paths[0], stop_before_pixels=True)
    with clock.stage("image_checks"):
        contrast, calibration = _image_checks(volume, header, measurement)
    if contrast.contrast and req.contrast_policy == "skip":
        reason = (f"contrast-enhanced study ({contrast.text}); contrast studies are not screened "
                  "([screening] contrast = \"skip\")")
        return _not_screened(req, out, header, reason, {"reason": reason, "contrast": contrast.as_dict()})
    demo = demographics_from_header(header)
    tab = tabular_input(req.labs, demo)
    patch = full_slice = None
    with clock.stage("model"):
        model = fused_model(bundle, req.backend, req.image_only_model)
        if measurement is not None and volume is not None:
            r, c = measurement.roi_centre_rc
            patch = extract_patch(volume.hu, volume.spacing, (float(measurement.slice_index), r, c))
            if model.image_only is not None and model.image_only.input_kind == "full_slice":
                full_slice = full_slice_input(volume.hu, volume.spacing, float(measurement.slice_index))
    try:
        fused = model.predict(patch, tab, clock=clock, full_slice=full_slice)
    except ValueError as exc:
        reason = f"{exc}" + (f" (image: {image_note})" if image_note else "")
        return _not_screened(req, out, header, reason, {"reason": reason})
    attenuation = classify_attenuation(measurement.mean_hu, rule.card) if measurement is not None else None
    attention = None  # only the model that made the result can give one
    if fused.attention is not None and measurement is not None and volume is not None:
        attention = report_attention(fused.attention, volume.hu.shape[1:], (volume.spacing[1], volume.spacing[2]),
                                     volume.to_source_rc, measurement.roi_centre_rc)

    versions = f"{bundle.card.version}/{rule.card.version}" + (f"/{selection.method}" if selection else "")
    series_versions = versions
    sr_series, sc_series = _uid(req.series_uid, "sr-series", versions), _uid(req.series_uid, "sc-series", versions)
    if req.predecessor_sr:  # a new version of the study's report gets new UIDs; a retried job keeps its own
        versions += f"/after:{req.predecessor_sr[2]}"
    sr_uid, sc_uid = _uid(req.series_uid, "sr", versions), _uid(req.series_uid, "sc", versions)
    source_uid = measurement.sop_instance_uid if measurement is not None else str(header.SOPInstanceUID)
    src_header = report_source(header, source_uid)
    with clock.stage("report"):
        library = []
        measured = [m for m in (measurement, *adjacent) if m is not None]
        if measured and volume is not None:
            ref = volume.slice_refs[measured[0].slice_index]
            if ref.frame_number is None:  # multi-frame: geometry is per frame; highdicom's entry wants one image
                library = [pydicom.dcmread(volume.slice_refs[m.slice_index].path, stop_before_pixels=True)
                           for m in measured]
        sr = build_sr(source_header=src_header, source_sop_instance_uid=source_uid, demographics=demo, labs=req.labs,
                      node=req.node, series_uid=sr_series, sop_uid=sr_uid, fused=fused,
                      fused_model=fused.model or (bundle.card.name, bundle.card.version), selection=selection,
                      measurement=measurement, attenuation=attenuation, image_note=image_note,
                      quality_notes=_quality_notes(contrast, calibration),
                      roi_source_rc=volume.to_source_rc(measurement.roi_polygon_rc) if measurement is not None
                      and volume is not None else None, predecessor=req.predecessor_sr, library_images=library,
                      adjacent=[(m, volume.to_source_rc(m.roi_polygon_rc)) for m in adjacent], attention=attention,
                      fractures=loc.fractures if loc is not None else (),
                      # what the answering model's card says of its data (the image path: semi-synthetic only)
                      model_intended_use=bundle.card.intended_use if fused.model is None else None,
                      instance_number=req.report_version)
        write_durably(out / "sr.dcm", lambda fh: sr.save_as(fh, enforce_file_format=True))
        outputs = [OutputObject("sr", str(out / "sr.dcm"), SR_SOP_CLASS, sr_uid)]

        if measurement is not None and volume is not None and selection is not None and attenuation is not None:
            expl = fused.explanation
            top = sorted(zip(expl.features, expl.contributions), key=lambda t: -abs(t[1]))[:6] if expl else []
            labels = {f.name: f.short_label for f in FEATURES}
            lines = [
                f"Screening: {fused.category_label}",
                f"Probability {probability_text(fused.probability)} (operating point "
                f"{probability_text(fused.threshold)}); modalities: {', '.join(fused.modalities)}",
                f"{measurement.level} trabecular attenuation: {measurement.mean_hu:.1f} HU "
                f"(SD {measurement.sd_hu:.1f}, ROI {measurement.area_mm2:.0f} mm2) - {attenuation.category_label} "
                f"by {attenuation.model_name}",
                f"Level: {selection.level} by {selection.method} (anchor {selection.anchor}, "
                f"confidence {selection.confidence:.2f}), {slice_label(volume, measurement.slice_index)}"
                + ("; possible transitional anatomy (short lowest ribs)"
                   if any(TRANSITIONAL_NOTE in n for n in loc.notes) else ""),
                *_panel_flags(contrast, calibration),
                *(f"FINDING: {f.text}" for f in loc.fractures),
                "Labs: " + ("; ".join(f"{v.name} {v.value:.4g} {v.unit}" for v in req.labs.values)
                            if req.labs.values else "none found"),
                "Patient: " + ", ".join(x for x in (
                    f"{int(demo.age_years)} y" if demo.age_years is not None else "", demo.sex or "") if x),
                "Model: " + " ".join(fused.model or (bundle.card.name, bundle.card.version)),
            ]
            if req.predecessor_sr:  # the earlier key image stays in the PACS, in the same series
                lines.append(f"Version {req.report_version}: replaces an earlier osteoscreen result for this study")
            if attention is not None:
                lines.append(f"Overlay: where this model looked ({attention.method}); not a finding")
            rgb = render_key_image(
                volume.hu[measurement.slice_index], (volume.spacing[1], volume.spacing[2]), measurement.roi_polygon_rc,
                title="osteoscreen - L1 bone screening", lines=lines, footer=SHORT_DISCLAIMER,
                bars=[(labels[n], v) for n, v in top], bars_title="Top factors (SHAP, probability units)",
                overlay=attention.on_slice if attention is not None else None)
            sc = build_sc(source_header=src_header, source_sop_instance_uid=source_uid,
                          source_frame_number=measurement.frame_number, rgb=rgb, node=req.node,
                          series_uid=sc_series, sop_uid=sc_uid, instance_number=req.report_version)
            write_durably(out / "sc.dcm", lambda fh: sc.save_as(fh, enforce_file_format=True))
            write_durably(out / "sc.png", lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))
            outputs.append(OutputObject("sc", str(out / "sc.dcm"), SC_SOP_CLASS, sc_uid))
            outputs += _companions(req, out, versions, series_versions, measurement, volume, sc, attenuation)

    summary = {
        **result_fields(req, header, fused, fused.model or (bundle.card.name, bundle.card.version), model.backend,
                        sr_series, sr_uid),
        "image_note": image_note,
        "contrast": contrast.as_dict(),
        "calibration": calibration.as_dict() if calibration is not None else None,
    }
    if attention is not None:
        summary["attention"] = {"method": attention.method, "region_area_mm2": round(attention.region.area_mm2, 1),
                                "region_share": round(attention.region.mass, 3),
                                "roi_distance_mm": None if attention.roi_distance_mm is None
                                else round(attention.roi_distance_mm, 1)}
    if measurement is not None and selection is not None and attenuation is not None and loc is not None:
        summary.update({
            "level": measurement.level,
            "slice_index": measurement.slice_index,
            "slice_label": slice_label(volume, measurement.slice_index),
            "source_sop_instance_uid": measurement.sop_instance_uid,
            "source_frame_number": measurement.frame_number,
            "mean_hu": round(measurement.mean_hu, 1),
            "sd_hu": round(measurement.sd_hu, 1),
            "median_hu": round(measurement.median_hu, 1),
            "roi_voxels": measurement.n_pixels,
            "roi_slices": list(measurement.pooled_slices),
            "roi_area_mm2": round(measurement.area_mm2, 1),
            "attenuation_category": attenuation.category_label,
            "attenuation_rule": f"{attenuation.model_name} {attenuation.model_version}",
            "selection": {"method": selection.method, "anchor": selection.anchor,
                          "confidence": selection.confidence, "note": selection.note},
            "localiser_notes": list(loc.notes),
            "adjacent_levels": [{"level": m.level, "mean_hu": round(m.mean_hu, 1), "sd_hu": round(m.sd_hu, 1),
                                 "roi_area_mm2": round(m.area_mm2, 1), "slice_index": m.slice_index,
                                 "source_sop_instance_uid": m.sop_instance_uid} for m in adjacent],
        })
    elif adjacent:  # the fallback levels of an L1 that could not be measured
        summary["adjacent_levels"] = [{"level": m.level, "mean_hu": round(m.mean_hu, 1), "sd_hu": round(m.sd_hu, 1),
                                       "roi_area_mm2": round(m.area_mm2, 1), "slice_index": m.slice_index,
                                       "source_sop_instance_uid": m.sop_instance_uid} for m in adjacent]
    if loc is not None and loc.fractures:
        summary["vertebral_fractures"] = [{"level": f.level, "height_mm": round(f.height_mm, 1),
                                           "ratio": round(f.ratio, 2), "reference": f.reference,
                                           "text": f.text} for f in loc.fractures]
    if volume is not None:
        summary["volume_notes"] = list(volume.notes)
        summary["slices"] = int(volume.shape[0])
    summary["result_key"] = result_key(summary)
    summary["performance"] = {"started_at": round(started_at, 3), "stage_s": clock.as_dict(),
                              "worker_peak_rss_mb": peak_rss_mb()}
    return _write_result(out, ScreeningResult("screened", None, req.series_uid, summary, tuple(outputs)))
