"""HL7 v2 receipt over a real MLLP socket: strict checks, durable store, ACK rules, lookup."""
import datetime as dt
import os
import socket
import time
from pathlib import Path

import pytest

from dicom_node.sample import demo_oru_message
from hl7.client import MLLPClient, ack_code, parse_ack
from hl7.lookup import lookup_labs
from hl7.mllp import FrameReader, MLLPServer, frame
from hl7.parse import parse_observations
from hl7.parse_worker import parse_pending
from hl7.precheck import PrecheckError, parse_header
from hl7.receiver import LabReceiver
from hl7.store import LabStore
from tests.conftest import wait_for

DATA = Path(__file__).parent / "data" / "hl7"
STUDY = dt.datetime(2026, 1, 5, 9, 0)


@pytest.fixture()
def listener(tmp_path):
    store = LabStore(tmp_path / "labs.sqlite")
    receiver = LabReceiver(store)
    server = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse, offload=receiver.needs_parse,
                        max_message_bytes=64 * 1024,
                        read_timeout_s=5)
    server.start()
    yield server, receiver, store
    server.stop()
    store.close()


def msh(segments: str, control="C1", version="2.5.1", mtype="ORU^R01") -> bytes:
    head = f"MSH|^~\\&|LIS|LAB|OSTEOSCREEN|RAD|20260104120000||{mtype}|{control}|P|{version}"
    return (head + "\r" + segments).encode()


def test_precheck_reads_ids_and_refuses_bad_headers():
    h = parse_header(demo_oru_message(STUDY).decode())
    assert (h.message_type, h.trigger_event, h.version) == ("ORU", "R01", "2.5.1")
    assert h.patient_ids[0].id == "OS-DEMO-0001" and h.patient_ids[0].issuer == "OSTEOSCREEN-DEMO"
    with pytest.raises(PrecheckError) as e:
        parse_header("PID|1||X")
    assert e.value.code == "AE"
    with pytest.raises(PrecheckError) as e:
        parse_header(msh("PID|1||123^^^H", mtype="ADT^A01").decode())
    assert e.value.code == "AR" and "ORU^R01" in e.value.text
    with pytest.raises(PrecheckError) as e:
        parse_header(msh("PID|1||123^^^H", version="2.7").decode())
    assert e.value.code == "AR" and "2.5.1" in e.value.text
    with pytest.raises(PrecheckError, match="PID-3") as e:
        parse_header(msh("PID|1||").decode())
    assert e.value.code == "AE"


def test_a_batch_of_several_patients_is_refused_whole(listener):
    """Results are filed under the message's patient, so a multi-patient ORU would give every OBX to the first."""
    server, _, store = listener
    one = demo_oru_message(STUDY, "B1").decode()
    pid = next(s for s in one.split("\r") if s.startswith("PID|"))
    second = one.split("\r", 1)[1].replace(pid, pid.replace("OS-DEMO-0001", "OS-DEMO-0002"))
    batch = (one.rstrip("\r") + "\r" + second).replace("|B1|", "|B2|", 1).encode()
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        ack = c.send(batch)
        assert ack_code(ack) == "AE" and b"2 different patients" in ack and b"|B2" in ack
        same_twice = (one.rstrip("\r") + "\r" + one.split("\r", 1)[1]).replace("|B1|", "|B3|", 1).encode()
        assert ack_code(c.send(same_twice)) == "AA"  # two result groups of the same patient are fine
    assert store.message_count() == 1


def test_a_storage_failure_is_answered_ar_so_the_sender_resends(listener, monkeypatch):
    server, _, store = listener

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with MLLPClient("127.0.0.1", server.bound_port) as c:
        monkeypatch.setattr(store, "store_message", failing)
        ack = c.send(demo_oru_message(STUDY, "S1"))
        assert ack_code(ack) == "AR" and b"resend later" in ack and b"|S1" in ack
        monkeypatch.undo()
        assert ack_code(c.send(demo_oru_message(STUDY, "S1"))) == "AA"
    assert store.message_count() == 1


