"""Receiver processes: associations served outside the service process, so ingest is not capped by one GIL.

The service keeps the listening socket and accepts; each accepted connection
is handed (its file descriptor, over a Unix SOCK_SEQPACKET pair) to the
receiver process with the fewest open associations. A receiver runs the same
``StorageSCP`` association code on it and writes the same durable store and
SQLite index; it tells the service about every stored or refused instance and
every closed association over the same pair, so series completion, metrics
and the association limit stay in the service. A receiver that dies is
restarted; what it had not acknowledged was never acknowledged, so the sender
resends it.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from config.schema import ListenerTLSSettings
from dicom_node.store import InstanceRef

log = logging.getLogger("osteoscreen.receiver")
_MAX_MESSAGE = 64 * 1024
_READY_TIMEOUT_S = 60.0

OnOutcome = Callable[[str, int, bool], None]


class ReceiverStartError(RuntimeError):
    """A receiver process could not start: the service cannot receive, so it must not report ready."""


@dataclass(frozen=True)
class ReceiverSetup:
    """What a receiver process needs to serve associations; picklable."""
    ae_title: str
    max_pdu: int
    max_associations: int
    allowed_calling_aets: list[str]
    allowed_sop_classes: dict[str, list[str]]
    tls: ListenerTLSSettings | None
    store_root: str
    db_path: str
    min_free_bytes: int
    index_synced: bool = True  # False: the service rebuilds unsynced rows after a power loss (InstanceStore)
    log_target: tuple = field(default=(logging.INFO, None, "text"))


class _Channel:
    """Pickled messages (and file descriptors) over one end of a SOCK_SEQPACKET pair; sends are serialised."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: tuple, fds: list[int] | None = None) -> None:
        data = pickle.dumps(message)
        with self._send_lock:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)

    def recv(self) -> tuple[tuple | None, list[int]]:
        """The next message and any descriptors with it; (None, []) when the other end is gone."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, _MAX_MESSAGE, 4)
        except OSError:
            return None, []
        if not data:
            return None, fds
        return pickle.loads(data), fds


# --- the receiver process ------------------------------------------------------------------
def receiver_main(setup: ReceiverSetup, ctrl: socket.socket, parent_pid: int, index: int) -> None:  # pragma: no cover
    """Entry point of a receiver process (spawned)."""
    from dicom_node.db import NodeDB
    from dicom_node.logfmt import configure
    from dicom_node.scp import StorageSCP
    from dicom_node.store import InstanceStore
    from hl7.parse_worker import exit_when_orphaned, ignore_sigterm
    from hl7.tls import server_context

    ignore_sigterm()  # the service stops it (a "stop" message, then SIGKILL)
    level, logfile, fmt = setup.log_target
    configure(level, fmt, filename=logfile, role=f"receiver-{index}")
    exit_when_orphaned(parent_pid)
    channel = _Channel(ctrl)
    db = NodeDB(setup.db_path)
    store = InstanceStore(setup.store_root, db, setup.min_free_bytes, sweep_stale=False,
                          index_synced=setup.index_synced)
    scp = StorageSCP(ae_title=setup.ae_title, host="", port=0, max_pdu=setup.max_pdu,
                     max_associations=setup.max_associations,
                     allowed_calling_aets=setup.allowed_calling_aets, store=store,
                     on_stored=lambda ref: channel.send(("stored", ref)),
                     on_outcome=lambda calling, status, dup: channel.send(("outcome", calling, status, dup)),
                     ssl_context=server_context(setup.tls) if setup.tls is not None else None,
                     allowed_sop_classes=setup.allowed_sop_classes, quiet_allow_list=True)
    channel.send(("ready", os.getpid()))
    while True:
        message, fds = channel.recv()
        if message is None or message[0] == "stop":
            break
        if message[0] == "connection" and fds:
            _, address, over_limit = message
            sock = socket.socket(fileno=fds[0])
            scp.serve_handed_off(sock, address, over_limit, lambda: channel.send(("closed",)))
        elif message[0] == "config":
            scp.set_allowed_calling_aets(message[1], quiet=True)
            scp.set_allowed_sop_classes(message[2])
    scp.close_connections()
    db.close()


# --- the service side ------------------------------------------------------------------------
class _Receiver:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.channel: _Channel | None = None
        self.open = 0  # associations handed to it and not yet closed
        self.ready = threading.Event()
        self.started = 0.0
        self.restart_delay_s = 0.0  # grows while the process keeps dying young (a crash loop)


class ReceiverPool:
    def __init__(self, setup: ReceiverSetup, processes: int, *, on_stored: Callable[[InstanceRef], None],
                 on_outcome: OnOutcome, on_lost: Callable[[], None] | None = None) -> None:
        """``on_lost``: called after a receiver died, which may have indexed an instance without telling us."""
        self.setup = setup
        self.on_lost = on_lost
        self.on_stored = on_stored
        self.on_outcome = on_outcome
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self.processes = processes
        self._receivers = [_Receiver(i) for i in range(processes)]
        self._stopping = threading.Event()
        self._started = False  # until every receiver was ready once, a death is a start failure, not restarted

    @property
    def open_associations(self) -> int:
        with self._lock:
            return sum(r.open for r in self._receivers)

    def start(self) -> None:
        """Start every receiver and wait until each is ready; ``ReceiverStartError`` if one dies or hangs."""
        self._stopping.clear()
        self._started = False
        for r in self._receivers:
            self._spawn(r)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for r in self._receivers:
            while not r.ready.wait(0.2):
                if r.process.exitcode is not None or time.monotonic() > deadline:
                    why = (f"exited with code {r.process.exitcode}" if r.process.exitcode is not None
                           else f"was not ready within {_READY_TIMEOUT_S:.0f} s")
                    self.stop()
                    raise ReceiverStartError(f"receiver process {r.index} {why} during start-up; its error is in "
                                             "the log above")
        self._started = True

    def _spawn(self, r: _Receiver) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r.ready.clear()
        r.open = 0
        r.started = time.monotonic()
        r.channel = _Channel(ours)
        r.process = self._ctx.Process(target=receiver_main, args=(self.setup, theirs, os.getpid(), r.index),
                                      name=f"osteoscreen-receiver-{r.index}", daemon=True)
        r.process.start()
        theirs.close()
        threading.Thread(target=self._listen, args=(r, r.channel), name=f"receiver-{r.index}-events",
                         daemon=True).start()

    def _listen(self, r: _Receiver, channel: _Channel) -> None:
        while True:
            message, fds = channel.recv()
            for fd in fds:
                os.close(fd)
            if message is None:
                break
            kind = message[0]
            if kind == "stored":
                try:
                    self.on_stored(message[1])
                except Exception:  # noqa: BLE001 - the instance is durable; completion is re-armed at restart
                    log.exception("series completion update failed for %s", message[1].series_uid)
            elif kind == "outcome":
                self.on_outcome(*message[1:])
            elif kind == "closed":
                with self._lock:
                    r.open = max(0, r.open - 1)
            elif kind == "ready":
                log.info("receiver process %d ready (pid %d)", r.index, message[1])
                r.ready.set()
        channel.sock.close()
        if self._stopping.is_set() or not self._started:
            return  # stopping, or failing to start: start() reports it
        r.process.join(timeout=5)
        young = time.monotonic() - r.started < 30
        r.restart_delay_s = min(60.0, max(1.0, 2 * r.restart_delay_s)) if young else 0.0
        log.error("receiver process %d exited (code %s) with %d association(s) open; their unacknowledged "
                  "instances will be re-sent by the senders; restarting it in %.0f s", r.index, r.process.exitcode,
                  r.open, r.restart_delay_s)
        self._remove_partial_files(r.process.pid)
        with self._lock:  # no connection is handed to it until its replacement is ready
            r.open = 0
            r.ready.clear()
            if r.channel is channel:
                r.channel = None
        if self.on_lost is not None:
            try:
                self.on_lost()
            except Exception:  # noqa: BLE001 - the restart below matters more
                log.exception("re-arming series after the loss of receiver process %d failed", r.index)
        if self._stopping.wait(r.restart_delay_s):
            return
        with self._lock:
            if not self._stopping.is_set():
                self._spawn(r)

    def _remove_partial_files(self, pid: int | None) -> None:
        """The half-received instances of a receiver that died (never acknowledged): their temporary names
        carry its pid, so no other writer's file is touched. Without this they stayed until the next start."""
        if pid is None:
            return
        removed = 0
        for path in Path(self.setup.store_root).rglob(f".incoming.{pid}.*.tmp"):
            try:
                path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("could not remove %s left by receiver pid %d: %s", path, pid, exc)
        if removed:
            log.info("removed %d half-received instance file(s) of receiver pid %d", removed, pid)

    def dispatch(self, sock: socket.socket, address: tuple, max_associations: int) -> bool:
        """Hand an accepted connection to the least busy running receiver (the association limit counts all of
        them) and close our copy; False, keeping ``sock``, when no receiver could take it (all are restarting)."""
        with self._lock:
            over_limit = sum(r.open for r in self._receivers) + 1 > max_associations
            running = [x for x in self._receivers if x.channel is not None and x.ready.is_set()]
            if not running:
                return False
            r = min(running, key=lambda x: (x.open, x.index))
            r.open += 1
            channel = r.channel
        try:
            channel.send(("connection", address, over_limit), [sock.fileno()])
        except OSError as exc:
            with self._lock:
                r.open = max(0, r.open - 1)
            log.error("could not hand the connection from %s:%s to receiver process %d: %s",
                      address[0], address[1], r.index, exc)
            return False
        sock.close()
        return True

    def configure(self, allowed_calling_aets: list[str], allowed_sop_classes: dict[str, list[str]]) -> None:
        """New allow-lists (a reload): sent to the running receivers and kept for any receiver started later."""
        with self._lock:  # a restart spawns under this lock: it starts with the new lists or gets the send below
            self.setup = dataclasses.replace(self.setup, allowed_calling_aets=list(allowed_calling_aets),
                                             allowed_sop_classes=dict(allowed_sop_classes))
        for r in self._receivers:
            if r.channel is not None:
                try:
                    r.channel.send(("config", list(allowed_calling_aets), dict(allowed_sop_classes)))
                except OSError as exc:
                    log.error("receiver process %d did not take the new allow-lists: %s", r.index, exc)

    def stop(self) -> None:
        with self._lock:  # a restart in progress finishes first, and none starts after this
            self._stopping.set()
        for r in self._receivers:
            if r.channel is not None:
                try:
                    r.channel.send(("stop",))
                except OSError:
                    pass
        for r in self._receivers:
            if r.process is not None:
                r.process.join(timeout=15)
                if r.process.is_alive():
                    r.process.kill()  # it ignores SIGTERM
                    r.process.join(timeout=5)
