"""Durable instance store: the encoded bytes as received, on disk before Success.

write temp file -> fsync -> atomic rename under study/series/sop -> fsync dir
-> index in SQLite. The pixel data is never decoded here.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import pydicom

from dicom_node.db import NodeDB, SeriesPurging, StoredInstance
from pipeline.demographics import IDENTITY_KEYWORDS, identity_of
from pipeline.durable import DurableFile, disk_shortage

log = logging.getLogger("osteoscreen.store")
Buffer = Union[bytes, bytearray, memoryview]
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
    moved_from_series: str | None = None  # a re-sent instance filed under another series before (reopened)


def _purging() -> InstanceRefused:
    return InstanceRefused(0xA700, "its series is being deleted by the retention rule at this moment; instance not "
                                   "stored: send it again in a minute and it is stored anew")


def valid_uid(value: object) -> bool:
    s = str(value or "").strip()
    return _valid_uid_text(s)


@functools.lru_cache(maxsize=4096)  # a series repeats its study, series and SOP class UIDs on every instance
def _valid_uid_text(s: str) -> bool:
    return 0 < len(s) <= 64 and bool(_UID.match(s)) and not any(len(p) > 1 and p[0] == "0" for p in s.split("."))


class InstanceStore:
    def __init__(self, root: str | Path, db: NodeDB, min_free_bytes: int = 0, *, sweep_stale: bool = True,
                 index_synced: bool = True) -> None:
        """``sweep_stale``: remove half-written files of a crashed run; only the one process that owns the
        store at start may do it (a receiver process must not delete another's file in flight).

        ``index_synced=False``: a new instance's index row is committed without waiting for the disk (its file
        is durable before the row is written, and holds everything the row says). Only for the service, which
        rebuilds the rows a power loss took from the files at its next start (``index_recovery``)."""
        self.root = Path(root)
        self.index_synced = index_synced
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self.root)
        self.db = db
        stale = list(self.root.rglob(".incoming.*")) if sweep_stale else []
        for p in stale:  # written by a process that died before the rename: never acknowledged
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d half-written instance file(s) left by an interrupted run", len(stale))

    def _check_space(self, incoming: int) -> None:
        """Refuse before writing when the store would drop below the low-space watermark."""
        shortage = disk_shortage(self.root, self.min_free_bytes, incoming)
        if shortage:
            raise InstanceRefused(0xA700, f"{shortage}; instance not stored")

    @staticmethod
    def _stored_identity(path: str) -> tuple[str, ...] | None:
        try:
            return identity_of(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(IDENTITY_KEYWORDS)))
        except Exception:  # noqa: BLE001 - unreadable: the re-sent copy replaces it
            return None

    def path_for(self, study: str, series: str, sop: str) -> str:
        return os.path.join(self._root_text, study, series, f"{sop}.dcm")  # str: built on every C-STORE

    def begin(self, *, sop_class: str, sop_uid: str, study_uid: str, series_uid: str,
              identity: tuple[str, ...] | None = None, expected_bytes: int = 0) -> "IncomingInstance":
        """Start receiving one instance: checks first (refusals raise ``InstanceRefused``), then the caller
        writes the Part 10 bytes in pieces as they arrive and commits. A re-sent instance is a duplicate and
        its bytes are not written again, unless its patient identity (``identity``: see ``identity_of``)
        changed: then it replaces the stored file and the series is reopened, so its screening is redone for
        the corrected patient and never uses the old one's labs."""
        for name, value in (("SOP Instance UID", sop_uid), ("Study Instance UID", study_uid),
                            ("Series Instance UID", series_uid), ("SOP Class UID", sop_class)):
            if not valid_uid(value):
                raise InstanceRefused(0xA900, f"{name} is missing or not a valid UID ({value!r}); instance not stored")
        path = self.path_for(study_uid, series_uid, sop_uid)
        self._check_space(expected_bytes)
        before: tuple[str, ...] | None = None
        stored = self.db.stored_instance(sop_uid)
        if stored is not None and stored.series_state == "purging":
            raise _purging()
        if stored is not None and stored.sop_class_uid and stored.sop_class_uid != sop_class:
            # one SOP Instance UID is one object: a different class under it is another object, never a
            # replacement (an AE allowed Secondary Capture only could otherwise overwrite a stored CT slice)
            raise InstanceRefused(0xA900, f"already stored as another SOP class ({stored.sop_class_uid}); "
                                          f"instance {sop_uid} not stored as {sop_class}")
        moved = stored is not None and (stored.study_uid, stored.series_uid) != (study_uid, series_uid)
        known = stored is not None and not moved
        if known:
            before = self._stored_identity(path)
            if identity is None or before == identity:
                return IncomingInstance(self, InstanceRef(sop_uid, sop_class, study_uid, series_uid, path, True))
        try:
            target = DurableFile(path, prefix=".incoming.")
        except OSError as exc:
            raise self._write_error(path, exc) from None
        ref = InstanceRef(sop_uid, sop_class, study_uid, series_uid, path, False, identity_update=known,
                          moved_from_series=stored.series_uid if moved and stored is not None else None)
        return IncomingInstance(self, ref, target, identity=identity, identity_before=before)

    def _write_error(self, path: str | Path, exc: OSError) -> InstanceRefused:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return InstanceRefused(0xA700, f"out of disk space in {self.root}: instance not stored")
        return InstanceRefused(0xA700, f"cannot write instance to {os.path.dirname(path)}: {exc.strerror}")

    def store(self, encoded: Buffer, *, sop_class: str, sop_uid: str, study_uid: str, series_uid: str,
              transfer_syntax: str, calling_aet: str, patient_id: str, issuer: str, modality: str,
              identity: tuple[str, ...] | None = None) -> InstanceRef:
        """Store a whole Part 10 file durably, then index it: see ``begin``."""
        incoming = self.begin(sop_class=sop_class, sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid,
                              identity=identity, expected_bytes=len(encoded))
        try:
            incoming.write(encoded)
            return incoming.commit(transfer_syntax=transfer_syntax, calling_aet=calling_aet, patient_id=patient_id,
                                   issuer=issuer, modality=modality)
        finally:
            incoming.discard()


