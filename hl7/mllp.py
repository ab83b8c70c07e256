"""MLLP framing and an asyncio server that keeps connections open for many messages.

Frames are <VT> message <FS><CR>. Bytes outside a frame (NUL padding, stray
CR/LF between frames) are skipped. A frame larger than the configured limit is
discarded and answered AE, named from its first segment. A connection is closed
when no complete frame arrives within the read timeout (idle, or bytes dripped),
when its peer does not read its ACKs within that time, and at accept when
``max_connections`` are already open. The handler returns the ACK bytes; nothing it raises reaches the
event loop. It runs on the loop thread itself: its work is one SQLite commit
(about 0.5 ms here), commits are serialised by the store anyway, and a hop to a
worker thread per message cost more than the commit (measured: 550 vs 1,200
messages/s on one connection). Messages for which ``offload`` says so (those
that ask for an application ACK, which needs the full parse) run in a thread.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Callable

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
log = logging.getLogger("osteoscreen.hl7.mllp")

Handler = Callable[[bytes], "bytes | list[bytes]"]  # the ACK frames to send (enhanced mode: 0-2)


def frame(message: bytes) -> bytes:
    return VT + message + FS + CR


HEAD_BYTES = 4096  # of a frame dropped for its size, this much of its first segment is kept to answer it


@dataclass(frozen=True)
class Oversize:
    """A frame dropped for its size; ``head`` is its first segment (its MSH, at most HEAD_BYTES), so that the
    refusal can name the message (MSA-2) and its sender."""

    head: bytes


def _first_segment(buf: bytearray | bytes) -> bytes:
    cut = len(buf) if len(buf) < HEAD_BYTES else HEAD_BYTES
    for sep in (CR, b"\n"):
        at = buf.find(sep, 0, cut)
        if at >= 0:
            cut = at
    return bytes(buf[:cut])


class FrameReader:
    """Incremental MLLP de-framer."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._in_frame = False
        self._head: bytes | None = None  # set while the current frame is being discarded for its size

    def feed(self, data: bytes) -> list[bytes | None]:
        """Complete frames in order; ``None`` marks a frame dropped for size."""
        return [None if isinstance(f, Oversize) else f for f in self.read(data)]

    def read(self, data: bytes) -> list[bytes | Oversize]:
        """Complete frames in order; an ``Oversize`` marks a frame dropped for size."""
        out: list[bytes | Oversize] = []
        self._buf.extend(data)
        while True:
            if not self._in_frame:
                start = self._buf.find(VT)
                if start < 0:
                    self._buf.clear()  # stray bytes between frames
                    return out
                del self._buf[: start + 1]
                self._in_frame, self._head = True, None
            end = self._buf.find(FS + CR)
            restart = self._buf.find(VT, 0, end if end >= 0 else len(self._buf))
            if restart >= 0:  # a new frame began before this one ended: the sender gave up on it (no ACK goes)
                log.warning("MLLP frame of %d bytes ended by the start of another, not by FS CR: dropped unanswered",
                            restart)
                del self._buf[: restart + 1]
                self._head = None
                continue
            if end < 0:
                if len(self._buf) > self.max_bytes:
                    if self._head is None:
                        self._head = _first_segment(self._buf)
                    del self._buf[:-1]  # keep a trailing FS that may pair with the next CR
                return out
            if self._head is not None or end > self.max_bytes:
                out.append(Oversize(self._head if self._head is not None else _first_segment(self._buf[:end])))
            else:
                out.append(bytes(self._buf[:end]))
            del self._buf[: end + 2]
            self._in_frame, self._head = False, None


