"""A minimal MLLP client: send messages on one connection, read one ACK each (optionally over TLS)."""
from __future__ import annotations

import socket
import ssl

from hl7.mllp import CR, FS, frame


class MLLPClient:
    def __init__(self, host: str, port: int, timeout_s: float = 30.0, *, connect_timeout_s: float | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``connect_timeout_s`` bounds the TCP (and TLS) handshake; ``timeout_s`` each read afterwards."""
        sock = socket.create_connection((host, port), timeout=connect_timeout_s or timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            sock.settimeout(timeout_s)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._buf = bytearray()

    def send(self, message: bytes) -> bytes:
        self._sock.sendall(frame(message))
        return self.read_frame()

    def send_raw(self, data: bytes) -> None:
        self._sock.sendall(data)

    def read_frame(self, timeout_s: float | None = None) -> bytes:
        """The next frame; ``timeout_s`` (if given) bounds this read and raises TimeoutError."""
        if timeout_s is not None:
            previous = self._sock.gettimeout()
            self._sock.settimeout(timeout_s)
            try:
                return self.read_frame()
            except socket.timeout as exc:
                raise TimeoutError(f"no frame within {timeout_s:g} s") from exc
            finally:
                self._sock.settimeout(previous)
        while True:
            end = self._buf.find(FS + CR)
            if end >= 0:
                start = self._buf.find(b"\x0b")
                message = bytes(self._buf[start + 1 : end])
                del self._buf[: end + 2]
                return message
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("MLLP peer closed the connection before the ACK")
            self._buf.extend(chunk)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "MLLPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK message."""
    for seg in ack.decode("latin-1").replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            return seg.split(seg[3])[1]
    raise ValueError("no MSA segment in the acknowledgement")
