"""DICOM listener limits: TLS (tested with DCMTK's TLS build), an association limit, a low-space watermark."""
import socket
import subprocess

import pydicom
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import need_tool, storescu, wait_for
from tests.test_receiver import _associate_rq, _read_pdu


def _dcmtk_tls(tool: str, port: int, pki, files=(), client_cert: bool = True) -> subprocess.CompletedProcess:
    exe = need_tool(tool)
    tls = (["+tls", str(pki / "client.key"), str(pki / "client.crt")] if client_cert else ["+tla"])
    return subprocess.run([exe, *tls, "+cf", str(pki / "ca.crt"), "-aet", "CT1", "-aec", "OSTEOSCREEN",
                           "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120, env={"TCP_NODELAY": "1"})


def test_dicom_tls_with_client_certificates(node_factory, sample_series, pki):
    node = node_factory(extra=f'[node.tls]\nenabled = true\ncert_file = "{pki / "server.crt"}"\n'
                              f'key_file = "{pki / "server.key"}"\nca_file = "{pki / "ca.crt"}"\n').start()
    r = _dcmtk_tls("echoscu", node.port, pki)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _dcmtk_tls("storescu", node.port, pki, sample_series.files[:3])
    assert r.returncode == 0, r.stdout + r.stderr
    assert _dcmtk_tls("echoscu", node.port, pki, client_cert=False).returncode != 0  # no client certificate
    plain = subprocess.run([need_tool("echoscu"), "-aet", "CT1", "-aec", "OSTEOSCREEN", "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0  # no clear-text DICOM on a TLS port
    assert "(TLS)" in node.log()


def test_association_limit_rejects_the_extra_association(node_factory):
    node = node_factory(node_extra="max_associations = 2\n").start()
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)

    def hold_two():
        """Two established associations, once the start-up port probe's slot has expired (ARTIM 10 s)."""
        held = [ae.associate("127.0.0.1", node.port, ae_title="OSTEOSCREEN") for _ in range(2)]
        if all(a.is_established for a in held):
            return held
        for a in held:
            if a.is_established:
                a.release()
        return None

    held = wait_for(hold_two, 40, "two association slots", interval=3.0)
    try:
        # read the answer on the wire: pynetdicom 3.0.4 may report a rejection that arrives with the socket's
        # close as an abort (its acse checks the socket after the DUL thread closed it)
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(_associate_rq((Verification, ExplicitVRLittleEndian)))
            pdu_type, body = _read_pdu(sock)
        assert pdu_type == 0x03  # A-ASSOCIATE-RJ
        assert tuple(body[1:4]) == (2, 3, 2)  # transient, service provider (presentation), local limit exceeded
    finally:
        for a in held:
            a.release()
    assert "association limit (2) reached" in node.log()
    again = wait_for(lambda: (lambda a: a if a.is_established else None)(
        ae.associate("127.0.0.1", node.port, ae_title="OSTEOSCREEN")), 30, "a slot after release", interval=2.0)
    again.release()


def test_low_space_watermark_refuses_c_store_but_keeps_echo(node_factory, sample_series):
    node = node_factory(node_extra="min_free_mb = 100000000\n").start()  # 100 TB: always below the watermark
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="OSTEOSCREEN")
    try:
        assert assoc.send_c_echo().Status == 0x0000
        status = assoc.send_c_store(pydicom.dcmread(sample_series.files[0]))
        assert status.Status == 0xA700 and "low disk space" in status.ErrorComment
    finally:
        assoc.release()
    assert not list((node.state_dir / "instances").rglob("*.dcm"))  # nothing half-written, nothing indexed
    assert storescu(sample_series.files[:1], node.port).returncode != 0


def test_encrypted_tls_key_takes_its_password_from_the_environment(pki, tmp_path, monkeypatch):
    """The secret is never in the config file: key_password_env names the variable; errors say what to do."""
    import pytest

    from config.schema import ListenerTLSSettings
    from hl7.tls import TLSConfigError, server_context

    enc = tmp_path / "server-enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki / "server.key"), "-aes256", "-passout", "pass:s3cret",
                    "-out", str(enc)], check=True, capture_output=True)
    base = dict(enabled=True, cert_file=pki / "server.crt", key_file=enc)
    with pytest.raises(TLSConfigError, match="key is encrypted: set key_password_env"):
        server_context(ListenerTLSSettings(**base))
    tls = ListenerTLSSettings(**base, key_password_env="OSTEOSCREEN_TLS_KEY_PASSWORD")
    monkeypatch.delenv("OSTEOSCREEN_TLS_KEY_PASSWORD", raising=False)
    with pytest.raises(TLSConfigError, match="OSTEOSCREEN_TLS_KEY_PASSWORD .* is not set"):
        server_context(tls)
    monkeypatch.setenv("OSTEOSCREEN_TLS_KEY_PASSWORD", "wrong")
    with pytest.raises(TLSConfigError, match="wrong password"):
        server_context(tls)
    monkeypatch.setenv("OSTEOSCREEN_TLS_KEY_PASSWORD", "s3cret")
    assert server_context(tls) is not None
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    with pytest.raises(TLSConfigError) as exc:  # not the encrypted-key hint for a broken certificate
        server_context(ListenerTLSSettings(enabled=True, cert_file=garbage, key_file=pki / "server.key"))
    assert "key is encrypted" not in str(exc.value) and "PEM" in str(exc.value)


def test_per_ae_sop_class_list_refuses_other_classes(node_factory, sample_series):
    """CT1 may only store CT; an MR-class instance from it is refused with 0x0122 and audited."""
    import sqlite3

    from pynetdicom.sop_class import MRImageStorage

    node = node_factory(extra='[node.allowed_sop_classes]\nCT1 = ["CTImageStorage"]\n').start()
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="OSTEOSCREEN")
    assert assoc.is_established
    try:
        ct = pydicom.dcmread(sample_series.files[0])
        assert assoc.send_c_store(ct).Status == 0x0000
        mr = pydicom.dcmread(sample_series.files[1])
        mr.SOPClassUID = MRImageStorage
        mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
        mr.Modality = "MR"
        assert assoc.send_c_store(mr).Status == 0x0122
    finally:
        assoc.release()
    audit = sqlite3.connect(node.state_dir / "osteoscreen.sqlite").execute(
        "SELECT detail FROM audit WHERE kind='refused'").fetchall()
    assert len(audit) == 1 and "0x0122" in audit[0][0]
