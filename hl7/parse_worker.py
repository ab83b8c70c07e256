"""Parsing stored messages after their ACK: on demand for one patient, or in a background process."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from pathlib import Path

from hl7.mapping import DEFAULT, LabMapping, load_mapping
from hl7.parse import parse_observations
from hl7.privacy import redact_values
from hl7.store import LabStore

log = logging.getLogger("osteoscreen.hl7.parse")


def parse_pending(store: LabStore, *, patient_id: str | None = None, limit: int | None = None,
                  mapping: LabMapping = DEFAULT) -> int:
    """Parse messages stored but not yet parsed; a failure is recorded on the message, never dropped."""
    done = 0
    for mid, raw in store.pending_messages(patient_id=patient_id, limit=limit):
        try:
            rows = parse_observations(raw, mapping)
        except Exception as exc:  # noqa: BLE001 - recorded and visible (`osteoscreen hl7 errors`)
            log.error("HL7 message %d stored but could not be parsed: %s", mid, redact_values(str(exc)))
            store.save_parse(mid, [], f"{type(exc).__name__}: {exc}")
        else:
            store.save_parse(mid, rows, None)
        done += 1
    return done


def exit_when_orphaned(parent: int, poll_s: float = 1.0) -> None:
    """End this child process when its parent is gone (killed with SIGKILL, say), instead of lingering.

    systemd stops the whole cgroup, but a parent killed outside systemd (or in a
    test) would otherwise leave spawned children polling a store nobody serves.
    """
    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def ignore_sigterm() -> None:
    """In a child process: the service stops its children itself, in order, after recording their state
    (systemd: KillMode=mixed sends SIGTERM to the service process only). A SIGTERM to the whole process group
    used to kill the parser while it held a lock the service then waited on for ever, and a job worker before
    the service knew it was stopping (an attempt counted against the job)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loop(db_path: str, poll_s: float, stop, mapping_file: str | None, parent: int,
          log_target: tuple | None = None) -> None:  # pragma: no cover
    ignore_sigterm()
    if log_target is not None:
        from dicom_node.logfmt import configure

        level, logfile, fmt = log_target
        configure(level, fmt, filename=logfile, role="hl7-parser")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [hl7-parser] %(message)s")
    exit_when_orphaned(parent)
    mapping = load_mapping(mapping_file)
    store = LabStore(db_path)
    while True:
        try:
            n = parse_pending(store, limit=50, mapping=mapping)
        except Exception:  # noqa: BLE001 - keep going; the next poll retries
            log.exception("background HL7 parse failed")
            n = 0
        # the stop signal is the pipe becoming readable (a message, or EOF when the service is gone): no lock
        # shared with the service that a killed child could leave held
        if stop.poll(poll_s if n == 0 else 0):
            break
    store.close()


class BackgroundParser:
    """A separate process, so hl7apy's CPU time never holds the listener's GIL."""

    def __init__(self, db_path: str | Path, poll_s: float = 1.0, mapping_file: str | Path | None = None,
                 log_target: tuple | None = None) -> None:
        """``log_target``: (level, file, format) of the service's logging (dicom_node.logfmt.current_target)."""
        ctx = multiprocessing.get_context("spawn")
        stop_reader, self._stop = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_loop, args=(str(db_path), poll_s, stop_reader,
                                                     str(mapping_file) if mapping_file else None, os.getpid(),
                                                     log_target),
                                 name="hl7-parser", daemon=True)

    def start(self) -> None:
        self._proc.start()

    def stop(self) -> None:
        try:
            self._stop.send(None)
        except OSError:  # the parser is gone already
            pass
        self._proc.join(timeout=15)
        if self._proc.is_alive():
            self._proc.kill()  # it ignores SIGTERM
            self._proc.join(timeout=5)