def test_a_handler_failure_is_answered_ar_for_that_message(tmp_path):
    """The listener's last resort still names the message (MSA-2), so the sender can match the AR."""
    store = LabStore(tmp_path / "labs.sqlite")
    receiver = LabReceiver(store)

    def crash(raw: bytes):
        raise RuntimeError("boom")

    server = MLLPServer("127.0.0.1", 0, crash, receiver.refuse, read_timeout_s=5)
    server.start()
    try:
        with MLLPClient("127.0.0.1", server.bound_port) as c:
            ack = c.send(demo_oru_message(STUDY, "H1"))
            assert ack_code(ack) == "AR" and b"|H1" in ack and b"internal error" in ack
            assert ack_code(c.send(b"not HL7 at all")) == "AR"  # no header to name: still an answer
    finally:
        server.stop()
        store.close()


def test_an_unterminated_frame_is_dropped_when_the_next_one_starts():
    """Merging it with the next message would file the second message's results under the first's header."""
    reader = FrameReader(1024)
    assert reader.feed(b"\x0bMSH|first, cut off") == []
    assert reader.feed(b"\x0bMSH|second\x1c") == []
    assert reader.feed(b"\x0d\x0bMSH|third\x1c\x0d") == [b"MSH|second", b"MSH|third"]


def test_many_messages_on_one_connection_malformed_does_not_break_it(listener):
    server, receiver, store = listener
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        assert ack_code(c.send(demo_oru_message(STUDY, "M1"))) == "AA"
        bad = c.send(b"this is not HL7")
        assert ack_code(bad) == "AE" and b"MSH" in bad
        assert ack_code(c.send(msh("PID|1||123^^^H", mtype="ADT^A01"))) == "AR"
        c.send_raw(b"\x00\x00\r\n")  # stray bytes between frames
        assert ack_code(c.send(demo_oru_message(STUDY, "M2").replace(b"\r", b"\n"))) == "AA"  # LF segment ends
        assert ack_code(c.send(demo_oru_message(STUDY, "M3"))) == "AA"
    assert store.message_count() == 3
    assert parse_pending(store) == 3
    assert store.parse_states() == {"parsed": 3}


def test_duplicates_are_stored_once_and_conflicts_refused(listener):
    server, _, store = listener
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        assert ack_code(c.send(demo_oru_message(STUDY, "D1"))) == "AA"
        assert ack_code(c.send(demo_oru_message(STUDY, "D1"))) == "AA"
        changed = demo_oru_message(STUDY, "D1").replace(b"|9.1|", b"|9.9|")
        assert ack_code(c.send(changed)) == "AE"
    assert store.message_count() == 1


def test_oversized_message_is_refused_ae_naming_it_and_connection_survives(listener):
    """The refusal names the message (MSA-2, MSH-5/6, trigger) from its first segment, so a sender matching on
    MSA-2 gets it; AE (content: too large), not AR, which would make the sender resend the same bytes."""
    server, _, store = listener
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        big = demo_oru_message(STUDY, "BIG") + b"NTE|1||" + b"x" * 70_000 + b"\r"
        ack = c.exchange(big)  # matched on MSA-2: times out if the refusal does not name BIG
        assert ack.code == "AE" and "maximum size" in ack.text
        msh = ack_msh(c, big)
        assert msh[4:6] == ["LIS", "GENERAL HOSPITAL"] and msh[8] == "ACK^R01^ACK"
        c.send_raw(frame(big)[:40_000])  # the next oversize one arrives in pieces: same answer
        c.send_raw(frame(big)[40_000:])
        assert parse_ack(c.read_frame()).control_id == "BIG"
        assert ack_code(c.send(demo_oru_message(STUDY, "SMALL"))) == "AA"
    assert store.message_count() == 1


def ack_msh(c: MLLPClient, message: bytes) -> list[str]:
    """The MSH fields of the listener's answer to ``message`` (sent again)."""
    return c.send(message).decode("latin-1").split("\r")[0].split("|")


def test_ack_only_after_commit(listener, tmp_path):
    server, _, store = listener
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        assert ack_code(c.send(demo_oru_message(STUDY, "K1"))) == "AA"
    # a second, independent connection to the same file sees the committed raw message
    other = LabStore(store.path)
    try:
        assert other.message_count() == 1
    finally:
        other.close()


