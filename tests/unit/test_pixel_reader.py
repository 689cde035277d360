"""The pipeline's pixel reader: native little-endian monochrome pixel data read straight into numpy must
equal pydicom's ``pixel_array``; everything else goes through pydicom, with pydicom's errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from edged.errors import PixelDataError
from edged.pipeline.pixels import ImageHeader, read_image, read_pixels
from edged.pipeline.preprocess import PreprocessSpec, prepare_dataset
from edged.synthetic import ct_slice

CORPUS = sorted(p for p in (Path(pydicom.__file__).parent / "data" / "test_files").rglob("*")
                if p.is_file() and p.suffix.lower() not in (".py", ".json", ".txt", ".gz", ".bz2", ".zip", ".xml"))
SPEC = PreprocessSpec(size=(32, 32), window=(-600.0, 1500.0))


def _pydicom(path: Path):
    """What the pipeline did before: a full dcmread and pixel_array; the array, or the exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path).pixel_array
    except Exception as exc:
        return exc


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_reader_equals_pydicom_on_its_test_files(path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds, pixels = read_image(path)
    except Exception as exc:  # the reader fails only where pydicom's own read fails, with the same error
        with pytest.raises(type(exc)):
            pydicom.dcmread(path)
        return
    expected = _pydicom(path)
    if pixels is None:  # declined: pydicom's full dataset, for pydicom to decode as before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ds == pydicom.dcmread(path)
        return
    assert "PixelData" not in ds  # the header only
    assert not isinstance(expected, Exception), expected
    assert pixels.dtype == expected.dtype and pixels.shape == expected.shape
    np.testing.assert_array_equal(pixels, expected)
    assert pixels.flags.writeable


def test_the_fast_path_covers_the_common_native_files() -> None:
    # Not a vacuous comparison: the corpus holds native monochrome files in both little-endian syntaxes,
    # with Bits Stored < Bits Allocated, signed, and multi-frame.
    accepted = []
    for path in CORPUS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds, pixels = read_image(path)
        except Exception:
            continue
        if pixels is not None:
            accepted.append((ds, pixels))
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds, _ in accepted}
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian} <= syntaxes
    assert any(ds.BitsStored < ds.BitsAllocated for ds, _ in accepted)
    assert any(ds.PixelRepresentation == 1 for ds, _ in accepted)
    assert any(p.ndim == 3 for _, p in accepted)


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _slice(**kw) -> pydicom.Dataset:
    return ct_slice(0, study_uid=generate_uid(), series_uid=generate_uid(), rows=64, columns=64, **kw)


def test_the_model_input_is_the_same_as_before(tmp_path: Path) -> None:
    path = _write(_slice(), tmp_path / "ct.dcm")
    ds, pixels = read_image(path)
    assert pixels is not None
    np.testing.assert_array_equal(prepare_dataset(ds, SPEC, pixels), prepare_dataset(pydicom.dcmread(path), SPEC))


def test_short_pixel_data_falls_back_to_pydicom_and_its_error(tmp_path: Path) -> None:
    ds = _slice()
    ds.PixelData = ds.PixelData[:-64]
    path = _write(ds, tmp_path / "short.dcm")
    full, pixels = read_image(path)
    assert pixels is None and "PixelData" in full
    with pytest.raises(ValueError) as before:
        prepare_dataset(pydicom.dcmread(path), SPEC)
    with pytest.raises(ValueError) as now:
        prepare_dataset(full, SPEC, pixels)
    assert str(now.value) == str(before.value)


def test_compressed_data_goes_to_pydicom_and_keeps_pixel_data_error(tmp_path: Path) -> None:
    ds = _slice()
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.Rows = 1  # found by the fuzz test: pylibjpeg-rle panics; edged turns it into PixelDataError
    path = _write(ds, tmp_path / "rle.dcm")
    full, pixels = read_image(path)
    assert pixels is None
    with pytest.raises(PixelDataError):
        prepare_dataset(full, SPEC, pixels)


def test_colour_is_refused_as_before(tmp_path: Path) -> None:
    ds = _slice()
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(64 * 64 * 3)
    path = _write(ds, tmp_path / "rgb.dcm")
    full, pixels = read_image(path)
    assert pixels is None
    with pytest.raises(ValueError, match="SamplesPerPixel"):
        prepare_dataset(full, SPEC, pixels)


