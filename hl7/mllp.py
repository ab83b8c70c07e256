"""MLLP framing and an asyncio server that keeps connections open for many messages.

Frames are <VT> message <FS><CR>. Bytes outside a frame (NUL padding, stray
CR/LF between frames) are skipped. A frame larger than the configured limit is
answered with a reject and discarded; an idle connection is closed after the
read timeout. The handler returns the ACK bytes; nothing it raises reaches the
event loop. It runs on the loop thread itself: its work is one SQLite commit
(about 0.5 ms here), commits are serialised by the store anyway, and a hop to a
worker thread per message cost more than the commit (measured: 550 vs 1,200
messages/s on one connection). Messages for which ``offload`` says so (those
that ask for an application ACK, which needs the full parse) run in a thread.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from typing import Callable

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
log = logging.getLogger("osteoscreen.hl7.mllp")

Handler = Callable[[bytes], "bytes | list[bytes]"]  # the ACK frames to send (enhanced mode: 0-2)


def frame(message: bytes) -> bytes:
    return VT + message + FS + CR


class FrameReader:
    """Incremental MLLP de-framer."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._in_frame = False
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """Complete frames in order; ``None`` marks a frame dropped for size."""
        out: list[bytes | None] = []
        self._buf.extend(data)
        while True:
            if not self._in_frame:
                start = self._buf.find(VT)
                if start < 0:
                    self._buf.clear()  # stray bytes between frames
                    return out
                del self._buf[: start + 1]
                self._in_frame, self._discarding = True, False
            end = self._buf.find(FS + CR)
            restart = self._buf.find(VT, 0, end if end >= 0 else len(self._buf))
            if restart >= 0:  # a new frame began before this one ended: the sender gave up on it (no ACK goes)
                log.warning("MLLP frame of %d bytes ended by the start of another, not by FS CR: dropped unanswered",
                            restart)
                del self._buf[: restart + 1]
                self._discarding = False
                continue
            if end < 0:
                if len(self._buf) > self.max_bytes:
                    self._discarding = True
                    del self._buf[:-1]  # keep a trailing FS that may pair with the next CR
                return out
            out.append(None if self._discarding or end > self.max_bytes else bytes(self._buf[:end]))
            del self._buf[: end + 2]
            self._in_frame = False


class MLLPServer:
    """Runs its own event loop in a background thread."""

    def __init__(self, host: str, port: int, handler: Handler, refuse: Callable[..., bytes | list[bytes]], *,
                 max_message_bytes: int = 1_048_576, read_timeout_s: float = 300.0,
                 ssl_context: ssl.SSLContext | None = None,
                 offload: Callable[[bytes], bool] | None = None) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.offload = offload  # True: handle this message in a worker thread (slow work)
        self.handler = handler
        self.refuse = refuse  # refuse(reason, message=None): the negative ACK for a message not handled
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
        log.info("MLLP connection from %s", peer)
        frames = FrameReader(self.max_message_bytes)
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), timeout=self.read_timeout_s)
                except asyncio.TimeoutError:
                    log.info("MLLP connection from %s idle for %.0f s: closing", peer, self.read_timeout_s)
                    break
                if not data:
                    break
                for message in frames.feed(data):
                    if message is None:
                        log.warning("MLLP message from %s exceeds %d bytes: rejected", peer, self.max_message_bytes)
                        ack = self.refuse(f"message exceeds the maximum size of {self.max_message_bytes} bytes")
                    elif self.offload is not None and self.offload(message):
                        ack = await loop.run_in_executor(None, self._safe_handle, message)
                    else:
                        ack = self._safe_handle(message)
                    for reply in ([ack] if isinstance(ack, bytes) else ack):  # enhanced mode: 0, 1 or 2 ACKs
                        writer.write(frame(reply))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.info("MLLP connection from %s lost: %s", peer, exc)
        except asyncio.CancelledError:  # shutdown: end quietly
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
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
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._client, self.host, self.port, reuse_address=True, ssl=self.ssl_context,
                                     ssl_handshake_timeout=min(self.read_timeout_s, 30.0) if self.ssl_context else None))
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
