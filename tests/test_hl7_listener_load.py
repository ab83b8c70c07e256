"""The MLLP listener driven by an independent raw-socket sender written here (not hl7.client)."""
import datetime as dt
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dicom_node.sample import demo_oru_message
from hl7.lookup import lookup_labs
from hl7.mllp import MLLPServer
from hl7.parse import parse_observations
from hl7.parse_worker import parse_pending
from hl7.receiver import LabReceiver
from hl7.store import LabStore

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
STUDY = dt.datetime(2026, 1, 5, 9, 0)
DATA = Path(__file__).parent / "data" / "hl7"


@pytest.fixture()
def listener(tmp_path):
    store = LabStore(tmp_path / "labs.sqlite")
    server = MLLPServer("127.0.0.1", 0, LabReceiver(store).handle, LabReceiver(store).refuse)
    server.start()
    yield server, store
    server.stop()
    store.close()


def read_acks(sock: socket.socket, n: int) -> list[bytes]:
    buf, acks = b"", []
    while len(acks) < n:
        chunk = sock.recv(65536)
        assert chunk, "listener closed the connection"
        buf += chunk
        while FS + CR in buf:
            end = buf.index(FS + CR)
            acks.append(buf[buf.index(VT) + 1 : end])
            buf = buf[end + 2 :]
    return acks


def msa(ack: bytes) -> tuple[str, str]:
    seg = next(s for s in ack.split(b"\r") if s.startswith(b"MSA"))
    parts = seg.decode().split("|")
    return parts[1], parts[2]


def test_thousand_messages_on_one_connection_all_stored(listener):
    server, store = listener
    s = socket.create_connection(("127.0.0.1", server.bound_port))
    sent = []
    for i in range(1000):
        cid = f"L{i:05d}"
        s.sendall(VT + demo_oru_message(STUDY, cid) + FS + CR)
        code, acked = msa(read_acks(s, 1)[0])
        assert (code, acked) == ("AA", cid)
        sent.append(cid)
        if i % 250 == 0:  # acknowledged means already committed: visible to another connection now
            other = LabStore(store.path)
            assert other.message_count() == i + 1
            other.close()
    s.close()
    assert store.message_count() == 1000


def test_ten_concurrent_connections(listener):
    server, store = listener
    errors: list[str] = []

    def client(k: int) -> None:
        s = socket.create_connection(("127.0.0.1", server.bound_port))
        for i in range(50):
            s.sendall(VT + demo_oru_message(STUDY, f"C{k}-{i}") + FS + CR)
            code, cid = msa(read_acks(s, 1)[0])
            if code != "AA" or cid != f"C{k}-{i}":
                errors.append(f"{k}/{i}: {code} {cid}")
        s.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert store.message_count() == 500


