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
from edged.pipeline.pixels import read_image
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
