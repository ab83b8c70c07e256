"""TID 1500 Comprehensive 3D SR for one screening result (built with highdicom)."""
from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.sr.codedict import codes

from hl7.panel import LabPanel, LabValue
from pipeline.attention import ReportedAttention
from pipeline.bone import BoneMeasurement
from pipeline.demographics import Demographics
from pipeline.features import FEATURES
from pipeline.fused import FusedOutput, model_lab
from pipeline.localiser import SuspectedFracture
from pipeline.report.notice import DISCLAIMER
from pipeline.report.source import copy_patient_study_extras
from pipeline.screening import Prediction
from pipeline.selection import SliceSelection

PRIVATE_SCHEME = "99OSTEOSCREEN"
# What the ROI samples. (It was SCT 91747007, which is "Lumen of blood vessel", not a part of a vertebra.)
TRABECULAR_BONE = CodedConcept("OS0020", PRIVATE_SCHEME, "Trabecular bone of vertebral body")
HU = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
MM2 = CodedConcept("mm2", "UCUM", "square millimeter")
MEAN = CodedConcept("373098007", "SCT", "Mean")
SD = CodedConcept("386136009", "SCT", "Standard Deviation")
MEDIAN = CodedConcept("373099004", "SCT", "Median")
VOXELS = CodedConcept("OS0011", PRIVATE_SCHEME, "ROI voxel count (pooled over slices)")
VOXEL_UNIT = CodedConcept("{voxels}", "UCUM", "voxels")
AREA = CodedConcept("42798000", "SCT", "Area")
ATTENUATION = CodedConcept("112031", "DCM", "Attenuation Coefficient")
VERTEBRA_SITES = {
    "T11": CodedConcept("12989004", "SCT", "T11 vertebra"),
    "T12": CodedConcept("23215003", "SCT", "T12 vertebra"),
    "L1": CodedConcept("66794005", "SCT", "L1 vertebra"),
    "L2": CodedConcept("14293000", "SCT", "L2 vertebra"),
    "L3": CodedConcept("36470004", "SCT", "L3 vertebra"),
}
SCREENING_CATEGORY = CodedConcept("OS0001", PRIVATE_SCHEME, "Opportunistic osteoporosis screening category")
NOT_SCREENED = CodedConcept("OS0010", PRIVATE_SCHEME, "Not screened")
ATTENUATION_CATEGORY = CodedConcept("OS0004", PRIVATE_SCHEME, "L1 attenuation category (threshold rule)")
PROBABILITY = CodedConcept("OS0002", PRIVATE_SCHEME, "Probability of osteoporosis (femoral neck T-score <= -2.5)")
THRESHOLD = CodedConcept("OS0003", PRIVATE_SCHEME, "Screening operating point")
SHAP_BASE = CodedConcept("OS0005", PRIVATE_SCHEME, "SHAP base value")
RATIO = CodedConcept("{ratio}", "UCUM", "ratio")
COMMENT = CodedConcept("121106", "DCM", "Comment")
ATTENTION_REGION = CodedConcept("OS0012", PRIVATE_SCHEME, "Region the screening model attended to")
ATTENTION_SHARE = CodedConcept("OS0013", PRIVATE_SCHEME, "Share of the model's attention in the region")
SUSPECTED_FRACTURE = CodedConcept("OS0014", PRIVATE_SCHEME, "Suspected vertebral compression fracture")
DISC_TO_DISC_HEIGHT = CodedConcept("OS0015", PRIVATE_SCHEME, "Disc-to-disc height along the spine axis")
HEIGHT_RATIO = CodedConcept("OS0016", PRIVATE_SCHEME, "Height relative to the neighbouring vertebrae")
VERTEBRA = CodedConcept("51282000", "SCT", "Vertebra")
MM = CodedConcept("mm", "UCUM", "millimeter")
FRACTURE_ADVICE = ("A vertebral fragility fracture is itself an indication for osteoporosis evaluation, whatever "
                   "the screening probability; confirm on sagittal reformats")
SR_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


@dataclass(frozen=True)
class NodeIdentity:
    manufacturer: str
    model_name: str
    software_version: str
    serial_number: str
    device_uid: str
    institution_name: str | None = None