class _PausedAtAccept(asyncio.StreamReaderProtocol):
    """``asyncio.start_server``'s protocol, reading nothing until the connection is let in: over TLS the
    client's first handshake bytes must reach ``start_tls``, not the plain stream's buffer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)


class MLLPServer:
    """Runs its own event loop in a background thread."""

    def __init__(self, host: str, port: int, handler: Handler, refuse: Callable[..., bytes | list[bytes]], *,
                 max_message_bytes: int = 1_048_576, read_timeout_s: float = 300.0,
                 ssl_context: ssl.SSLContext | None = None,
                 offload: Callable[[bytes], bool] | None = None, max_connections: int = 64,
                 allowed_hosts: list[str] | None = None) -> None:
        self.host, self.port = host, port
        self.allowed_networks = [ipaddress.ip_network(h, strict=False) for h in allowed_hosts or []]
        self.max_connections = max_connections  # more at once are closed at accept, with a log line
        self._slots: asyncio.Semaphore | None = None
        self.ssl_context = ssl_context
        self.offload = offload  # True: handle this message in a worker thread (slow work)
        self.handler = handler
        self.refuse = refuse  # refuse(reason, message=None, code="AR"): the negative ACK for a message not handled
        self.max_message_bytes = max_message_bytes
        self.read_timeout_s = read_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        assert self._slots is not None
        if not self._host_allowed(peer):
            log.warning("MLLP connection from %s refused: not in hl7.allowed_hosts", peer)
            writer.close()
            return
        if self._slots.locked():
            log.warning("MLLP connection from %s refused: %d connections already open (hl7.max_connections); "
                        "raise the limit if that many senders are expected, else find the sender that leaves "
                        "connections open", peer, self.max_connections)
            writer.close()
            return
        async with self._slots:
            try:
                if self.ssl_context is None:
                    writer.transport.resume_reading()  # paused at accept (_PausedAtAccept)
                elif not await self._start_tls(peer, writer):
                    return
                await self._serve(peer, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
                log.info("MLLP connection from %s lost: %s", peer, exc)
            except asyncio.CancelledError:  # shutdown: end quietly
                pass
            finally:
                await self._close(writer)

    async def _start_tls(self, peer: object, writer: asyncio.StreamWriter) -> bool:
        """The TLS handshake, only now that the host is allowed and a slot is held: a host outside
        allowed_hosts, or connections beyond max_connections, cost no handshake (asymmetric crypto on the
        event loop). False (logged) when it fails or does not finish within the handshake timeout."""
        assert self.ssl_context is not None
        try:  # a handshake past the timeout raises ConnectionAbortedError
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=min(self.read_timeout_s, 30.0))
        except (ssl.SSLError, OSError) as exc:
            log.warning("MLLP connection from %s: TLS handshake failed: %s", peer, getattr(exc, "reason", None) or exc)
            return False
        return True

    def _host_allowed(self, peer: object) -> bool:
        if not self.allowed_networks:
            return True
        try:
            address = ipaddress.ip_address(peer[0])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            return False
        if address.version == 6 and address.ipv4_mapped is not None:  # ::ffff:10.1.2.3 on a dual-stack socket
            address = address.ipv4_mapped
        return any(address in net for net in self.allowed_networks)

    async def _serve(self, peer: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer frames until the peer closes, or sends no complete frame within read_timeout_s (an idle
        connection, or one dripping bytes), or does not read its ACKs within read_timeout_s."""
        log.info("MLLP connection from %s", peer)
        frames = FrameReader(self.max_message_bytes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s  # the next complete frame is due by then
        while True:
            data = await self._read(reader, deadline, peer)
            if not data:
                return
            for message in frames.read(data):
                if not await self._write(writer, await self._answer(message, peer), peer):
                    return
                deadline = loop.time() + self.read_timeout_s

    async def _read(self, reader: asyncio.StreamReader, deadline: float, peer: object) -> bytes:
        """The next bytes, or b"" when the peer closed or the frame deadline passed."""
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(reader.read(65536), timeout=remaining)
        except asyncio.TimeoutError:
            log.info("MLLP connection from %s: no complete frame within %.0f s (idle, or sending too slowly): "
                     "closing", peer, self.read_timeout_s)
            return b""

    async def _answer(self, message: bytes | Oversize, peer: object) -> bytes | list[bytes]:
        if isinstance(message, Oversize):
            log.warning("MLLP message from %s exceeds %d bytes: refused (AE)", peer, self.max_message_bytes)
            return self.refuse(f"message exceeds the maximum size of {self.max_message_bytes} bytes: not stored; "
                               "split it, or ask for hl7.max_message_bytes to be raised", message.head, code="AE")
        if self.offload is not None and self.offload(message):
            return await asyncio.get_running_loop().run_in_executor(None, self._safe_handle, message)
        return self._safe_handle(message)

    async def _write(self, writer: asyncio.StreamWriter, ack: bytes | list[bytes], peer: object) -> bool:
        """Send the ACK frames (enhanced mode: 0, 1 or 2); False when the peer has not read them in time."""
        for reply in ([ack] if isinstance(ack, bytes) else ack):
            writer.write(frame(reply))
        try:
            await asyncio.wait_for(writer.drain(), timeout=self.read_timeout_s)
        except asyncio.TimeoutError:
            log.warning("MLLP connection from %s: its ACKs not read for %.0f s: closing", peer, self.read_timeout_s)
            writer.transport.abort()  # a close would wait for the unread ACKs to drain
            return False
        return True

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        if writer.transport.is_closing():  # closed under us (a failed TLS handshake): no close will be reported
            writer.transport.abort()
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout=5)
        except asyncio.TimeoutError:
            writer.transport.abort()
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - closing at shutdown: end quietly
            pass

    def _safe_handle(self, message: bytes) -> bytes | list[bytes]:
        try:
            return self.handler(message)
        except Exception as exc:  # noqa: BLE001 - the listener must survive any handler failure
            log.exception("HL7 handler failed")
            return self.refuse(f"internal error, message not stored: {exc}", message)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._slots = asyncio.Semaphore(self.max_connections)
        try:
            self._server = loop.run_until_complete(
                # plain TCP first: TLS starts per connection after the host and slot checks (_start_tls)
                loop.create_server(lambda: _PausedAtAccept(asyncio.StreamReader(loop=loop), self._client, loop=loop),
                                   self.host, self.port, reuse_address=True))
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mllp-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise OSError(f"cannot listen for HL7 on {self.host}:{self.port}: {self._error}")
        log.info("MLLP listener on %s:%d%s", self.host, self.bound_port, " (TLS)" if self.ssl_context else "")

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
