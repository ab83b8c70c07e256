"""Durable instance store: the encoded bytes as received, on disk before Success.

write temp file -> fsync -> atomic rename under study/series/sop -> fsync dir
-> index in SQLite. The pixel data is never decoded here.
"""
from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from dicom_node.db import NodeDB
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


def valid_uid(value: object) -> bool:
    s = str(value or "").strip()
    return 0 < len(s) <= 64 and bool(_UID.match(s)) and not any(len(p) > 1 and p[0] == "0" for p in s.split("."))


class InstanceStore:
    def __init__(self, root: str | Path, db: NodeDB) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = db
        stale = list(self.root.rglob(".incoming.*"))
        for p in stale:  # written by a process that died before the rename: never acknowledged
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d half-written instance file(s) left by an interrupted run", len(stale))

    def path_for(self, study: str, series: str, sop: str) -> Path:
        return self.root / study / series / f"{sop}.dcm"

    def store(self, encoded: bytes, *, sop_class: str, sop_uid: str, study_uid: str, series_uid: str,
              transfer_syntax: str, calling_aet: str, patient_id: str, issuer: str, modality: str) -> InstanceRef:
        for name, value in (("SOP Instance UID", sop_uid), ("Study Instance UID", study_uid),
                            ("Series Instance UID", series_uid), ("SOP Class UID", sop_class)):
            if not valid_uid(value):
                raise InstanceRefused(0xA900, f"{name} is missing or not a valid UID ({value!r}); instance not stored")
        path = self.path_for(study_uid, series_uid, sop_uid)
        if self.db.has_instance(sop_uid):
            return InstanceRef(sop_uid, sop_class, study_uid, series_uid, str(path), True)
        try:
            write_durably(path, lambda fh: fh.write(encoded), prefix=".incoming.")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InstanceRefused(0xA700, f"out of disk space in {self.root}: instance not stored") from None
            raise InstanceRefused(0xA700, f"cannot write instance to {path.parent}: {exc.strerror}") from None
        fresh = self.db.index_instance(
            sop_uid=sop_uid, sop_class=sop_class, study_uid=study_uid, series_uid=series_uid, path=str(path),
            transfer_syntax=transfer_syntax, calling_aet=calling_aet, patient_id=patient_id, issuer=issuer,
            modality=modality,
        )
        return InstanceRef(sop_uid, sop_class, study_uid, series_uid, str(path), not fresh)