def test_frame_reader_handles_split_frames():
    r = FrameReader(1000)
    assert r.feed(b"\x00\x0bMSH|a") == []
    assert r.feed(b"bc\x1c") == []
    assert r.feed(b"\r\n\x0bMSH|2\x1c\r") == [b"MSH|abc", b"MSH|2"]


def test_units_are_normalised_and_window_applied(listener):
    server, receiver, store = listener
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        assert ack_code(c.send(demo_oru_message(STUDY, "U1"))) == "AA"
        old = demo_oru_message(STUDY - dt.timedelta(days=400), "U0").replace(b"|9.1|", b"|8.0|")
        assert ack_code(c.send(old)) == "AA"
    panel = lookup_labs(store, "OS-DEMO-0001", "OSTEOSCREEN-DEMO", STUDY.date(), window_days=90)
    got = {v.loinc: v for v in panel.values}
    assert got["17861-6"].value == pytest.approx(9.1)  # the recent calcium, not the old one
    assert got["1751-7"].value == pytest.approx(4.1) and got["1751-7"].unit == "g/dL"  # 41 g/L
    assert got["2160-0"].value == pytest.approx(71 / 88.42, rel=1e-3)  # umol/L -> mg/dL
    assert got["1989-3"].value == pytest.approx(18) and got["1989-3"].unit == "ng/mL"  # the unit of this Mass code
    assert lookup_labs(store, "OS-DEMO-0001", "OTHER-HOSPITAL", STUDY.date()).is_empty
    assert lookup_labs(store, "NOBODY", None, STUDY.date()).is_empty


@pytest.mark.parametrize("name", ["LAB-ORU-1.hl7", "LAB-ORU-2.hl7", "LRI_2.0-NG_CBC_Typ_Message.hl7",
                                  "ORU-R01-RMGEAD.hl7"])
def test_real_public_messages_are_accepted_and_parsed(listener, name):
    server, receiver, store = listener
    raw = (DATA / name).read_bytes()
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        # the NIST message asks for enhanced mode (MSH-15 AL, MSH-16 NE): accept ACK CA, no application ACK
        assert ack_code(c.send(raw)) == ("CA" if name.startswith("LRI") else "AA")
    assert parse_pending(store) == 1
    assert store.parse_states() == {"parsed": 1}
    rows = parse_observations(raw)
    assert rows and all("problem" in r for r in rows)


def test_lri_cbc_maps_loinc(listener):
    rows = parse_observations((DATA / "LRI_2.0-NG_CBC_Typ_Message.hl7").read_bytes())
    loincs = {r["loinc"] for r in rows if r["loinc"]}
    assert {"718-7", "6690-2", "777-3"} <= loincs


def test_idle_connection_is_closed(listener):
    server, _, _ = listener
    s = socket.create_connection(("127.0.0.1", server.bound_port))
    s.settimeout(15)
    assert s.recv(10) == b""  # server closes after its 5 s read timeout
    s.close()


def _enhanced(control: str, accept: str, app: str, pid: str = "PID|1||E-1^^^HOSP||DOE^JANE||19500101|F") -> bytes:
    head = (f"MSH|^~\\&|LIS|LAB|OSTEOSCREEN|RAD|20260104120000||ORU^R01|{control}|P|2.5.1|||{accept}|{app}")
    obx = "OBR|1|||17861-6^Calcium^LN\rOBX|1|NM|17861-6^Calcium^LN||9.4|mg/dL|||||F|||20260104080000"
    return (head + "\r" + pid + "\r" + obx + "\r").encode()