class IncomingInstance:
    """One instance being received: written in pieces, durable and indexed on ``commit``, else discarded."""

    def __init__(self, store: InstanceStore, ref: InstanceRef, target: DurableFile | None = None, *,
                 identity: tuple[str, ...] | None = None, identity_before: tuple[str, ...] | None = None) -> None:
        self.store = store
        self.ref = ref
        self._target = target  # None: a duplicate, nothing to write
        self._identity = identity
        self._identity_before = identity_before

    def write(self, data: Buffer) -> None:
        if self._target is None:
            return
        target = self._target
        try:
            target.write(data)
        except OSError as exc:
            self.discard()
            raise self.store._write_error(target.path, exc) from None

    def discard(self) -> None:
        if self._target is not None:
            self._target.discard()
            self._target = None

    def commit(self, *, transfer_syntax: str, calling_aet: str, patient_id: str, issuer: str,
               modality: str) -> InstanceRef:
        """Make the instance durable (file, then directory, then index; an identity update: index, then file);
        only then may Success be answered."""
        ref = self.ref
        if self._target is None:
            if not ref.duplicate:
                raise InstanceRefused(0xA700, "instance not stored: its file was discarded after a write error")
            if self.store.db.stored_series_state(ref.sop_instance_uid) in (None, "purging"):
                raise _purging()  # retention began deleting the stored copy while this one arrived: not a duplicate
            return ref
        target, self._target = self._target, None
        db = self.store.db
        if ref.identity_update:
            # The index first: if replacing the file then fails, the sender's retry still finds the old identity
            # in the file and redoes this. The other order could leave the new file with the series never reopened.
            before = self._identity_before or ("",) * len(IDENTITY_KEYWORDS)
            changed = [k for k, a, b in zip(IDENTITY_KEYWORDS, before, self._identity or before) if a != b]
            detail = f"patient identity changed on re-send ({', '.join(changed)}): series reopened"
            try:
                first = db.identity_update(ref.series_uid, patient_id, issuer, detail)
            except SeriesPurging:  # retention claimed the series since ``begin``: its files are being deleted
                target.discard()
                raise _purging() from None
            except BaseException:
                target.discard()
                raise
            if first:
                log.warning("series %s: patient identity changed on re-send (%s); it will be screened again",
                            ref.series_uid, ", ".join(changed))
        try:
            target.commit()
        except OSError as exc:
            raise self.store._write_error(target.path, exc) from None
        if ref.identity_update:
            return ref
        fields = dict(sop_uid=ref.sop_instance_uid, sop_class=ref.sop_class_uid, study_uid=ref.study_uid,
                      series_uid=ref.series_uid, path=ref.path, transfer_syntax=transfer_syntax,
                      calling_aet=calling_aet, patient_id=patient_id, issuer=issuer, modality=modality)
        if ref.moved_from_series is not None:
            self._move(fields)
            return ref
        if db.index_instance(**fields, synced=self.store.index_synced):
            return ref
        # Indexed by another association since ``begin``: the same file (a duplicate), or the same instance sent
        # under another series at the same moment, filed there. This copy is the later one: moved here, as if
        # it had been sent after (else the index would name the other file and this one would lie unindexed).
        stored = db.stored_instance(ref.sop_instance_uid)
        if stored is not None and stored.path != ref.path:
            filed_before = self._move(fields)
            if filed_before is not None:
                return dataclasses.replace(ref, moved_from_series=filed_before.series_uid)
            return ref
        return dataclasses.replace(ref, duplicate=True)

    def _move(self, fields: dict) -> StoredInstance | None:
        """Re-file the instance under the series it was just sent in, and delete its file under the old one."""
        filed_before = self.store.db.move_instance(**fields)
        if filed_before is not None and filed_before.path != fields["path"]:
            log.warning("instance %s re-sent under series %s (was series %s): moved; that series is decided "
                        "again", fields["sop_uid"], fields["series_uid"], filed_before.series_uid)
            try:
                os.unlink(filed_before.path)
            except OSError as exc:  # the index no longer names it: only disk space is at stake
                log.warning("could not delete the moved instance's old file %s: %s", filed_before.path, exc)
        return filed_before
