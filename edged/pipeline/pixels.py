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
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

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
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    allocated, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    representation = _int(ds, "PixelRepresentation")
    samples = _int(ds, "SamplesPerPixel", 1)
    frames = _int(ds, "NumberOfFrames", 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
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