def test_enhanced_mode_accept_and_application_acks(listener):
    server, _, store = listener
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        c.send_raw(frame(_enhanced("E1", "NE", "NE")))  # no ACK at all
        c.send_raw(frame(_enhanced("E2", "ER", "")))  # accept ACK only on error: none
        c.send_raw(frame(_enhanced("E3", "AL", "AL")))  # CA, then the application ACK after the parse
        accept, app = c.read_frame(), c.read_frame()
        assert ack_code(accept) == "CA" and b"|E3|" in accept  # the first reply belongs to E3: E1, E2 got none
        assert ack_code(app) == "AA" and b"|E3|" in app and b"parsed: 1 observations" in app
        c.send_raw(frame(_enhanced("E4", "SU", "ER", pid="PID|1||")))  # no PID-3: error, SU -> no accept ACK
        c.send_raw(frame(_enhanced("E5", "ER", "NE", pid="PID|1||")))  # error, ER -> CE with the reason
        refused = c.read_frame()
        assert ack_code(refused) == "CE" and b"|E5|" in refused and b"PID-3" in refused
    assert store.message_count() == 3  # E1, E2, E3 stored; E4, E5 refused
    assert store.parse_states() == {"parsed": 1, "pending": 2}  # E3 parsed for its application ACK


def test_only_messages_that_ask_for_an_application_ack_are_parsed_off_the_loop():
    base = msh("PID|1||P1", control="A")
    assert not LabReceiver.needs_parse(base)
    assert not LabReceiver.needs_parse(base.replace(b"|2.5.1", b"|2.5.1|||AL|NE"))
    assert LabReceiver.needs_parse(base.replace(b"|2.5.1", b"|2.5.1|||AL|AL"))
    assert LabReceiver.needs_parse(base.replace(b"|2.5.1", b"|2.5.1|||NE|ER"))
    assert not LabReceiver.needs_parse(b"garbage")


def test_original_mode_is_unchanged_by_empty_msh15_16(listener):
    server, _, _ = listener
    with MLLPClient("127.0.0.1", server.bound_port) as c:
        assert ack_code(c.send(_enhanced("O1", "", ""))) == "AA"


def _oru(control: str, obx: list[tuple[str, str, str, str, str]], pid: str = "P1^^^HOSP^MR") -> bytes:
    """ORU^R01 with OBX rows (code, value type, value, unit, status/time as 'S@YYYYmmddHHMM')."""
    rows = []
    for i, (code, vt, value, unit, status_at) in enumerate(obx, 1):
        status, at = status_at.split("@")
        rows.append(f"OBX|{i}|{vt}|{code}||{value}|{unit}|||||{status}|||{at}")
    return msh(f"PID|1||{pid}||Doe^Jane||19600101|F\rOBR|1|||24323-8^CMP^LN|||202601040800\r" + "\r".join(rows)
               + "\r", control=control)


def test_a_correction_that_cannot_be_used_still_withdraws_the_value_it_corrects(tmp_path):
    """A censored ('<0.2') or unreadable correction, 'not obtainable', or a final after a preliminary: the earlier
    value of that analyte and time is never used (it was, since only usable values were ranked)."""
    store = LabStore(tmp_path / "labs.sqlite")
    rx = LabReceiver(store)
    creat = "2160-0^Creatinine^LN"
    hb = "718-7^Hemoglobin^LN"
    for raw in (_oru("A1", [(creat, "NM", "9.0", "mg/dL", "F@202601040800"), (hb, "NM", "12.8", "g/dL", "P@202601040800")]),
                _oru("A2", [(creat, "ST", "<^0.2", "mg/dL", "C@202601040800"), (hb, "NM", "", "g/dL", "X@202601040800")])):
        rx.handle(raw)
    panel = lookup_labs(store, "P1", "HOSP", STUDY.date(), accept_preliminary=True)
    assert panel.get("2160-0") is None and panel.get("718-7") is None
    reasons = {e.code: e.reason for e in panel.excluded}
    assert "2160-0" in reasons and "718-7" in reasons
    rx.handle(_oru("A3", [("2345-7^Glucose^LN", "NM", "150", "mg/dL", "P@202601040800")]))
    rx.handle(_oru("A4", [("2345-7^Glucose^LN", "NM", "<^20", "mg/dL", "F@202601040800")]))
    assert lookup_labs(store, "P1", "HOSP", STUDY.date(), accept_preliminary=True).get("2345-7") is None
    store.close()


