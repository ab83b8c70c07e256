"""The follow-up ORU^R01: valid HL7 (hl7apy strict), coded result, recommendation only when positive."""
import dataclasses
import datetime as dt
import socket
import threading
import time

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.uid import ComprehensiveSRStorage

from config.schema import Destination, FollowupSettings
from dicom_node.db import NodeDB
from dicom_node.export import HL7_SOP_CLASS, Exporter
from dicom_node.sample import demo_oru_message
from hl7.ack import build_ack
from hl7.client import parse_ack
from hl7.mllp import frame
from hl7.precheck import parse_header
from hl7.result_message import ScreeningReport, build_result_message

REPORT = ScreeningReport(
    control_id="OSR000042", patient_id="P|1", issuer="HOSP", patient_name="O'NEIL^MARY^A", birth_date="19580312",
    sex="F", accession_number="ACC-9", study_uid="1.2.3", study_datetime="20260105093000",
    category_id="screen_positive", category_label="Elevated osteoporosis risk - consider DXA", probability=0.183,
    threshold=0.12, model="fused_kdamm_v1 1.0.0", level="L1", mean_hu=94.0, sr_sop_instance_uid="1.2.3.4",
    recommendation="Consider DXA ^ soon", notice="RESEARCH USE ONLY - not for diagnostic use")
ARGS = dict(sending_application="OSTEOSCREEN", sending_facility="RAD", receiving_application="RIS",
            receiving_facility="HOSP", now=dt.datetime(2026, 1, 5, 12))


def obx(message: bytes) -> dict[str, list[str]]:
    out = {}
    for seg in message.decode().split("\r"):
        f = seg.split("|")
        if f[0] == "OBX":
            out[f[3].split("^")[0]] = f
    return out


def test_positive_result_is_strictly_valid_and_carries_the_recommendation():
    msg = build_result_message(REPORT, **ARGS)
    parsed = parse_message(msg.decode(), validation_level=VALIDATION_LEVEL.STRICT)
    assert parsed.msh.msh_10.value == "OSR000042"
    pid = parsed.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "P\\F\\1^^^HOSP^MR"  # the '|' in the ID is escaped, not a new field
    assert pid.pid_5.to_er7() == "O'NEIL^MARY^A"
    rows = obx(msg)
    assert rows["OS0001"][5].startswith("screen_positive^")
    assert rows["OS0002"][5] == "0.183" and rows["OS0002"][8] == "A"
    assert rows["112031"][5] == "94.0" and rows["112031"][11] == "F" and rows["112031"][14] == "20260105120000"
    assert rows["OS0006"][5] == "Consider DXA \\S\\ soon"
    assert rows["OS0009"][5].startswith("RESEARCH USE ONLY")
    obr = next(s for s in msg.decode().split("\r") if s.startswith("OBR")).split("|")
    assert obr[3] == obr[18] == "ACC-9" and obr[25] == "F"


def test_negative_result_has_no_recommendation_and_no_measurement_when_the_image_was_not_used():
    neg = dataclasses.replace(REPORT, category_id="screen_negative", category_label="Low risk", probability=0.05,
                              level=None, mean_hu=None)
    msg = build_result_message(neg, **ARGS)
    parse_message(msg.decode(), validation_level=VALIDATION_LEVEL.STRICT)
    rows = obx(msg)
    assert "OS0006" not in rows and "112031" not in rows
    assert rows["OS0002"][8] == "N"


def test_a_corrected_result_says_so_in_every_result_status():
    msg = build_result_message(dataclasses.replace(REPORT, corrected=True), **ARGS)
    parse_message(msg.decode(), validation_level=VALIDATION_LEVEL.STRICT)
    obr = next(s for s in msg.decode().split("\r") if s.startswith("OBR")).split("|")
    assert obr[25] == "C" and {f[11] for f in obx(msg).values()} == {"C"}
    assert {f[11] for f in obx(build_result_message(REPORT, **ARGS)).values()} == {"F"}


