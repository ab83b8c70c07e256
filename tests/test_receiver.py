"""The node's own DICOM receive path: header scanning, upper-layer robustness, streaming durability,
transfer syntaxes, and the receiver processes of the service."""
from __future__ import annotations

import glob
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.db import NodeDB
from dicom_node.dimse_codec import decode_command
from dicom_node.header_scan import WANTED, Unsupported, scan_header
from dicom_node.scp import StorageSCP
from dicom_node.store import InstanceStore
from tests.conftest import need_tool, storescu, wait_for

PYDICOM_FILES = Path(pydicom.__file__).parent / "data"


def _data_set_of(path: str) -> tuple[bytes, str] | None:
    raw = Path(path).read_bytes()
    if raw[128:136] != b"DICM\x02\x00\x00\x00":  # no preamble, or no meta group length to skip the meta by
        return None
    meta_len = struct.unpack_from("<L", raw, 140)[0]
    return raw[144 + meta_len:], str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_header_scan_equals_pydicom_on_real_files():
    """pydicom's own test and character-set files plus the shipped ones: same values, prefixes never wrong."""
    files = sorted(glob.glob(str(PYDICOM_FILES / "test_files" / "*.dcm")) +
                   glob.glob(str(PYDICOM_FILES / "charset_files" / "*.dcm")) +
                   glob.glob("dicom_node/sample_data/*.dcm"))
    compared = 0
    for f in files:
        try:
            found = _data_set_of(f)
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - files pydicom itself cannot read are not the point here
            continue
        if found is None:
            continue
        body, syntax = found
        want = {k: str(ds.get(k, "") or "").strip() for k, _ in WANTED.values()
                if k in ds and k != "SpecificCharacterSet"}
        try:
            got = scan_header(body, syntax)
        except Unsupported:
            continue
        assert got is not None
        assert {k: v for k, v in got.items() if k != "SpecificCharacterSet"} == want, f
        compared += 1
        for cut in (7, 64, 300, 1000):
            partial = scan_header(body[:cut], syntax, complete=False) if cut < len(body) else None
            if partial is not None:
                assert {k: v for k, v in partial.items() if k != "SpecificCharacterSet"} == want, (f, cut)
    assert compared >= 60  # Japanese (ISO 2022), Cyrillic, Greek, ... included


# --- raw upper-layer peers ---------------------------------------------------------------------
@pytest.fixture()
def scp(tmp_path):
    db = NodeDB(tmp_path / "db.sqlite")
    store = InstanceStore(tmp_path / "store", db)
    stored = []
    server = StorageSCP(ae_title="OSTEOSCREEN", host="127.0.0.1", port=0, max_pdu=16384, allowed_calling_aets=[],
                        store=store, on_stored=stored.append)
    server.acse_timeout = 3.0
    server.start()
    server.stored = stored
    yield server
    server.stop()
    db.close()