def test_a_value_before_the_study_wins_over_a_later_one_and_no_study_date_means_no_labs(tmp_path):
    store = LabStore(tmp_path / "labs.sqlite")
    rx = LabReceiver(store)
    hb = "718-7^Hemoglobin^LN"
    rx.handle(_oru("B1", [(hb, "NM", "13.1", "g/dL", "F@202601050700")]))  # the study morning
    rx.handle(_oru("B2", [(hb, "NM", "7.9", "g/dL", "F@202601061900")]))  # the next evening
    assert lookup_labs(store, "P1", "HOSP", STUDY.date()).get("718-7").value == pytest.approx(13.1)
    rx.handle(_oru("B3", [("777-3^Platelets^LN", "NM", "250", "10*3/uL", "F@202601061900")]))
    assert lookup_labs(store, "P1", "HOSP", STUDY.date()).get("777-3").value == 250  # only after: still used
    undated = lookup_labs(store, "P1", "HOSP", None)
    assert undated.is_empty and "study date unknown" in undated.notes[0]
    store.close()


def test_an_account_number_in_pid3_never_matches_another_patients_record(tmp_path):
    """PID-3 = P1 (MR) ~ 778899 (AN): the results are P1's, never those of the patient whose MRN is 778899."""
    store = LabStore(tmp_path / "labs.sqlite")
    rx = LabReceiver(store)
    raw = msh("PID|1||P1^^^HOSP^MR~778899^^^HOSP^AN||Doe^Jane\rOBR|1|||24323-8^CMP^LN|||202601040800\r"
              "OBX|1|NM|17861-6^Calcium^LN||13.2|mg/dL|||||F|||202601040800\r", control="ID1")
    assert b"MSA|AA" in rx.handle(raw)[0]
    assert lookup_labs(store, "P1", "HOSP", STUDY.date()).get("17861-6").value == pytest.approx(13.2)
    assert lookup_labs(store, "778899", "HOSP", STUDY.date()).is_empty
    only_account = msh("PID|1||778899^^^HOSP^AN||Doe^Jane\rOBR|1|||24323-8^CMP^LN|||202601040800\r"
                       "OBX|1|NM|17861-6^Calcium^LN||9.0|mg/dL|||||F|||202601040800\r", control="ID2")
    ack = rx.handle(only_account)[0]
    assert b"MSA|AE" in ack and b"no patient record number" in ack
    store.close()


def test_at_the_same_time_the_analytes_own_code_beats_an_alias(tmp_path):
    """Blood glucose (2339-0, an alias) and serum glucose (2345-7) in one message: the serum value is the one
    reported under 2345-7, whichever OBX comes first."""
    store = LabStore(tmp_path / "labs.sqlite")
    rx = LabReceiver(store)
    rx.handle(_oru("G1", [("2339-0^Glucose blood^LN", "NM", "61", "mg/dL", "F@202601040800"),
                          ("2345-7^Glucose^LN", "NM", "104", "mg/dL", "F@202601040800")]))
    assert lookup_labs(store, "P1", "HOSP", STUDY.date()).get("2345-7").value == pytest.approx(104)
    store.close()


def test_a_message_with_the_truncation_character_in_msh2_is_parsed_not_silently_dropped(tmp_path):
    store = LabStore(tmp_path / "labs.sqlite")
    rx = LabReceiver(store)
    raw = ("MSH|^~\\&#|LIS|LAB|OSTEOSCREEN|RAD|20260104120000||ORU^R01|T1|P|2.5.1\r"
           "PID|1||P1^^^HOSP^MR||Doe^Jane\rOBR|1|||24323-8^CMP^LN|||202601040800\r"
           "OBX|1|NM|17861-6^Calcium^LN||9.1|mg/dL|||||F|||202601040800\r").encode()
    assert b"MSA|AA" in rx.handle(raw)[0]
    assert lookup_labs(store, "P1", "HOSP", STUDY.date()).get("17861-6").value == pytest.approx(9.1)
    store.close()


def test_a_resent_enhanced_message_gets_its_application_ack_again(listener):
    """A sender that lost the application ACK resends: it gets CA (duplicate) and the application ACK again,
    not only CA (it would wait for ever)."""
    server, _, store = listener
    for _ in range(2):
        with MLLPClient("127.0.0.1", server.bound_port, timeout_s=5) as c:
            c.send_raw(frame(_enhanced("R1", "AL", "AL")))
            accept, app = parse_ack(c.read_frame()), parse_ack(c.read_frame())
            assert (accept.code, accept.control_id, app.code, app.control_id) == ("CA", "R1", "AA", "R1")
            assert "parsed: 1 observations" in app.text
    assert store.message_count() == 1


