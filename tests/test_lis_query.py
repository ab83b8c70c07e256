"""Pulling labs from a LIS (QBP^Q11 / QRY^R02) within a time budget, and MLLP over TLS."""
import datetime as dt
import socket
import ssl
import subprocess
import threading
import time

import pytest

from config.schema import LISQuerySettings, TLSSettings
from dicom_node.pacs import free_port
from dicom_node.sample import demo_oru_message
from hl7.client import FrameTooLarge, MLLPClient, ack_code
from hl7.lookup import lookup_labs
from hl7.mllp import MLLPServer
from hl7.query import LabQueryClient, build_query
from hl7.receiver import LabReceiver
from hl7.store import LabStore
from hl7.tls import client_context, server_context
from tests.conftest import wait_for
from tests.lis_simulator import LabPatient, LISSimulator

STUDY = dt.date(2026, 1, 5)
START, END = STUDY - dt.timedelta(days=90), STUDY + dt.timedelta(days=1)
P1 = LabPatient("P1", "HOSP", results=[
    ("17861-6", "Calcium", "2.30", "mmol/L", "F", "202601040800"),
    ("1989-3", "Vitamin D3", "21", "ng/mL", "F", "202512200800"),
    ("2160-0", "Creatinine", "80", "umol/L", "F", "202401010800"),  # outside the asked window: not sent
])


@pytest.fixture()
def store(tmp_path):
    s = LabStore(tmp_path / "labs.sqlite")
    yield s
    s.close()


def settings(port: int, **kw) -> LISQuerySettings:
    base = dict(enabled=True, host="127.0.0.1", port=port, connect_timeout_s=1.0, read_timeout_s=2.0, retries=2,
                budget_s=5.0, requery_after_s=0.0)
    return LISQuerySettings(**{**base, **kw})


@pytest.mark.parametrize("protocol,answer_type", [("qbp_q11", "RSP^K11"), ("qry_r02", "ORF^R04")])
def test_query_fetches_stores_and_feeds_the_lookup(store, protocol, answer_type):
    with LISSimulator([P1]) as lis:
        outcome = LabQueryClient(settings(lis.port, protocol=protocol), store).fetch("P1", "HOSP", START, END)
        assert outcome.status == "found" and outcome.observations == 2 and outcome.attempts == 1, outcome
        request = lis.requests[0]
    assert ("QBP^Q11" if protocol == "qbp_q11" else "QRY^R02") in request
    assert "P1" in request and START.strftime("%Y%m%d") in request and END.strftime("%Y%m%d") in request
    panel = lookup_labs(store, "P1", "HOSP", STUDY)
    assert panel.get("17861-6").value == pytest.approx(2.30 * 4.008)
    assert panel.get("1989-3").value == pytest.approx(21) and panel.get("1989-3").unit == "ng/mL"
    assert panel.get("2160-0") is None
    assert store.message_count() == 1
    assert store._db.execute("SELECT message_type FROM messages").fetchone()[0] == answer_type


def test_no_data_and_refusals_store_nothing(store):
    with LISSimulator([P1]) as lis:
        client = LabQueryClient(settings(lis.port), store)
        assert client.fetch("UNKNOWN", "HOSP", START, END).status == "no data"
        lis.answer_for = "P1"  # a LIS bug: answers about another patient
        wrong = client.fetch("P2", "HOSP", START, END)
        assert wrong.status == "failed" and "another patient" in wrong.detail
        lis.answer_for, lis.refuse = "", "query not permitted for this application"
        refused = client.fetch("P1", "HOSP", START, END)
        assert refused.status == "failed" and "not permitted" in refused.detail
        lis.refuse = ""
        other_name = client.fetch("P1", "1.2.3.4.5", START, END)  # the LIS calls the authority HOSP
        assert other_name.status == "failed" and "another patient" in other_name.detail
    assert store.message_count() == 0
    with LISSimulator([P1]) as lis:
        joined = LabQueryClient(settings(lis.port), store, issuer_aliases={"1.2.3.4.5": "HOSP"})
        assert joined.fetch("P1", "1.2.3.4.5", START, END).status == "found"


def test_bounded_retries_and_time_budget(store):
    with LISSimulator([P1]) as lis:
        lis.drop_connections = 2  # two connections closed without an answer, then a good one
        outcome = LabQueryClient(settings(lis.port), store).fetch("P1", "HOSP", START, END)
        assert outcome.status == "found" and outcome.attempts == 3
        lis.delay_s = 3.0  # slower than the budget
        slow = LabQueryClient(settings(lis.port, budget_s=1.0, read_timeout_s=5.0), store).fetch("P1", "HOSP",
                                                                                               START, END)
        assert slow.status == "failed" and slow.elapsed_s < 2.0  # bounded by the budget, not the LIS
    dead = LabQueryClient(settings(free_port(), retries=1), store).fetch("P1", "HOSP", START, END)
    assert dead.status == "failed" and dead.attempts == 2 and "unreachable" in dead.detail


