"""Durable instance store: the encoded bytes as received, on disk before Success.

write temp file -> fsync -> atomic rename under study/series/sop -> fsync dir
-> index in SQLite. The pixel data is never decoded here.
"""
from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.db import NodeDB
from pipeline.demographics import IDENTITY_KEYWORDS, identity_of
from pipeline.durable import write_durably

log = logging.getLogger("osteoscreen.store")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InstanceRefused(Exception):
    """The instance is not stored; ``status`` is the DIMSE status to return."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InstanceRef:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    path: str
    duplicate: bool
    identity_update: bool = False  # a re-sent instance whose patient identity changed


def valid_uid(value: object) -> bool:
    s = str(value or "").strip()
    return 0 < len(s) <= 64 and bool(_UID.match(s)) and not any(len(p) > 1 and p[0] == "0" for p in s.split("."))


class InstanceStore:
    def __init__(self, root: str | Path, db: NodeDB, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = db
        stale = list(self.root.rglob(".incoming.*"))
        for p in stale:  # written by a process that died before the rename: never acknowledged
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d half-written instance file(s) left by an interrupted run", len(stale))

    def _check_space(self, incoming: int) -> None:
        """Refuse before writing when the store would drop below the low-space watermark."""
        if not self.min_free_bytes:
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free - incoming < self.min_free_bytes:
            raise InstanceRefused(0xA700, f"low disk space: {free // 2**20} MB free in {self.root}, watermark "
                                          f"{self.min_free_bytes // 2**20} MB; instance not stored")

    def _write(self, path: Path, encoded: bytes) -> None:
        try:
            write_durably(path, lambda fh: fh.write(encoded), prefix=".incoming.")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InstanceRefused(0xA700, f"out of disk space in {self.root}: instance not stored") from None
            raise InstanceRefused(0xA700, f"cannot write instance to {path.parent}: {exc.strerror}") from None

    @staticmethod
    def _stored_identity(path: Path) -> tuple[str, ...] | None:
        try:
            return identity_of(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(IDENTITY_KEYWORDS)))
        except Exception:  # noqa: BLE001 - unreadable: the re-sent copy replaces it
            return None

    def path_for(self, study: str, series: str, sop: str) -> Path:
        return self.root / study / series / f"{sop}.dcm"

    def store(self, encoded: bytes, *, sop_class: str, sop_uid: str, study_uid: str, series_uid: str,
              transfer_syntax: str, calling_aet: str, patient_id: str, issuer: str, modality: str,
              identity: tuple[str, ...] | None = None) -> InstanceRef:
        """Store durably, then index. A re-sent instance is a duplicate, unless its patient identity
        (``identity``: see ``identity_of``) changed: then it replaces the stored file and the series is
        reopened, so its screening is redone for the corrected patient and never uses the old one's labs."""
        for name, value in (("SOP Instance UID", sop_uid), ("Study Instance UID", study_uid),
                            ("Series Instance UID", series_uid), ("SOP Class UID", sop_class)):
            if not valid_uid(value):
                raise InstanceRefused(0xA900, f"{name} is missing or not a valid UID ({value!r}); instance not stored")
        path = self.path_for(study_uid, series_uid, sop_uid)
        self._check_space(len(encoded))
        if self.db.has_instance(sop_uid):
            before = self._stored_identity(path)
            if identity is None or before == identity:
                return InstanceRef(sop_uid, sop_class, study_uid, series_uid, str(path), True)
            self._write(path, encoded)
            changed = [k for k, a, b in zip(IDENTITY_KEYWORDS, before or ("",) * 5, identity) if a != b]
            if self.db.identity_update(series_uid, patient_id, issuer,
                                       f"patient identity changed on re-send ({', '.join(changed)}): series reopened"):
                log.warning("series %s: patient identity changed on re-send (%s); it will be screened again",
                            series_uid, ", ".join(changed))
            return InstanceRef(sop_uid, sop_class, study_uid, series_uid, str(path), False, identity_update=True)
        self._write(path, encoded)
        fresh = self.db.index_instance(
            sop_uid=sop_uid, sop_class=sop_class, study_uid=study_uid, series_uid=series_uid, path=str(path),
            transfer_syntax=transfer_syntax, calling_aet=calling_aet, patient_id=patient_id, issuer=issuer,
            modality=modality,
        )
        return InstanceRef(sop_uid, sop_class, study_uid, series_uid, str(path), not fresh)
