"""Acknowledgements: original mode (AA/AE/AR) and enhanced mode (accept CA/CE/CR, application AA/AE).

A message is in enhanced mode when MSH-15 (accept acknowledgement type) or
MSH-16 (application acknowledgement type) is valued. Then MSH-15 says when an
accept ACK is sent (AL always, NE never, ER on error only, SU on success only;
empty means AL), and MSH-16 likewise for the application ACK (empty means NE).
Every ACK carries the reason in MSA-3.
"""
from __future__ import annotations

import datetime as dt
import itertools
import os

from hl7.precheck import MessageHeader

_counter = itertools.count(1)

ACCEPT_CODE = {"AA": "CA", "AE": "CE", "AR": "CR"}  # original-mode outcome -> enhanced accept ACK


def is_enhanced(header: MessageHeader | None) -> bool:
    return header is not None and bool(header.accept_ack_type or header.application_ack_type)


def ack_wanted(condition: str, success: bool, *, default: str) -> bool:
    """Whether an MSH-15/16 condition (AL, NE, ER, SU) asks for an ACK with this outcome."""
    condition = (condition or default).upper()
    if condition == "NE":
        return False
    if condition == "ER":
        return not success
    if condition == "SU":
        return success
    return True  # AL, or an unknown value: answering is the safe side


def escape(text: str, fs: str = "|", enc: str = "^~\\&") -> str:
    """HL7 escape sequences for the delimiters in free text."""
    cs, rs, esc, sub = enc[0], enc[1], enc[2], enc[3]
    out = text.replace(esc, f"{esc}E{esc}")
    for ch, code in ((fs, "F"), (cs, "S"), (rs, "R"), (sub, "T")):
        out = out.replace(ch, f"{esc}{code}{esc}")
    return out.replace("\r", " ").replace("\n", " ")


ERROR_TEXT = {
    100: "Segment sequence error",
    101: "Required field missing",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    203: "Unsupported version id",
    205: "Duplicate key identifier",
    207: "Application internal error",
}


def _echoed(header: MessageHeader | None, n: int, fallback: str, fs: str, enc: str) -> str:
    """MSH-n of the message as sent (components and escapes untouched: it is already in this encoding),
    else ``fallback`` escaped."""
    raw = header.raw_field(n).strip() if header else ""
    return raw or escape(fallback, fs, enc)


def build_ack(code: str, text: str, header: MessageHeader | None, *, error_code: int = 207,
              application: str = "OSTEOSCREEN", facility: str = "") -> bytes:
    """An ACK for ``header`` (or for an unreadable message when ``header`` is None).

    MSH-3/4 echo the message's MSH-5/6, MSH-5/6 its MSH-3/4 and MSA-2 its MSH-10, each verbatim, so a
    sender matching on them (hierarchic designators with components, escapes) finds them unchanged."""
    fs, enc = (header.field_sep, header.encoding) if header else ("|", "^~\\&")
    now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    control = f"OS{os.getpid()}{next(_counter):06d}"
    version = header.version if header and header.version else "2.5.1"
    trigger = header.trigger_event if header else ""
    msh = fs.join([
        "MSH", enc,
        _echoed(header, 5, application, fs, enc),
        _echoed(header, 6, facility, fs, enc),
        _echoed(header, 3, "", fs, enc),
        _echoed(header, 4, "", fs, enc),
        now, "", f"ACK{enc[0]}{trigger}{enc[0]}ACK" if trigger else "ACK",
        control, header.processing_id if header and header.processing_id else "P", version,
    ])
    msa = fs.join(["MSA", code, _echoed(header, 10, "", fs, enc), escape(text[:200], fs, enc)])
    segments = [msh, msa]
    if code not in ("AA", "CA"):
        cs, sub = enc[0], enc[3]
        label = ERROR_TEXT.get(error_code, "Application error")
        if version in ("2.3", "2.3.1", "2.4"):  # ERR-1: error code and location (ELD)
            segments.append(fs.join(["ERR", f"{cs}{cs}{cs}{error_code}{sub}{label}{sub}HL70357"]))
        else:  # ERR-3 HL7 error code, ERR-4 severity, ERR-8 user message
            segments.append(fs.join(["ERR", "", "", f"{error_code}{cs}{label}{cs}HL70357", "E", "", "", "",
                                     escape(text[:200], fs, enc)]))
    return ("\r".join(segments) + "\r").encode("latin-1", errors="replace")