def test_non_ascii_names_are_declared_in_msh_18_and_only_the_alphabetic_group_is_sent():
    latin = build_result_message(dataclasses.replace(REPORT, patient_name="Müller^Jürgen"), **ARGS)
    msh = latin.split(b"\r")[0].split(b"|")
    assert msh[17] == b"8859/1" and b"PID|1||P\\F\\1^^^HOSP^MR||M\xfcller^J\xfcrgen|" in latin
    parse_message(latin.decode("latin-1"), validation_level=VALIDATION_LEVEL.STRICT)
    japanese = build_result_message(dataclasses.replace(REPORT, patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう"),
                                    **ARGS)
    pid = next(s for s in japanese.split(b"\r") if s.startswith(b"PID")).split(b"|")
    assert pid[5] == b"Yamada^Tarou"  # ideographic and phonetic groups are not XPN components
    wide = build_result_message(dataclasses.replace(REPORT, patient_name="Łukasiewicz^Zoë", model="模型"), **ARGS)
    assert wide.split(b"\r")[0].split(b"|")[17] == b"UNICODE UTF-8" and "模型" in wide.decode("utf-8")
    old = build_result_message(dataclasses.replace(REPORT, patient_name="Łukasiewicz^Zoë"), **ARGS, version="2.4")
    assert old.split(b"\r")[0].split(b"|")[17] == b"8859/1" and b"?ukasiewicz^Zo\xeb" in old  # no UTF-8 before 2.5
    assert b"|" * 6 not in build_result_message(REPORT, **ARGS).split(b"\r")[0]  # ASCII: MSH-18 left out


# --- delivery to the RIS: the exporter against a scripted RIS on a real socket ----------------------------------
RIS_HEAD = b"MSH|^~\\&|RIS|HOSP|OSTEOSCREEN||20260105120000||ACK^R01^ACK|R1|P|2.5.1\r"


def ris_ack(code: str, control: str, text: str = "", err: str = "") -> bytes:
    """One framed ACK as a RIS writes it; ``err`` is ERR-3 (v2.5: code^text^HL70357)."""
    body = RIS_HEAD + f"MSA|{code}|{control}|{text}\r".encode() + (f"ERR|||{err}|E\r".encode() if err else b"")
    return frame(body)


class ScriptedRIS:
    """An MLLP peer on loopback that answers the n-th message it receives (any connection) with
    ``script(message, n)``: the raw bytes to write (framed ACKs), b"" for none; with ``drip_s`` it then
    sends one more byte every ``drip_s`` seconds, for ever (an answer that never ends)."""

    def __init__(self, script, drip_s: float = 0.0) -> None:
        self.script = script
        self.drip_s = drip_s
        self.received: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with conn:
                self._connection(conn)

    def _connection(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        while not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\x1c\r" in buf:
                end = buf.index(b"\x1c\r")
                message, buf = buf[buf.index(b"\x0b") + 1:end], buf[end + 2:]
                self.received.append(message)
                try:
                    conn.sendall(self.script(message, len(self.received) - 1))
                    while self.drip_s and not self._stop.wait(self.drip_s):
                        conn.sendall(b"x")
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def control_of(message: bytes) -> str:
    return message.split(b"\r")[0].split(b"|")[9].decode()


@pytest.fixture()
def ris_outbox(tmp_path):
    """(make exporter for a RIS port, queue result messages, db): rows for one study, as the node queues them."""
    db = NodeDB(tmp_path / "node.sqlite")
    with db._tx() as tx:
        tx.execute("INSERT INTO series (series_uid, study_uid, patient_id, issuer, modality, calling_aet,"
                   " first_received, last_received) VALUES ('1.2.3.1', '1.2.3', 'P1', '', 'CT', 'CT1', 0, 0)")
        tx.execute("INSERT INTO jobs (series_uid, created_at, updated_at) VALUES ('1.2.3.1', 0, 0)")

    def queue(*controls: str, destination: str = "hl7:ris", sop_class: str = HL7_SOP_CLASS) -> None:
        for control in controls:
            path = tmp_path / f"{control}.hl7"
            path.write_bytes(build_result_message(dataclasses.replace(REPORT, control_id=control), **ARGS))
            with db._tx() as tx:
                tx.execute("INSERT INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid)"
                           " VALUES (1, ?, ?, ?, ?)", (destination, str(path), sop_class, control))

    def exporter(port: int, destinations=(), timeout_s: float = 2.0) -> Exporter:
        return Exporter(db, list(destinations), calling_aet="OSTEOSCREEN", retry_initial_s=60, retry_max_s=60,
                        timeout_s=timeout_s, followup=FollowupSettings(enabled=True, port=port, timeout_s=timeout_s))

    yield exporter, queue, db
    db.close()


def states(db: NodeDB) -> dict[str, tuple[str, str]]:
    return {r.sop_instance_uid: (r.state, r.last_error or "") for r in db.outbox()}


def audit(db: NodeDB) -> list[str]:
    return [r[0] for r in db._query("SELECT detail FROM audit WHERE kind='export' ORDER BY id")]


def test_an_ack_counts_only_for_the_message_its_msa2_names(ris_outbox):
    """An AA naming another control ID is not this message's ACK; a second ACK of message 0 (CA, then AA) is not
    taken for message 1, which the RIS refused (AE)."""
    exporter, queue, db = ris_outbox
    wrong = ScriptedRIS(lambda m, n: ris_ack("AA", "SOMETHING-ELSE"))
    try:
        queue("OSR000001")
        exporter(wrong.port, timeout_s=1.0)._deliver_due()
    finally:
        wrong.close()
    state, error = states(db)["OSR000001"]
    assert state == "pending" and "no ACK for OSR000001" in error and "'SOMETHING-ELSE'" in error

    def two_acks_for_the_first(message: bytes, n: int) -> bytes:
        if n == 0:  # an accept ACK and an application ACK, as if the message had asked for enhanced mode
            return ris_ack("CA", control_of(message)) + ris_ack("AA", control_of(message))
        return ris_ack("AE", control_of(message), "OBX-5 value not numeric")

    ris = ScriptedRIS(two_acks_for_the_first)
    try:
        with db._tx() as tx:
            tx.execute("DELETE FROM outbox")
        queue("OSR000002", "OSR000003")
        exporter(ris.port)._deliver_due()
    finally:
        ris.close()
    got = states(db)
    assert got["OSR000002"][0] == "sent"
    assert got["OSR000003"][0] == "failed" and "OBX-5 value not numeric" in got["OSR000003"][1]


def test_a_ris_dripping_its_ack_cannot_hold_the_exporter_past_its_timeout(ris_outbox):
    """Each byte within the timeout used to restart the wait: one pass never ended (no other row went out)."""
    exporter, queue, db = ris_outbox
    ris = ScriptedRIS(lambda m, n: b"\x0b" + RIS_HEAD, drip_s=0.2)  # an ACK begun, then a byte every 0.2 s
    try:
        queue("OSR000001")
        started = time.monotonic()
        exporter(ris.port, timeout_s=1.0)._deliver_due()
        elapsed = time.monotonic() - started
    finally:
        ris.close()
    assert elapsed < 3.0, f"one delivery pass took {elapsed:.1f} s with [followup] timeout_s = 1"
    assert states(db)["OSR000001"][0] == "pending"


def test_ar_is_resent_later_ae_is_given_up_with_the_ris_reason(ris_outbox):
    """HL7 v2: AR/CR = the receiver's problem (resend later); AE/CE = the message's (resending cannot help);
    AR with ERR-3 200-203 (unsupported type, event, processing ID, version) is given up too. A given-up message
    never reached the chart, so it is not one a later result corrects."""
    exporter, queue, db = ris_outbox
    answers = {"OSR000002": ris_ack("AE", "OSR000002", "PID-3 unknown patient", "204^Unknown key identifier^HL70357"),
               "OSR000003": ris_ack("AR", "OSR000003", "version 2.5.1 not supported", "203^Unsupported version id^"
                                                                                       "HL70357"),
               "OSR000004": ris_ack("CE", "OSR000004", "required field missing"),
               "OSR000001": ris_ack("AR", "OSR000001", "database busy, resend later"),
               "OSR000005": ris_ack("AA", "OSR000005")}
    ris = ScriptedRIS(lambda m, n: answers[control_of(m)])
    try:
        queue(*answers)
        ex = exporter(ris.port)
        for _ in range(3):  # an AR ends the pass, and what follows it waits for its retry (never overtakes it)
            ex._deliver_due()
            with db._tx() as tx:
                tx.execute("UPDATE outbox SET next_attempt_at=0 WHERE state='pending' AND attempts=0")
    finally:
        ris.close()
    got = states(db)
    assert got["OSR000005"][0] == "pending" and not got["OSR000005"][1]  # held behind OSR000001's retry
    assert got["OSR000001"][0] == "pending" and "database busy" in got["OSR000001"][1]
    assert got["OSR000002"][0] == "failed" and "PID-3 unknown patient" in got["OSR000002"][1]
    assert "outbox retry" in got["OSR000002"][1]
    assert got["OSR000003"][0] == "failed" and "not supported" in got["OSR000003"][1] and "203" in got["OSR000003"][1]
    assert got["OSR000004"][0] == "failed" and "required field missing" in got["OSR000004"][1]
    log = audit(db)
    assert any(d.startswith("retry: ") and "database busy" in d for d in log)
    assert any(d.startswith("gave up: ") and "PID-3 unknown patient" in d for d in log)
    next_attempt = db._query("SELECT next_attempt_at FROM outbox WHERE sop_instance_uid='OSR000001'")[0][0]
    assert next_attempt > time.time() + 30  # with backoff, not at once
    # the correction logic (service._followup_message) counts only messages not given up
    assert [c for c, s in db.result_messages("1.2.3", "hl7:ris") if s != "failed"] == ["OSR000001", "OSR000005"]


def test_an_unreadable_ack_fails_that_row_and_the_other_destinations_still_get_their_pass(ris_outbox, tmp_path):
    exporter, queue, db = ris_outbox
    ris = ScriptedRIS(lambda m, n: frame(RIS_HEAD + b"MSA\r"))  # an MSA segment without fields
    closed = socket.create_server(("127.0.0.1", 0))
    pacs_port = closed.getsockname()[1]
    closed.close()  # nobody listens there: the PACS row fails with "cannot associate"
    try:
        queue("OSR000001")
        queue("1.2.3.4.5", destination="pacs", sop_class=ComprehensiveSRStorage)
        exporter(ris.port, [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port)],
                 timeout_s=1.0)._deliver_due()
    finally:
        ris.close()
    got = states(db)
    assert got["OSR000001"][0] == "pending" and "MSA segment has no fields" in got["OSR000001"][1]
    assert db._query("SELECT attempts FROM outbox WHERE sop_instance_uid='OSR000001'")[0][0] == 1  # with backoff
    assert got["1.2.3.4.5"][0] == "pending" and "PACS" in got["1.2.3.4.5"][1]  # attempted in the same pass


def test_ack_codes_and_errors_are_read_or_refused_with_a_reason():
    header = parse_header(demo_oru_message(dt.datetime(2026, 1, 5), "V23").decode().replace("|2.5.1", "|2.3"))
    old = parse_ack(build_ack("AR", "unsupported", header, error_code=203))
    assert (old.code, old.control_id, old.error_code, old.unsupported) == ("AR", "V23", "203", True)
    for bad, why in ((b"MSH|^~\\&|X\rMSA\r", "no fields"), (b"hello", "no MSA"), (b"MSA|XX|1", "not an ack")):
        with pytest.raises(ValueError, match=why):
            parse_ack(bad)
