"""Preprocessing: the fused fast path gives the numbers of the DICOM pixel pipeline step by step."""

from __future__ import annotations

import numpy as np
import pytest

from edged.pipeline.preprocess import PreprocessSpec, modality_lut, prepare_slice, resize, window


def _reference(pixels: np.ndarray, spec: PreprocessSpec, slope: float, intercept: float) -> np.ndarray:
    """Stored -> modality LUT -> window -> block mean (written the slow, obvious way)."""
    values = modality_lut(pixels, slope, intercept) if spec.modality_lut else pixels.astype(np.float32)
    assert spec.window is not None
    values = window(values, *spec.window)
    h, w = values.shape
    rows, cols = spec.size
    fy, fx = h // rows, w // cols
    return values.reshape(rows, fy, cols, fx).astype(np.float64).mean(axis=(1, 3))


@pytest.mark.parametrize("size", [(256, 256), (128, 128), (512, 512)])
@pytest.mark.parametrize("win,lut", [((-600.0, 1500.0), True), ((40.0, 400.0), True), ((1000.0, 2000.0), False)])
def test_windowed_block_mean_matches_the_step_by_step_pipeline(size, win, lut) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, size=(512, 512)).astype(np.uint16)
    spec = PreprocessSpec(size=size, window=win, modality_lut=lut)
    got = prepare_slice(pixels, spec, slope=1.0, intercept=-1024.0)
    assert got.dtype == np.float32 and got.shape == size
    np.testing.assert_allclose(got, _reference(pixels, spec, 1.0, -1024.0), atol=1e-6)


def test_window_clips_to_unit_range_with_slope() -> None:
    pixels = np.array([[0, 600], [2000, 4095]], dtype=np.uint16)
    got = prepare_slice(pixels, PreprocessSpec(size=(2, 2), window=(0.0, 1000.0)), slope=2.0, intercept=-1000.0)
    # HU = 2 * stored - 1000; window [-500, 499]: -1000 -> 0, 200 -> 700/999, 3000 and 7190 -> 1
    assert got[0, 0] == 0.0 and got[1, 0] == 1.0 and got[1, 1] == 1.0
    assert got[0, 1] == pytest.approx(700 / 999, abs=1e-6)


def test_block_mean_of_non_square_reduction() -> None:
    plane = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    got = resize(plane, (3, 2))  # 2x4 blocks
    np.testing.assert_allclose(got, plane.reshape(3, 2, 2, 4).mean(axis=(1, 3)), atol=1e-5)


def _previous_prepare_slice(pixels: np.ndarray, spec: PreprocessSpec, slope: float, intercept: float) -> np.ndarray:
    """prepare_slice's windowed path as it was written before its passes were cut (astype copy, then *=,
    +=, np.clip; the block mean from an astype copy of the first view): the model must get the same bits."""
    center, width = spec.window  # type: ignore[misc]
    lo = center - 0.5 - (width - 1) / 2
    out = pixels.astype(np.float32)
    out *= np.float32(slope / (width - 1))
    out += np.float32((intercept - lo) / (width - 1))
    out = np.clip(out, 0.0, 1.0, out=out)
    h, w = out.shape
    fy, fx = max(h // spec.size[0], 1), max(w // spec.size[1], 1)
    out = out[:(h // fy) * fy, :(w // fx) * fx]
    acc = out[0::fy, 0::fx].astype(np.float32)
    for dy in range(fy):
        for dx in range(fx):
            if dy or dx:
                acc += out[dy::fy, dx::fx]
    acc *= np.float32(1.0 / (fy * fx))
    return acc


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32])
@pytest.mark.parametrize("shape,size", [((512, 512), (256, 256)), ((512, 512), (512, 512)), ((300, 451), (100, 150)),
                                        ((512, 512), (128, 64))])
def test_windowed_path_gives_the_same_bits_as_before(dtype, shape, size) -> None:
    rng = np.random.default_rng(11)
    info = np.iinfo(dtype)
    pixels = rng.integers(max(info.min, -(1 << 20)), min(info.max, 1 << 20), size=shape, endpoint=True).astype(dtype)
    for win, slope, intercept in (((-600.0, 1500.0), 1.0, -1024.0), ((40.0, 400.0), 0.37, 12.5), ((0.0, 2.0), 3.0, 0.0)):
        spec = PreprocessSpec(size=size, window=win)
        got = prepare_slice(pixels, spec, slope=slope, intercept=intercept)
        expected = _previous_prepare_slice(pixels, spec, slope, intercept)
        assert got.dtype == np.float32
        assert got.tobytes() == expected.tobytes()