def test_the_ack_echoes_sender_fields_and_control_id_verbatim(listener):
    """MSH-3/4 with components and an escape came back as `LAB\\E\\T\\E\\X` without its components."""
    server, _, _ = listener
    raw = demo_oru_message(STUDY, "X\\E\\1").decode().replace(
        "MSH|^~\\&|LIS|GENERAL HOSPITAL|", "MSH|^~\\&|LAB\\T\\X^1.2.3^ISO|GH^2.16.1^ISO|", 1).encode()
    with MLLPClient("127.0.0.1", server.bound_port, timeout_s=5) as c:
        ack = c.exchange(raw)  # matched on MSA-2 = MSH-10 as sent
        msh = ack_msh(c, raw)
    assert ack.code == "AA" and ack.control_id == "X\\E\\1"
    assert msh[4:6] == ["LAB\\T\\X^1.2.3^ISO", "GH^2.16.1^ISO"]


@pytest.fixture()
def strict_listener(tmp_path):
    """A listener with a 1 s read timeout and room for 2 connections."""
    store = LabStore(tmp_path / "labs.sqlite")
    receiver = LabReceiver(store)
    server = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse, read_timeout_s=1.0, max_connections=2)
    server.start()
    yield server
    server.stop()
    store.close()


def closed_by_peer(s: socket.socket, within_s: float = 2.0) -> bool:
    s.settimeout(within_s)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_a_sender_dripping_a_frame_is_closed_at_the_read_timeout(strict_listener):
    """One byte every 0.3 s used to reset a per-read idle timeout: the connection stayed open for ever."""
    s = socket.create_connection(("127.0.0.1", strict_listener.bound_port))
    with s:
        s.sendall(b"\x0bMSH|^~\\&|LIS")
        try:
            for _ in range(10):  # 3 s of dripping, three times the read timeout
                time.sleep(0.3)
                s.sendall(b"x")
        except OSError:
            pass  # closed by the listener while we drip: what this test wants
        assert closed_by_peer(s, 0.5)


