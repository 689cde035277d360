"""Read the few header attributes the listener records, without decoding pixel data.

A little endian data set is first walked directly (:func:`edged.dicom.elements.scan`, then
:func:`_fast`); whatever that does not decode exactly as pydicom does (big endian, an unusual VR, value,
character set or structure, and every refusal) is read by pydicom (:func:`_read`), as before. Both
give the same :class:`Header` or the same :class:`HeaderError` (``tests/unit/test_elements.py``)."""

from __future__ import annotations

import mmap
import os
import re
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

from edged.dicom.elements import scan
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
    return _decode_raw_text(raw.value, keyword, vr)


def _decode_raw_text(raw: bytes, keyword: str, vr: str) -> str:
    value = raw.decode(default_encoding)
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
    return _read_buffer(stream, len(stream), ts, complete=True)


def read_header_at(fd: int, start: int, end: int, transfer_syntax: str, *,
                   head: bytes | bytearray | None = None) -> Header:
    """Like :func:`read_header`, for a data set that is bytes ``start:end`` of the open file ``fd`` (a
    spooled data set after its File Meta). Only the header is read: its first 64 KiB (``pread``, or
    ``head`` where the caller still holds at least that much of the data set's start, as written), and
    where the direct walker (:func:`_fast`) gives up, through a 64 KiB buffer, whatever the data set's
    size; a deflated one is inflated from an ``mmap`` of the file, at most as far as :func:`read_header`
    would. The file's offset may be moved."""
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        with mmap.mmap(fd, end, access=mmap.ACCESS_READ) as mm, memoryview(mm) as whole:
            with whole[start:end] as view:
                return _read_deflated(view, ts)
    if ts.is_transfer_syntax:
        first = min(max(end - start, 0), _HEADER_BUFFER)
        if head is not None and len(head) >= first:
            with memoryview(head) as view, view[:first] as buf:
                header = _fast(buf, end - start, ts, False)
        else:
            header = _fast(os.pread(fd, first, start), end - start, ts, False)
        if header is not None:
            return header
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
    return _read_buffer(head, total, ts, complete=len(head) >= total)


def _read_deflated(stream: bytes | memoryview, ts: UID) -> Header:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(stream, _MAX_INFLATE)
    except zlib.error:
        raise HeaderError("deflated dataset could not be inflated") from None
    # Only the start was inflated: lengths can be checked against the end only if it was reached.
    total = len(data) if not inflater.unconsumed_tail else sys.maxsize
    return _read_buffer(data, total, ts, complete=True)


def _read_buffer(buf: bytes | memoryview, total: int, ts: UID, complete: bool) -> Header:
    """:func:`_read` of a data set whose first bytes (all of them when ``complete``) are ``buf``: by
    :func:`_fast` where it can, else through pydicom."""
    if ts.is_transfer_syntax:
        header = _fast(buf, total, ts, complete)
        if header is not None:
            return header
    return _read(BytesIO(buf), total, ts)


_FAST_WANTED = frozenset(_WANTED)
#: Character sets under which the printable ASCII Series Description :func:`_fast` accepts decodes as
#: ASCII (and which pydicom accepts without a warning).
_PLAIN_CHARSETS = frozenset((b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192"))
_PLAIN_IS = re.compile(rb" *[0-9]{1,8} *")
_PLAIN_LO = re.compile(rb"[ -\[\]-~]*")  # printable ASCII but the backslash


def _fast(buf: bytes | memoryview, total: int, ts: UID, complete: bool) -> Header | None:
    """The :class:`Header` that :func:`_read` gives, from the top-level elements found by
    :func:`edged.dicom.elements.scan`, or ``None`` (then :func:`_read` decides) for anything it does
    not decode exactly as :func:`_read` would: big endian, a VR other than the expected one (or
    implicit), an empty value, a character set other than the plain ones, a Series Description that is
    not printable ASCII without a backslash, a Number of Frames or Images in Acquisition that is not a
    plain number, several values, and whatever :func:`~edged.dicom.elements.scan` gives up on.
    Every refusal (:class:`HeaderError`) is left to :func:`_read`."""
    if not ts.is_little_endian:
        return None
    found = scan(buf, total, ts.is_implicit_VR, _FAST_WANTED, complete)
    if found is None:
        return None
    for vr, value in found.values():
        if not value:
            return None
    charset = found.get(0x00080005)
    if charset is not None and (charset[0] not in ("CS", None) or charset[1].rstrip(b" ") not in _PLAIN_CHARSETS):
        return None
    try:
        texts = []
        for tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00080060, 0x00180015):
            element = found.get(tag)
            if element is None:
                texts.append("")
                continue
            keyword, vr = _RAW_TEXT[tag]
            if element[0] not in (vr, None):
                return None
            texts.append(_decode_raw_text(element[1], keyword, vr))
    except HeaderError:
        return None
    shorts = []
    for tag in (0x00280010, 0x00280011):
        element = found.get(tag)
        if element is None:
            shorts.append(0)
        elif element[0] in ("US", None) and len(element[1]) == 2:
            shorts.append(element[1][0] | element[1][1] << 8)
        else:
            return None
    numbers: list[int | None] = []
    for tag in (0x00280008, 0x00201002):
        element = found.get(tag)
        if element is None:
            numbers.append(None)
        elif element[0] in ("IS", None) and _PLAIN_IS.fullmatch(element[1]):
            numbers.append(int(element[1]))
        else:
            return None
    description = found.get(0x0008103E)
    if description is None:
        series_description = ""
    elif description[0] in ("LO", None) and _PLAIN_LO.fullmatch(description[1]):
        series_description = description[1].decode("ascii").strip()
    else:
        return None
    return Header(sop_class_uid=texts[0], sop_instance_uid=texts[1], study_instance_uid=texts[2],
                  series_instance_uid=texts[3], modality=texts[4], body_part=texts[5],
                  series_description=series_description, rows=shorts[0], columns=shorts[1],
                  number_of_frames=numbers[0] or 1, images_in_acquisition=numbers[1])


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