def test_not_dicom_raises_what_pydicom_raises(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not a dicom file" * 10)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        read_image(path)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_odd_length_pixel_data_with_its_padding_byte(tmp_path: Path, syntax: str) -> None:
    # 8-bit, 3 x 3: nine bytes of pixels and one of padding (PS3.5 7.1.1: values have even length)
    ds = _slice()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows = ds.Columns = 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 7, 6, 1
    ds.PixelData = bytes([0, 1, 2, 63, 64, 127, 128, 200, 255])  # high bits set: pydicom sign-extends from bit 6
    path = _write(ds, tmp_path / "odd.dcm")
    header, pixels = read_image(path)
    assert pixels is not None
    expected = pydicom.dcmread(path).pixel_array
    assert pixels.dtype == expected.dtype == np.int8
    np.testing.assert_array_equal(pixels, expected)


# -- read_pixels: the element walker for callers that need only what preprocessing reads -------------------

WALKER_SPEC = PreprocessSpec(size=(16, 16), window=(40.0, 400.0))


def _outcome(fn, *args):
    """A result, or the exception's type and message, for comparing two ways of doing the same thing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)
    except Exception as exc:
        return (type(exc), str(exc))


def _model_input(ds, pixels):
    out = _outcome(prepare_dataset, ds, WALKER_SPEC, pixels)
    return out if isinstance(out, tuple) else out.tobytes()


def _same_as_read_image(path: Path) -> bool:
    """read_pixels(path) gives the model what read_image(path) gives it (the same planes, or the same error
    from preprocessing); returns whether its walker took it. Where it did, the header's attributes are
    pydicom's; where it did not, the result is read_image's. (read_image's own result is checked against
    pydicom's full read and pixel_array by the tests above.)"""
    got = _outcome(read_pixels, path)
    before = _outcome(read_image, path)
    if isinstance(got, tuple) and isinstance(got[0], type):  # an exception: read_image's own
        assert got == before
        return False
    header, pixels = got
    if not isinstance(header, ImageHeader):
        assert not isinstance(before[0], type)
        assert type(header) is type(before[0]) and (pixels is None) == (before[1] is None)
        assert _model_input(header, pixels) == _model_input(*before)
        assert _outcome(lambda: str(header.get("SOPClassUID"))) == _outcome(lambda: str(before[0].get("SOPClassUID")))
        return False
    assert not isinstance(before[0], type), before  # the walker reads only what read_image reads
    assert _model_input(header, pixels) == _model_input(*before)
    full = before[0]
    assert header.SOPClassUID == full.get("SOPClassUID") and header.SOPInstanceUID == full.get("SOPInstanceUID")
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel"):
        assert getattr(header, keyword) == full.get(keyword)
    return True


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_read_pixels_gives_the_same_model_input_on_pydicom_test_files(path: Path) -> None:
    _same_as_read_image(path)


def test_read_pixels_walker_takes_the_common_native_files() -> None:
    taken = [path for path in CORPUS if _same_as_read_image(path)]
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in taken}
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian} <= syntaxes
    assert len(taken) >= 10


def _with_sequences() -> pydicom.Dataset:
    """A slice with rescale values, sequences of defined and undefined length (nested), a private
    element and multi-valued strings: what the walker must step over."""
    ds = _slice()
    ds.RescaleSlope, ds.RescaleIntercept = "1.5", "-1024"
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D0050", "SRT", "Tissue"
    inner = pydicom.Dataset()
    inner.ReferencedSOPClassUID, inner.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
    item.ReferencedImageSequence = [inner, inner]
    ds.AnatomicRegionSequence = [item]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.add_new(0x00091010, "LO", "private")
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined-length-sequences"])
def test_read_pixels_walks_sequences_and_equals_pydicom(tmp_path: Path, syntax: str, undefined: bool) -> None:
    ds = _with_sequences()
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "ct.dcm"
    if undefined:
        ds.AnatomicRegionSequence.is_undefined_length = True
        ds.AnatomicRegionSequence[0].is_undefined_length_sequence_item = True
        ds.AnatomicRegionSequence[0].ReferencedImageSequence.is_undefined_length = True
    _write(ds, path)
    header, pixels = read_pixels(path)
    assert isinstance(header, ImageHeader)  # taken by the walker
    assert header.RescaleSlope == 1.5 and header.RescaleIntercept == -1024.0
    assert _same_as_read_image(path)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_read_pixels_never_gives_a_wrong_image_from_a_cut_or_mutated_file(tmp_path: Path, syntax: str) -> None:
    # Every cut of the header and every byte of it changed (three ways): the walker either reads what
    # pydicom reads, or declines and read_image's result (or error) comes back.
    ds = _with_sequences()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.AnatomicRegionSequence.is_undefined_length = True
    good = _write(ds, tmp_path / "good.dcm").read_bytes()
    header_end = good.index(b"\xe0\x7f\x10\x00") + 12
    path = tmp_path / "x.dcm"
    taken = declined = 0
    for cut in range(0, header_end + 64, 3):
        path.write_bytes(good[:cut])
        if _same_as_read_image(path):
            taken += 1
        else:
            declined += 1
    for at in range(132, header_end):
        for new in (good[at] ^ 0x01, good[at] ^ 0x80, 0x5C):  # a bit, the high bit, a backslash
            path.write_bytes(good[:at] + bytes([new]) + good[at + 1:])
            if _same_as_read_image(path):
                taken += 1
            else:
                declined += 1
    assert declined > 0 and taken > 0  # both ways exercised
