"""Receipt of ORU messages: check, store durably, acknowledge. Nothing else on this path.

The full hl7apy parse (tens of milliseconds per message) runs elsewhere: in a
background parser process and, on demand, when a job looks up a patient's labs.
"""
from __future__ import annotations

import logging

from hl7.ack import build_ack
from hl7.precheck import PrecheckError, parse_header
from hl7.store import DuplicateConflict, LabStore

log = logging.getLogger("osteoscreen.hl7")


class LabReceiver:
    """The MLLP handler: AA only after the raw message is committed."""

    def __init__(self, store: LabStore) -> None:
        self.store = store

    def refuse(self, reason: str) -> bytes:
        return build_ack("AR", reason, None)

    def handle(self, raw: bytes) -> bytes:
        text = raw.decode("latin-1")
        try:
            header = parse_header(text)
        except PrecheckError as exc:
            log.warning("HL7 message refused (%s): %s", exc.code, exc.text)
            return build_ack(exc.code, exc.text, exc.header, error_code=exc.error_code)
        try:
            outcome = self.store.store_message(raw, header)
        except DuplicateConflict as exc:
            log.warning("HL7 message refused (AE): %s", exc)
            return build_ack("AE", str(exc), header, error_code=205)
        except Exception as exc:  # noqa: BLE001 - storage failure: say so, never AA
            log.exception("HL7 message %s could not be stored", header.control_id)
            return build_ack("AE", f"message not stored: {exc}", header)
        if outcome.duplicate:
            log.info("HL7 message %s from %s is a duplicate; already stored", header.control_id, header.sender)
            return build_ack("AA", "duplicate of a stored message", header)
        log.debug("HL7 %s^%s %s from %s stored as message %d", header.message_type, header.trigger_event,
                  header.control_id, header.sender, outcome.message_id)
        return build_ack("AA", "stored", header)
