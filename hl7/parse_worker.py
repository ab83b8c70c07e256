"""Parsing stored messages after their ACK: on demand for one patient, or in a background process."""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from pathlib import Path

from hl7.mapping import DEFAULT, LabMapping, load_mapping
from hl7.parse import parse_observations
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
            log.error("HL7 message %d stored but could not be parsed: %s", mid, exc)
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


def _loop(db_path: str, poll_s: float, stop, mapping_file: str | None, parent: int) -> None:  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [hl7-parser] %(message)s")
    exit_when_orphaned(parent)
    mapping = load_mapping(mapping_file)
    store = LabStore(db_path)
    while not stop.is_set():
        try:
            n = parse_pending(store, limit=50, mapping=mapping)
        except Exception:  # noqa: BLE001 - keep going; the next poll retries
            log.exception("background HL7 parse failed")
            n = 0
        if n == 0:
            stop.wait(poll_s)
    store.close()


class BackgroundParser:
    """A separate process, so hl7apy's CPU time never holds the listener's GIL."""

    def __init__(self, db_path: str | Path, poll_s: float = 1.0, mapping_file: str | Path | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_loop, args=(str(db_path), poll_s, self._stop,
                                                     str(mapping_file) if mapping_file else None, os.getpid()),
                                 name="hl7-parser", daemon=True)

    def start(self) -> None:
        self._proc.start()

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(timeout=15)
        if self._proc.is_alive():
            self._proc.terminate()
