"""DICOM upper layer (PS3.8) for the receiving side: PDU framing on a blocking socket.

Why not pynetdicom's DUL here: its reactor threads poll their queues with 1 ms
sleeps, and one C-STORE crosses three of them, which capped ingest at about
175 instances/s on the benchmark machine whatever the storage did. This module
reads each PDU with blocking ``recv_into`` calls into one reusable buffer, so an
association costs one thread and no polling. The association-time PDUs
(A-ASSOCIATE-RQ/-AC/-RJ), which are not on the hot path, are decoded and
encoded with pynetdicom's PDU classes.
"""
from __future__ import annotations

import socket
import struct
import time

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE

A_ASSOCIATE_RQ_TYPE = 0x01
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_ABORT_TYPE = 0x07
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

# A-ABORT provider reasons (PS3.8 9.3.8)
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06

_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


class PeerClosed(Exception):
    """The peer closed the TCP connection."""


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol; ``reason`` is the A-ABORT provider reason to send."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


def abort_pdu(reason: int = 0x00, source: int = 0x02) -> bytes:
    """A-ABORT; source 0x02 (service provider) with a reason, or 0x00 (service user)."""
    return bytes((0x07, 0, 0, 0, 0, 4, 0, 0, source, reason))


def p_data_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU holding a whole command set (the responses we send are always small)."""
    pdv_len = len(command) + 2
    return _HEADER.pack(P_DATA_TF_TYPE, pdv_len + 4) + _PDV_HEADER.pack(pdv_len, context_id, 0x03) + command


class PduReader:
    """Reads whole PDUs from a socket into one reusable buffer.

    ``limit`` bounds the PDU length we accept, so a peer cannot make us allocate
    gigabytes; a longer PDU is a protocol error.
    """

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self._buf = bytearray(64 * 1024)
        self._header = bytearray(6)
        self._deadline: float | None = None

    def _fill(self, view: memoryview) -> None:
        got, want = 0, len(view)
        while got < want:
            if self._deadline is not None:  # a whole-PDU deadline: a byte now and then does not extend it
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("deadline passed")
                self.sock.settimeout(left)
            n = self.sock.recv_into(view[got:], want - got)
            if n == 0:
                raise PeerClosed("the peer closed the connection")
            got += n

    def read(self, *, limit: int | None = None, within_s: float | None = None) -> tuple[int, memoryview]:
        """The next PDU: (type, body). The body view is valid until the next call.

        ``limit``: another length limit for this PDU; ``within_s``: the whole PDU must arrive within this time
        (TimeoutError), whatever the socket's per-read timeout."""
        limit = self.limit if limit is None else limit
        if within_s is None:
            return self._read(limit)
        per_read = self.sock.gettimeout()
        self._deadline = time.monotonic() + within_s
        try:
            return self._read(limit)
        finally:
            self._deadline = None
            self.sock.settimeout(per_read)

    def _read(self, limit: int) -> tuple[int, memoryview]:
        self._fill(memoryview(self._header))
        pdu_type, length = _HEADER.unpack(self._header)
        if pdu_type not in KNOWN_PDU_TYPES:
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
        if length > limit:
            raise ProtocolError(f"PDU of {length} bytes exceeds the {limit}-byte limit")
        if length > len(self._buf):
            self._buf = bytearray(length)
        body = memoryview(self._buf)[:length]
        self._fill(body)
        return pdu_type, body


def iter_pdvs(body: memoryview):
    """Presentation data values of a P-DATA-TF body: (context id, is_command, is_last, data view)."""
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            raise ProtocolError("truncated presentation data value item")
        length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError(f"presentation data value length {length} does not fit its PDU")
        yield context_id, bool(control & 0x01), bool(control & 0x02), body[pos + 6:pos + 4 + length]
        pos += 4 + length


def decode_associate_rq(body: memoryview) -> A_ASSOCIATE:
    """The A-ASSOCIATE-RQ body as pynetdicom's primitive (AE titles, contexts, user information)."""
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(_HEADER.pack(A_ASSOCIATE_RQ_TYPE, len(body)) + bytes(body))
        primitive = pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - any malformed request is a protocol error, not a crash
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {exc}") from None
    primitive.protocol_version = pdu.protocol_version  # type: ignore[attr-defined]
    return primitive


def associate_ac_pdu(primitive: A_ASSOCIATE) -> bytes:
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return pdu.encode()


def associate_rj_pdu(result: int, source: int, diagnostic: int) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = result, source, diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()
