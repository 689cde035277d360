"""Preprocessing: pure numpy functions from stored pixels to model input planes. No I/O here.

The order follows DICOM's pixel pipeline (PS3.4 N.2): stored values -> modality LUT (Rescale Slope /
Intercept: CT numbers in HU) -> MONOCHROME1 inversion -> value of interest (a window, or a percentile
clip for modalities without calibrated units) scaled to [0, 1] -> resampling to the model's size ->
normalisation. Training (engines/train_demo_models.py), calibration (int8) and inference all call
:func:`prepare_slice`, so a model sees the same numbers everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edged.errors import PixelDataError

try:
    from numpy._core.umath import clip as _clip_ufunc  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.umath import clip as _clip_ufunc  # type: ignore[no-redef]


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input (``[preprocess]`` in model.toml)."""

    size: tuple[int, int]
    modality_lut: bool = True
    window: tuple[float, float] | None = None
    percentile: tuple[float, float] | None = None
    mean: float = 0.0
    std: float = 1.0


def modality_lut(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values to modality units (PS3.3 C.11.1): ``value * slope + intercept``, as float32."""
    out = pixels.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window (PS3.3 C.11.2.1.2.1, "LINEAR") scaled to [0, 1] and clipped."""
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    lo = center - 0.5 - (width - 1) / 2
    out = (values - np.float32(lo)) / np.float32(width - 1)
    return np.clip(out, 0.0, 1.0, out=out)


def _windowed(pixels: np.ndarray, slope: float, intercept: float, center: float, width: float) -> np.ndarray:
    """:func:`modality_lut` then :func:`window` in one pass: ``clip(value * a + b, 0, 1)`` with
    ``a = slope / (width - 1)`` and ``b = (intercept - low) / (width - 1)``."""
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    lo = center - 0.5 - (width - 1) / 2
    # the stored values cast to float32 inside the multiply (one pass, no separate astype copy); the same
    # float32 arithmetic as astype then *=, +=, clip
    out = np.multiply(pixels, np.float32(slope / (width - 1)), dtype=np.float32)
    out += np.float32((intercept - lo) / (width - 1))
    return _clip01(out)


def _clip01(out: np.ndarray) -> np.ndarray:
    """``np.clip(out, 0, 1, out=out)`` on a float32 array: the clip ufunc itself, without np.clip's wrappers."""
    return _clip_ufunc(out, np.float32(0.0), np.float32(1.0), out=out)  # type: ignore[no-any-return]


def percentile_clip(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to the [low, high] percentiles of the image and scale to [0, 1]."""
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    out = (values - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def invert_monochrome1(pixels: np.ndarray, bits_stored: int | None, signed: bool) -> np.ndarray:
    """MONOCHROME1 to MONOCHROME2 on stored values: ``max + min - value`` over the stored range."""
    if bits_stored:
        lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    else:
        lo, hi = int(pixels.min()), int(pixels.max())
    return (np.int64(lo + hi) - pixels.astype(np.int64)).astype(np.float32)


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights for resampling an axis (pixel centres aligned, edges clamped)."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (x - i0).astype(np.float32)
    return i0, i1, w


def _block_mean(plane: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Mean of each ``fy`` x ``fx`` block, as float32: a sum of strided views (several times faster than
    ``reshape(...).mean(axis=(1, 3))``, whose reduction runs over non-adjacent axes)."""
    views = [plane[dy::fy, dx::fx] for dy in range(fy) for dx in range(fx)]
    if len(views) > 1 and plane.dtype == np.float32:  # the first two summed into a new array: a pass fewer
        acc = np.add(views[0], views[1])
        views = views[2:]
    else:
        acc = views[0].astype(np.float32)
        views = views[1:]
    for view in views:
        acc += view
    acc *= np.float32(1.0 / (fy * fx))
    return acc


def resize(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample a 2-D float plane to ``size`` (rows, columns).

    Whole-number reductions average blocks (no aliasing: 512 -> 256 averages 2x2); anything else is
    bilinear, after block-averaging by the whole part of the reduction.
    """
    rows, cols = size
    h, w = plane.shape
    if (h, w) == (rows, cols):
        return plane.astype(np.float32, copy=False)
    fy, fx = max(h // rows, 1), max(w // cols, 1)
    if fy > 1 or fx > 1:
        hh, ww = (h // fy) * fy, (w // fx) * fx
        plane = _block_mean(plane[:hh, :ww], fy, fx)
        h, w = plane.shape
        if (h, w) == (rows, cols):
            return plane
    y0, y1, wy = _linear_weights(h, rows)
    x0, x1, wx = _linear_weights(w, cols)
    top = plane[y0][:, x0] * (1 - wx) + plane[y0][:, x1] * wx
    bottom = plane[y1][:, x0] * (1 - wx) + plane[y1][:, x1] * wx
    return (top * (1 - wy)[:, None] + bottom * wy[:, None]).astype(np.float32, copy=False)


def prepare_slice(
    pixels: np.ndarray,
    spec: PreprocessSpec,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    monochrome1: bool = False,
    bits_stored: int | None = None,
    signed: bool = False,
    pixel_spacing: tuple[float, float] | None = None,
) -> np.ndarray:
    """Stored pixels (rows, columns) to one float32 model input plane of ``spec.size``.

    MONOCHROME1 (minimum shown white) is inverted on the stored values over their full range
    (``bits_stored``, ``signed``), so the model always sees MONOCHROME2. ``pixel_spacing`` is accepted
    for models that resample to a spacing (reserved; the demo models resample to a size).
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D plane, got shape {pixels.shape}")
    if monochrome1:
        pixels = invert_monochrome1(pixels, bits_stored, signed)
    if spec.window is not None:
        # modality LUT and window fused into one multiply-add on a float32 copy (the same line, fewer passes)
        if not spec.modality_lut:
            slope, intercept = 1.0, 0.0
        values = _windowed(pixels, slope, intercept, *spec.window)
    elif spec.percentile is not None:
        values = modality_lut(pixels, slope, intercept) if spec.modality_lut else pixels.astype(np.float32)
        values = percentile_clip(values, *spec.percentile)
    else:
        values = modality_lut(pixels, slope, intercept) if spec.modality_lut else pixels.astype(np.float32)
    plane = resize(values, spec.size)
    if spec.mean != 0.0 or spec.std != 1.0:
        plane = (plane - np.float32(spec.mean)) / np.float32(spec.std)
    return plane.astype(np.float32, copy=False)


def _first(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, (str, bytes)):
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def decode_pixels(ds: object) -> np.ndarray:
    """``ds.pixel_array``, where a decoder's crash on corrupt data becomes :class:`PixelDataError`.

    pylibjpeg-rle is written in Rust: data that disagrees with Rows/Columns makes it panic, which pyo3
    raises as ``pyo3_runtime.PanicException``, a BaseException that ``except Exception`` lets through
    (it would kill the worker thread and leave its job running). Other BaseExceptions pass unchanged.
    """
    try:
        return ds.pixel_array  # type: ignore[attr-defined,no-any-return]
    except Exception:
        raise
    except BaseException as exc:
        if type(exc).__module__ != "pyo3_runtime":
            raise
        raise PixelDataError(f"pixel data decoder failed ({type(exc).__name__})") from None


def prepare_dataset(ds: object, spec: PreprocessSpec, pixels: np.ndarray | None = None) -> np.ndarray:
    """A decoded DICOM image (pydicom Dataset) to model inputs: float32 ``(frames, 1, rows, columns)``.

    Decodes pixel data (any transfer syntax pydicom with pylibjpeg handles); colour images are
    refused with ValueError, multi-frame images give one plane per frame. ``pixels``: the stored values
    already read (:func:`edged.pipeline.pixels.read_image`, with ``ds`` its header), instead of decoding.
    """
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ValueError(f"SamplesPerPixel is {samples}: only monochrome images are supported")
    if pixels is None:
        pixels = decode_pixels(ds)
    frames = pixels if pixels.ndim == 3 else pixels[None]
    slope = _first(getattr(ds, "RescaleSlope", None), 1.0)
    intercept = _first(getattr(ds, "RescaleIntercept", None), 0.0)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise PixelDataError("Rescale Slope or Intercept is not a finite number")
    mono1 = str(getattr(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    bits = int(getattr(ds, "BitsStored", 0) or 0) or None
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    planes = [prepare_slice(f, spec, slope=slope, intercept=intercept, monochrome1=mono1, bits_stored=bits,
                            signed=signed) for f in frames]
    out = np.stack(planes)[:, None]
    if not np.isfinite(out).all():
        raise PixelDataError("pixel values are not finite numbers after preprocessing")
    return out
