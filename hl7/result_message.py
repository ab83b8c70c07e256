"""The follow-up result message: one ORU^R01 per screening result, for the RIS/EHR where care coordinators work.

It carries the patient identity and accession number from the image, the coded
screening category, the probability, the measured attenuation, a recommendation
(configurable wording) when the screen is positive, and the research-use notice.
Codes: the screening concepts are osteoscreen private codes (99OSTEOSCREEN, as in
the SR), the attenuation is DICOM's 112031 in UCUM [hnsf'U].
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from hl7.er7 import escape

PRIVATE = "99OSTEOSCREEN"


@dataclass(frozen=True)
class ScreeningReport:
    """What the message says; plain fields, filled by the service from the image header and the job result."""

    control_id: str
    patient_id: str
    issuer: str
    patient_name: str  # DICOM PN (family^given)
    birth_date: str  # YYYYMMDD or ""
    sex: str
    accession_number: str
    study_uid: str
    study_datetime: str  # YYYYMMDD[HHMMSS]
    category_id: str  # screen_positive / screen_negative
    category_label: str
    probability: float
    threshold: float
    model: str
    level: str | None = None
    mean_hu: float | None = None
    sr_sop_instance_uid: str = ""
    recommendation: str = ""
    notice: str = ""
    corrected: bool = False  # replaces an earlier result message for the study: result status C, not F


def _charset(text: str, version: str) -> tuple[str, str]:
    """(MSH-18, Python codec) for the message text: none for ASCII (HL7's default), else ISO 8859-1 where it
    holds every character, else UTF-8; declared, so the receiver never has to guess. "UNICODE UTF-8" exists
    from HL7 v2.5: an older version gets ISO 8859-1, the characters it lacks replaced by '?'."""
    if text.isascii():
        return "", "ascii"
    try:
        text.encode("latin-1")
        return "8859/1", "latin-1"
    except UnicodeEncodeError:
        if tuple(int(p) for p in version.split(".")[:2]) < (2, 5):
            return "8859/1", "latin-1"
        return "UNICODE UTF-8", "utf-8"


def _hl7_name(dicom_pn: str) -> str:
    """A DICOM PN's alphabetic group as XPN components (family^given^middle^suffix^prefix); its ideographic and
    phonetic groups (after '=') have no place in PID-5's first repetition."""
    return dicom_pn.split("=", 1)[0]


def build_result_message(r: ScreeningReport, *, sending_application: str, sending_facility: str,
                         receiving_application: str, receiving_facility: str, version: str = "2.5.1",
                         now: dt.datetime | None = None) -> bytes:
    """An ORU^R01 in original acknowledgement mode (the receiver answers AA/AE/AR)."""
    now = now or dt.datetime.now()
    ts = now.strftime("%Y%m%d%H%M%S")
    e = escape
    status = "C" if r.corrected else "F"
    pid3 = e(r.patient_id) + (f"^^^{e(r.issuer)}^MR" if r.issuer else "^^^^MR")
    segs = [
        "|".join(["MSH", "^~\\&", e(sending_application), e(sending_facility), e(receiving_application),
                  e(receiving_facility), ts, "", "ORU^R01^ORU_R01", e(r.control_id), "P", version]),
        f"PID|1||{pid3}||{'^'.join(e(part) for part in _hl7_name(r.patient_name).split('^'))}||{e(r.birth_date)}|"
        f"{e(r.sex)}",
        "|".join(["OBR", "1", "", e(r.accession_number), f"OS-SCREEN^Opportunistic osteoporosis screening^{PRIVATE}",
                  "", "", e(r.study_datetime)] + [""] * 10 + [e(r.accession_number)] + [""] * 3 + [ts, "", "CT", status]),
    ]
    obx: list[str] = [
        f"CWE|OS0001^Opportunistic osteoporosis screening category^{PRIVATE}||"
        f"{e(r.category_id)}^{e(r.category_label)}^{PRIVATE}||||||F",
        f"NM|OS0002^Probability of osteoporosis (femoral neck T-score <= -2.5)^{PRIVATE}||{r.probability:.4g}|"
        f"{{ratio}}^ratio^UCUM|<{r.threshold:.4g}|{'A' if r.category_id == 'screen_positive' else 'N'}|||F",
    ]
    if r.mean_hu is not None and r.level:
        obx.append(f"NM|112031^Attenuation Coefficient ({e(r.level)} trabecular)^DCM||{r.mean_hu:.1f}|"
                   "[hnsf'U]^Hounsfield unit^UCUM|||||F")
    if r.recommendation and r.category_id == "screen_positive":
        obx.append(f"TX|OS0006^Recommendation^{PRIVATE}||{e(r.recommendation)}||||||F")
    obx.append(f"ST|OS0007^Screening model^{PRIVATE}||{e(r.model)}||||||F")
    if r.sr_sop_instance_uid:
        obx.append(f"ST|OS0008^Report (DICOM SR SOP Instance UID)^{PRIVATE}||{e(r.sr_sop_instance_uid)}||||||F")
    if r.notice:
        obx.append(f"TX|OS0009^Notice^{PRIVATE}||{e(r.notice)}||||||F")
    obx = [body[:-1] + status if body.endswith("|F") else body for body in obx]
    segs += [f"OBX|{i}|{body}|||{ts}" if body.endswith("|" + status) else f"OBX|{i}|{body}"
             for i, body in enumerate(obx, 1)]
    text = "\r".join(segs) + "\r"
    msh18, codec = _charset(text, version)
    if msh18:  # MSH-13..17 empty, MSH-18 the character set
        msh, rest = text.split("\r", 1)
        text = msh + "|" * 6 + msh18 + "\r" + rest
    return text.encode(codec, errors="replace")