def test_a_lis_dripping_its_answer_cannot_hold_the_job_past_the_budget(store):
    """Each byte within read_timeout_s used to restart the wait: a 300-byte answer at 0.05 s a byte took 15 s
    with budget_s = 1.5, on the job dispatcher's thread."""
    with LISSimulator([P1]) as lis:
        lis.drip_s = 0.05
        started = time.monotonic()
        outcome = LabQueryClient(settings(lis.port, budget_s=1.5, read_timeout_s=1.0, retries=3), store).fetch(
            "P1", "HOSP", START, END)
        elapsed = time.monotonic() - started
    assert outcome.status == "failed" and "TimeoutError" in outcome.detail, outcome
    assert elapsed < 2.5, f"the query took {elapsed:.1f} s with budget_s = 1.5"
    assert store.message_count() == 0


def test_an_answer_that_never_ends_its_frame_is_refused_at_the_size_cap():
    """A peer streaming bytes without FS CR: the client stops at its cap instead of filling memory."""
    server = socket.create_server(("127.0.0.1", 0))

    def flood() -> None:
        conn, _ = server.accept()
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"\x0bMSH|" + b"x" * 300_000)
                time.sleep(0.5)
            except OSError:
                pass

    worker = threading.Thread(target=flood, daemon=True)
    worker.start()
    try:
        with MLLPClient("127.0.0.1", server.getsockname()[1], timeout_s=5, max_frame_bytes=100_000) as c:
            with pytest.raises(FrameTooLarge, match="without ending the frame"):
                c.send(b"MSH|^~\\&|OS||LIS||2026||QBP^Q11|Q1|P|2.5.1\r")
    finally:
        server.close()
        worker.join(timeout=5)


def test_same_patient_is_not_asked_again_within_requery_time(store):
    with LISSimulator([P1]) as lis:
        client = LabQueryClient(settings(lis.port, requery_after_s=300), store)
        assert client.fetch("P1", "HOSP", START, END).status == "found"
        assert client.fetch("P1", "HOSP", START, END).status == "skipped"
        assert len(lis.requests) == 1


def test_query_fields_are_escaped():
    q = build_query(settings(1), "A|B^C", "X&Y", START, END)
    qpd = next(s for s in q.message.decode().split("\r") if s.startswith("QPD"))
    assert "A\\F\\B\\S\\C^^^X\\T\\Y^MR" in qpd


# --- TLS ---------------------------------------------------------------------------------------------------------
def test_listener_over_tls_with_client_certificates(tmp_path, pki):
    store = LabStore(tmp_path / "labs.sqlite")
    receiver = LabReceiver(store)
    server_tls = TLSSettings(enabled=True, cert_file=pki / "server.crt", key_file=pki / "server.key",
                             ca_file=pki / "ca.crt")
    server = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse, read_timeout_s=5,
                        ssl_context=server_context(server_tls))
    server.start()
    try:
        good = client_context(TLSSettings(enabled=True, ca_file=pki / "ca.crt", cert_file=pki / "client.crt",
                                          key_file=pki / "client.key"))
        with MLLPClient("127.0.0.1", server.bound_port, timeout_s=5, ssl_context=good) as c:
            assert ack_code(c.send(demo_oru_message(dt.datetime(2026, 1, 5, 9), "TLS1"))) == "AA"
        assert store.message_count() == 1
        no_cert = client_context(TLSSettings(enabled=True, ca_file=pki / "ca.crt"))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with MLLPClient("127.0.0.1", server.bound_port, timeout_s=5, ssl_context=no_cert) as c:
                c.send(demo_oru_message(dt.datetime(2026, 1, 5, 9), "TLS2"))
        untrusting = client_context(TLSSettings(enabled=True))  # system CAs only: our test CA is not trusted
        with pytest.raises(ssl.SSLCertVerificationError):
            MLLPClient("127.0.0.1", server.bound_port, timeout_s=5, ssl_context=untrusting)
        with socket.create_connection(("127.0.0.1", server.bound_port), timeout=5) as plain:
            plain.sendall(b"\x0b" + demo_oru_message(dt.datetime(2026, 1, 5, 9), "PLAIN") + b"\x1c\x0d")
            assert b"MSA|AA" not in plain.recv(4096)  # no ACK in clear text
        assert store.message_count() == 1
    finally:
        server.stop()
        store.close()


def test_a_tls_connection_refused_by_host_or_slot_costs_no_handshake(tmp_path, pki, caplog):
    """allowed_hosts and max_connections are checked before the TLS handshake: a refused peer's handshake never
    completes (it used to, then the connection was closed)."""
    store = LabStore(tmp_path / "labs.sqlite")
    receiver = LabReceiver(store)
    server_tls = server_context(TLSSettings(enabled=True, cert_file=pki / "server.crt", key_file=pki / "server.key"))
    client_tls = client_context(TLSSettings(enabled=True, ca_file=pki / "ca.crt"))
    one_slot = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse, read_timeout_s=5,
                          ssl_context=server_tls, max_connections=1)
    closed = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse, read_timeout_s=5,
                        ssl_context=server_tls, allowed_hosts=["10.0.0.0/8"])
    one_slot.start()
    closed.start()
    try:
        with MLLPClient("127.0.0.1", one_slot.bound_port, timeout_s=5, ssl_context=client_tls) as first:
            assert ack_code(first.send(demo_oru_message(dt.datetime(2026, 1, 5, 9), "S1"))) == "AA"
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                MLLPClient("127.0.0.1", one_slot.bound_port, timeout_s=5, ssl_context=client_tls)
            assert ack_code(first.send(demo_oru_message(dt.datetime(2026, 1, 5, 9), "S2"))) == "AA"
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            MLLPClient("127.0.0.1", closed.bound_port, timeout_s=5, ssl_context=client_tls)
    finally:
        one_slot.stop()
        closed.stop()
        store.close()
    assert "1 connections already open" in caplog.text and "not in hl7.allowed_hosts" in caplog.text
    assert "TLS handshake failed" not in caplog.text


