"""The DICOM listener: C-ECHO and C-STORE SCP on the node's own upper layer.

One thread per association reads PDUs with blocking calls (``upper_layer``),
reassembles each C-STORE's data set, stores it durably (``store``) and only
then answers Success. Association negotiation follows pynetdicom's acceptor
rules (and uses its presentation-context negotiation), so peers see the same
accept/reject behaviour as before; the receive path itself has no polling.
"""
from __future__ import annotations

import io
import logging
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context, negotiate_as_acceptor
from pynetdicom.sop_class import (
    CTImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from dicom_node import upper_layer as ul
from dicom_node.dimse_codec import (
    C_ECHO_RQ,
    C_STORE_RQ,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Command,
    CommandError,
    decode_command,
    encode_response,
    file_meta_header,
)
from dicom_node.metrics import INSTANCES_RECEIVED, INSTANCES_REFUSED
from dicom_node.store import IncomingInstance, InstanceRef, InstanceRefused, InstanceStore
from dicom_node.dataset_end import DataSetEnd, Malformed
from dicom_node.header_scan import WANTED, Unsupported, scan_header
from hl7.privacy import redact_values
from pipeline.demographics import IDENTITY_KEYWORDS

if TYPE_CHECKING:
    from dicom_node.receiver_pool import ReceiverPool

log = logging.getLogger("osteoscreen.scp")

STORAGE_CLASSES = [
    CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage, EnhancedMRImageStorage,
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage, MultiFrameTrueColorSecondaryCaptureImageStorage,
]
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]
DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# A PDU longer than this is refused even when max_pdu is 0 (unlimited): a peer must not make us allocate at will.
# It is also the maximum length advertised then, so that a peer honouring it never sends a longer one.
UNLIMITED_PDU_CAP = 64 * 2**20
# A DIMSE command set is a few hundred bytes: fragments are collected up to this, then the association is aborted
# (they were collected without limit, a gigabyte from one association)
MAX_COMMAND_BYTES = 64 * 1024
# The elements before the pixel data are held in memory until read; a data set whose header goes on past this is
# refused (a lying element length would otherwise buffer the whole transfer).
HEADER_LIMIT = 8 * 2**20
# An A-ASSOCIATE-RQ may be longer than the P-DATA limit (max_pdu bounds P-DATA-TF only): 128 contexts x 13
# transfer syntaxes is about 45 kB.
ASSOCIATE_RQ_LIMIT = 1 * 2**20
STATUS_UNRECOGNISED_OPERATION = 0x0211

OnStored = Callable[[InstanceRef], None]
OnOutcome = Callable[[str, int, bool], None]  # calling AE, DIMSE status, duplicate


def count_outcome(calling: str, status: int, duplicate: bool) -> None:
    """Prometheus counters for one C-STORE (in the service process, whichever process received it)."""
    if status == 0:
        INSTANCES_RECEIVED.labels(calling, str(duplicate)).inc()
    else:
        INSTANCES_REFUSED.labels(f"0x{status:04X}").inc()


@dataclass(frozen=True)
class _Rejection:
    result: int
    source: int
    diagnostic: int
    why: str


class _StopAtPixelData:
    """pydicom's ``stop_when``: stop before the pixel data, and remember that it was reached."""

    def __init__(self) -> None:
        self.reached = False

    def __call__(self, tag, vr, length) -> bool:  # noqa: ANN001 - pydicom's signature
        self.reached = int(tag) >= 0x7FE00008
        return self.reached


