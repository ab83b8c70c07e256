"""Receipt of ORU messages: check, store durably, acknowledge. Nothing else on this path.

The full hl7apy parse (tens of milliseconds per message) runs elsewhere: in a
background parser process and, on demand, when a job looks up a patient's labs.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable

from hl7.ack import ACCEPT_CODE, ack_wanted, build_ack, is_enhanced
from hl7.mapping import DEFAULT, LabMapping
from hl7.parse import parse_observations
from hl7.precheck import MessageHeader, PrecheckError, parse_header
from hl7.store import DuplicateConflict, LabStore
from pipeline.durable import disk_shortage

log = logging.getLogger("osteoscreen.hl7")


def low_space_check(directory: str | Path, min_free_bytes: int) -> Callable[[], str | None] | None:
    """A check that names the shortage while ``directory`` has less free space than ``min_free_bytes`` (the
    node's ``[node] min_free_mb``, which guards the whole state directory); None when the watermark is 0."""
    if min_free_bytes <= 0:
        return None

    def check() -> str | None:
        shortage = disk_shortage(directory, min_free_bytes)
        return f"{shortage} ([node] min_free_mb)" if shortage else None
    return check


class LabReceiver:
    """The MLLP handler: AA (or CA) only after the raw message is committed.

    ``handle`` returns the ACK frames to send, in order: one in original mode; in
    enhanced mode the accept ACK and/or the application ACK, as MSH-15/16 ask, or
    none. The application ACK (requested by MSH-16) follows the accept ACK on the
    same connection, after the message has been parsed: AA when its observations
    were read, AE with the parse error otherwise.
    """

    def __init__(self, store: LabStore, mapping: LabMapping = DEFAULT, allowed_senders: list[str] | None = None,
                 low_space: Callable[[], str | None] | None = None) -> None:
        """``low_space``: names a disk shortage (``low_space_check``); while it does, messages get AR (resend
        later) instead of filling the disk the received CT, the jobs and the results need."""
        self.store = store
        self.low_space = low_space
        self.mapping = mapping
        self.allowed_senders = list(allowed_senders or [])  # hl7.allowed_senders: "APP" or "APP|FACILITY", upper
        self.ack_counts: Counter[str] = Counter()  # ACK code -> messages answered (read by the metrics endpoint)

    def sender_allowed(self, header: MessageHeader) -> bool:
        """MSH-3 (namespace ID), and MSH-4 where the entry names a facility, against ``allowed_senders``."""
        if not self.allowed_senders:
            return True
        app = header.sending_application.split("^")[0].strip().upper()
        facility = header.sending_facility.split("^")[0].strip().upper()
        return app in self.allowed_senders or f"{app}|{facility}" in self.allowed_senders

    @staticmethod
    def needs_parse(raw: bytes) -> bool:
        """Whether handling ``raw`` includes the full parse (MSH-16 asks for an application ACK): slow work."""
        end = raw.find(b"\r")
        msh = raw[: end if end >= 0 else len(raw)].split(b"\n")[0]
        if len(msh) < 4:
            return False
        fields = msh.split(msh[3:4])
        return len(fields) > 15 and fields[15].strip().upper() not in (b"", b"NE")

    def refuse(self, reason: str, message: bytes | None = None, code: str = "AR") -> bytes | list[bytes]:
        """A negative ACK (AR by default; AE for a message too large) for a message not handled (too big, or the
        handler failed); it answers the message's own control ID (MSA-2), sender and ACK mode whenever its header
        (``message`` may be just its MSH segment) can be read, so the sender can match it."""
        header = None
        if message is not None:
            try:
                header = parse_header(message.decode("latin-1"))
            except PrecheckError as exc:
                header = exc.header
            except Exception:  # noqa: BLE001 - an unreadable header: the ACK cannot name the message
                header = None
        if header is None:
            self.ack_counts[code] += 1
            return build_ack(code, reason, None)
        return self._accept(code, reason, header)

    def _accept(self, code: str, text: str, header: MessageHeader | None, error_code: int = 207) -> list[bytes]:
        self.ack_counts[ACCEPT_CODE[code] if is_enhanced(header) else code] += 1
        if not is_enhanced(header):
            return [build_ack(code, text, header, error_code=error_code)]
        assert header is not None
        if ack_wanted(header.accept_ack_type, code == "AA", default="AL"):
            return [build_ack(ACCEPT_CODE[code], text, header, error_code=error_code)]
        return []

    def handle(self, raw: bytes) -> list[bytes]:
        text = raw.decode("latin-1")
        try:
            header = parse_header(text)
        except PrecheckError as exc:
            log.warning("HL7 message refused (%s): %s", exc.code, exc.text)
            return self._accept(exc.code, exc.text, exc.header, exc.error_code)
        if not self.sender_allowed(header):
            # anyone who reached the port could otherwise store results for any patient, or take a real
            # message's control ID first so that the real one is refused as a conflicting duplicate
            text = f"sender {header.sender} is not in hl7.allowed_senders: message not stored"
            log.warning("HL7 message %s refused (AE): %s", header.control_id, text)
            return self._accept("AE", text, header)
        shortage = self.low_space() if self.low_space is not None else None
        if shortage:
            log.warning("HL7 message %s refused (AR, resend later): %s", header.control_id, shortage)
            return self._accept("AR", f"message not stored, resend later: {shortage}", header)
        try:
            outcome = self.store.store_message(raw, header)
        except DuplicateConflict as exc:
            log.warning("HL7 message refused (AE): %s", exc)
            return self._accept("AE", str(exc), header, 205)
        except Exception as exc:  # noqa: BLE001 - storage failure: say so, never AA
            # AR, not AE: the message is fine, this end failed (HL7 v2 2.9.2), so the sender keeps it and resends.
            log.exception("HL7 message %s could not be stored", header.control_id)
            return self._accept("AR", f"message not stored, resend later: {exc}", header)
        if outcome.duplicate:
            log.info("HL7 message %s from %s is a duplicate; already stored", header.control_id, header.sender)
            acks = self._accept("AA", "duplicate of a stored message", header)
        else:
            log.debug("HL7 %s^%s %s from %s stored as message %d", header.message_type, header.trigger_event,
                      header.control_id, header.sender, outcome.message_id)
            acks = self._accept("AA", "stored", header)
        if (header.application_ack_type or "NE").upper() != "NE":  # some application ACK may be wanted
            # a resend too: the sender that resends after a lost application ACK is still waiting for one
            acks += self._application_ack(raw, header, outcome.message_id)
        return acks

    def _application_ack(self, raw: bytes, header: MessageHeader, message_id: int) -> list[bytes]:
        """Parse now (the sender asked to hear the result) and answer AA or AE as MSH-16 wants."""
        try:
            rows = parse_observations(raw, self.mapping)
        except Exception as exc:  # noqa: BLE001 - recorded on the message and reported in the AE
            error = f"{type(exc).__name__}: {exc}"
            rows, ok, text = [], False, f"stored, but could not be parsed: {error}"
        else:
            error, ok, text = None, True, f"parsed: {len(rows)} observations"
        try:
            self.store.save_parse(message_id, rows, error)
        except Exception as exc:  # noqa: BLE001 - the message is stored: the background parser takes it later
            log.exception("HL7 message %s: the parse result could not be saved", header.control_id)
            ok, text = False, f"stored; its parse could not be saved ({exc}) and is retried in the background"
        if not ack_wanted(header.application_ack_type, ok, default="NE"):
            return []
        return [build_ack("AA" if ok else "AE", text, header)]
