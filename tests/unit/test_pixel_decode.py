"""Pixel decoding of corrupt images: a clear error, never a crash of the worker thread."""

from __future__ import annotations

import pytest
from pydicom.uid import RLELossless, generate_uid

from edged.errors import EdgedError, PixelDataError
from edged.pipeline.preprocess import PreprocessSpec, decode_pixels, prepare_dataset
from edged.synthetic import ct_slice

SPEC = PreprocessSpec(size=(32, 32), window=(-600.0, 1500.0))


def _rle_slice():
    ds = ct_slice(0, study_uid=generate_uid(), series_uid=generate_uid(), rows=64, columns=64)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    return ds


def test_rle_image_decodes() -> None:
    assert prepare_dataset(_rle_slice(), SPEC).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("keyword, value", [("Rows", 1), ("Columns", 31)])
def test_rle_data_larger_than_rows_columns_is_a_pixel_data_error(keyword: str, value: int) -> None:
    # Found by the fuzz test: pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on these.
    ds = _rle_slice()
    setattr(ds, keyword, value)
    with pytest.raises(PixelDataError) as info:
        decode_pixels(ds)
    assert isinstance(info.value, EdgedError) and isinstance(info.value, ValueError)
    with pytest.raises(PixelDataError):
        prepare_dataset(ds, SPEC)


def test_other_base_exceptions_pass_through() -> None:
    class Stop:
        @property
        def pixel_array(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode_pixels(Stop())


@pytest.mark.parametrize("keyword, value", [("RescaleSlope", "nan"), ("RescaleIntercept", "inf"),
                                            ("RescaleSlope", "-inf")])
def test_non_finite_rescale_is_a_pixel_data_error(keyword: str, value: str) -> None:
    # Found by the fuzz test: a NaN slope gave NaN model inputs, a NaN probability and a failed commit.
    ds = ct_slice(0, study_uid=generate_uid(), series_uid=generate_uid(), rows=64, columns=64)
    setattr(ds, keyword, value)
    with pytest.raises(PixelDataError, match="finite"):
        prepare_dataset(ds, SPEC)
