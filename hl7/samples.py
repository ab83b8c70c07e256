"""The demo lab message (an invented ORU^R01 for the fictitious demo patient), used by the demo, the HL7
bench and the tests. Kept in hl7/ so that hl7 needs nothing from dicom_node.

hl7/demo_oru.hl7 was written for osteoscreen following the structure of the public
sample messages in microsoft/FHIR-Converter (MIT); its values are invented.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

TEMPLATE = Path(__file__).with_name("demo_oru.hl7")


def demo_oru_message(when: dt.datetime, control_id: str = "DEMO0001") -> bytes:
    """The demo ORU^R01 with CR segment separators, observed the day before ``when``."""
    template = TEMPLATE.read_text(encoding="ascii")
    obs = (when - dt.timedelta(days=1)).strftime("%Y%m%d%H%M")
    text = template.format(msg_time=when.strftime("%Y%m%d%H%M%S"), control_id=control_id, obs_time=obs)
    return "\r".join(line for line in text.splitlines() if line).encode("ascii") + b"\r"
