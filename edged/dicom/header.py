"""Read the few header attributes the listener records, without decoding pixel data."""

from __future__ import annotations

import mmap
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable
from io import BytesIO

from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from edged.errors import EdgedError

#: Reading stops at the first element at or past Pixel Data: nothing after it is recorded.
_PIXEL_DATA = 0x7FE00010
_HEADER_BUFFER = 64 * 1024
_int_ge = int.__ge__  # BaseTag's own comparison is Python code, called for every element
#: The elements :class:`Header` is made of (and the character set): pydicom skips the values of the others.
_WANTED = [0x00080005, 0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00080060, 0x00180015, 0x0008103E,
           0x00280010, 0x00280011, 0x00280008, 0x00201002]
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
    body_part: str = ""
    series_description: str = ""
    rows: int = 0
    columns: int = 0
    number_of_frames: int = 1
    images_in_acquisition: int | None = None


_UNDEFINED_LENGTH = 0xFFFFFFFF


class _Truncated(Exception):
    def __init__(self, tag: BaseTag) -> None:
        self.tag = tag


def _stop_at_pixels(fp: BinaryIO, total: int) -> Callable[[BaseTag, "str | None", int], bool]:
    """A ``stop_when`` for pydicom that also refuses a top-level element running past the end.

    pydicom reads a value shorter than its declared length without complaint; a truncated dataset
    must be refused rather than stored as if complete. Pixel Data's length is checked too.
    """

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        if length != _UNDEFINED_LENGTH and fp.tell() + length > total:
            raise _Truncated(tag)
        return _int_ge(tag, _PIXEL_DATA)

    return stop


def _text(ds: object, keyword: str) -> str:
    value = getattr(ds, keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        raise HeaderError(f"{keyword} has more than one value")
    return str(value).strip().strip("\x00")


#: Elements whose value pydicom decodes without the character set: converted here from the raw bytes,
#: exactly as pydicom would (``convert_UI``/``convert_string`` and ``multi_string``), when their VR is
#: the expected one (or implicit). Anything else goes through pydicom.
_RAW_TEXT = {0x00080016: ("SOPClassUID", "UI"), 0x00080018: ("SOPInstanceUID", "UI"),
             0x0020000D: ("StudyInstanceUID", "UI"), 0x0020000E: ("SeriesInstanceUID", "UI"),
             0x00080060: ("Modality", "CS"), 0x00180015: ("BodyPartExamined", "CS")}
_RAW_US = {0x00280010: "Rows", 0x00280011: "Columns"}


def _raw_text(ds: Dataset, tag: int) -> str:
    """:func:`_text` for a tag of :data:`_RAW_TEXT`, without pydicom's per-element conversion."""
    keyword, vr = _RAW_TEXT[tag]
    raw = ds.get_item(tag)
    if raw is None:
        return ""
    if not (isinstance(raw, RawDataElement) and raw.VR in (vr, None) and isinstance(raw.value, bytes)):
        return _text(ds, keyword)
    value = raw.value.decode(default_encoding)
    if vr == "UI":
        value = value.rstrip("\0 ")
    items = value.rstrip(" \x00").split("\\")
    if len(items) > 1:
        raise HeaderError(f"{keyword} has more than one value")
    return items[0].strip().strip("\x00")


def _raw_us(ds: Dataset, tag: int) -> int | None:
    """:func:`_int` for a tag of :data:`_RAW_US` (one unsigned short), without pydicom's conversion."""
    raw = ds.get_item(tag)
    if raw is None:
        return None
    if isinstance(raw, RawDataElement) and raw.VR in ("US", None) and isinstance(raw.value, bytes) \
            and len(raw.value) == 2:
        return int(struct.unpack("<H" if raw.is_little_endian else ">H", raw.value)[0])
    return _int(ds, _RAW_US[tag])


def _int(ds: object, keyword: str) -> int | None:
    """An integer attribute, or None when absent, empty or not a number (routing treats it as unknown)."""
    try:
        text = _text(ds, keyword)
        return int(float(text)) if text else None
    except (ValueError, HeaderError):
        return None


def read_header(stream: bytes | memoryview, transfer_syntax: str) -> Header:
    """Decode the header of an encoded dataset (no file meta) sent with ``transfer_syntax``."""
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        return _read_deflated(stream, ts)
    return _read(BytesIO(stream), len(stream), ts)


def read_header_at(fd: int, start: int, end: int, transfer_syntax: str) -> Header:
    """Like :func:`read_header`, for a data set that is bytes ``start:end`` of the open file ``fd`` (a
    spooled data set after its File Meta). Only the header is read (through a 64 KiB buffer), whatever
    the data set's size; a deflated one is inflated from an ``mmap`` of the file, at most as far as
    :func:`read_header` would. The file's offset is moved."""
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        with mmap.mmap(fd, end, access=mmap.ACCESS_READ) as mm, memoryview(mm) as whole:
            with whole[start:end] as view:
                return _read_deflated(view, ts)
    with open(fd, "rb", buffering=_HEADER_BUFFER, closefd=False) as fp:  # seeks past the end as BytesIO does
        fp.raw.name = "<spooled data set>"  # pydicom puts the name in messages: not a number
        fp.seek(start)
        return _read(fp, end, ts)


def read_header_head(head: bytes, total: int, transfer_syntax: str) -> Header:
    """Like :func:`read_header`, from the first bytes (``head``) of a data set of ``total`` bytes: the
    header must lie within ``head``."""
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        return _read_deflated(head, ts)
    return _read(BytesIO(head), total, ts)


def _read_deflated(stream: bytes | memoryview, ts: UID) -> Header:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(stream, _MAX_INFLATE)
    except zlib.error:
        raise HeaderError("deflated dataset could not be inflated") from None
    # Only the start was inflated: lengths can be checked against the end only if it was reached.
    total = len(data) if not inflater.unconsumed_tail else sys.maxsize
    return _read(BytesIO(data), total, ts)


def _read(fp: BinaryIO, total: int, ts: UID) -> Header:
    """Read from ``fp`` (positioned at the dataset) to at most ``total`` (an absolute position)."""
    if not ts.is_transfer_syntax:
        raise HeaderError("unknown transfer syntax")
    try:
        ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=_stop_at_pixels(fp, total),
                          specific_tags=_WANTED)
        return Header(
            sop_class_uid=_raw_text(ds, 0x00080016),
            sop_instance_uid=_raw_text(ds, 0x00080018),
            study_instance_uid=_raw_text(ds, 0x0020000D),
            series_instance_uid=_raw_text(ds, 0x0020000E),
            modality=_raw_text(ds, 0x00080060),
            body_part=_raw_text(ds, 0x00180015),
            series_description=_text(ds, "SeriesDescription"),
            rows=_raw_us(ds, 0x00280010) or 0,
            columns=_raw_us(ds, 0x00280011) or 0,
            number_of_frames=_int(ds, "NumberOfFrames") or 1,
            images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        )
    except HeaderError:
        raise
    except _Truncated as exc:
        raise HeaderError(f"element ({exc.tag.group:04X},{exc.tag.element:04X}) runs past the end of the dataset") from None
    except Exception as exc:  # pydicom raises many types on malformed data
        raise HeaderError(f"header could not be decoded ({type(exc).__name__})") from None
