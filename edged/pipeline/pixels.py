"""Reading a stored image for the pipeline: its header and its stored pixel values.

For the common case, monochrome native (uncompressed) pixel data in a little-endian transfer syntax,
the pixel values are read straight from the file into a numpy array: a header-only parse finds where
Pixel Data starts, the element's own header gives its length, and the bytes go into the array with one
``readinto``. That skips pydicom's full read (the pixel bytes copied into the dataset) and its
decoder's checks, which cost more than the rest of the preprocessing.

Anything else (compressed, big endian, deflated, colour, 1-bit, float, a length that disagrees with
the header, an element pydicom would have to interpret) goes through pydicom exactly as before:
``dcmread`` and :func:`edged.pipeline.preprocess.decode_pixels`, so every error (PixelDataError,
pydicom's ValueError on a short Pixel Data, ...) stays what it was. The array equals pydicom's
``pixel_array`` for every file this reader accepts (tests/unit/test_pixel_reader.py checks pydicom's
test files), including its correction of unused high bits (Bits Stored < Bits Allocated).

An instance job of a model that needs no geometry (a classifier) needs even less of the header: the
attributes preprocessing reads and the SOP Class and Instance UIDs. :func:`read_pixels` walks the
elements itself (explicit or implicit VR little endian: tag, VR, length; values skipped, sequences of
undefined length skipped item by item), keeps those few attributes as an
:class:`ImageHeader` and reads Pixel Data as above. Whatever it does not recognise as plainly valid (a
value pydicom would convert in a way it does not, an unknown or unexpected VR, an encoding pydicom
would switch, elements out of order, undefined lengths outside sequences, a truncated file, a missing
attribute) makes it give up, and the reading above runs instead: its result is then exactly what it was
(tests/unit/test_pixel_reader.py checks the same model inputs on pydicom's test files and on cut and
mutated files).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edged.dicom import elements

PIXEL_DATA = 0x7FE00010
_NATIVE_LITTLE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
_LONG_VRS = {b"OB", b"OW", b"UN"}  # the VRs Pixel Data may have, all with a 4-byte length after 2 reserved bytes
_UNDEFINED = 0xFFFFFFFF


def read_image(path: str | Path) -> tuple[Dataset, np.ndarray | None]:
    """The dataset at ``path`` and, where the fast path applies, its stored pixel values.

    Returns ``(header, pixels)`` with a header-only dataset (no Pixel Data) and a writeable array shaped
    as pydicom's ``pixel_array`` ((rows, columns), or (frames, rows, columns)); or ``(dataset, None)``
    with the full dataset read by pydicom, to be decoded by pydicom, when the fast path does not apply.
    """
    try:
        with open(path, "rb") as fp:
            header = dcmread(fp, stop_before_pixels=True)
            pixels = _native_pixels(fp, header)
    except Exception:  # whatever it is, pydicom's full read below says it the way it always did
        pixels = None
    if pixels is None:
        return dcmread(path), None
    return header, pixels


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _native_pixels(fp: BinaryIO, ds: Dataset) -> np.ndarray | None:
    """Pixel Data read from ``fp`` (positioned where the header-only parse stopped), or None when
    pydicom should handle this dataset."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in _NATIVE_LITTLE:
        return None
    implicit, little = ds.original_encoding
    if not little or implicit is None:
        return None
    return _read_pixel_data(fp, implicit, _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated"),
                            _int(ds, "BitsStored"), _int(ds, "PixelRepresentation"), _int(ds, "SamplesPerPixel", 1),
                            _int(ds, "NumberOfFrames", 1), str(ds.get("PhotometricInterpretation", "")).strip())


def _read_pixel_data(fp: BinaryIO, implicit: bool, rows: int | None, cols: int | None, allocated: int | None,
                     stored: int | None, representation: int | None, samples: int | None, frames: int | None,
                     photometric: str) -> np.ndarray | None:
    """The stored values of the Pixel Data element at ``fp``, or None when pydicom should handle them."""
    if (not rows or not cols or rows < 0 or cols < 0 or allocated not in (8, 16, 32) or stored is None
            or not 1 <= stored <= allocated or representation not in (0, 1) or samples != 1 or not frames
            or frames < 1 or photometric not in ("MONOCHROME1", "MONOCHROME2")):
        return None
    head = fp.read(8)
    if len(head) != 8:
        return None
    group, element = struct.unpack("<HH", head[:4])
    if (group << 16 | element) != PIXEL_DATA:
        return None
    if implicit:
        (length,) = struct.unpack("<L", head[4:])
    else:
        if head[4:6] not in _LONG_VRS:
            return None
        rest = fp.read(4)
        if len(rest) != 4:
            return None
        (length,) = struct.unpack("<L", rest)
    expected = rows * cols * frames * (allocated // 8)
    if length == _UNDEFINED or length != expected and not (expected % 2 and length == expected + 1):
        return None  # short, excess or undefined: pydicom's checks and messages
    dtype = np.dtype(f"<{'i' if representation else 'u'}{allocated // 8}")
    out = np.empty(rows * cols * frames, dtype=dtype)
    if fp.readinto(memoryview(out).cast("B")) != expected:
        return None
    out = out.reshape((frames, rows, cols) if frames > 1 else (rows, cols))
    if stored < allocated:  # pydicom's default correct_unused_bits: mask (unsigned) or sign-extend (signed)
        shift = allocated - stored
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)
    return out


