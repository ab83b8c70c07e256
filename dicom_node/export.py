"""Outbox delivery: DICOM by C-STORE, the follow-up HL7 message over MLLP; exponential backoff while a
destination is away."""
from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import defaultdict
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from config.schema import Destination, FollowupSettings
from dicom_node.db import NodeDB, OutboxRow
from dicom_node.metrics import OUTBOX_RETRIES, OUTBOX_SENT
from hl7.client import Ack, MLLPClient

log = logging.getLogger("osteoscreen.export")
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
HL7_PREFIX = "hl7:"  # outbox destinations that are MLLP receivers, not DICOM AEs
HL7_SOP_CLASS = "HL7 ORU^R01"  # the outbox's sop_class_uid column for a result message


def _refused_for_good(status: int) -> bool:
    """C-STORE failures that a resend of the same object cannot cure (PS3.4 B.2.3, PS3.7 Annex C): data set does
    not match the SOP class (A9xx), SOP class not supported (0122), not authorized (0124), invalid SOP instance
    (0117). "Cannot understand" (Cxxx) is left to the back-off: PACS software answers it for passing faults too
    (pynetdicom's 0xC211 for any exception in the store handler, a full disk say), as for out of resources (A7xx)
    and processing failure (0110)."""
    return 0xA900 <= status <= 0xA9FF or status in (0x0117, 0x0122, 0x0124)


def _sop_class_name(uid: str) -> str:
    name = pydicom.uid.UID(uid).name
    return name if name != uid else "this SOP class"


