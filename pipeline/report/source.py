"""The source image's header made fit for the result objects' constructors (highdicom copies the patient and
study from it): every result must name the same patient, in the same character set, as the image it reports on."""
from __future__ import annotations

import copy
import re
import warnings

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, IS, TM, DSfloat

# Patient and study attributes that are Type 2 in the result objects: absent in some headers (anonymised,
# unknown age), present and empty in the results.
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Optional patient and study attributes that highdicom's SC and KOS constructors leave out; a PACS that keys
# patients on ID + issuer files an object without its issuer apart from the study.
PATIENT_STUDY_EXTRAS = ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientAge", "PatientSize",
                        "PatientWeight", "StudyDescription")


def _with_default_repertoire(charset: object) -> object:
    """``\\ISO 2022 IR 87`` (an empty first value: the default repertoire, as PS3.3 C.12.1.1.2 allows) spelt out
    as ``ISO 2022 IR 6\\ISO 2022 IR 87``, which highdicom's validating constructors accept."""
    values = [charset] if isinstance(charset, str) else list(charset or [])
    if len(values) > 1 and not values[0]:  # a single empty value is just the default repertoire: left alone
        values[0] = "ISO 2022 IR 6"
        return values
    return charset


_CHECKED_VRS = {"DA": DA, "TM": TM, "DT": DT, "DS": DSfloat, "IS": IS}
_AGE = re.compile(r"^\d{3}[DWMY]$")


def _conforms(vr: str, value: object) -> bool:
    """Whether a single value of ``vr`` is one the result constructors accept (pydicom converts DA, TM, DT, DS, IS
    values, and refuses a value such as '1958-03-12': the whole job used to fail, the value in its error text)."""
    if value in (None, ""):
        return True
    if vr == "AS":
        return bool(_AGE.match(str(value)))
    convert = _CHECKED_VRS.get(vr)
    if convert is None:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom warns (logging the value) where it does not raise
            convert(str(value))
    except Exception:  # noqa: BLE001 - ValueError, or the warning raised above
        return False
    return True


def report_source(header: Dataset, sop_instance_uid: str | None = None) -> Dataset:
    """A copy of ``header`` for the result constructors: Type 2 patient/study attributes present, the character
    set spelt out, and ``sop_instance_uid`` (the measured slice) as its SOP Instance UID when given. A copied
    patient/study value that does not conform to its VR (a birth date written 1958-03-12) is left empty (Type 2)
    or out, rather than fail the job."""
    src = copy.deepcopy(header)  # Dataset.copy() is shallow: setting attributes on it would change ``header``
    if sop_instance_uid:
        src.SOPInstanceUID = sop_instance_uid
    for kw in (*TYPE2_PATIENT_STUDY, *PATIENT_STUDY_EXTRAS):
        elem = src.get(kw) if kw in src else None
        if elem is None:
            continue
        raw = src[kw]
        values = raw.value if raw.VM > 1 else [raw.value]
        if not all(_conforms(raw.VR, v) for v in values):
            if kw in TYPE2_PATIENT_STUDY:
                raw.value = ""
            else:
                del src[kw]
    for kw in TYPE2_PATIENT_STUDY:
        if kw not in src:
            setattr(src, kw, "")
    if "SpecificCharacterSet" in src:
        src.SpecificCharacterSet = _with_default_repertoire(src.SpecificCharacterSet)
    return src


def copy_patient_study_extras(target: Dataset, source: Dataset) -> None:
    """The optional patient and study attributes of ``source`` that ``target`` lacks (see PATIENT_STUDY_EXTRAS)."""
    for kw in PATIENT_STUDY_EXTRAS:
        if kw in source and kw not in target:
            setattr(target, kw, source.get(kw))
