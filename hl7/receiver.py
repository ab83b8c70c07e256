"""Receipt of ORU messages: check, store durably, acknowledge; parse afterwards."""
from __future__ import annotations

import logging
import queue
import threading

from hl7.ack import build_ack
from hl7.parse import parse_observations
from hl7.precheck import PrecheckError, parse_header
from hl7.store import DuplicateConflict, LabStore

log = logging.getLogger("osteoscreen.hl7")


class LabReceiver:
    """The MLLP handler: AA only after the raw message is committed."""

    def __init__(self, store: LabStore) -> None:
        self.store = store
        self._parse_queue: queue.Queue[int | None] = queue.Queue()
        self._parser = threading.Thread(target=self._parse_loop, name="hl7-parser", daemon=True)
        self._parser_started = False

    def start(self) -> None:
        """Start the parser thread and resume parsing of messages stored but not parsed."""
        if not self._parser_started:
            self._parser.start()
            self._parser_started = True
        for mid, _ in self.store.pending_messages():
            self._parse_queue.put(mid)

    def stop(self) -> None:
        if self._parser_started:
            self._parse_queue.put(None)
            self._parser.join(timeout=10)

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
        log.info("HL7 %s^%s %s from %s stored for patient %s", header.message_type, header.trigger_event,
                 header.control_id, header.sender, header.patient_ids[0].id)
        self._parse_queue.put(outcome.message_id)
        return build_ack("AA", "stored", header)

    def _parse_loop(self) -> None:
        while True:
            mid = self._parse_queue.get()
            if mid is None:
                return
            self.parse_one(mid)

    def parse_one(self, message_id: int) -> None:
        raw = next((r for m, r in self.store.pending_messages() if m == message_id), None)
        if raw is None:
            return
        try:
            rows = parse_observations(raw)
        except Exception as exc:  # noqa: BLE001 - recorded and visible, never silently dropped
            log.error("HL7 message %d stored but could not be parsed: %s", message_id, exc)
            self.store.save_parse(message_id, [], f"{type(exc).__name__}: {exc}")
            return
        self.store.save_parse(message_id, rows, None)
        usable = sum(1 for r in rows if r["value"] is not None)
        log.info("HL7 message %d parsed: %d observations, %d usable", message_id, len(rows), usable)

    def wait_parsed(self, timeout: float = 10.0) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.store.pending_messages():
                return True
            time.sleep(0.05)
        return False