def set_equipment(ds: Dataset, node: NodeIdentity) -> None:
    """The General Equipment identity every result object carries: model, serial number, software version, and
    the institution where configured (a source's own InstitutionName, copied in by a constructor, is kept)."""
    ds.ManufacturerModelName = node.model_name
    ds.DeviceSerialNumber = node.serial_number
    ds.SoftwareVersions = node.software_version
    if node.institution_name and "InstitutionName" not in ds:
        ds.InstitutionName = node.institution_name


def _coding_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "osteoscreen private codes"
    item.CodingSchemeResponsibleOrganization = "osteoscreen project"
    return item


LAB_GROUP = "Laboratory values found"  # every recent value of the patient's mapped analytes, model input or not


def model_lab_codes(labs: LabPanel) -> set[str]:
    """The LOINC codes of the values the fused model takes (pipeline.fused.tabular_input: per feature, the first
    of its codes present); PTH, TSH, urine values and a second vitamin D code are shown but not model inputs."""
    found = (model_lab(f, labs) for f in FEATURES if f.group == "labs")
    return {lab.loinc for lab in found if lab is not None}


def _lab_text(v: LabValue, model_input: bool = False) -> str:
    """One lab value as the radiologist reads it: value, unit, the lab's own flag, status if not final, date."""
    text = f"{v.name}{'*' if model_input else ''} {v.value:.4g} {v.unit}"  # as coded in the measurement
    if v.flags and v.flags.upper() not in ("N", "NORMAL"):
        text += f" [flag {v.flags}]"
    if v.status == "P":
        text += " (preliminary)"
    return text + (f" ({v.observed_at:%Y-%m-%d})" if v.observed_at else "")


def _tracking_uid(report_uid: str, identifier: str) -> str:
    """A measurement group's tracking UID, derived from the report's SOP Instance UID and the group: a job run
    again writes the same content items (random UIDs sent one SOP Instance UID with two contents)."""
    return generate_uid(entropy_srcs=[report_uid, identifier])  # (prefix=None would ignore the sources)


def _roi_group(m: BoneMeasurement, source_rc: np.ndarray | None, sop_class_uid: str,
               algorithm: hd.sr.AlgorithmIdentification | None, evaluations: list | None, report_uid: str
               ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One vertebra's trabecular ROI: SCOORD on its source slice, mean/SD HU, area, SNOMED finding site."""
    site = VERTEBRA_SITES.get(m.level)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        # (column, row) in the source image's pixel grid, pixel centres
        graphic_data=np.asarray(m.roi_polygon_rc if source_rc is None else source_rc)[:, ::-1] + 0.5,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=sop_class_uid,
            referenced_sop_instance_uid=m.sop_instance_uid,
            referenced_frame_numbers=[m.frame_number] if m.frame_number else None,
        ),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(report_uid, f"{m.level} trabecular ROI"),
                                                     identifier=f"{m.level} trabecular ROI"),
        referenced_region=region,
        finding_type=TRABECULAR_BONE,
        finding_category=CodedConcept("91723000", "SCT", "Anatomical structure"),
        finding_sites=[hd.sr.FindingSite(site)] if site else None,
        measurements=[
            hd.sr.Measurement(name=ATTENUATION, value=round(m.mean_hu, 1), unit=HU, derivation=MEAN),
            hd.sr.Measurement(name=ATTENUATION, value=round(m.sd_hu, 1), unit=HU, derivation=SD),
            hd.sr.Measurement(name=ATTENUATION, value=round(m.median_hu, 1), unit=HU, derivation=MEDIAN),
            hd.sr.Measurement(name=AREA, value=round(m.area_mm2, 1), unit=MM2),
            hd.sr.Measurement(name=VOXELS, value=m.n_pixels, unit=VOXEL_UNIT),
        ],
        qualitative_evaluations=evaluations or None,
        algorithm_id=algorithm,
    )


def _demographics_text(d: Demographics | None) -> str:
    if d is None:
        return "not available"
    parts = [f"age {int(d.age_years)} y" if d.age_years is not None else "age unknown",
             f"sex {d.sex}" if d.sex else "sex unknown"]
    if d.bmi is not None:
        parts.append(f"BMI {d.bmi:.1f} kg/m2")
    return ", ".join(parts) + "".join(f"; {note}" for note in d.notes)


