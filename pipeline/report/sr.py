"""TID 1500 Comprehensive 3D SR for one screening result (built with highdicom)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from hl7.panel import LabPanel
from pipeline.bone import BoneMeasurement
from pipeline.demographics import Demographics
from pipeline.report.notice import DISCLAIMER
from pipeline.screening import Prediction
from pipeline.selection import SliceSelection

PRIVATE_SCHEME = "99OSTEOSCREEN"
HU = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
MM2 = CodedConcept("mm2", "UCUM", "square millimeter")
MEAN = CodedConcept("373098007", "SCT", "Mean")
SD = CodedConcept("386136009", "SCT", "Standard Deviation")
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
COMMENT = CodedConcept("121106", "DCM", "Comment")


@dataclass(frozen=True)
class NodeIdentity:
    manufacturer: str
    model_name: str
    software_version: str
    serial_number: str
    device_uid: str
    institution_name: str | None = None


def _coding_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "osteoscreen private codes"
    item.CodingSchemeResponsibleOrganization = "osteoscreen project"
    return item


def _demographics_text(d: Demographics | None) -> str:
    if d is None:
        return "not available"
    parts = [f"age {d.age_years:.0f} y" if d.age_years is not None else "age unknown",
             f"sex {d.sex}" if d.sex else "sex unknown"]
    if d.bmi is not None:
        parts.append(f"BMI {d.bmi:.1f} kg/m2")
    return ", ".join(parts)


def _dicom_dt(value: dt.datetime) -> str:
    return value.strftime("%Y%m%d%H%M%S")


def build_sr(
    *,
    source_header: Dataset,
    demographics: Demographics | None = None,
    selection: SliceSelection,
    measurement: BoneMeasurement,
    prediction: Prediction,
    labs: LabPanel,
    node: NodeIdentity,
    series_uid: str,
    sop_uid: str,
    series_number: int = 9901,
) -> hd.sr.Comprehensive3DSR:
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
    algorithm = hd.sr.AlgorithmIdentification(name=prediction.model_name, version=prediction.model_version)
    site = VERTEBRA_SITES.get(measurement.level)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(measurement.roi_polygon_rc)[:, ::-1] + 0.5,  # (column, row), pixel centres
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source_header.SOPClassUID),
            referenced_sop_instance_uid=measurement.sop_instance_uid,
        ),
    )
    measurements = [
        hd.sr.Measurement(name=ATTENUATION, value=round(measurement.mean_hu, 1), unit=HU, derivation=MEAN,
                          algorithm_id=algorithm),
        hd.sr.Measurement(name=ATTENUATION, value=round(measurement.sd_hu, 1), unit=HU, derivation=SD,
                          algorithm_id=algorithm),
        hd.sr.Measurement(name=AREA, value=round(measurement.area_mm2, 1), unit=MM2),
    ]
    value_value, value_scheme, value_meaning = prediction.category_code
    roi_group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{measurement.level} trabecular ROI"
        ),
        referenced_region=region,
        finding_type=CodedConcept("91747007", "SCT", "Lumen of vertebral body"),
        finding_category=CodedConcept("91723000", "SCT", "Anatomical structure"),
        finding_sites=[hd.sr.FindingSite(site)] if site else None,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=SCREENING_CATEGORY,
                value=CodedConcept(value_value, value_scheme, value_meaning),
            )
        ],
    )
    groups: list = [roi_group]
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
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Laboratory values used"),
                measurements=lab_measurements,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    root = report[0]
    text_items = [
        f"Screening rule/model: {prediction.model_name} {prediction.model_version}. "
        f"Category: {prediction.category_label}. "
        f"{measurement.level} trabecular mean {measurement.mean_hu:.0f} HU (SD {measurement.sd_hu:.0f}, "
        f"ROI {measurement.area_mm2:.0f} mm2). Thresholds: "
        + ", ".join(f"{k}={v:g}" for k, v in prediction.thresholds.items())
        + f". Modalities used: {', '.join(prediction.modalities_used)}.",
        f"Slice selection: {selection.method}, level {selection.level}, anchor {selection.anchor}, "
        f"confidence {selection.confidence:.2f}.",
        "Laboratory values: "
        + ("; ".join(f"{v.name} {v.value:g} {v.unit} ({v.observed_at:%Y-%m-%d})" if v.observed_at
                     else f"{v.name} {v.value:g} {v.unit}" for v in labs.values)
           if labs.values else "none available in the look-back window")
        + (". Not used: " + "; ".join(f"{e.name}: {e.reason}" for e in labs.excluded) if labs.excluded else "")
        + ". Labs are reported, not yet used by the screening rule.",
        "Demographics (from the image header): " + _demographics_text(demographics)
        + ". Reported, not yet used by the screening rule.",
        DISCLAIMER,
    ]
    for text in text_items:
        root.ContentSequence.append(
            hd.sr.TextContentItem(name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        )
    evidence = Dataset()
    for kw in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
               "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime", "AccessionNumber",
               "ReferringPhysicianName", "IssuerOfPatientID", "PatientAge"):
        if kw in source_header:
            setattr(evidence, kw, source_header.get(kw))
    evidence.SOPInstanceUID = measurement.sop_instance_uid
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=node.manufacturer,
        institution_name=node.institution_name or None,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = "osteoscreen L1 screening report (research use)"
    sr.SoftwareVersions = node.software_version
    sr.ManufacturerModelName = node.model_name
    sr.DeviceSerialNumber = node.serial_number
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_identification()]
    return sr
