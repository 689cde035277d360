"""File Meta Information (group 0002) for a received dataset, encoded directly.

pynetdicom's ``event.file_meta`` builds a pydicom dataset (validating every value) that
``encode_file_meta`` then encodes element by element: about a tenth of the CPU a C-STORE costs in the
listener. The group is always the same seven elements in Explicit VR Little Endian, so it is written
here with ``struct``; tests/unit/test_filemeta.py checks the bytes against pydicom's encoder.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _sh(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


_TAIL = (_element(0x0002, 0x0012, b"UI", _ui(str(PYNETDICOM_IMPLEMENTATION_UID)))
         + _element(0x0002, 0x0013, b"SH", _sh(str(PYNETDICOM_IMPLEMENTATION_VERSION))))
_VERSION = _element(0x0002, 0x0001, b"OB", b"\x00\x01")


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, as ``event.file_meta`` would give them.

    UIDs must be ASCII (the caller has already checked them against the dataset's header).
    """
    body = (_VERSION
            + _element(0x0002, 0x0002, b"UI", _ui(sop_class_uid))
            + _element(0x0002, 0x0003, b"UI", _ui(sop_instance_uid))
            + _element(0x0002, 0x0010, b"UI", _ui(transfer_syntax_uid))
            + _TAIL)
    return PREAMBLE + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body