def read_header(data: bytes | bytearray, transfer_syntax: str, *, complete: bool = True) -> Dataset | None:
    """The received data set's elements up to the pixel data; the pixel data stays encoded.

    ``complete=False``: ``data`` is only the start of the data set; None when the header goes on past it.
    A deflated data set is inflated only as far as ``HEADER_LIMIT`` (a few MB of deflate can inflate to GB).
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(bytes(data), HEADER_LIMIT)
        if not inflater.eof:
            complete = False  # only the start of the data set: the header must end in what was inflated
            if len(data) >= HEADER_LIMIT:
                ds = read_header(data, ExplicitVRLittleEndian, complete=False)
                if ds is None:
                    raise ValueError(f"header longer than {HEADER_LIMIT // 2**20} MiB")
                return ds
    stop = _StopAtPixelData()
    try:
        ds = read_dataset(io.BytesIO(data), transfer_syntax == ImplicitVRLittleEndian,
                          transfer_syntax != ExplicitVRBigEndian, stop_when=stop)
        if not complete and stop.reached:
            ds.get("SeriesInstanceUID")  # values are converted lazily: a cut inside one shows up here
    except Exception:
        if complete:
            raise
        return None
    return ds if complete or stop.reached else None


class StorageSCP:
    def __init__(self, *, ae_title: str, host: str, port: int, max_pdu: int, allowed_calling_aets: list[str],
                 store: InstanceStore, on_stored: OnStored, max_associations: int = 32,
                 ssl_context: ssl.SSLContext | None = None,
                 allowed_sop_classes: dict[str, list[str]] | None = None,
                 on_outcome: OnOutcome = count_outcome, pool: "ReceiverPool | None" = None,
                 quiet_allow_list: bool = False) -> None:
        """``pool``: hand every association to receiver processes instead of serving it in this one."""
        self.ae_title = ae_title
        self.on_outcome = on_outcome
        self.pool = pool
        self.allowed_calling_aets: frozenset[str] = frozenset()
        self.allowed_sop_classes: dict[str, frozenset[str]] = {}
        self.host, self.port = host, port
        self.max_pdu = max_pdu
        self.ssl_context = ssl_context
        self.store = store
        self.on_stored = on_stored
        self.max_associations = max_associations
        self.network_timeout = 60.0
        # ARTIM: a TCP connection that sends no A-ASSOCIATE-RQ (a port scanner, a health probe) holds an
        # association slot until this expires.
        self.acse_timeout = 10.0
        self.set_allowed_sop_classes(allowed_sop_classes or {})
        self.supported_contexts = [build_context(uid, TRANSFER_SYNTAXES) for uid in STORAGE_CLASSES]
        self.supported_contexts.append(build_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        self.set_allowed_calling_aets(allowed_calling_aets, quiet=quiet_allow_list)
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._last_accept_error = -1e9  # monotonic time of the last accept error logged

    def set_allowed_sop_classes(self, by_ae: dict[str, list[str]]) -> None:
        self.allowed_sop_classes = {ae: frozenset(uids) for ae, uids in by_ae.items()}
        self._forward_allow_lists()

    def set_allowed_calling_aets(self, aets: list[str], quiet: bool = False) -> None:
        self.allowed_calling_aets = frozenset(a.strip() for a in aets)
        if not aets and not quiet:
            log.warning("no calling AE allow-list configured: associations from any AE title are accepted")
        self._forward_allow_lists()

    def _forward_allow_lists(self) -> None:
        if self.pool is not None:
            self.pool.configure(sorted(self.allowed_calling_aets),
                                {ae: sorted(uids) for ae, uids in self.allowed_sop_classes.items()})

    # --- listener -----------------------------------------------------------------
    def start(self) -> None:
        if self.pool is not None:
            self.pool.start()
        try:
            listener = socket.create_server((self.host, self.port), reuse_port=False, backlog=64)
        except OSError as exc:
            if self.pool is not None:
                self.pool.stop()  # started above; nothing will stop it once start() has failed
            raise OSError(exc.errno, f"cannot listen for DICOM on {self.host}:{self.port} ([node] host/port): "
                                     f"{exc.strerror}") from None
        listener.settimeout(0.5)  # the accept loop checks for stop() twice a second
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._stopping.clear()
        self._acceptor = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._acceptor.start()
        log.info("DICOM SCP %s listening on %s:%d%s%s", self.ae_title, self.host, self.port,
                 " (TLS)" if self.ssl_context else "",
                 f", {self.pool.processes} receiver processes" if self.pool is not None else "")

    def alive(self) -> bool:
        """The accept loop runs (only meaningful after ``start``)."""
        return self._acceptor is not None and self._acceptor.is_alive()

    def stop(self) -> None:
        """Stop listening and close open associations; a C-STORE being written finishes first."""
        if self._listener is None:
            return
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join()
        self._listener.close()
        self._listener = None
        if self.pool is not None:
            self.pool.stop()
        self.close_connections()

    def close_connections(self) -> None:
        """Close open associations; a C-STORE being written finishes first (its answer may not reach the peer)."""
        with self._lock:
            open_connections = list(self._connections.items())
        for sock, _ in open_connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in open_connections:
            thread.join(timeout=10)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stopping.is_set():
                    # out of file descriptors (EMFILE/ENFILE): wait, instead of a tight loop logging the same
                    # error hundreds of thousands of times
                    now = time.monotonic()
                    if now - self._last_accept_error >= 10.0:
                        log.error("DICOM listener accept failed: %s (further errors within 10 s not logged)", exc)
                        self._last_accept_error = now
                    self._stopping.wait(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.pool is not None:
                if not self.pool.dispatch(sock, address, self.max_associations):
                    # Refused here with a transient A-ASSOCIATE-RJ (the sender retries), not dropped.
                    log.error("no receiver process can take the association from %s:%s (restarting); refusing it "
                              "for now", address[0], address[1])
                    self.serve_handed_off(sock, address, True, None)
                continue
            with self._lock:
                over_limit = len(self._connections) + 1 > self.max_associations
            self.serve_handed_off(sock, address, over_limit, None)

    def serve_handed_off(self, sock: socket.socket, address: tuple, over_limit: bool,
                         on_done: Callable[[], None] | None) -> None:
        """Serve one accepted connection (here, or in a receiver process) in its own thread; ``on_done`` when it
        is closed."""
        def serve() -> None:
            try:
                self._serve_connection(sock, address, over_limit)
            finally:
                if on_done is not None:
                    on_done()

        thread = threading.Thread(target=serve, name=f"dicom-assoc-{address[1]}", daemon=True)
        with self._lock:
            self._connections[sock] = thread
        thread.start()

    def _serve_connection(self, sock: socket.socket, address: tuple, over_limit: bool) -> None:
        peer = f"{address[0]}:{address[1]}"
        conn: socket.socket = sock
        try:
            conn.settimeout(self.acse_timeout)
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(sock, server_side=True)
            _Association(self, conn, peer, over_limit).run()
        except ssl.SSLError as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc.reason or exc)
        except (TimeoutError, ul.PeerClosed):
            log.info("connection from %s closed before an association was requested", peer)
        except OSError as exc:
            if not self._stopping.is_set():
                log.warning("connection from %s failed: %s", peer, exc)
        except Exception:  # noqa: BLE001 - one bad association must never take the listener down
            log.exception("association from %s failed; connection closed", peer)
            try:
                conn.sendall(ul.abort_pdu())
            except OSError:
                pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._lock:
                self._connections.pop(sock, None)

    # --- association negotiation ------------------------------------------------------
    def check_association(self, rq: A_ASSOCIATE, over_limit: bool) -> _Rejection | None:
        """pynetdicom's acceptor rules, in its order: the last failing check gives the reason."""
        rejection = None
        if getattr(rq, "protocol_version", 1) & 0x01 == 0:
            rejection = _Rejection(0x01, 0x02, 0x02, "protocol version not supported")
        if str(rq.application_context_name or "") != DICOM_APPLICATION_CONTEXT:
            rejection = _Rejection(0x01, 0x01, 0x02, f"application context {rq.application_context_name} "
                                                     "is not DICOM's")
        if self.allowed_calling_aets and str(rq.calling_ae_title).strip() not in self.allowed_calling_aets:
            rejection = _Rejection(0x01, 0x01, 0x03, "calling AE title not allowed")
        if over_limit:
            rejection = _Rejection(0x02, 0x03, 0x02, f"association limit ({self.max_associations}) reached; "
                                                     "the sender should retry later")
        return rejection

    def accept_response(self, rq: A_ASSOCIATE) -> tuple[A_ASSOCIATE, dict[int, tuple[str, str]]]:
        """The A-ASSOCIATE-AC primitive and the accepted contexts {id: (abstract syntax, transfer syntax)}."""
        roles = {str(item.sop_class_uid): (item.scu_role, item.scp_role) for item in rq.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        results, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                    self.supported_contexts, roles or None)
        ac = A_ASSOCIATE()
        ac.application_context_name = DICOM_APPLICATION_CONTEXT
        ac.calling_ae_title, ac.called_ae_title = rq.calling_ae_title, rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.max_pdu or UNLIMITED_PDU_CAP
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_version = ImplementationVersionNameNotification()
        impl_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_length, impl_uid, impl_version, *role_items]
        accepted = {int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in results if cx.result == 0x00}
        return ac, accepted

    # --- C-STORE ---------------------------------------------------------------------
    def _audit_refusal(self, sop_uid: str, calling: str, status: int, reason: str) -> None:
        """Best effort: a refusal is answered even when the audit cannot be written (a full disk)."""
        try:
            self.store.db.audit("refused", sop_uid or "(no SOP Instance UID)",
                                f"C-STORE from {calling}: 0x{status:04X} {reason}")
        except Exception as exc:  # noqa: BLE001
            log.warning("refusal of %s not audited: %s", sop_uid or "(no UID)", exc)

    def receive(self, calling: str, request: Command, context: tuple[str, str]) -> "_Receipt":
        """A C-STORE's data set, fed fragment by fragment as it arrives; ``context``: the presentation context's
        (abstract syntax, transfer syntax)."""
        return _Receipt(self, calling, request, context)


