"""Full parse of a stored ORU^R01 with hl7apy (after the ACK) into observation rows."""
from __future__ import annotations

import datetime as dt

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from hl7.loinc import UnitError, canonical_code, to_canonical
from hl7.precheck import split_segments

FINAL_STATUSES = {"F", "C", "A", ""}  # final, corrected, amended; empty is treated as final


def parse_hl7_datetime(text: str) -> dt.datetime | None:
    """HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) -> naive local datetime; None if unreadable."""
    t = text.strip()
    if not t:
        return None
    for sign in ("+", "-"):
        if sign in t[8:]:
            t = t[: 8 + t[8:].index(sign)]
    t = t.split(".")[0]
    fmts = {4: "%Y", 6: "%Y%m", 8: "%Y%m%d", 10: "%Y%m%d%H", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    fmt = fmts.get(len(t))
    if not fmt:
        return None
    try:
        return dt.datetime.strptime(t, fmt)
    except ValueError:
        return None


def _value(field) -> str:
    try:
        return field.to_er7() if field is not None else ""
    except Exception:  # noqa: BLE001 - hl7apy raises varied errors on odd content
        return ""


def parse_observations(raw: bytes) -> list[dict]:
    """OBX rows with mapped LOINC and canonical value where possible; a problem is recorded per row."""
    text = raw.decode("latin-1")
    er7 = "\r".join(split_segments(text))
    msg = parse_message(er7, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    enc_cs = msg.msh.msh_2.value[0] if msg.msh.msh_2.value else "^"
    obr_time = None
    rows: list[dict] = []
    seq = 0
    for seg in msg.children:
        name = seg.name
        if name == "OBR":
            obr_time = parse_hl7_datetime(_value(seg.obr_7).split(enc_cs)[0])
            continue
        if name != "OBX":
            continue
        seq += 1
        ident = _value(seg.obx_3).split(enc_cs)
        code = ident[0] if ident else ""
        text_name = ident[1] if len(ident) > 1 else ""
        system = ident[2] if len(ident) > 2 else ""
        value_type = _value(seg.obx_2)
        value_text = _value(seg.obx_5)
        unit_text = _value(seg.obx_6).split(enc_cs)[0]
        status = _value(seg.obx_11).strip().upper()
        observed = parse_hl7_datetime(_value(seg.obx_14).split(enc_cs)[0]) or obr_time
        loinc = canonical_code(code, system)
        value = unit = problem = None
        if loinc is None and len(ident) > 5 and ident[5].upper() in ("LN", "LOINC"):
            loinc = canonical_code(ident[3], ident[5])  # alternate identifier is LOINC
        if loinc is None:
            problem = "not a LOINC code used by osteoscreen"
        elif status not in FINAL_STATUSES:
            problem = f"result status {status} is not final"
        elif value_type and value_type not in ("NM", "SN", "ST", "TX"):
            problem = f"value type {value_type} is not numeric"
        else:
            try:
                number = float(value_text.replace(enc_cs, "").strip().lstrip("=<>").strip())
                value, unit = to_canonical(loinc, number, unit_text)
            except UnitError as exc:
                problem = str(exc)
            except ValueError:
                problem = f"value {value_text!r} is not a number"
        rows.append({
            "seq": seq, "code": code, "code_system": system, "name": text_name or code, "loinc": loinc,
            "value_text": value_text, "unit_text": unit_text, "value": value, "unit": unit, "status": status,
            "observed_at": observed.isoformat() if observed else None, "problem": problem,
        })
    return rows
