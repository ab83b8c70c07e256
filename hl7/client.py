"""A minimal MLLP client: send messages on one connection, read their ACKs (optionally over TLS).

Every read of a frame has a deadline (a peer that drips bytes cannot hold the caller
longer than the timeout) and a size cap (a peer that never ends its frame cannot fill
memory). ``exchange`` matches the ACK to the message by MSA-2 = MSH-10.
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass

from hl7.mllp import CR, FS, VT, frame

log = logging.getLogger("osteoscreen.hl7.client")

MAX_FRAME_BYTES = 1_048_576  # an answer larger than this is not an ACK or a query answer we can use
ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


class FrameTooLarge(ConnectionError):
    """The peer sent more than the cap without ending its frame (FS CR): the connection is unusable."""


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2: the MSH-10 of the message it answers
    text: str = ""  # MSA-3
    error_code: str = ""  # ERR-3.1 (v2.5+) or ERR-1.4.1 (v2.3/2.4): HL7 table 0357
    error_text: str = ""  # ERR-8, else the code's label (ERR-3.2)

    @property
    def reason(self) -> str:
        """What the receiver said, for the outbox row and the audit."""
        parts = [p for p in (self.text, self.error_text if self.error_text != self.text else "") if p]
        why = "; ".join(parts) or "no reason given"
        return f"{why} (ERR {self.error_code})" if self.error_code else why

    @property
    def unsupported(self) -> bool:
        """ERR code 200-203: message type, event, processing ID or version not supported by the receiver."""
        return self.error_code in ("200", "201", "202", "203")


class MLLPClient:
    def __init__(self, host: str, port: int, timeout_s: float = 30.0, *, connect_timeout_s: float | None = None,
                 ssl_context: ssl.SSLContext | None = None, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        """``connect_timeout_s`` bounds the TCP (and TLS) handshake; ``timeout_s`` each frame read afterwards
        (every recv, and the whole frame unless a shorter timeout is passed)."""
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
        self.timeout_s = timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.peer = f"{host}:{port}"

    def send(self, message: bytes, timeout_s: float | None = None) -> bytes:
        """Send ``message`` and return the next frame, within ``timeout_s`` (default: the client's timeout)."""
        deadline = self._deadline(timeout_s)
        self._send_within(frame(message), deadline)
        return self._read_until(deadline)

    def exchange(self, message: bytes, timeout_s: float | None = None) -> Ack:
        """Send ``message`` and return its ACK: the first frame whose MSA-2 is the message's MSH-10.

        ACKs of other messages (a late or second ACK of an earlier one) are skipped. TimeoutError when no
        matching ACK came within ``timeout_s``; ValueError for an answer that is not a readable ACK.
        """
        control = control_id(message)
        deadline = self._deadline(timeout_s)
        self._send_within(frame(message), deadline)
        skipped: list[str] = []
        while True:
            try:
                raw = self._read_until(deadline, f"no ACK for {control}")
            except TimeoutError as exc:
                if not skipped:
                    raise
                raise TimeoutError(f"{exc}; skipped ACKs naming other messages in MSA-2: {', '.join(skipped[:3])}"
                                   " (the receiver must echo MSH-10 in MSA-2)") from None
            ack = parse_ack(raw)
            if ack.control_id == control:
                return ack
            skipped.append(f"{ack.code} for {ack.control_id or '(empty)'!r}")
            log.warning("MLLP peer %s: skipped an ACK (%s) for %r while waiting for the ACK of %s", self.peer,
                        ack.code, ack.control_id, control)

    def send_raw(self, data: bytes) -> None:
        self._sock.sendall(data)

    def read_frame(self, timeout_s: float | None = None) -> bytes:
        """The next frame within ``timeout_s`` (default: the client's timeout); TimeoutError when none came."""
        return self._read_until(self._deadline(timeout_s))

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    def _remaining(self, deadline: float, what: str) -> float:
        """Seconds the next socket operation may take; TimeoutError(``what``) when the deadline has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(what)
        return min(self.timeout_s, remaining)

    def _send_within(self, data: bytes, deadline: float) -> None:
        what = f"{self.peer} did not take the message within the time limit"
        self._sock.settimeout(self._remaining(deadline, what))
        try:
            self._sock.sendall(data)  # the socket timeout bounds the whole sendall (Python >= 3.5)
        except socket.timeout as exc:
            raise TimeoutError(what) from exc

    def _read_until(self, deadline: float, expected: str = "no complete frame") -> bytes:
        what = f"{expected} from {self.peer} within the time limit"
        while True:
            message = self._take_frame()
            if message is not None:
                return message
            if len(self._buf) > self.max_frame_bytes:
                self._buf.clear()
                raise FrameTooLarge(f"{self.peer} sent over {self.max_frame_bytes} bytes without ending the frame "
                                    "(FS CR): connection dropped; check the peer's MLLP framing")
            self._sock.settimeout(self._remaining(deadline, what))
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout as exc:
                raise TimeoutError(what) from exc
            if not chunk:
                raise ConnectionError(f"MLLP peer {self.peer} closed the connection before the ACK")
            self._buf.extend(chunk)

    def _take_frame(self) -> bytes | None:
        end = self._buf.find(FS + CR)
        if end < 0:
            return None
        start = self._buf.find(VT, 0, end)
        message = bytes(self._buf[start + 1: end])
        del self._buf[: end + 2]
        return message

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "MLLPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _segments(raw: bytes) -> list[str]:
    return [s for s in raw.decode("latin-1").replace("\n", "\r").split("\r") if s.strip()]


def control_id(message: bytes) -> str:
    """MSH-10 of a message; ValueError when it has none."""
    segments = _segments(message)
    msh = segments[0] if segments else ""
    fields = msh.split(msh[3]) if msh.startswith("MSH") and len(msh) > 3 else []
    if len(fields) < 10 or not fields[9].strip():
        raise ValueError("the message has no MSH-10 (control ID): its ACK cannot be recognised")
    return fields[9].strip()


def _field(fields: list[str], n: int) -> str:
    return fields[n].strip() if len(fields) > n else ""


def parse_ack(raw: bytes) -> Ack:
    """The MSA (and ERR) of an acknowledgement; ValueError with the reason for anything unreadable."""
    segments = _segments(raw)
    msh = segments[0] if segments and segments[0].startswith("MSH") and len(segments[0]) > 7 else ""
    cs = msh[4] if msh else "^"
    msa = next((s for s in segments if s.startswith("MSA")), None)
    if msa is None:
        raise ValueError("no MSA segment in the acknowledgement")
    if len(msa) < 4:
        raise ValueError("the acknowledgement's MSA segment has no fields")
    fields = msa.split(msh[3] if msh else msa[3])
    code = _field(fields, 1).upper()
    if code not in ACK_CODES:
        raise ValueError(f"MSA-1 {code or '(empty)'!r} is not an acknowledgement code")
    err = next((s.split(msh[3] if msh else s[3]) for s in segments if s.startswith("ERR") and len(s) > 3), [])
    error_code, error_text = _err(err, cs, msh[5:8] if msh else "~\\&")
    return Ack(code, _field(fields, 2), _field(fields, 3), error_code, error_text)


def _err(err: list[str], cs: str, rest: str) -> tuple[str, str]:
    """(code, text) of an ERR segment: ERR-3 and ERR-8 (v2.5+), else the code in ERR-1's ELD (v2.3/2.4)."""
    sub = rest[2] if len(rest) > 2 else "&"
    if len(err) > 3 and err[3].strip():
        parts = err[3].split(cs)
        return parts[0].strip(), _field(err, 8) or (parts[1].strip() if len(parts) > 1 else "")
    eld = err[1].split(cs) if len(err) > 1 else []
    if len(eld) > 3:  # ELD-4: the code, as CE (code&text&table)
        parts = eld[3].split(sub)
        return parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""
    return "", ""


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK message; ValueError when it is not a readable ACK."""
    return parse_ack(ack).code