def _associate_rq(*contexts: tuple[str, str]) -> bytes:
    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title, rq.called_ae_title = "CT1", "OSTEOSCREEN"
    items = []
    for i, (abstract, syntax) in enumerate(contexts):
        cx = build_context(abstract, [syntax])
        cx.context_id = 2 * i + 1
        items.append(cx)
    rq.presentation_context_definition_list = items
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.3.4"
    rq.user_information = [max_length, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return pdu.encode()


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    length = struct.unpack(">L", header[2:6])[0]
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return header[0], body


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def _command(field: int, sop_class: str, sop_uid: str = "") -> bytes:
    def element(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0, elem, len(value)) + value

    def ui(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\x00" if len(raw) % 2 else raw

    body = (element(0x0002, ui(sop_class)) + element(0x0100, struct.pack("<H", field))
            + element(0x0110, struct.pack("<H", 7)) + element(0x0700, struct.pack("<H", 0))
            + element(0x0800, struct.pack("<H", 0x0000)) + (element(0x1000, ui(sop_uid)) if sop_uid else b""))
    return element(0x0000, struct.pack("<L", len(body))) + body


def _open(scp, *contexts) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", scp.port), timeout=10)
    sock.sendall(_associate_rq(*(contexts or [(CTImageStorage, ExplicitVRLittleEndian)])))
    assert _read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
    return sock


def _echo_works(port: int) -> bool:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOSCREEN")
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def test_abort_in_the_middle_of_a_data_set_keeps_nothing(scp, sample_series, tmp_path):
    found = _data_set_of(str(sample_series.files[0]))
    assert found is not None
    body, _ = found
    ds = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    sock = _open(scp)
    sock.sendall(_p_data(1, 0x03, _command(0x0001, CTImageStorage, ds.SOPInstanceUID)))
    for off in range(0, 64 * 1024, 16000):  # the header and some pixel data: the file is already open
        sock.sendall(_p_data(1, 0x00, body[off:off + 16000]))
    wait_for(lambda: list((tmp_path / "store").rglob(".incoming.*")), 10,
             "the instance streamed to disk while it arrives")
    sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-ABORT
    sock.close()
    wait_for(lambda: not list((tmp_path / "store").rglob(".incoming.*")), 10, "the partial file removed")
    assert not list((tmp_path / "store").rglob("*.dcm")) and not scp.stored
    assert _echo_works(scp.port)


@pytest.mark.parametrize("bad", ["unknown PDU type", "context not accepted", "PDU too long", "garbage command"])
def test_upper_layer_violations_abort_the_association_not_the_listener(scp, bad):
    sock = _open(scp)
    if bad == "unknown PDU type":
        sock.sendall(b"\x09\x00\x00\x00\x00\x02\x00\x00")
    elif bad == "context not accepted":
        sock.sendall(_p_data(5, 0x03, _command(0x0030, Verification)))
    elif bad == "PDU too long":
        sock.sendall(struct.pack(">BxL", 0x04, 10 * 2**20))
    else:
        sock.sendall(_p_data(1, 0x03, b"\x00\x00\x00\x00\xff\xff"))
    pdu_type, _ = _read_pdu(sock)
    assert pdu_type == 0x07  # A-ABORT
    sock.close()
    assert _echo_works(scp.port)


def test_a_request_not_served_here_is_answered_unrecognised(scp):
    """A C-FIND-RQ (with its identifier) on the storage context: read to the end, answered 0x0211."""
    sock = _open(scp)
    sock.sendall(_p_data(1, 0x03, _command(0x0020, CTImageStorage)))
    sock.sendall(_p_data(1, 0x02, b"\x10\x00\x20\x00LO\x02\x00*\x00"))
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x04
    response = decode_command(body[6:])
    assert response.command_field == 0x8020
    status = re.search(rb"\x00\x00\x00\x09\x02\x00\x00\x00(..)", body[6:], re.S)
    assert status and struct.unpack("<H", status.group(1))[0] == 0x0211
    sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
    assert _read_pdu(sock)[0] == 0x06
    sock.close()


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_other_transfer_syntaxes_are_stored_as_received(scp, sample_series, syntax, tmp_path):
    ds = pydicom.dcmread(sample_series.files[0])
    ds.file_meta.TransferSyntaxUID = syntax
    pydicom.dcmwrite(tmp_path / "sent.dcm", ds, implicit_vr=False, little_endian=syntax != ExplicitVRBigEndian,
                     force_encoding=True)
    ds = pydicom.dcmread(tmp_path / "sent.dcm")
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="OSTEOSCREEN")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    stored = pydicom.dcmread(scp.stored[0].path)
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.PatientID == ds.PatientID
    assert np.array_equal(stored.pixel_array, pydicom.dcmread(tmp_path / "sent.dcm").pixel_array)


# --- receiver processes --------------------------------------------------------------------------
def test_receiver_processes_share_concurrent_senders_and_one_that_dies_is_restarted(node_factory, sample_series):
    node = node_factory(node_extra="receiver_processes = 2\n", quiet_s=30).start()
    pids = wait_for(lambda: (lambda m: m if len(m) == 2 else None)(
        dict(re.findall(r"receiver process (\d) ready \(pid (\d+)\)", node.log()))), 30, "two receiver processes")
    files = sample_series.files
    halves = [files[: len(files) // 2], files[len(files) // 2:]]
    senders = [subprocess.Popen([need_tool("storescu"), "-aet", "CT1", "-aec", "OSTEOSCREEN", "127.0.0.1",
                                 str(node.port), *map(str, part)], env=dict(os.environ, TCP_NODELAY="1"))
               for part in halves]
    assert [s.wait(timeout=120) for s in senders] == [0, 0]
    assert len(list((node.state_dir / "instances").rglob("*.dcm"))) == len(files)
    os.kill(int(pids["0"]), signal.SIGKILL)
    wait_for(lambda: "receiver process 0 exited" in node.log(), 20, "the receiver's death noticed")
    # it might have indexed an instance without telling the service: the receiving series get their timer again
    wait_for(lambda: f"series {sample_series.series_uid} may have lost a receiver's notice" in node.log(), 10,
             "the series' quiet period restarted")
    wait_for(lambda: len(re.findall(r"receiver process 0 ready", node.log())) == 2, 60, "receiver 0 restarted")
    r = storescu(files[:2], node.port)  # duplicates now: answered Success, stored once
    assert r.returncode == 0, r.stderr
    assert node.proc is not None and node.proc.poll() is None


def test_a_silent_peer_is_aborted_after_the_network_timeout(scp):
    scp.network_timeout = 1.0
    sock = _open(scp)
    started = time.monotonic()
    sock.settimeout(10)
    assert _read_pdu(sock)[0] == 0x07  # A-ABORT, unprompted
    assert time.monotonic() - started < 5
    sock.close()
    assert _echo_works(scp.port)


def test_the_association_names_our_implementation_as_the_conformance_statement_does(scp):
    from dicom_node.dimse_codec import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="ANY-SCP")  # the called AE title is not checked
    try:
        assert assoc.is_established
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        assert assoc.acceptor.maximum_length == 16384
    finally:
        assoc.release()
    statement = Path("docs/conformance.md").read_text()
    assert f"{IMPLEMENTATION_CLASS_UID} / {IMPLEMENTATION_VERSION_NAME}" in statement


def test_a_receiver_that_cannot_start_fails_the_start_instead_of_looping(tmp_path):
    """Here its database path lies under a plain file; the service must not report ready without receivers."""
    from dicom_node.receiver_pool import ReceiverPool, ReceiverSetup, ReceiverStartError

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    setup = ReceiverSetup(ae_title="OSTEOSCREEN", max_pdu=16384, max_associations=4, allowed_calling_aets=[],
                          allowed_sop_classes={}, tls=None, store_root=str(tmp_path / "store"),
                          db_path=str(blocker / "osteoscreen.sqlite"), min_free_bytes=0)
    pool = ReceiverPool(setup, 1, on_stored=lambda ref: None, on_outcome=lambda *a: None)
    started = time.monotonic()
    with pytest.raises(ReceiverStartError, match="exited with code 1 during start-up"):
        pool.start()
    assert time.monotonic() - started < 30
    assert all(r.process.exitcode is not None for r in pool._receivers)


def test_a_restarted_receiver_keeps_the_reloaded_allow_list(tmp_path):
    """A reload (SIGHUP) changes the calling-AE allow-list; a receiver that dies afterwards must come back with
    the new list, not the one the service started with."""
    from dicom_node.receiver_pool import ReceiverPool, ReceiverSetup

    db = NodeDB(tmp_path / "db.sqlite")
    setup = ReceiverSetup(ae_title="OSTEOSCREEN", max_pdu=16384, max_associations=4, allowed_calling_aets=["CT1"],
                          allowed_sop_classes={}, tls=None, store_root=str(tmp_path / "store"),
                          db_path=str(tmp_path / "db.sqlite"), min_free_bytes=0)
    pool = ReceiverPool(setup, 1, on_stored=lambda ref: None, on_outcome=lambda *a: None)
    server = StorageSCP(ae_title="OSTEOSCREEN", host="127.0.0.1", port=0, max_pdu=16384,
                        allowed_calling_aets=["CT1"], store=InstanceStore(tmp_path / "store", db),
                        on_stored=lambda ref: None, pool=pool)
    server.start()
    try:
        def echo_as(calling: str) -> bool:
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", server.port, ae_title="OSTEOSCREEN")
            try:
                return assoc.is_established and assoc.send_c_echo().Status == 0
            finally:
                if assoc.is_established:
                    assoc.release()

        assert echo_as("CT1") and not echo_as("CT2")
        server.set_allowed_calling_aets(["CT2"])  # what a reload does
        assert wait_for(lambda: echo_as("CT2"), 10, "the new allow-list in the receiver") and not echo_as("CT1")
        receiver = pool._receivers[0]
        old = receiver.process
        os.kill(old.pid, signal.SIGKILL)
        wait_for(lambda: receiver.process is not old and receiver.ready.is_set(), 30, "the receiver restarted")
        assert echo_as("CT2") and not echo_as("CT1")
    finally:
        server.stop()
        db.close()


def test_while_its_only_receiver_restarts_an_association_is_refused_transiently_not_dropped(tmp_path):
    """A connection cannot go to a dead receiver: the sender gets an A-ASSOCIATE-RJ (transient) and retries."""
    from dicom_node.receiver_pool import ReceiverPool, ReceiverSetup

    db = NodeDB(tmp_path / "db.sqlite")
    setup = ReceiverSetup(ae_title="OSTEOSCREEN", max_pdu=16384, max_associations=4, allowed_calling_aets=[],
                          allowed_sop_classes={}, tls=None, store_root=str(tmp_path / "store"),
                          db_path=str(tmp_path / "db.sqlite"), min_free_bytes=0)
    pool = ReceiverPool(setup, 1, on_stored=lambda ref: None, on_outcome=lambda *a: None)
    server = StorageSCP(ae_title="OSTEOSCREEN", host="127.0.0.1", port=0, max_pdu=16384, allowed_calling_aets=[],
                        store=InstanceStore(tmp_path / "store", db), on_stored=lambda ref: None, pool=pool)
    server.start()
    try:
        receiver = pool._receivers[0]
        os.kill(receiver.process.pid, signal.SIGKILL)  # dies young: restarted after a 1 s back-off
        wait_for(lambda: receiver.channel is None, 10, "the receiver's death noticed")
        ae = AE(ae_title="CT1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="OSTEOSCREEN")
        assert assoc.is_rejected and not assoc.is_established
        wait_for(lambda: receiver.ready.is_set(), 30, "the receiver restarted")
        assert _echo_works(server.port)
    finally:
        server.stop()
        db.close()


# --- data sets that must not be answered Success (review of the receive path, 2026-12-07) ---------------------
def _status(body: bytes) -> tuple[int, str]:
    found = re.search(rb"\x00\x00\x00\x09\x02\x00\x00\x00(..)", body[6:], re.S)
    comment = re.search(rb"\x00\x00\x02\x09(....)", body[6:], re.S)
    text = ""
    if comment:
        n = struct.unpack("<L", comment.group(1))[0]
        text = body[6 + comment.end():6 + comment.end() + n].decode(errors="replace").strip("\x00 ")
    return struct.unpack("<H", found.group(1))[0], text


def _send_store(sock: socket.socket, context_id: int, command: bytes, data: bytes) -> tuple[int, str]:
    sock.sendall(_p_data(context_id, 0x03, command))
    pieces = [data[i:i + 16000] for i in range(0, len(data), 16000)] or [b""]
    for i, piece in enumerate(pieces):
        sock.sendall(_p_data(context_id, 0x02 if i == len(pieces) - 1 else 0x00, piece))
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x04, pdu_type
    return _status(body)


def test_a_data_set_cut_short_is_refused_and_nothing_is_kept(scp, sample_series, tmp_path):
    """A sender that set the last-fragment flag early (20 kB of pixel data missing) was answered Success and the
    node kept a file whose pixel data could not be read; the sender may then purge the only good copy."""
    from dicom_node.dataset_end import DataSetEnd

    body, syntax = _data_set_of(str(sample_series.files[0]))
    ds = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    sock = _open(scp)
    status, comment = _send_store(sock, 1, _command(0x0001, CTImageStorage, ds.SOPInstanceUID), body[:-20000])
    assert status == 0xC210 and "cut short" in comment
    assert not list((tmp_path / "store").rglob("*.dcm")) and not list((tmp_path / "store").rglob(".incoming.*"))
    assert _send_store(sock, 1, _command(0x0001, CTImageStorage, ds.SOPInstanceUID), body) == (0x0000, "")
    assert len(scp.stored) == 1 and pydicom.dcmread(scp.stored[0].path).pixel_array.shape == (ds.Rows, ds.Columns)
    sock.close()
    # the framing check itself, on every kind of cut and on a whole data set fed in odd pieces
    for cut in (1, 7, 100, len(body) // 2, len(body) - 1):
        end = DataSetEnd(syntax)
        end.feed(body[:cut])
        assert not end.complete(), cut
    end = DataSetEnd(syntax)
    for i in range(0, len(body), 4093):
        end.feed(memoryview(body)[i:i + 4093])
    assert end.complete()


def test_a_deflated_data_set_cut_short_is_refused(scp, sample_series, tmp_path):
    ds = pydicom.dcmread(sample_series.files[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    pydicom.dcmwrite(tmp_path / "deflated.dcm", ds, implicit_vr=False, little_endian=True, force_encoding=True)
    body, syntax = _data_set_of(str(tmp_path / "deflated.dcm"))
    assert syntax == DeflatedExplicitVRLittleEndian
    sock = _open(scp, (CTImageStorage, DeflatedExplicitVRLittleEndian))
    status, comment = _send_store(sock, 1, _command(0x0001, CTImageStorage, ds.SOPInstanceUID), body[:-500])
    assert status == 0xC210 and "cut short" in comment
    assert _send_store(sock, 1, _command(0x0001, CTImageStorage, ds.SOPInstanceUID), body) == (0x0000, "")
    sock.close()


def test_the_sop_class_must_agree_between_context_command_and_data_set(scp, sample_series):
    """A CT sent on the Verification context, a CT data set under a Secondary Capture command, and a command
    without its Affected SOP Instance UID were all stored (the file meta then said SC for a CT)."""
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    body, _ = _data_set_of(str(sample_series.files[0]))
    ds = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    sock = _open(scp, (CTImageStorage, ExplicitVRLittleEndian), (Verification, ExplicitVRLittleEndian),
                 (SecondaryCaptureImageStorage, ExplicitVRLittleEndian))
    uid = ds.SOPInstanceUID
    assert _send_store(sock, 3, _command(0x0001, CTImageStorage, uid), body)[0] == 0x0122
    status, comment = _send_store(sock, 5, _command(0x0001, SecondaryCaptureImageStorage, uid), body)
    assert status == 0xA900 and "SOP Class UID in the dataset" in comment
    status, comment = _send_store(sock, 1, _command(0x0001, CTImageStorage), body)
    assert status == 0xA900 and "no Affected SOP Instance UID" in comment
    assert not scp.stored
    assert _send_store(sock, 1, _command(0x0001, CTImageStorage, uid), body) == (0x0000, "")
    sock.close()


def test_a_lying_element_length_in_the_header_is_refused_without_buffering_the_transfer(scp):
    """A defined-length element before group 0020 claiming ~4 GB kept the header 'unfinished', so every later
    fragment was held in memory (150 MB sent: +150 MB resident)."""
    from dicom_node.scp import HEADER_LIMIT

    sock = _open(scp)
    lying = struct.pack("<HH2sHL", 0x0009, 0x0010, b"OB", 0, 0xFFFFFFF0)  # private OB, 4 GB long
    data = lying + bytes(HEADER_LIMIT + 2**20)
    status, comment = _send_store(sock, 1, _command(0x0001, CTImageStorage, "1.2.3.4"), data)
    assert status == 0xC210 and "no end of its header" in comment
    sock.close()
    assert _echo_works(scp.port)


def test_the_association_request_must_arrive_whole_within_artim(scp):
    """One byte every second kept the connection (and an association slot) for as long as the peer liked."""
    rq = _associate_rq((CTImageStorage, ExplicitVRLittleEndian))
    sock = socket.create_connection(("127.0.0.1", scp.port), timeout=10)
    started = time.monotonic()
    with pytest.raises(OSError):
        for i in range(len(rq)):
            sock.sendall(rq[i:i + 1])
            time.sleep(1.0)
            if time.monotonic() - started > 15:
                break
    assert time.monotonic() - started < scp.acse_timeout + 4
    sock.close()


def test_max_pdu_zero_advertises_the_largest_pdu_the_node_reads(tmp_path, sample_series):
    """max_pdu = 0 was advertised as 'unlimited', but PDUs over 64 MiB are refused: a peer honouring it sent a
    large data set as one PDU and was aborted."""
    from dicom_node.scp import UNLIMITED_PDU_CAP

    db = NodeDB(tmp_path / "db.sqlite")
    server = StorageSCP(ae_title="OSTEOSCREEN", host="127.0.0.1", port=0, max_pdu=0, allowed_calling_aets=[],
                        store=InstanceStore(tmp_path / "store", db), on_stored=lambda ref: None)
    server.start()
    try:
        ae = AE(ae_title="CT1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="OSTEOSCREEN")
        assert assoc.is_established and assoc.acceptor.maximum_length == UNLIMITED_PDU_CAP
        assoc.release()
    finally:
        server.stop()
        db.close()


def test_one_instance_sent_under_two_series_at_once_ends_filed_once(tmp_path, sample_series):
    """Both associations were answered Success; the index kept the first series and the second file lay on disk
    unindexed. The later commit now moves the instance, as a re-send after the first would."""
    data = Path(sample_series.files[0]).read_bytes()
    ds = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    db = NodeDB(tmp_path / "db.sqlite")
    store = InstanceStore(tmp_path / "store", db)
    keys = dict(sop_class=str(ds.SOPClassUID), sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID))
    first, second = (store.begin(series_uid=s, **keys) for s in ("1.2.3.1", "1.2.3.2"))
    for incoming in (first, second):
        incoming.write(data)
    meta = dict(transfer_syntax=ExplicitVRLittleEndian, calling_aet="CT1", patient_id="P", issuer="", modality="CT")
    assert not first.commit(**meta).duplicate
    ref = second.commit(**meta)
    assert ref.moved_from_series == "1.2.3.1"
    assert db.stored_instance(str(ds.SOPInstanceUID)).series_uid == "1.2.3.2"
    assert [p.parent.name for p in (tmp_path / "store").rglob("*.dcm")] == ["1.2.3.2"]
    db.close()


def test_a_dead_receivers_half_received_files_are_removed_and_no_others(tmp_path):
    from dicom_node.receiver_pool import ReceiverPool, ReceiverSetup

    setup = ReceiverSetup(ae_title="OSTEOSCREEN", max_pdu=16384, max_associations=4, allowed_calling_aets=[],
                          allowed_sop_classes={}, tls=None, store_root=str(tmp_path / "store"),
                          db_path=str(tmp_path / "db.sqlite"), min_free_bytes=0)
    series = tmp_path / "store" / "1.2" / "1.2.3"
    series.mkdir(parents=True)
    for name in (".incoming.4242.1.tmp", ".incoming.4242.2.tmp", ".incoming.4243.1.tmp", "1.2.3.4.dcm"):
        (series / name).write_bytes(b"x")
    ReceiverPool(setup, 1, on_stored=lambda ref: None, on_outcome=lambda *a: None)._remove_partial_files(4242)
    assert sorted(p.name for p in series.iterdir()) == [".incoming.4243.1.tmp", "1.2.3.4.dcm"]


def test_success_is_answered_only_after_the_instance_file_is_fsynced(scp, sample_series, monkeypatch):
    """Counting fsyncs (the bench's strace) would also pass a node that fsynced after answering: here the first
    fsync of the instance file is held, and no answer may reach the sender until it is let go."""
    import threading

    real_fsync, gate, entered = os.fsync, threading.Event(), threading.Event()

    def held_fsync(fd):
        entered.set()
        gate.wait(30)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    body, _ = _data_set_of(str(sample_series.files[0]))
    ds = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    sock = _open(scp)
    sock.sendall(_p_data(1, 0x03, _command(0x0001, CTImageStorage, ds.SOPInstanceUID)))
    pieces = [body[i:i + 16000] for i in range(0, len(body), 16000)]
    for i, piece in enumerate(pieces):
        sock.sendall(_p_data(1, 0x02 if i == len(pieces) - 1 else 0x00, piece))
    assert entered.wait(10), "the instance file was never fsynced"
    sock.settimeout(1.5)
    with pytest.raises(TimeoutError):
        sock.recv(1)  # nothing answered while the file is not durable
    assert not scp.stored
    gate.set()
    sock.settimeout(10)
    pdu_type, response = _read_pdu(sock)
    assert pdu_type == 0x04 and _status(response) == (0x0000, "")
    sock.close()


def test_command_fragments_are_bounded_and_deep_nesting_is_refused(scp, sample_series):
    """Command fragments without the last flag were collected without limit (1 GiB from one association), and
    8-byte undefined-length item headers cost ~70 bytes of memory each without limit (96 MiB sent: +900 MB)."""
    from dicom_node.dataset_end import MAX_NESTING, DataSetEnd, Malformed
    from dicom_node.scp import MAX_COMMAND_BYTES

    sock = _open(scp)
    chunk = _p_data(1, 0x01, bytes(16000))  # a command fragment, not the last (under the 16 KiB PDU)
    for _ in range(MAX_COMMAND_BYTES // 16000 + 2):
        sock.sendall(chunk)
    sock.settimeout(10)
    assert _read_pdu(sock)[0] == 0x07  # A-ABORT
    sock.close()
    assert _echo_works(scp.port)

    sq = struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = DataSetEnd(ExplicitVRLittleEndian)
    with pytest.raises(Malformed, match="nested"):
        end.feed((sq + item) * MAX_NESTING)
    with pytest.raises(Malformed, match="outside a sequence"):
        DataSetEnd(ExplicitVRLittleEndian).feed(item * 4)
    end = DataSetEnd(ExplicitVRLittleEndian)  # real nesting still passes
    end.feed(sq + item + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    assert end.complete()


def test_an_instance_uid_stored_as_one_sop_class_is_not_replaced_by_another(scp, sample_series, tmp_path):
    """An AE allowed Secondary Capture only re-sent a stored CT slice's UID as SC (another patient, no pixels): it
    was answered Success and replaced the CT file."""
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    body, _ = _data_set_of(str(sample_series.files[0]))
    ds = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    sock = _open(scp, (CTImageStorage, ExplicitVRLittleEndian), (SecondaryCaptureImageStorage, ExplicitVRLittleEndian))
    assert _send_store(sock, 1, _command(0x0001, CTImageStorage, ds.SOPInstanceUID), body) == (0x0000, "")
    sc = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    sc.SOPClassUID, sc.PatientID = SecondaryCaptureImageStorage, "ATTACKER-1"
    sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    sc_body, _ = _data_set_of(str(tmp_path / "sc.dcm"))
    status, comment = _send_store(sock, 3, _command(0x0001, SecondaryCaptureImageStorage, ds.SOPInstanceUID), sc_body)
    assert status == 0xA900 and "already stored as another SOP class" in comment
    sock.close()
    kept = pydicom.dcmread(scp.stored[0].path)
    assert kept.SOPClassUID == CTImageStorage and kept.PatientID == ds.PatientID and "PixelData" in kept