class _Receipt:
    """One C-STORE data set while it arrives.

    The header is read from the first fragment(s), so the checks run and the
    file is opened while the rest is still on the wire; later fragments are
    written straight from the PDU buffer. Success is answered only after
    ``finish`` made the file durable and indexed it.
    """

    HEADER_PROBE_BYTES = 16 * 1024

    def __init__(self, scp: StorageSCP, calling: str, request: Command, context: tuple[str, str]) -> None:
        self.scp = scp
        self.calling = calling
        self.request = request
        abstract_syntax, self.transfer_syntax = context
        self._buffer = bytearray()
        self._next_probe = self.HEADER_PROBE_BYTES
        self._incoming: IncomingInstance | None = None
        self._refusal: tuple[int, str] | None = None
        self._fields: dict[str, str] = {}
        self._end = DataSetEnd(self.transfer_syntax)
        if request.affected_sop_class != abstract_syntax:
            self._refuse(0x0122, f"the C-STORE's SOP class {request.affected_sop_class or '(none)'} is not the "
                                 f"presentation context's ({abstract_syntax})", audit=True)
        elif not request.affected_sop_instance:
            self._refuse(0xA900, "the C-STORE request has no Affected SOP Instance UID", audit=True)

    def add(self, fragment: bytes | bytearray | memoryview, is_last: bool) -> None:
        if self._refusal is not None:
            return  # the rest of a refused data set is read and dropped
        try:
            self._end.feed(fragment)
        except (Malformed, zlib.error) as exc:
            self.discard()
            self._refuse(0xC210, f"cannot parse dataset: {exc}")
            return
        if self._incoming is not None:
            self._write(fragment)
            return
        self._buffer += fragment
        if len(self._buffer) < self._next_probe and not is_last:
            return
        try:
            fields = self._header_fields(is_last)
        except Exception as exc:  # noqa: BLE001 - malformed data is refused, never a crash
            log.warning("C-STORE from %s refused: cannot parse dataset: %s", self.calling, redact_values(str(exc)))
            self._refusal = (0xC210, "cannot parse dataset")
            return
        if fields is None:  # the header goes on past what has arrived
            if len(self._buffer) >= HEADER_LIMIT:
                self._refuse(0xC210, f"cannot parse dataset: no end of its header (the elements before the pixel "
                                     f"data) in the first {HEADER_LIMIT // 2**20} MiB")
                self._buffer = bytearray()
                return
            self._next_probe = min(2 * len(self._buffer), HEADER_LIMIT)
            return
        self._begin(fields)

    def _header_fields(self, complete: bool) -> dict[str, str] | None:
        try:
            fields = scan_header(self._buffer, self.transfer_syntax, complete=complete)
            if fields is not None or not complete:
                return fields
        except Unsupported:
            pass
        ds = read_header(self._buffer, self.transfer_syntax, complete=complete)  # pydicom: the reference reader
        if ds is None:
            return None
        return {keyword: str(ds.get(keyword, "") or "").strip() for keyword, _ in WANTED.values()}

    def _begin(self, fields: dict[str, str]) -> None:
        calling, scp = self.calling, self.scp
        f = {k: fields.get(k, "") for k, _ in WANTED.values()}
        identity = tuple(f[k] for k in IDENTITY_KEYWORDS)
        self._fields = f
        sop_uid, sop_class = f["SOPInstanceUID"], f["SOPClassUID"]
        allowed = scp.allowed_sop_classes.get(calling)
        if allowed is not None and sop_class not in allowed:
            reason = f"SOP class {sop_class} is not allowed for calling AE {calling} ([node] allowed_sop_classes)"
            self._refuse(0x0122, reason, audit=True)
            return
        if sop_uid and self.request.affected_sop_instance not in ("", sop_uid):
            self._refuse(0xA900, "SOP Instance UID in the dataset differs from the C-STORE request")
            return
        if sop_class and sop_class != self.request.affected_sop_class:
            self._refuse(0xA900, f"SOP Class UID in the dataset ({sop_class}) differs from the C-STORE request "
                                 f"({self.request.affected_sop_class})", audit=True)
            return
        try:
            self._incoming = scp.store.begin(sop_class=sop_class, sop_uid=sop_uid, study_uid=f["StudyInstanceUID"],
                                             series_uid=f["SeriesInstanceUID"], identity=identity,
                                             expected_bytes=len(self._buffer))
        except InstanceRefused as exc:
            self._refuse(exc.status, exc.reason, audit=True)
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("C-STORE %s from %s failed", sop_uid, calling)
            self._refusal = (0xA700, f"internal error: {exc}")
            return
        self._write(file_meta_header(self.request.affected_sop_class or sop_class, sop_uid, self.transfer_syntax,
                                     calling))
        self._write(self._buffer)
        self._buffer = bytearray()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._incoming is None:  # refused by an earlier write: the rest is dropped
            return
        try:
            self._incoming.write(data)
        except InstanceRefused as exc:
            self._incoming = None
            self._refuse(exc.status, exc.reason, audit=True)

    def _refuse(self, status: int, reason: str, audit: bool = False) -> None:
        sop_uid = self._fields.get("SOPInstanceUID", "")
        log.warning("C-STORE %s from %s refused (0x%04X): %s", sop_uid or "(no UID)", self.calling, status, reason)
        if audit:
            self.scp._audit_refusal(sop_uid, self.calling, status, reason)
        self._refusal = (status, reason)

    def discard(self) -> None:
        """The association ended before the data set did: nothing was acknowledged, nothing is kept."""
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None

    def finish(self) -> tuple[int, str | None]:
        """Commit the complete data set; the status (and comment) to answer with."""
        status, comment, duplicate = self._commit()
        try:
            self.scp.on_outcome(self.calling, status, duplicate)
        except Exception:  # noqa: BLE001 - counting never changes the answer
            log.exception("C-STORE outcome not counted")
        return status, comment

    def _commit(self) -> tuple[int, str | None, bool]:
        if self._refusal is not None:
            return self._refusal[0], self._refusal[1], False
        if self._incoming is None:  # never reached a header: an empty data set
            self._refuse(0xC210, "cannot parse dataset: no data")
            return 0xC210, "cannot parse dataset", False
        if not self._end.complete():
            self.discard()
            reason = (f"data set cut short: it ends inside an element after {self._end.seen} bytes (the last "
                      "fragment came before the data did); not stored: send it again")
            self._refuse(0xC210, reason, audit=True)
            return 0xC210, reason, False
        f, incoming = self._fields, self._incoming
        self._incoming = None
        try:
            ref = incoming.commit(transfer_syntax=self.transfer_syntax, calling_aet=self.calling,
                                  patient_id=f["PatientID"], issuer=f["IssuerOfPatientID"], modality=f["Modality"])
        except InstanceRefused as exc:
            self._refuse(exc.status, exc.reason, audit=True)
            return exc.status, exc.reason, False
        except Exception as exc:  # noqa: BLE001
            log.exception("C-STORE %s from %s failed", f["SOPInstanceUID"], self.calling)
            return 0xA700, f"internal error: {exc}", False
        finally:
            incoming.discard()
        if ref.duplicate:
            log.info("C-STORE %s from %s: duplicate, already stored", ref.sop_instance_uid, self.calling)
        else:
            try:
                self.scp.on_stored(ref)
            except Exception:  # noqa: BLE001 - the instance is durable; completion is re-armed at restart
                log.exception("series completion update failed for %s", ref.series_uid)
        return 0x0000, None, ref.duplicate


