"""Read the few header attributes the listener records, without decoding pixel data."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from edged.errors import EdgedError

#: Reading stops at the first element at or past Pixel Data: nothing after it is recorded.
_PIXEL_DATA = 0x7FE00010
#: A deflated header is inflated at most this far (the recorded attributes are near the start).
_MAX_INFLATE = 4 << 20


class HeaderError(EdgedError):
    """The dataset's header could not be decoded. ``reason`` has no patient data."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Header:
    """Identifying attributes of a received instance (empty string where absent)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str


def _stop(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= _PIXEL_DATA


def _text(ds: object, keyword: str) -> str:
    value = getattr(ds, keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        raise HeaderError(f"{keyword} has more than one value")
    return str(value).strip().strip("\x00")


def read_header(stream: bytes | memoryview, transfer_syntax: str) -> Header:
    """Decode the header of an encoded dataset (no file meta) sent with ``transfer_syntax``."""
    ts = UID(transfer_syntax)
    data: bytes | memoryview = stream
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(stream), _MAX_INFLATE)
        except zlib.error:
            raise HeaderError("deflated dataset could not be inflated") from None
    if not ts.is_transfer_syntax:
        raise HeaderError("unknown transfer syntax")
    try:
        ds = read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian, stop_when=_stop)
        return Header(
            sop_class_uid=_text(ds, "SOPClassUID"),
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality"),
        )
    except HeaderError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed data
        raise HeaderError(f"header could not be decoded ({type(exc).__name__})") from None