def test_a_silent_tls_peer_gives_its_slot_back_at_the_handshake_timeout(tmp_path, pki, caplog):
    """A peer that connects and never starts TLS holds its slot only until the handshake timeout, not longer."""
    store = LabStore(tmp_path / "labs.sqlite")
    receiver = LabReceiver(store)
    server = MLLPServer("127.0.0.1", 0, receiver.handle, receiver.refuse, read_timeout_s=1, max_connections=1,
                        ssl_context=server_context(TLSSettings(enabled=True, cert_file=pki / "server.crt",
                                                               key_file=pki / "server.key")))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.bound_port), timeout=5):
            wait_for(lambda: "TLS handshake failed" in caplog.text, 10, "the silent peer's handshake to time out")
            client_tls = client_context(TLSSettings(enabled=True, ca_file=pki / "ca.crt"))
            with MLLPClient("127.0.0.1", server.bound_port, timeout_s=5, ssl_context=client_tls) as c:
                assert ack_code(c.send(demo_oru_message(dt.datetime(2026, 1, 5, 9), "T1"))) == "AA"
    finally:
        server.stop()
        store.close()
    assert "connections already open" not in caplog.text


def test_query_over_tls(store, pki):
    server_ctx = server_context(TLSSettings(enabled=True, cert_file=pki / "server.crt", key_file=pki / "server.key"))
    with LISSimulator([P1], ssl_context=server_ctx) as lis:
        ctx = client_context(TLSSettings(enabled=True, ca_file=pki / "ca.crt"))
        outcome = LabQueryClient(settings(lis.port), store, ctx).fetch("P1", "HOSP", START, END)
        assert outcome.status == "found", outcome
        plain = LabQueryClient(settings(lis.port, retries=0), store).fetch("P1", "HOSP", START, END)
        assert plain.status == "failed"


def test_cli_query_and_send_over_tls(tmp_path, pki):
    import sys

    today = dt.datetime.combine(dt.date.today(), dt.time(8))
    patient = LabPatient("P9", "HOSP", results=[("17861-6", "Calcium", "9.4", "mg/dL", "F",
                                                 (today - dt.timedelta(days=3)).strftime("%Y%m%d%H%M"))])
    hl7_port = free_port()
    with LISSimulator([patient]) as lis:
        cfg = tmp_path / "n.toml"
        cfg.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n[hl7]\nport = {hl7_port}\n'
                       f'[lis_query]\nport = {lis.port}\nprotocol = "qry_r02"\n')
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "hl7", "query", "P9", "--issuer", "HOSP",
                            "--config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "found: 1 observation(s)" in r.stdout and "1 usable" in r.stdout, r.stdout

    store = LabStore(tmp_path / "tls.sqlite")
    server = MLLPServer("127.0.0.1", hl7_port, LabReceiver(store).handle, LabReceiver(store).refuse,
                        ssl_context=server_context(TLSSettings(enabled=True, cert_file=pki / "server.crt",
                                                               key_file=pki / "server.key")))
    server.start()
    try:
        msg = tmp_path / "m.hl7"
        msg.write_bytes(demo_oru_message(today, "CLITLS"))
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "hl7", "send", str(msg), "--config", str(cfg),
                            "--tls-ca", str(pki / "ca.crt")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip().endswith("AA"), r.stdout + r.stderr
    finally:
        server.stop()
        store.close()


def test_tls_and_query_settings_are_checked_at_config_time(tmp_path):
    import tomllib

    from config import ConfigError, settings_from_dict

    with pytest.raises(ConfigError, match="hl7.tls"):
        settings_from_dict(tomllib.loads("[hl7.tls]\nenabled = true\n"))  # a TLS listener needs a certificate
    with pytest.raises(ConfigError, match="cert_file .* does not exist"):
        settings_from_dict(tomllib.loads(f'[hl7.tls]\nenabled = true\ncert_file = "{tmp_path}/x.crt"\n'
                                         f'key_file = "{tmp_path}/x.key"\n'))
    with pytest.raises(ConfigError, match="lis_query.protocol"):
        settings_from_dict(tomllib.loads('[lis_query]\nprotocol = "fhir"\n'))
    s = settings_from_dict(tomllib.loads('[lis_query]\nenabled = true\nprotocol = "qry_r02"\n'))
    assert s.lis_query.enabled and not s.lis_query.tls.enabled