class _Association:
    """One accepted connection: negotiation, then P-DATA until release or abort."""

    def __init__(self, scp: StorageSCP, sock: socket.socket, peer: str, over_limit: bool) -> None:
        self.scp = scp
        self.over_limit = over_limit
        self.sock = sock
        self.peer = peer
        limit = scp.max_pdu if scp.max_pdu else UNLIMITED_PDU_CAP
        # Peers may count the PDU header, or send a little over: pynetdicom was as lenient.
        self.reader = ul.PduReader(sock, limit=max(limit, 16384) + 6)
        self.calling = ""

    def run(self) -> None:
        try:
            # ARTIM: the whole request within acse_timeout, not per read (one byte every few seconds would hold
            # an association slot for ever)
            pdu_type, body = self.reader.read(limit=max(self.reader.limit, ASSOCIATE_RQ_LIMIT),
                                              within_s=self.scp.acse_timeout)
        except ul.ProtocolError as exc:
            self._abort(exc)
            return
        if pdu_type != ul.A_ASSOCIATE_RQ_TYPE:
            self._abort(ul.ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                                         ul.ABORT_UNEXPECTED_PDU))
            return
        try:
            rq = ul.decode_associate_rq(body)
        except ul.ProtocolError as exc:
            self._abort(exc)
            return
        self.calling = str(rq.calling_ae_title).strip()
        rejection = self.scp.check_association(rq, self.over_limit)
        if rejection is not None:
            log.warning("association from %s (%s) rejected: %s", self.calling, self.peer, rejection.why)
            self.sock.sendall(ul.associate_rj_pdu(rejection.result, rejection.source, rejection.diagnostic))
            return
        ac, contexts = self.scp.accept_response(rq)
        self.sock.sendall(ul.associate_ac_pdu(ac))
        log.info("association accepted from %s (%s)", self.calling, self.peer)
        self.sock.settimeout(self.scp.network_timeout)
        try:
            self._serve(contexts)
        except ul.ProtocolError as exc:
            self._abort(exc)
        except CommandError as exc:
            self._abort(ul.ProtocolError(f"undecodable DIMSE command: {exc}"))
        except ul.PeerClosed:
            log.warning("association from %s (%s): connection closed without release", self.calling, self.peer)
        except TimeoutError:
            self._abort(ul.ProtocolError(f"no data for {self.scp.network_timeout:.0f} s", 0x00))

    def _abort(self, exc: ul.ProtocolError) -> None:
        log.warning("association from %s (%s) aborted: %s", self.calling or "?", self.peer, exc)
        try:
            self.sock.sendall(ul.abort_pdu(exc.reason))
        except OSError:
            pass

    def _serve(self, contexts: dict[int, tuple[str, str]]) -> None:
        command = bytearray()
        # a command whose data set is still arriving; no receipt: a request not served here, its data dropped
        pending: tuple[Command, int, _Receipt | None] | None = None
        try:
            while True:
                pdu_type, body = self.reader.read()
                if pdu_type == ul.A_RELEASE_RQ_TYPE:
                    if pending is not None:
                        raise ul.ProtocolError("release requested in the middle of a data set", ul.ABORT_UNEXPECTED_PDU)
                    log.info("association from %s (%s) released", self.calling, self.peer)
                    self.sock.sendall(ul.RELEASE_RP)
                    return
                if pdu_type == ul.A_ABORT_TYPE:
                    log.warning("association from %s (%s) aborted by the peer", self.calling, self.peer)
                    return
                if pdu_type != ul.P_DATA_TF_TYPE:
                    raise ul.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} during the association",
                                           ul.ABORT_UNEXPECTED_PDU)
                for context_id, is_command, is_last, fragment in ul.iter_pdvs(body):
                    if context_id not in contexts:
                        raise ul.ProtocolError(f"data on presentation context {context_id}, which was not accepted")
                    if is_command:
                        if pending is not None:
                            raise ul.ProtocolError("a command arrived before the previous command's data set ended")
                        command += fragment
                        if len(command) > MAX_COMMAND_BYTES:  # a command set is a few hundred bytes
                            raise ul.ProtocolError(f"command set over {MAX_COMMAND_BYTES} bytes")
                        if not is_last:
                            continue
                        request = decode_command(bytes(command))
                        command.clear()
                        if request.command_field == C_STORE_RQ and request.has_data_set:
                            receipt = self.scp.receive(self.calling, request, contexts[context_id])
                            pending = (request, context_id, receipt)
                        elif request.has_data_set:
                            pending = (request, context_id, None)
                        else:
                            self._respond(request, context_id, None)
                    else:
                        if pending is None or pending[1] != context_id:
                            raise ul.ProtocolError("a data set fragment arrived without its command")
                        if pending[2] is not None:
                            pending[2].add(fragment, is_last)
                        if is_last:
                            request, _, receipt = pending
                            pending = None
                            self._respond(request, context_id, receipt)
        finally:
            if pending is not None and pending[2] is not None:
                pending[2].discard()

    def _respond(self, request: Command, context_id: int, receipt: _Receipt | None) -> None:
        comment = None
        if request.command_field == C_ECHO_RQ:
            status = 0x0000
        elif receipt is not None:
            status, comment = receipt.finish()
        elif request.command_field == C_STORE_RQ and not request.has_data_set:
            status, comment = 0xA900, "C-STORE request without a data set: nothing to store"
            log.warning("association from %s: %s", self.calling, comment)
        else:
            status, comment = STATUS_UNRECOGNISED_OPERATION, "only C-ECHO and C-STORE are served here"
            log.warning("association from %s: DIMSE command 0x%04X refused (%s)", self.calling,
                        request.command_field, comment)
        self.sock.sendall(ul.p_data_pdu(context_id, encode_response(request, status, comment)))
