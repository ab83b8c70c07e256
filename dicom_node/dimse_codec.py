"""DIMSE command sets (PS3.7, implicit VR little endian) and the Part 10 file meta of a received instance.

Only what the receiving side needs: decode a request's command set, encode
C-STORE/C-ECHO responses, and write the 128-byte preamble + file meta that
turn the received data set bytes into a DICOM file without decoding them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import generate_uid

from dicom_node import __version__

# One UID for this implementation (PS3.7 D.3.3.2), derived rather than registered: pydicom's root.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["osteoscreen-implementation-class"])
IMPLEMENTATION_VERSION_NAME = f"OSTEOSCREEN_{__version__.replace('.', '')}"[:16]

C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATA_SET = 0x0101

_TAG_LEN = struct.Struct("<HHL")
_AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID = 0x0002, 0x0100, 0x0110
_RESPONDED_TO, _DATA_SET_TYPE, _STATUS, _ERROR_COMMENT = 0x0120, 0x0800, 0x0900, 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AET = 0x1030


class CommandError(Exception):
    """A command set that cannot be decoded or lacks a required element."""


@dataclass(frozen=True)
class Command:
    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class: str
    affected_sop_instance: str
    move_originator_aet: str


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace").strip()


def decode_command(data: bytes) -> Command:
    elements: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise CommandError("truncated command element")
        group, element, length = _TAG_LEN.unpack_from(data, pos)
        if group != 0x0000:
            raise CommandError(f"command set holds a non-command element ({group:04X},{element:04X})")
        pos += 8
        if length == 0xFFFFFFFF or pos + length > end:
            raise CommandError(f"command element (0000,{element:04X}) has an invalid length {length}")
        elements[element] = bytes(data[pos:pos + length])
        pos += length

    def us(element: int) -> int:
        value = elements.get(element)
        if value is None or len(value) != 2:
            raise CommandError(f"command element (0000,{element:04X}) missing or not US")
        return int.from_bytes(value, "little")

    return Command(
        command_field=us(_COMMAND_FIELD),
        message_id=us(_MESSAGE_ID) if _MESSAGE_ID in elements else 0,
        has_data_set=us(_DATA_SET_TYPE) != NO_DATA_SET,
        affected_sop_class=_text(elements.get(_AFFECTED_SOP_CLASS, b"")),
        affected_sop_instance=_text(elements.get(_AFFECTED_SOP_INSTANCE, b"")),
        move_originator_aet=_text(elements.get(_MOVE_ORIGINATOR_AET, b"")),
    )


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def _implicit(element: int, value: bytes) -> bytes:
    return _TAG_LEN.pack(0x0000, element, len(value)) + value


def encode_response(request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The response command set to ``request``: same SOP class/instance, command field | 0x8000."""
    parts = []
    if request.affected_sop_class:
        parts.append(_implicit(_AFFECTED_SOP_CLASS, _padded(request.affected_sop_class, b"\x00")))
    parts += [
        _implicit(_COMMAND_FIELD, struct.pack("<H", request.command_field | 0x8000)),
        _implicit(_RESPONDED_TO, struct.pack("<H", request.message_id)),
        _implicit(_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _implicit(_STATUS, struct.pack("<H", status)),
    ]
    if error_comment:
        parts.append(_implicit(_ERROR_COMMENT, _padded(error_comment[:64], b" ")))
    if request.affected_sop_instance:
        parts.append(_implicit(_AFFECTED_SOP_INSTANCE, _padded(request.affected_sop_instance, b"\x00")))
    body = b"".join(parts)
    return _implicit(0x0000, struct.pack("<L", len(body))) + body


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sxxL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str) -> bytes:
    """Preamble, 'DICM' and the group 0002 file meta information (explicit VR little endian)."""
    body = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", _padded(sop_class, b"\x00")),
        _explicit(0x0003, b"UI", _padded(sop_instance, b"\x00")),
        _explicit(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _explicit(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _explicit(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        *([_explicit(0x0016, b"AE", _padded(source_aet[:16], b" "))] if source_aet else []),
    ))
    return b"\x00" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<L", len(body))) + body
