"""Rebuild the index rows a power loss took: instance files in the store that the index does not name.

The service commits a received instance's index row without waiting for the disk
(``InstanceStore(index_synced=False)``); the instance file and its directory entry
are fsynced before Success is answered, the row is not. A crash of the process
loses nothing (the row is already with the operating system), and the next synced
commit of anything makes every earlier row durable. A power loss or kernel crash
can take the last rows. So each start records itself (``NodeDB.begin_run``) and a
clean stop marks its run; when the run before did not stop cleanly, the store is
walked before the listener opens, and every instance file the index does not name
is indexed again from its own header, its series reopened and screened as if the
instance had just arrived. ``osteoscreen restore`` asks for the same check
(``request_store_check``): the instances received after the backup are on disk
but not in the restored index.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pydicom

from dicom_node.db import RunRow
from dicom_node.store import InstanceStore, valid_uid
from pipeline.durable import write_durably

log = logging.getLogger("osteoscreen.recovery")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CHECK_REQUEST = ".check-instance-store"  # in the state directory: why the next start must check the store
_clock = time.monotonic
_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
             "IssuerOfPatientID", "Modality")


def boot_id() -> str:
    """This boot of the machine (Linux); '' where unknown. Tells a power loss or reboot from a process crash."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass
class RecoveryReport:
    files: int = 0  # instance files in the store
    reindexed: int = 0  # indexed again from their header
    left: list[str] = field(default_factory=list)  # unindexed files that could not be indexed: left untouched


def _header(path: str) -> dict[str, str] | None:
    """The fields the receiver indexes, read from the stored file; None when it cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - an unreadable file is reported, never a failed start
        return None
    fields = {k: str(ds.get(k, "") or "").strip() for k in _KEYWORDS}
    meta = getattr(ds, "file_meta", None)
    fields["TransferSyntaxUID"] = str(getattr(meta, "TransferSyntaxUID", "") or "")
    fields["SourceApplicationEntityTitle"] = str(getattr(meta, "SourceApplicationEntityTitle", "") or "").strip()
    return fields


def reindex_unindexed(store: InstanceStore, progress: Callable[[int], None] | None = None,
                      why: str = "store check") -> RecoveryReport:
    """Index every instance file under ``store.root`` that the index does not name (see the module docstring).

    Only files where the node files them (``study/series/sop.dcm``, matching their own header) are taken; a
    file whose SOP Instance UID is indexed under another path (the old copy of an instance moved to another
    series, whose deletion was cut short) and anything unreadable are left as they are and reported. The index
    is read one series folder at a time, so memory does not grow with the store. ``progress(files so far)`` is
    called every few seconds of a long walk; ``why`` goes into the audit row."""
    db = store.db
    report = RecoveryReport()
    last_progress = _clock()
    for dirpath, dirnames, names in os.walk(store.root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        instance_files = [n for n in names if n.endswith(".dcm") and not n.startswith(".")]
        if not instance_files:
            continue
        indexed = {row[0] for row in db._query("SELECT path FROM instances WHERE series_uid=?",
                                               (os.path.basename(dirpath),))}
        for name in instance_files:
            report.files += 1
            path = os.path.join(dirpath, name)
            if path in indexed:
                continue
            if _reindex(store, path):
                report.reindexed += 1
            else:
                report.left.append(path)
        if progress is not None and _clock() - last_progress >= 5.0:
            progress(report.files)
            last_progress = _clock()
    if report.reindexed or report.left:
        # synced: makes the rows above durable with it
        db.audit("recovered", str(store.root),
                 f"{why}: {report.reindexed} instance file(s) indexed again from their "
                 f"headers, {len(report.left)} unindexed file(s) left as they are")
    return report


def _reindex(store: InstanceStore, path: str) -> bool:
    """Index one unindexed file from its header; False when it is left as it is."""
    f = _header(path)
    if f is None or not all(valid_uid(f[k]) for k in _KEYWORDS[:4]) or not f["TransferSyntaxUID"] \
            or store.path_for(f["StudyInstanceUID"], f["SeriesInstanceUID"], f["SOPInstanceUID"]) != path:
        return False
    return store.db.index_instance(sop_uid=f["SOPInstanceUID"], sop_class=f["SOPClassUID"],
                                   study_uid=f["StudyInstanceUID"], series_uid=f["SeriesInstanceUID"], path=path,
                                   transfer_syntax=f["TransferSyntaxUID"],
                                   calling_aet=f["SourceApplicationEntityTitle"], patient_id=f["PatientID"],
                                   issuer=f["IssuerOfPatientID"], modality=f["Modality"], synced=False)


def request_store_check(state_dir: str | Path, why: str) -> None:
    """Make the next start check the instance store (see the module docstring), durably."""
    write_durably(Path(state_dir) / CHECK_REQUEST, lambda fh: fh.write(why.encode()))


def requested_store_check(state_dir: str | Path) -> str | None:
    """Why a store check was asked for (``request_store_check``); None when it was not."""
    try:
        return (Path(state_dir) / CHECK_REQUEST).read_text(errors="replace").strip() or "asked for"
    except FileNotFoundError:
        return None


def clear_store_check(state_dir: str | Path) -> None:
    (Path(state_dir) / CHECK_REQUEST).unlink(missing_ok=True)


def check_store_at_start(store: InstanceStore, previous: RunRow | None, *, requested: str | None = None,
                         progress: Callable[[int], None] | None = None) -> RecoveryReport | None:
    """At start: rebuild lost index rows if the run before (``previous``) ended without a clean stop, or a check
    was ``requested`` (its reason); None when neither."""
    if requested:
        why = requested
    elif previous is None or previous.stopped_at is not None:
        return None  # the first recorded run (every earlier release synced each row), or a clean stop
    elif previous.boot_id and previous.boot_id != boot_id():
        why = "the last run did not stop cleanly and the machine restarted since: a power loss or crash of the host"
    else:
        why = "the last run did not stop cleanly: the process ended without its shutdown"
    log.warning("%s: checking the instance store for files the index does not name", why)
    report = reindex_unindexed(store, progress, why)
    if report.reindexed:
        log.warning("indexed %d received instance file(s) again from their headers; their series are screened "
                    "again", report.reindexed)
    for path in report.left[:20]:
        log.warning("instance file %s is not in the index and could not be indexed (unreadable, not filed "
                    "under its own UIDs, or its SOP Instance UID filed elsewhere): left as it is", path)
    log.info("instance store checked: %d file(s), %d indexed again, %d left", report.files, report.reindexed,
             len(report.left))
    return report