def test_split_reads_two_in_one_read_and_nul_padding(listener):
    server, store = listener
    s = socket.create_connection(("127.0.0.1", server.bound_port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    one = VT + demo_oru_message(STUDY, "S1") + FS + CR
    for i in range(0, len(one), 7):  # one message split across many TCP writes
        s.sendall(one[i : i + 7])
    assert msa(read_acks(s, 1)[0]) == ("AA", "S1")
    two = VT + demo_oru_message(STUDY, "S2") + FS + CR + b"\x00\x00\x00" + VT + demo_oru_message(STUDY, "S3") + FS + CR
    s.sendall(b"\x00" * 16 + two)  # NUL padding, then two messages in one write
    assert [msa(a) for a in read_acks(s, 2)] == [("AA", "S2"), ("AA", "S3")]
    s.close()
    assert store.message_count() == 3


def test_implausible_values_are_excluded_with_a_reason(listener, tmp_path):
    server, store = listener
    raw = demo_oru_message(STUDY, "HB").replace(
        b"OBX|6|", b"OBX|7|NM|718-7^Hemoglobin^LN||12.5|g/mL|||||F|||202601040900\rOBX|6|")
    rows = parse_observations(raw)
    hb = next(r for r in rows if r["loinc"] == "718-7")
    assert hb["value"] is None and "implausible" in hb["problem"]
    s = socket.create_connection(("127.0.0.1", server.bound_port))
    s.sendall(VT + raw + FS + CR)
    assert msa(read_acks(s, 1)[0])[0] == "AA"
    s.close()
    panel = lookup_labs(store, "OS-DEMO-0001", "OSTEOSCREEN-DEMO", STUDY.date())
    assert panel.get("718-7") is None
    assert any(e.code == "718-7" and "implausible" in e.reason for e in panel.excluded)


def test_real_lri_message_hemoglobin_in_g_per_ml_is_not_fed_to_the_model():
    rows = parse_observations((DATA / "LRI_2.0-NG_CBC_Typ_Message.hl7").read_bytes())
    hb = [r for r in rows if r["loinc"] == "718-7"]
    assert hb and all(r["value"] is None for r in hb)


def test_corrected_result_supersedes_the_original(listener):
    server, store = listener
    first = demo_oru_message(STUDY, "V1")
    corrected = demo_oru_message(STUDY, "V2").replace(b"|9.1|mg/dL|8.6-10.3|N|||F|", b"|8.7|mg/dL|8.6-10.3|N|||C|")
    s = socket.create_connection(("127.0.0.1", server.bound_port))
    for m in (first, corrected):
        s.sendall(VT + m + FS + CR)
        assert msa(read_acks(s, 1)[0])[0] == "AA"
    s.close()
    panel = lookup_labs(store, "OS-DEMO-0001", "OSTEOSCREEN-DEMO", STUDY.date())
    assert panel.get("17861-6").value == pytest.approx(8.7)


def test_unit_conversions():
    from hl7.mapping import to_canonical

    assert to_canonical("17861-6", 2.5, "mmol/L")[0] == pytest.approx(10.02)
    assert to_canonical("2160-0", 88.42, "µmol/L")[0] == pytest.approx(1.0)
    assert to_canonical("1989-3", 49.92, "nmol/L")[0] == pytest.approx(20, rel=1e-4)
    with pytest.raises(ValueError, match="not recognised"):
        to_canonical("17861-6", 9.0, "furlongs")


def test_hl7_cli_tools(tmp_path):
    cfg = tmp_path / "n.toml"
    from dicom_node.pacs import free_port

    port = free_port()
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n[hl7]\nport = {port}\n')
    store = LabStore(tmp_path / "state" / "labs.sqlite")
    server = MLLPServer("127.0.0.1", port, LabReceiver(store).handle, LabReceiver(store).refuse)
    server.start()
    try:
        msg = tmp_path / "m.hl7"
        today = dt.datetime.combine(dt.date.today(), dt.time(9))
        msg.write_bytes(demo_oru_message(today + dt.timedelta(days=1), "CLI1").replace(b"\r", b"\n"))
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "hl7", "send", str(msg), "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip().endswith("AA"), r.stdout + r.stderr
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "hl7", "labs", "OS-DEMO-0001", "--config",
                            str(cfg)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "6 usable" in r.stdout, r.stdout + r.stderr
        store.store_message(b"MSH|^~\\&|X|Y|||20260101||ORU^R01|BAD|P|2.5.1\rPID|1||P1\rOBX|1|NM|\x00",
                            __import__("hl7.precheck", fromlist=["parse_header"]).parse_header(
                                "MSH|^~\\&|X|Y|||20260101||ORU^R01|BAD|P|2.5.1\rPID|1||P1\r"))
        parse_pending(store)
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "hl7", "errors", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        assert "hl7 errors:" in r.stdout
    finally:
        server.stop()
        store.close()


def test_hl7_bench_command():
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "hl7", "bench"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    import re

    assert re.match(r"hl7 bench: msgs_s=\d+ p50_ms=[0-9.]+ p99_ms=[0-9.]+$", r.stdout.strip().splitlines()[-1])
    assert "2000 AA, 2000 stored" in r.stdout


def test_identity_mismatch_blocks_labs(listener):
    server, store = listener
    s = socket.create_connection(("127.0.0.1", server.bound_port))
    s.sendall(VT + demo_oru_message(STUDY, "ID1") + FS + CR)  # PID-7 19580312, PID-8 F
    assert msa(read_acks(s, 1)[0])[0] == "AA"
    s.close()
    ok = lookup_labs(store, "OS-DEMO-0001", "OSTEOSCREEN-DEMO", STUDY.date(), birth_date=dt.date(1958, 3, 12),
                     sex="F")
    assert len(ok.values) == 6
    other = lookup_labs(store, "OS-DEMO-0001", "OSTEOSCREEN-DEMO", STUDY.date(), birth_date=dt.date(1971, 6, 1),
                        sex="M")
    assert other.is_empty
    assert any("birth date and sex" in n for n in other.notes)
    assert all("blocked" in e.reason for e in other.excluded)


def test_older_store_is_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE message_patients (message_id INTEGER NOT NULL, patient_id TEXT NOT NULL, "
                     "issuer TEXT NOT NULL); INSERT INTO message_patients VALUES (1, 'P', '');")
    db.commit()
    db.close()
    store = LabStore(path)  # opens an older store and adds the new columns
    store.close()
    cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(message_patients)")}
    assert {"birth_date", "sex"} <= cols
