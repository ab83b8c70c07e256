"""The few header values the receiver indexes, read straight from the received bytes.

pydicom builds every element of the header and converts each value it is
asked for (UID validation, character sets); on the ingest path that was about
0.5 ms of a ~2.5 ms budget per instance. Every value the receiver needs is a
top-level element in groups 0008-0020, so this walks the elements in order,
skipping values (and whole sequences), and stops at the first element past
group 0020. Pure-ASCII single values are decoded here; anything else (another
character set, several values) is handed to pydicom for exactly its usual
conversion, so the result always equals ``str(ds.get(keyword, "")).strip()``.
Big endian and deflated data sets are read with pydicom.
"""
from __future__ import annotations

import struct

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

WANTED: dict[int, tuple[str, str]] = {  # tag -> (keyword, VR)
    0x00080005: ("SpecificCharacterSet", "CS"),
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080060: ("Modality", "CS"),
    0x00100010: ("PatientName", "PN"),
    0x00100020: ("PatientID", "LO"),
    0x00100021: ("IssuerOfPatientID", "LO"),
    0x00100030: ("PatientBirthDate", "DA"),
    0x00100040: ("PatientSex", "CS"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
}
_LAST_GROUP = 0x0020
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"))
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_FAST_VRS = frozenset(("UI", "CS", "LO", "PN", "DA"))
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c != 0x5C) + b"\x00"  # printable ASCII but the value separator
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")


class NeedMoreData(Exception):
    """The bytes end inside the header."""


class Unsupported(Exception):
    """A construct this scanner does not read; use pydicom."""


def _element(data, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(data):
        raise NeedMoreData
    group, elem = _TAG.unpack_from(data, pos)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:  # item and delimiter tags have no VR even in explicit VR
        return tag, b"", _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = bytes(data[pos + 4:pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise NeedMoreData
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    if not vr.isalpha():
        raise Unsupported(f"no VR at ({group:04X},{elem:04X})")
    return tag, vr, _U16.unpack_from(data, pos + 6)[0], pos + 8


def _skip_undefined(data, pos: int, implicit: bool, end_tag: int) -> int:
    """Position after the delimiter ``end_tag`` that ends an undefined-length value starting at ``pos``."""
    while True:
        tag, _, length, value = _element(data, pos, implicit)
        if tag == end_tag:
            return value
        if length == _UNDEFINED:
            inner_end = _ITEM_END if tag == _ITEM else _SEQUENCE_END
            pos = _skip_undefined(data, value, implicit, inner_end)
        else:
            pos = value + length
        if pos > len(data):
            raise NeedMoreData


def scan_header(data, transfer_syntax: str, *, complete: bool = True) -> dict[str, str] | None:
    """Keyword -> value for ``WANTED`` (missing ones absent); None when ``data`` ends inside the header.

    ``complete=False``: ``data`` is only the start of the data set, so the header has ended only once an
    element past group 0020 is seen.

    Raises ``Unsupported`` for data sets to read with pydicom instead.
    """
    if transfer_syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        raise Unsupported(transfer_syntax)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    raw: dict[int, tuple[str, bytes]] = {}
    pos = 0
    try:
        while pos < len(data):
            tag, vr, length, value = _element(data, pos, implicit)
            if tag >> 16 > _LAST_GROUP:
                break
            if length == _UNDEFINED:
                if tag in WANTED:
                    raise Unsupported("a wanted element of undefined length")
                pos = _skip_undefined(data, value, implicit, _SEQUENCE_END)
                continue
            pos = value + length
            if tag in WANTED:
                if pos > len(data):
                    raise NeedMoreData
                raw[tag] = (vr.decode("ascii") if vr else WANTED[tag][1], bytes(data[value:pos]))
        else:
            if pos > len(data) or not complete:
                raise NeedMoreData
    except NeedMoreData:
        return None
    return _decode(raw, implicit)


def _decode(raw: dict[int, tuple[str, bytes]], implicit: bool) -> dict[str, str]:
    fields: dict[str, str] = {}
    slow: dict[int, tuple[str, bytes]] = {}
    for tag, (vr, value) in raw.items():
        if vr in _FAST_VRS and not value.translate(None, _PLAIN):
            fields[WANTED[tag][0]] = value.decode("ascii").strip(" \x00")
        else:
            slow[tag] = (vr, value)
    if slow:  # another character set, several values, an odd VR: pydicom's own conversion
        ds = Dataset()
        charset = {0x00080005: raw[0x00080005]} if 0x00080005 in raw else {}  # how pydicom decodes the rest
        for tag, (vr, value) in {**slow, **charset}.items():
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, True)
        for tag in slow:
            keyword = WANTED[tag][0]
            fields[keyword] = str(ds.get(keyword, "") or "").strip()
    return fields
