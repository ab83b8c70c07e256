"""Has a received data set really ended? Element framing followed while the bytes stream to disk.

A sender that sets the last-fragment flag early (a bug, a cut connection behind a
proxy) hands over a data set whose last element is shorter than its length says:
pydicom reads such a header happily, the pixel data is simply missing, and a
Success answer would let the sender purge the only good copy. ``DataSetEnd`` walks
the element headers as the fragments pass (values are skipped, never copied), and
``complete()`` says whether the data set ended exactly at an element boundary with
every undefined-length sequence and item closed.

Deflated data sets are inflated in bounded steps as they arrive (nothing inflated is
kept) and must reach the end of their zlib stream. What a cut exactly at an element
boundary leaves (a structurally whole data set without its last elements) cannot be
told from the bytes; the checks after receipt (pixel data length, decoding) remain.
"""
from __future__ import annotations

import struct
import zlib

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

_VR = struct.Struct("<H")  # the two VR characters as one number (the same in either byte order's header)
_LONG_VRS = frozenset(_VR.unpack(v)[0] for v in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN",
                                                 b"UR", b"UT"))
_UN = _VR.unpack(b"UN")[0]
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_INFLATE_STEP = 1 << 20  # bytes inflated per step: memory stays bounded whatever the compression ratio
# Undefined-length sequences and items open at once. Real data sets nest a few levels; each level costs an entry
# here, so 8 bytes on the wire would otherwise cost ~70 bytes of memory without limit.
MAX_NESTING = 64


class Malformed(Exception):
    """The bytes cannot be a data set (a delimiter where none is open, an element header that is not one)."""


class DataSetEnd:
    """Follows element framing over a data set fed in pieces (``feed``); ``complete`` at the end."""

    def __init__(self, transfer_syntax: str) -> None:
        self._implicit_base = transfer_syntax == ImplicitVRLittleEndian
        big = transfer_syntax == ExplicitVRBigEndian
        self._tag = struct.Struct(">HH" if big else "<HH")
        self._u16 = struct.Struct(">H" if big else "<H")
        self._u32 = struct.Struct(">L" if big else "<L")
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if transfer_syntax == DeflatedExplicitVRLittleEndian \
            else None
        self._skip = 0  # value bytes still to pass before the next element header
        self._tail = b""  # the start of an element header cut by the end of the last piece
        self._open: list[tuple[int, bool]] = []  # undefined-length values open: (closing tag, implicit inside)
        self.seen = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._inflater is None:
            self._walk(data)
            return
        if self._inflater.eof:
            return  # bytes after the end of the zlib stream (a padding byte) are not part of the data set
        chunk = self._inflater.decompress(data, _INFLATE_STEP)
        while True:
            self._walk(chunk)
            if not self._inflater.unconsumed_tail or self._inflater.eof:
                break
            chunk = self._inflater.decompress(self._inflater.unconsumed_tail, _INFLATE_STEP)

    def complete(self) -> bool:
        """The data set ended at an element boundary, every undefined-length value closed (and, deflated,
        with its zlib stream)."""
        if self._inflater is not None and not self._inflater.eof:
            return False
        padding = not self._tail.strip(b"\0")  # a few NUL bytes after the last element: padding, not an element
        return self._skip == 0 and padding and not self._open

    def _walk(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self.seen += n
        if self._skip >= n:
            self._skip -= n
            return
        pos = self._skip
        self._skip = 0
        if self._tail:
            data = self._tail + bytes(data[pos:])
            pos, n = 0, len(data)
            self._tail = b""
        tag_at, u16_at, u32_at, vr_at = self._tag.unpack_from, self._u16.unpack_from, self._u32.unpack_from, \
            _VR.unpack_from
        opened = self._open
        implicit = opened[-1][1] if opened else self._implicit_base
        while pos < n:
            if pos + 8 > n:
                self._tail = bytes(data[pos:])
                return
            group, elem = tag_at(data, pos)
            if group == 0xFFFE:  # items and delimiters: no VR in any transfer syntax
                tag = (group << 16) | elem
                length = u32_at(data, pos + 4)[0]
                pos += 8
                if tag == _ITEM:
                    if not opened or opened[-1][0] != _SEQUENCE_END:
                        raise Malformed("an item outside a sequence")
                    if length == _UNDEFINED:
                        if len(opened) >= MAX_NESTING:
                            raise Malformed(f"sequences nested more than {MAX_NESTING} deep")
                        opened.append((_ITEM_END, implicit))
                        continue
                elif tag == _ITEM_END or tag == _SEQUENCE_END:
                    if not opened or opened[-1][0] != tag:
                        raise Malformed(f"delimiter ({group:04X},{elem:04X}) where none is open")
                    opened.pop()
                    implicit = opened[-1][1] if opened else self._implicit_base
                    continue
                else:
                    raise Malformed(f"unknown item tag ({group:04X},{elem:04X})")
            elif implicit:
                length = u32_at(data, pos + 4)[0]
                pos += 8
                if length == _UNDEFINED:
                    if len(opened) >= MAX_NESTING:
                        raise Malformed(f"sequences nested more than {MAX_NESTING} deep")
                    opened.append((_SEQUENCE_END, True))
                    continue
            else:
                vr = vr_at(data, pos + 4)[0]
                if vr in _LONG_VRS:
                    if pos + 12 > n:
                        self._tail = bytes(data[pos:])
                        return
                    length = u32_at(data, pos + 8)[0]
                    pos += 12
                    if length == _UNDEFINED:
                        # a UN of undefined length holds implicit VR little endian (PS3.5 6.2.2)
                        implicit = vr == _UN
                        if len(opened) >= MAX_NESTING:
                            raise Malformed(f"sequences nested more than {MAX_NESTING} deep")
                        opened.append((_SEQUENCE_END, implicit))
                        continue
                elif 0x41 <= vr & 0xFF <= 0x5A and 0x41 <= vr >> 8 <= 0x5A:
                    length = u16_at(data, pos + 6)[0]
                    pos += 8
                else:
                    raise Malformed(f"no VR at ({group:04X},{elem:04X})")
            pos += length
        if pos > n:
            self._skip = pos - n
