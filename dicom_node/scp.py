"""The DICOM listener: C-ECHO and C-STORE SCP (pynetdicom)."""
from __future__ import annotations

import logging
import ssl
import threading
from typing import Callable

from pydicom.dataset import Dataset
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
from pynetdicom import AE, evt
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

from dicom_node.metrics import INSTANCES_RECEIVED, INSTANCES_REFUSED
from dicom_node.store import InstanceRef, InstanceRefused, InstanceStore
from pipeline.demographics import identity_of

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

OnStored = Callable[[InstanceRef], None]


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class StorageSCP:
    def __init__(self, *, ae_title: str, host: str, port: int, max_pdu: int, allowed_calling_aets: list[str],
                 store: InstanceStore, on_stored: OnStored, max_associations: int = 32,
                 ssl_context: ssl.SSLContext | None = None,
                 allowed_sop_classes: dict[str, list[str]] | None = None) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.store = store
        self.on_stored = on_stored
        self._per_thread = threading.local()
        self.allowed_sop_classes = {ae: frozenset(uids) for ae, uids in (allowed_sop_classes or {}).items()}
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = max_pdu
        self.ae.maximum_associations = max_associations
        self.ae.network_timeout = 60
        self.ae.dimse_timeout = 60
        # ARTIM: a TCP connection that sends no A-ASSOCIATE-RQ (a port scanner, a health probe) holds an
        # association slot until this expires.
        self.ae.acse_timeout = 10
        for uid in STORAGE_CLASSES:
            self.ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.set_allowed_calling_aets(allowed_calling_aets)
        self._server = None

    def set_allowed_sop_classes(self, by_ae: dict[str, list[str]]) -> None:
        self.allowed_sop_classes = {ae: frozenset(uids) for ae, uids in by_ae.items()}

    def set_allowed_calling_aets(self, aets: list[str]) -> None:
        self.ae.require_calling_aet = list(aets)
        if not aets:
            log.warning("no calling AE allow-list configured: associations from any AE title are accepted")

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self._server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers,
                                            ssl_context=self.ssl_context)
        self.port = self._server.server_address[1]
        log.info("DICOM SCP %s listening on %s:%d%s", self.ae.ae_title, self.host, self.port,
                 " (TLS)" if self.ssl_context else "")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_accepted(self, event) -> None:
        a = event.assoc
        log.info("association accepted from %s (%s:%s)", a.requestor.ae_title, a.requestor.address, a.requestor.port)

    def _on_rejected(self, event) -> None:
        """Say why: pynetdicom's event does not carry the reason, so it is worked out again here."""
        a = event.assoc
        allowed = self.ae.require_calling_aet
        acceptors = [x for x in self.ae.active_associations if x.is_acceptor]
        if allowed and a.requestor.ae_title.strip() not in [t.strip() for t in allowed]:
            why = "calling AE title not allowed"
        elif a.requestor.primitive is not None and \
                str(a.requestor.primitive.called_ae_title).strip() != self.ae.ae_title.strip():
            why = "called AE title is not ours"
        elif len(acceptors) > self.ae.maximum_associations:
            why = f"association limit ({self.ae.maximum_associations}) reached; the sender should retry later"
        else:
            why = "association negotiation failed"
        log.warning("association from %s (%s) rejected: %s", a.requestor.ae_title, a.requestor.address, why)

    def _on_echo(self, event) -> int:
        return 0x0000

    def _audit_refusal(self, sop_uid: str, calling: str, status: int, reason: str) -> None:
        """Best effort: a refusal is answered even when the audit cannot be written (a full disk)."""
        try:
            self.store.db.audit("refused", sop_uid or "(no SOP Instance UID)",
                                f"C-STORE from {calling}: 0x{status:04X} {reason}")
        except Exception as exc:  # noqa: BLE001
            log.warning("refusal of %s not audited: %s", sop_uid or "(no UID)", exc)

    def _on_store(self, event) -> Dataset | int:
        status = self._store(event)
        code = int(status.Status) if isinstance(status, Dataset) else int(status)
        if code == 0:
            INSTANCES_RECEIVED.labels(str(event.assoc.requestor.ae_title).strip(), str(getattr(self._per_thread, 'duplicate', False))).inc()
        else:
            INSTANCES_REFUSED.labels(f"0x{code:04X}").inc()
        return status

    def _store(self, event) -> Dataset | int:
        calling = str(event.assoc.requestor.ae_title).strip()
        self._per_thread.duplicate = False  # association threads store concurrently
        try:
            ds = event.dataset  # header parse only: pixel data stays encoded
        except Exception as exc:  # noqa: BLE001 - malformed data is refused, never a crash
            log.warning("C-STORE from %s refused: cannot parse dataset: %s", calling, exc)
            return _status(0xC210, "cannot parse dataset")
        req = event.request
        sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        allowed = self.allowed_sop_classes.get(calling)
        if allowed is not None and sop_class not in allowed:
            reason = f"SOP class {sop_class} is not allowed for calling AE {calling} ([node] allowed_sop_classes)"
            log.warning("C-STORE %s from %s refused: %s", sop_uid or "(no UID)", calling, reason)
            self._audit_refusal(sop_uid, calling, 0x0122, reason)
            return _status(0x0122, reason)
        if sop_uid and str(req.AffectedSOPInstanceUID or "").strip() not in ("", sop_uid):
            reason = "SOP Instance UID in the dataset differs from the C-STORE request"
            log.warning("C-STORE from %s refused: %s", calling, reason)
            return _status(0xA900, reason)
        try:
            ref = self.store.store(
                event.encoded_dataset(),
                sop_class=sop_class,
                sop_uid=sop_uid,
                study_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
                series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
                transfer_syntax=str(event.context.transfer_syntax),
                calling_aet=calling,
                patient_id=str(ds.get("PatientID", "") or "").strip(),
                issuer=str(ds.get("IssuerOfPatientID", "") or "").strip(),
                modality=str(ds.get("Modality", "") or "").strip(),
                identity=identity_of(ds),
            )
        except InstanceRefused as exc:
            log.warning("C-STORE %s from %s refused (0x%04X): %s", sop_uid or "(no UID)", calling, exc.status, exc.reason)
            self._audit_refusal(sop_uid, calling, exc.status, exc.reason)
            return _status(exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001
            log.exception("C-STORE %s from %s failed", sop_uid, calling)
            return _status(0xA700, f"internal error: {exc}")
        if ref.duplicate:
            self._per_thread.duplicate = True
            log.info("C-STORE %s from %s: duplicate, already stored", sop_uid, calling)
        else:
            try:
                self.on_stored(ref)
            except Exception:  # noqa: BLE001 - the instance is durable; completion is re-armed at restart
                log.exception("series completion update failed for %s", ref.series_uid)
        return 0x0000