# -- the element walker: just the attributes preprocessing needs --------------------------------------


@dataclass(frozen=True)
class ImageHeader:
    """The attributes of an image that :func:`edged.pipeline.preprocess.prepare_dataset` reads (under their
    pydicom keywords, as pydicom gives them; None where absent), and its SOP Class and Instance UIDs."""

    SOPClassUID: str | None
    SOPInstanceUID: str | None
    SamplesPerPixel: int | None
    PhotometricInterpretation: str
    NumberOfFrames: int | None
    Rows: int
    Columns: int
    BitsAllocated: int
    BitsStored: int
    PixelRepresentation: int
    RescaleIntercept: float | None
    RescaleSlope: float | None


class _Decline(Exception):
    """The walker does not handle this file: pydicom reads it."""


# tag -> (keyword, VR) of the top-level attributes kept
_WANTED = {
    0x00080016: ("SOPClassUID", "UI"), 0x00080018: ("SOPInstanceUID", "UI"),
    0x00280002: ("SamplesPerPixel", "US"), 0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280008: ("NumberOfFrames", "IS"), 0x00280010: ("Rows", "US"), 0x00280011: ("Columns", "US"),
    0x00280100: ("BitsAllocated", "US"), 0x00280101: ("BitsStored", "US"),
    0x00280103: ("PixelRepresentation", "US"), 0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
}
_REQUIRED = ("PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
_EXPLICIT_LONG = elements.LONG_VRS  # the same VR tables as the listener's header walker
_EXPLICIT_SHORT = elements.KNOWN_VRS - elements.LONG_VRS
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_IS = re.compile(r" *[+-]?[0-9]+ *")
_DS = re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
_UI = re.compile(r"[0-9.]+")
_MONOCHROME = re.compile(r" *MONOCHROME[12] *")
_MAX_DEPTH = 16


def _letters(vr: bytes) -> bool:
    """pydicom's test of whether two bytes are an explicit VR (both 'A'..'Z')."""
    return 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B


def _element(fp: BinaryIO, implicit: bool) -> tuple[int, bytes | None, int]:
    """The next element's tag, VR (None in implicit VR) and value length; ``fp`` then at its value."""
    head = fp.read(8)
    if len(head) != 8:
        raise _Decline
    group, element, length = struct.unpack("<HHL", head)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:  # items and delimiters have no VR in either encoding
        return tag, None, length
    vr = head[4:6]
    if vr in _EXPLICIT_SHORT:
        return tag, vr, length >> 16
    if vr not in _EXPLICIT_LONG or length >> 16:  # reserved bytes must be zero
        raise _Decline
    rest = fp.read(4)
    if len(rest) != 4:
        raise _Decline
    return tag, vr, struct.unpack("<L", rest)[0]


def _skip_sequence(fp: BinaryIO, implicit: bool, depth: int) -> None:
    """Skip the items of a sequence of undefined length, up to and including its delimiter."""
    if depth > _MAX_DEPTH:
        raise _Decline
    while True:
        tag, _, length = _element(fp, implicit)
        if tag == _SEQUENCE_END:
            if length:
                raise _Decline
            return
        if tag != _ITEM:
            raise _Decline
        if length == _UNDEFINED:
            _skip_item(fp, implicit, depth + 1)
        else:
            fp.seek(length, 1)


def _skip_item(fp: BinaryIO, implicit: bool, depth: int) -> None:
    """Skip the elements of an item of undefined length, up to and including its delimiter."""
    if depth > _MAX_DEPTH:
        raise _Decline
    while True:
        tag, vr, length = _element(fp, implicit)
        if tag == _ITEM_END:
            if length:
                raise _Decline
            return
        if tag >> 16 == 0xFFFE:
            raise _Decline
        if length == _UNDEFINED:
            if vr not in (None, b"SQ"):
                raise _Decline
            _skip_sequence(fp, implicit, depth + 1)
        else:
            fp.seek(length, 1)


def _text(value: bytes, pattern: re.Pattern[str]) -> list[str]:
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise _Decline from None
    parts = text.split("\\")
    if not all(pattern.fullmatch(p) for p in parts):
        raise _Decline
    return parts


def _convert(vr: str, value: bytes) -> object:
    """A kept attribute's value as pydicom converts it (the first of several for IS and DS, as
    :func:`edged.pipeline.preprocess.prepare_dataset` takes it); _Decline for anything unusual."""
    if vr == "US":
        if len(value) != 2:
            raise _Decline
        return struct.unpack("<H", value)[0]
    if vr == "UI":
        parts = _text(value.rstrip(b"\0 "), _UI)
        if len(parts) != 1:
            raise _Decline
        return parts[0]
    if vr == "CS":
        text = _text(value, _MONOCHROME)
        if len(text) != 1:
            raise _Decline
        return text[0].strip()
    if vr == "IS":
        parts = _text(value, _IS)
        if len(parts) != 1:
            raise _Decline
        return int(parts[0])
    number = float(_text(value, _DS)[0])  # DS
    if not math.isfinite(number):
        raise _Decline
    return number


def _walk(fp: BinaryIO) -> tuple[ImageHeader, bool]:
    """The kept attributes of the file at ``fp`` (at its start) and whether it is implicit VR; ``fp``
    then at the Pixel Data element's value."""
    preamble = fp.read(132)
    if len(preamble) != 132 or preamble[128:] != b"DICM":
        raise _Decline
    syntax = None
    while True:  # file meta: explicit VR little endian, group 2
        group = fp.read(2)
        if len(group) != 2:
            raise _Decline
        fp.seek(-2, 1)
        if group != b"\x02\x00":
            break
        tag, vr, length = _element(fp, False)
        if length == _UNDEFINED:
            raise _Decline
        value = fp.read(length)
        if len(value) != length:
            raise _Decline
        if tag == 0x00020010:
            syntax = value.rstrip(b"\0 ")
    if syntax == ExplicitVRLittleEndian.encode():
        implicit = False
    elif syntax == ImplicitVRLittleEndian.encode():
        implicit = True
    else:
        raise _Decline
    first = fp.read(8)
    if len(first) != 8 or _letters(first[4:6]) == implicit:  # pydicom would switch to the other encoding
        raise _Decline
    fp.seek(-8, 1)
    values: dict[str, object] = {}
    previous = -1
    while True:
        tag, vr, length = _element(fp, implicit)
        if tag <= previous or tag >> 16 == 0xFFFE:
            raise _Decline
        previous = tag
        if tag == PIXEL_DATA:
            fp.seek(-(8 if implicit or vr not in _EXPLICIT_LONG else 12), 1)
            break
        if tag > PIXEL_DATA:
            raise _Decline
        wanted = _WANTED.get(tag)
        if wanted is not None:
            keyword, expected_vr = wanted
            if vr is not None and vr.decode() != expected_vr or length == _UNDEFINED:
                raise _Decline
            value = fp.read(length)
            if len(value) != length:
                raise _Decline
            values[keyword] = _convert(expected_vr, value)
        elif length == _UNDEFINED:
            if vr not in (None, b"SQ"):
                raise _Decline
            _skip_sequence(fp, implicit, 1)
        else:
            fp.seek(length, 1)
    if any(k not in values for k in _REQUIRED):
        raise _Decline
    header = ImageHeader(**{keyword: values.get(keyword) for keyword, _ in _WANTED.values()})  # type: ignore[arg-type]
    return header, implicit


def read_pixels(path: str | Path) -> tuple[ImageHeader | Dataset, np.ndarray | None]:
    """:func:`read_image` for a caller that needs no more of the header than :class:`ImageHeader`:
    ``(ImageHeader, pixels)`` from the element walker where it handles the file, else exactly what
    :func:`read_image` returns."""
    try:
        with open(path, "rb") as fp:
            header, implicit = _walk(fp)
            pixels = _read_pixel_data(fp, implicit, header.Rows, header.Columns, header.BitsAllocated,
                                      header.BitsStored, header.PixelRepresentation,
                                      1 if header.SamplesPerPixel is None else header.SamplesPerPixel,
                                      1 if header.NumberOfFrames is None else header.NumberOfFrames,
                                      header.PhotometricInterpretation)
    except (_Decline, OSError, ValueError):
        pixels = None
    if pixels is None:
        return read_image(path)
    return header, pixels
