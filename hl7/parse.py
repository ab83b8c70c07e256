"""Full parse of a stored result message with hl7apy (after the ACK) into observation rows.

Rows keep what the OBX said (identifiers, value, unit, status, flags, time) so the
lookup can apply the current mapping table and status policy; the mapped value
stored with each row is what the table made of it at parse time.
"""
from __future__ import annotations

import datetime as dt

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from hl7.mapping import DEFAULT, LabMapping
from hl7.er7 import unescape
from hl7.precheck import split_segments


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


def _repetitions(field) -> list[str]:
    try:
        return [rep.to_er7() for rep in field]
    except Exception:  # noqa: BLE001
        return []


def parse_observations(raw: bytes, mapping: LabMapping = DEFAULT) -> list[dict]:
    """OBX rows of any result message (ORU^R01, RSP^K11, ORF^R04), mapped where the table allows."""
    text = raw.decode("latin-1")
    er7 = "\r".join(split_segments(text))
    fs = er7[3:4]
    if fs and er7.startswith("MSH"):  # HL7 2.7's truncation character (a 5th encoding character): hl7apy refuses
        encoding, _, rest = er7[4:].partition(fs)  # it, and nothing here truncates values, so it is dropped
        if len(encoding) == 5:
            er7 = "MSH" + fs + encoding[:4] + fs + rest
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
        ident = _value(seg.obx_3).split(enc_cs) + [""] * 6
        code, text_name, system, alt_code, alt_system = ident[0], ident[1], ident[2], ident[3], ident[5]
        value_type = _value(seg.obx_2).strip().upper()
        value_text = _value(seg.obx_5)
        unit_text = unescape(_value(seg.obx_6).split(enc_cs)[0], msg.msh.msh_2.value or "^~\\&")
        flags = "~".join(f.split(enc_cs)[0].strip() for f in _repetitions(seg.obx_8) if f.strip())
        status = _value(seg.obx_11).strip().upper()
        observed = parse_hl7_datetime(_value(seg.obx_14).split(enc_cs)[0]) or obr_time
        found = mapping.interpret(code, system, alt_code, alt_system, value_type, value_text, unit_text)
        rows.append({
            "seq": seq, "code": code, "code_system": system, "alt_code": alt_code, "alt_system": alt_system,
            "name": text_name or code, "loinc": found.loinc, "value_type": value_type, "value_text": value_text,
            "unit_text": unit_text, "value": found.value, "unit": found.unit, "abnormal_flags": flags,
            "status": status, "observed_at": observed.isoformat() if observed else None, "problem": found.problem,
        })
    return rows