def test_a_sender_that_never_reads_its_acks_is_closed(strict_listener, caplog):
    """Garbage frames, each answered with a ~250-byte AE, never read: the listener used to wait in drain()
    for ever, holding the connection. Judged by the listener's own abort: whether the client's kernel notices
    the RST to its zero window, and when, varies under load (seen: not within 20 s)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect(): the window is agreed then
    s.connect(("127.0.0.1", strict_listener.bound_port))
    with s:
        s.setblocking(False)
        junk, stuck_since, started = b"\x0bX\x1c\r" * 1000, None, time.monotonic()
        while time.monotonic() - started < 20 and (stuck_since is None or time.monotonic() - stuck_since < 1):
            try:
                s.send(junk)
                stuck_since = None
            except BlockingIOError:  # the listener stopped reading: its ACKs back up
                stuck_since = stuck_since or time.monotonic()
                time.sleep(0.05)
            except (ConnectionResetError, BrokenPipeError):
                break
        # the listener works through what it read, then gives up on drain() and aborts the connection
        wait_for(lambda: "its ACKs not read" in caplog.text, 30, "the listener to close the connection")


def test_connections_beyond_max_connections_are_closed_at_accept(strict_listener, caplog):
    port = strict_listener.bound_port
    first, second = (MLLPClient("127.0.0.1", port, timeout_s=5) for _ in range(2))
    with first, second:
        assert ack_code(first.send(demo_oru_message(STUDY, "L1"))) == "AA"
        assert ack_code(second.send(demo_oru_message(STUDY, "L2"))) == "AA"
        with socket.create_connection(("127.0.0.1", port)) as third:
            assert closed_by_peer(third)
    assert "hl7.max_connections" in caplog.text
    deadline = time.monotonic() + 5
    while True:  # the slots are free again once the two have closed
        try:
            with MLLPClient("127.0.0.1", port, timeout_s=2) as again:
                assert ack_code(again.send(demo_oru_message(STUDY, "L3"))) == "AA"
            break
        except (ConnectionError, TimeoutError):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_only_the_configured_senders_and_hosts_are_taken(tmp_path):
    """Anyone who reached the port stored results for any patient, and a forged message with the real one's
    control ID got the real one refused as a conflicting duplicate."""
    from config import ConfigError, settings_from_dict

    store = LabStore(tmp_path / "labs.sqlite")
    receiver = LabReceiver(store, allowed_senders=["LIS|GENERAL HOSPITAL"])
    day = dt.date(2026, 1, 5)
    real = demo_oru_message(dt.datetime(2026, 1, 4, 9), "C1")
    header = parse_header(real.decode("latin-1"))
    assert receiver.sender_allowed(header), header.sender
    forged = real.replace(header.sending_application.encode(), b"INTRUDER", 1)
    server = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse)
    server.start()
    try:
        with MLLPClient("127.0.0.1", server.bound_port) as c:
            reply = c.send(forged)
            assert ack_code(reply) == "AE" and b"allowed_senders" in reply
            assert ack_code(c.send(real)) == "AA"
    finally:
        server.stop()
    assert lookup_labs(store, "OS-DEMO-0001", None, day).values  # the real message, stored
    assert store.message_count() == 1

    closed = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse, allowed_hosts=["10.0.0.0/8"])
    closed.start()
    try:
        with pytest.raises((ConnectionError, OSError, TimeoutError)):
            with MLLPClient("127.0.0.1", closed.bound_port, timeout_s=5) as c:
                c.send(real)
    finally:
        closed.stop()
        store.close()
    for bad in ({"allowed_hosts": ["10.0.0.300"]}, {"allowed_senders": ["|FAC"]}):
        with pytest.raises(ConfigError, match="hl7.allowed_"):
            settings_from_dict({"hl7": bad})
    ok = settings_from_dict({"hl7": {"allowed_hosts": ["10.1.2.3", "10.1.0.0/16"], "allowed_senders": ["lis | gh"]}})
    assert ok.hl7.allowed_senders == ["LIS|GH"]


def test_a_message_with_thousands_of_segments_is_refused_before_any_parse(listener):
    """22,000 OBX segments in one 1 MiB message made the full parse grow the service by 800 MB."""
    from hl7.precheck import MAX_SEGMENTS

    server, receiver, store = listener
    obx = "".join(f"OBX|{i}|NM|17861-6^Ca^LN||9.1|mg/dL|||||F\r" for i in range(MAX_SEGMENTS + 1))
    message = msh("PID|1||P1^^^HOSP^MR||DOE^JANE||19580312|F\rOBR|1|O1|F1|24323-8^CMP^LN\r" + obx, control="BIG")
    with pytest.raises(PrecheckError, match="segments"):
        parse_header(message.decode())
    [reply] = receiver.handle(message)  # (over the fixture's frame limit: handed to the receiver directly)
    assert ack_code(reply) == "AE" and b"split it" in reply and store.message_count() == 0


def test_below_the_free_space_watermark_a_message_gets_ar_and_nothing_is_stored(tmp_path):
    """The state directory's watermark ([node] min_free_mb) guards HL7 too: AR (resend later), nothing stored,
    and the same message is stored once space is back."""
    from hl7.receiver import low_space_check

    assert low_space_check(tmp_path, 0) is None  # 0 turns the check off
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert low_space_check(tmp_path, 1)() is None
    reason = low_space_check(tmp_path, free + 2**40)()
    assert reason.startswith("low disk space: ") and "([node] min_free_mb)" in reason
    store = LabStore(tmp_path / "labs.sqlite")
    shortage: list[str | None] = [reason]
    receiver = LabReceiver(store, low_space=lambda: shortage[0])
    message = demo_oru_message(dt.datetime(2026, 1, 4, 9), "C1")
    reply = receiver.handle(message)[0]
    assert ack_code(reply) == "AR" and b"low disk space" in reply and store.message_count() == 0
    shortage[0] = None
    assert ack_code(receiver.handle(message)[0]) == "AA" and store.message_count() == 1
    store.close()