def _dicom_dt(value: dt.datetime) -> str:
    return value.strftime("%Y%m%d%H%M%S")


def _shap_code(name: str, label: str) -> CodedConcept:
    return CodedConcept(f"OS-SHAP-{name}"[:16], PRIVATE_SCHEME, f"SHAP contribution: {label}"[:64])


def build_sr(
    *,
    source_header: Dataset,
    source_sop_instance_uid: str,
    demographics: Demographics | None,
    labs: LabPanel,
    node: NodeIdentity,
    series_uid: str,
    sop_uid: str,
    fused: FusedOutput | None = None,
    fused_model: tuple[str, str] | None = None,
    selection: SliceSelection | None = None,
    measurement: BoneMeasurement | None = None,
    attenuation: Prediction | None = None,
    image_note: str | None = None,
    quality_notes: Sequence[str] = (),
    roi_source_rc: np.ndarray | None = None,
    series_number: int = 9901,
    predecessor: tuple[str, str, str] | None = None,
    library_images: Sequence[Dataset] = (),
    not_screened_reason: str | None = None,
    adjacent: Sequence[tuple[BoneMeasurement, np.ndarray | None]] = (),
    attention: ReportedAttention | None = None,
    procedure: CodedConcept | None = None,
    title_note: str | None = None,
    fractures: Sequence[SuspectedFracture] = (),
    model_intended_use: str | None = None,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """The screening report. The ROI group is present when the image could be measured.

    ``library_images``: headers (no pixels) of the source images the report measured on, listed in the
    Image Library (modality, geometry) so a viewer can place the ROI without fetching them first.
    ``attention``: the attention of the model that made the result, outlined on the measured slice; only that
    model's own map is ever given here.
    """
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=node.device_uid,
            name="osteoscreen",
            manufacturer_name=node.manufacturer,
            model_name=node.model_name,
            serial_number=node.serial_number,
        ),
    )
    groups: list = []
    if measurement is not None and attenuation is not None:
        cv, cs, cm = attenuation.category_code
        groups.append(_roi_group(
            measurement, roi_source_rc, str(source_header.SOPClassUID),
            hd.sr.AlgorithmIdentification(name=attenuation.model_name, version=attenuation.model_version),
            [hd.sr.QualitativeEvaluation(ATTENUATION_CATEGORY, CodedConcept(cv, cs, cm))], sop_uid))
    for fracture in fractures:  # a finding in its own right, whatever the screening result
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_tracking_uid(sop_uid, f"Suspected compression fracture {fracture.level}"),
                identifier=f"Suspected compression fracture {fracture.level}"),
            finding_type=SUSPECTED_FRACTURE,
            finding_sites=[hd.sr.FindingSite(VERTEBRA_SITES.get(fracture.level, VERTEBRA))],
            measurements=[hd.sr.Measurement(name=DISC_TO_DISC_HEIGHT, value=round(fracture.height_mm, 1), unit=MM),
                          hd.sr.Measurement(name=HEIGHT_RATIO, value=round(fracture.ratio, 2), unit=RATIO)]))
    for other, other_rc in adjacent:  # T12 / L2 when confidently found: measurements only, no L1 threshold rule
        groups.append(_roi_group(other, other_rc, str(source_header.SOPClassUID), None, None, sop_uid))
    if fused is not None and fused_model is not None:
        alg = hd.sr.AlgorithmIdentification(name=fused_model[0], version=fused_model[1])
        cv, cs, cm = fused.category_code
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(sop_uid, "Fused screening model"), identifier="Fused screening model"),
            algorithm_id=alg,
            measurements=[
                hd.sr.Measurement(name=PROBABILITY, value=round(fused.probability, 4), unit=RATIO, algorithm_id=alg),
                hd.sr.Measurement(name=THRESHOLD, value=round(fused.threshold, 4), unit=RATIO),
            ],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(SCREENING_CATEGORY, CodedConcept(cv, cs, cm))],
        ))
        if attention is not None and measurement is not None:
            region, source_poly = attention.region, attention.source_polygon_rc
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(sop_uid, "Model attention region"), identifier="Model attention region"),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=np.asarray(source_poly)[:, ::-1] + 0.5,
                    source_image=hd.sr.SourceImageForRegion(
                        referenced_sop_class_uid=str(source_header.SOPClassUID),
                        referenced_sop_instance_uid=measurement.sop_instance_uid,
                        referenced_frame_numbers=[measurement.frame_number] if measurement.frame_number else None)),
                finding_type=ATTENTION_REGION,
                algorithm_id=alg,
                measurements=[hd.sr.Measurement(name=AREA, value=round(region.area_mm2, 1), unit=MM2),
                              hd.sr.Measurement(name=ATTENTION_SHARE, value=round(region.mass, 3), unit=RATIO)],
            ))
        if fused.explanation is not None and fused.explanation.features:
            labels = {f.name: f.label for f in FEATURES}
            shap = [hd.sr.Measurement(name=SHAP_BASE, value=round(fused.explanation.base_value, 5), unit=RATIO)]
            shap += [hd.sr.Measurement(name=_shap_code(n, labels[n]), value=round(v, 5), unit=RATIO)
                     for n, v in zip(fused.explanation.features, fused.explanation.contributions)]
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(sop_uid, "Model explanation (SHAP)"), identifier="Model explanation (SHAP)"),
                algorithm_id=alg, measurements=shap))
    lab_measurements = []
    for lab in labs.values:
        m = hd.sr.Measurement(
            name=CodedConcept(lab.loinc, "LN", lab.name[:64]),
            value=float(f"{lab.value:.4g}"),
            unit=CodedConcept(lab.unit, "UCUM", lab.unit),
        )
        if lab.observed_at:
            m[0].ObservationDateTime = _dicom_dt(lab.observed_at)
        lab_measurements.append(m)
    if lab_measurements:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(sop_uid, LAB_GROUP), identifier=LAB_GROUP),
            measurements=lab_measurements,
        ))
    if not_screened_reason:  # the coded statement that this series was seen and not screened
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(sop_uid, "Screening not performed"), identifier="Screening not performed"),
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(SCREENING_CATEGORY, NOT_SCREENED)]))

    def measurement_report(images: Sequence[Dataset] | None) -> hd.sr.MeasurementReport:
        return hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=procedure or codes.LN.CTUnspecifiedBodyRegion,
            imaging_measurements=groups,
            referenced_images=images,
        )

    try:
        report = measurement_report(list(library_images) or None)
    except (AttributeError, ValueError, TypeError):  # an image highdicom cannot describe: the library is optional
        if not library_images:
            raise
        report = measurement_report(None)
    texts = [title_note] if title_note else []
    texts += [f"FINDING: {f.text}. {FRACTURE_ADVICE}." for f in fractures]
    if not_screened_reason:
        texts.append("osteoscreen received this series but did not screen it: " + not_screened_reason
                     + ". No screening result is given for this study from this series.")
    if fused is not None and fused_model is not None:
        texts.append(
            f"Screening result ({fused_model[0]} {fused_model[1]}): probability {fused.probability:.3g}, "
            f"operating point {fused.threshold:.3g} -> {fused.category_label}. Modalities used: "
            f"{', '.join(fused.modalities)}."
            + (" Outside the training range: " + "; ".join(fused.input_notes) + "." if fused.input_notes else ""))
        if model_intended_use:
            texts.append(f"Model card ({fused_model[0]} {fused_model[1]}): {model_intended_use}")
        if fused.explanation is not None and fused.explanation.features:
            top = sorted(zip(fused.explanation.features, fused.explanation.contributions), key=lambda t: -abs(t[1]))
            labels = {f.name: f.label for f in FEATURES}
            texts.append("Largest SHAP contributions of the demographic and lab inputs (probability units; the "
                         "image, where used, is held as it is, so its effect is part of the base value): "
                         + "; ".join(f"{labels.get(n, n)} {v:+.3f}" for n, v in top[:6])
                         + f". Base value {fused.explanation.base_value:.3f}.")
    if attention is not None and fused_model is not None:
        region = attention.region
        texts.append(
            f"Model attention ({attention.method}) of {fused_model[0]} {fused_model[1]}: {region.mass:.0%} of it lies "
            f"in the outlined region ({region.area_mm2:.0f} mm2) on the measured slice"
            + (f"; its centre is {attention.roi_distance_mm:.0f} mm from the centre of the {measurement.level} ROI"
               if measurement is not None and attention.roi_distance_mm is not None else "")
            + ". It shows where the model looked, not a finding.")
    if measurement is not None and attenuation is not None:
        texts.append(
            f"{measurement.level} trabecular mean {measurement.mean_hu:.1f} HU (SD {measurement.sd_hu:.1f}, median "
            f"{measurement.median_hu:.1f}; {measurement.n_pixels} voxels on {measurement.n_slices} slice(s), ROI "
            f"{measurement.area_mm2:.0f} mm2 on the slice shown); {attenuation.model_name} {attenuation.model_version}: "
            f"{attenuation.category_label} (" + ", ".join(f"{k}={v:g}" for k, v in attenuation.thresholds.items())
            + ").")
    for other, _ in adjacent:
        texts.append(f"{other.level} trabecular mean {other.mean_hu:.1f} HU (SD {other.sd_hu:.1f}, ROI "
                     f"{other.area_mm2:.0f} mm2), measured the same way for comparison; the threshold rule applies "
                     "to L1 only.")
    if selection is not None:
        texts.append(f"Slice selection: {selection.method}, level {selection.level}, anchor {selection.anchor}, "
                     f"confidence {selection.confidence:.2f}" + (f"; {selection.note}" if selection.note else "") + ".")
    if image_note:
        texts.append(f"Image not used: {image_note}.")
    texts.extend(quality_notes)
    inputs = model_lab_codes(labs) if fused is not None and "labs" in fused.modalities else set()
    texts.append(
        ("Laboratory values found (* = an input of the screening model): " if inputs else
         "Laboratory values found (none used by a model here): " if labs.values else "Laboratory values: ")
        + ("; ".join(_lab_text(v, v.loinc in inputs) for v in labs.values)
           if labs.values else "none available in the look-back window")
        + (". Not used: " + "; ".join(f"{e.name}: {e.reason}" for e in labs.excluded) if labs.excluded else "")
        + (". " + "; ".join(labs.notes) if labs.notes else "")
        + ".")
    texts.append("Demographics (from the image header): " + _demographics_text(demographics) + ".")
    texts.append(DISCLAIMER)
    root = report[0]
    for text in texts:
        root.ContentSequence.append(
            hd.sr.TextContentItem(name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    evidence = Dataset()
    for kw in ("SpecificCharacterSet", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
               "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime", "AccessionNumber",
               "ReferringPhysicianName", "IssuerOfPatientID", "PatientAge"):
        if kw in source_header:
            setattr(evidence, kw, source_header.get(kw))
    evidence.SOPInstanceUID = source_sop_instance_uid
    evidence_items = [evidence]
    for other, _ in adjacent:  # the slices the T12/L2 ROIs are drawn on
        if other.sop_instance_uid != source_sop_instance_uid:
            item = copy.deepcopy(evidence)
            item.SOPInstanceUID = other.sop_instance_uid
            evidence_items.append(item)
    previous = None
    if predecessor is not None:  # an earlier version of this study's report: viewers show the latest
        previous = Dataset()
        previous.SOPClassUID = SR_CLASS_UID
        previous.StudyInstanceUID, previous.SeriesInstanceUID, previous.SOPInstanceUID = predecessor
        texts_pre = f"This report replaces an earlier osteoscreen report for this study (SOP {predecessor[2]})."
        root.ContentSequence.append(hd.sr.TextContentItem(
            name=COMMENT, value=texts_pre, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence_items,
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=node.manufacturer,
        institution_name=node.institution_name or None,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[previous] if previous is not None else None,
    )
    sr.SeriesDescription = ("osteoscreen L1 screening report (research use)" if procedure is None
                            else "osteoscreen chest radiograph report (EXPERIMENTAL)")
    set_equipment(sr, node)
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_identification()]
    copy_patient_study_extras(sr, source_header)  # StudyDescription etc., as the SC, KOS and GSPS carry them
    return sr
