"""A direct walker over the top-level elements of a little endian data set (no pydicom).

:func:`scan` reads each top-level element's tag, VR and length, skips the values it was not asked
for and stops at the first element at or past a given tag (Pixel Data by default), returning the raw
bytes of the wanted elements. It gives up (returns ``None``) on anything it does not fully understand,
so that a caller can fall back to pydicom, which then decides (and refuses where it refuses):

- a first element whose VR bytes say explicit when implicit VR was expected, or the reverse (pydicom
  switches encodings there);
- an explicit VR it does not know (pydicom guesses there);
- an undefined length before the stop tag (sequences and items pydicom parses), and a top-level
  Item Delimitation tag;
- an element whose declared length runs past ``total`` (the data set's end: pydicom's readers in
  :mod:`edged.dicom.header` refuse those), or a wanted value, or an element header, not in ``buf``;
- reaching the end of ``buf`` before the stop tag, unless ``buf`` is the whole data set and ends
  exactly at an element boundary.

Big endian data sets are not handled (the caller should not ask). Values are returned undecoded.
"""

from __future__ import annotations

import struct

PIXEL_DATA = 0x7FE00010
ITEM_DELIMITATION = 0xFFFEE00D
UNDEFINED_LENGTH = 0xFFFFFFFF

#: Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = frozenset(v.encode() for v in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                                          "UT", "UV"))
#: Every explicit VR this walker knows (the same two-letter VRs pydicom's reader knows).
KNOWN_VRS = LONG_VRS | frozenset(v.encode() for v in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST",
    "TM", "UI", "UL", "US"))

_explicit = struct.Struct("<HH2sH").unpack_from
_implicit = struct.Struct("<HHL").unpack_from
_long = struct.Struct("<L").unpack_from


def scan(buf: bytes | memoryview, total: int, implicit: bool, wanted: frozenset[int] | set[int],
         complete: bool = False, stop: int = PIXEL_DATA) -> dict[int, tuple[str | None, bytes]] | None:
    """The wanted top-level elements of the little endian data set starting at ``buf[0]``, as
    ``{tag: (VR, value bytes)}`` (VR ``None`` for implicit VR); ``None`` where the walker gives up.

    ``total`` is the data set's length (lengths are checked against it), ``buf`` its first bytes (all
    of it when ``complete``). A tag that appears twice keeps its last value."""
    n = len(buf)
    if n < 6:
        return None
    b0, b1 = buf[4], buf[5]
    if (not (0x40 < b0 < 0x5B and 0x40 < b1 < 0x5B)) != implicit:
        return None
    found: dict[int, tuple[str | None, bytes]] = {}
    pos = 0
    while True:
        if pos + 8 > n:
            return found if complete and pos == n else None
        if implicit:
            group, elem, length = _implicit(buf, pos)
            vr = None
            pos += 8
        else:
            group, elem, vr, length = _explicit(buf, pos)
            if vr in LONG_VRS:
                if pos + 12 > n:
                    return None
                length = _long(buf, pos + 8)[0]
                pos += 12
            elif vr in KNOWN_VRS:
                pos += 8
            else:
                return None
        tag = group << 16 | elem
        if tag == ITEM_DELIMITATION:
            return None
        if length == UNDEFINED_LENGTH:
            return found if tag >= stop else None
        if pos + length > total:
            return None
        if tag >= stop:
            return found
        if tag in wanted:
            if pos + length > n:
                return None
            found[tag] = (vr and vr.decode("ascii"), bytes(buf[pos:pos + length]))
        pos += length