class Exporter:
    def __init__(self, db: NodeDB, destinations: list[Destination], *, calling_aet: str, retry_initial_s: float,
                 retry_max_s: float, timeout_s: float, followup: FollowupSettings | None = None,
                 followup_ssl: ssl.SSLContext | None = None) -> None:
        self.db = db
        self.followup = followup
        self.followup_ssl = followup_ssl
        self.destinations = {d.name: d for d in destinations}
        self.calling_aet = calling_aet
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.timeout_s = timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="exporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():  # never started when the node's start failed before it
            self._thread.join(timeout=self.timeout_s + 5)

    def wake(self) -> None:
        self._wake.set()

    def set_destinations(self, destinations: list[Destination]) -> None:
        self.destinations = {d.name: d for d in destinations}
        self._wake.set()

    def backoff(self, attempts: int) -> float:
        return min(self.retry_max_s, self.retry_initial_s * (2 ** max(0, attempts)))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                timeout = self._deliver_due()
            except Exception:  # noqa: BLE001 - the exporter must outlive any one failure, or nothing is sent again
                log.exception("outbox delivery failed; trying again in %.0f s", self.retry_initial_s)
                timeout = max(0.05, self.retry_initial_s)
            self._wake.wait(timeout)
            self._wake.clear()

    def _deliver_due(self) -> float:
        """Send every due outbox row, by destination; seconds until the next is due (at most 5)."""
        rows = self.db.due_outbox()
        by_dest: dict[str, list[OutboxRow]] = defaultdict(list)
        for r in rows:
            by_dest[r.destination].append(r)
        for name, batch in by_dest.items():
            if self._stop.is_set():
                break
            try:
                self._send_batch(name, batch)
            except Exception as exc:  # noqa: BLE001 - one destination's fault must not stop delivery to the others
                log.exception("delivery to %s failed unexpectedly; its rows stay queued and the other "
                              "destinations go on", name)
                # with the usual backoff: without it the same fault came back 20 times a second
                still_due = {r.id for r in self.db.due_outbox()}
                self._fail([r for r in batch if r.id in still_due], f"unexpected error: {exc!r}"[:300])
        due = self.db.next_outbox_due()
        return 5.0 if due is None else max(0.05, min(5.0, due - time.time()))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _fail(self, rows: list[OutboxRow], error: str) -> None:
        for r in rows:
            delay = self.backoff(r.attempts)
            log.warning("export of %s to %s failed (attempt %d), retry in %.0f s: %s",
                        r.sop_instance_uid, r.destination, r.attempts + 1, delay, error)
            self.db.mark_send_failed(r.id, error, time.time() + delay)
            OUTBOX_RETRIES.labels(r.destination).inc()

    def _send_hl7(self, name: str, rows: list[OutboxRow]) -> None:
        """One MLLP connection; each message is sent once its predecessor's ACK came back. A retried message ends
        the pass for this destination, so that no later message (a correction, say) overtakes it in this pass."""
        f = self.followup
        if f is None or not f.enabled or name != HL7_PREFIX + f.name:
            self._fail(rows, f"HL7 destination {name!r} is not configured")
            return
        try:
            client = MLLPClient(f.host, f.port, timeout_s=f.timeout_s, ssl_context=self.followup_ssl)
        except (OSError, ssl.SSLError) as exc:
            self._fail(rows, f"cannot connect to {f.host}:{f.port}: {exc}")
            return
        with client:
            for r in rows:
                if self._stop.is_set() or not self._send_hl7_row(client, name, r, f):
                    break

    def _send_hl7_row(self, client: MLLPClient, name: str, r: OutboxRow, f: FollowupSettings) -> bool:
        """Send one result message and record its ACK; False when the pass for this destination should end."""
        try:
            message = Path(r.path).read_bytes()
        except OSError as exc:
            self.db.mark_send_failed(r.id, f"cannot read {r.path}: {exc}", time.time(), give_up=True)
            return True
        try:
            ack = client.exchange(message, timeout_s=f.timeout_s)  # its own ACK (MSA-2 = MSH-10), in time
        except (OSError, ValueError, ssl.SSLError) as exc:  # TimeoutError and a closed connection are OSErrors
            self._fail([r], f"no usable ACK from {name} ({f.host}:{f.port}, [followup] timeout_s "
                            f"{f.timeout_s:g} s): {exc}")
            return False
        return self._record_hl7_ack(name, r, ack)

    def _record_hl7_ack(self, name: str, r: OutboxRow, ack: Ack) -> bool:
        """HL7 v2 ACK semantics: AA/CA accepted; AE/CE an error in the message (resending the same bytes cannot
        help: given up); AR/CR a problem at the receiver (resent with backoff), unless ERR-3 says the message
        type, event, processing ID or version is not supported there (200-203: given up)."""
        if ack.code in ("AA", "CA"):
            self.db.mark_sent(r.id, f"sent result message {r.sop_instance_uid} to {name} ({ack.code})")
            OUTBOX_SENT.labels(name).inc()
            log.info("sent result message %s to %s, %s", r.sop_instance_uid, name, ack.code)
            return True
        if ack.code in ("AE", "CE") or ack.unsupported:
            what = "unsupported" if ack.code in ("AR", "CR") else "an error in the message"
            error = (f"{name} refused result message {r.sop_instance_uid} ({ack.code}, {what}): {ack.reason}; "
                     "resending the same message cannot help: fix the cause (the RIS interface, or [followup] "
                     "version and applications), then `osteoscreen outbox retry`, or screen the series again")
            self.db.mark_send_failed(r.id, error, time.time(), give_up=True)
            log.error("result message %s given up: %s", r.sop_instance_uid, error)
            return True
        self._fail([r], f"{name} could not take result message {r.sop_instance_uid} now ({ack.code}): {ack.reason}")
        return False

    def _send_batch(self, name: str, rows: list[OutboxRow]) -> None:
        if name.startswith(HL7_PREFIX):
            self._send_hl7(name, rows)
            return
        dest = self.destinations.get(name)
        if dest is None:
            self._fail(rows, f"destination {name!r} is not configured")
            return
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for sop_class in sorted({r.sop_class_uid for r in rows}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        except Exception as exc:  # noqa: BLE001
            self._fail(rows, f"cannot associate with {dest.ae_title}@{dest.host}:{dest.port}: {exc}")
            return
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "unreachable"
            self._fail(rows, f"{dest.ae_title}@{dest.host}:{dest.port} {why}")
            return
        try:
            for r in rows:
                try:
                    ds = pydicom.dcmread(r.path)
                except Exception as exc:  # noqa: BLE001
                    self.db.mark_send_failed(r.id, f"cannot read {r.path}: {exc}", time.time(), give_up=True)
                    log.error("export of %s abandoned: cannot read %s: %s", r.sop_instance_uid, r.path, exc)
                    continue
                if str(ds.get("SOPInstanceUID", "")) != r.sop_instance_uid:  # never send one object as another
                    error = (f"{r.path} now holds {ds.get('SOPInstanceUID', 'no SOP Instance UID')}, not "
                             f"{r.sop_instance_uid}: the file was replaced after it was queued; screen the series "
                             "again (`osteoscreen jobs retry JOB`) to make a new report")
                    self.db.mark_send_failed(r.id, error, time.time(), give_up=True)
                    log.error("export of %s abandoned: %s", r.sop_instance_uid, error)
                    continue
                if not any(c.abstract_syntax == r.sop_class_uid for c in assoc.accepted_contexts):
                    self._fail([r], f"{dest.ae_title} does not accept {_sop_class_name(r.sop_class_uid)} "
                                    f"({r.sop_class_uid}): enable that SOP class on the PACS (the optional KOS and "
                                    "GSPS can be turned off in [results])")
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, ValueError, OSError) as exc:  # the association ended or cannot carry it
                    self._fail([r], f"C-STORE failed: {exc}")
                    break
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in SUCCESS_OR_WARNING:
                    self.db.mark_sent(r.id, f"sent {r.sop_instance_uid} to {name} (status 0x{code:04X})")
                    OUTBOX_SENT.labels(name).inc()
                    log.info("sent %s to %s (%s@%s:%d), status 0x%04X", r.sop_instance_uid, name, dest.ae_title,
                             dest.host, dest.port, code)
                elif code == -1:
                    self._fail([r], "no C-STORE response (connection lost)")
                    break
                elif _refused_for_good(code):
                    error = (f"{dest.ae_title} refused {_sop_class_name(r.sop_class_uid)} with status 0x{code:04X} "
                             "(the PACS cannot take this object as it is; resending the same bytes cannot help): "
                             "fix the cause at the PACS, then `osteoscreen outbox retry`")
                    self.db.mark_send_failed(r.id, error, time.time(), give_up=True)
                    log.error("export of %s to %s given up: %s", r.sop_instance_uid, name, error)
                else:
                    self._fail([r], f"C-STORE status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
