"""Precision is decided on the ONNX, so TensorRT (10 and 11, strongly typed) and ONNX Runtime run the same model.

* ``fp32``: the model as shipped.
* ``fp16``: weights and compute in float16, inputs and outputs kept float32 (ONNX Runtime's
  float16 converter, ``keep_io_types``).
* ``int8``: Q/DQ nodes from static post-training quantisation (ONNX Runtime's quantisation tools, QDQ
  format, symmetric per-channel int8 weights, symmetric int8 activations as TensorRT requires),
  calibrated on DICOM images preprocessed exactly as at inference. The layers reading the image
  itself stay in float (see :func:`input_layers`).

Converted models are cached (inference/cache.py), keyed by the source ONNX's sha256, the precision,
the calibration data's digest and the converter's version.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edged import logs
from edged.errors import EngineBuildError
from edged.inference.cache import ArtifactCache, Entry
from edged.inference.repository import ModelSpec
from edged.pipeline.preprocess import prepare_dataset

log = logging.getLogger("edged.precision")

#: Calibration stops after this many planes (ONNX Runtime's MinMax calibrator holds them all).
MAX_CALIBRATION_PLANES = 512


def onnx_kind(precision: str) -> str:
    return f"onnx-{precision}"


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def source_key(spec: ModelSpec, precision: str) -> dict[str, str]:
    """Cache key parts of a converted ONNX, except the calibration digest (int8 adds it)."""
    return {"source_sha256": spec.onnx_sha256(), "precision": precision, "converter": f"onnxruntime {_ort_version()}"}


def calibration_planes(spec: ModelSpec, folder: Path, limit: int = MAX_CALIBRATION_PLANES) -> np.ndarray:
    """Every readable monochrome DICOM image under ``folder``, preprocessed as at inference."""
    from pydicom import dcmread

    pre = spec.preprocess.spec()
    planes: list[np.ndarray] = []
    skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path)
            planes.extend(prepare_dataset(ds, pre))
        except Exception:
            skipped += 1
            continue
        if len(planes) >= limit:
            break
    logs.event(log, logging.INFO, "calibration.read", model=spec.name, planes=len(planes), skipped_files=skipped)
    if not planes:
        raise EngineBuildError(spec.name, f"no usable DICOM images in calibration folder {folder}")
    return np.stack(planes[:limit]).astype(np.float32)


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))


def _to_int8(src: Path, dst: Path, spec: ModelSpec, planes: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(planes[i : i + 1] for i in range(len(planes)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {spec.input.name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(dst), Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=input_layers(prepared, spec.input.name),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )


def input_layers(model_path: Path, input_name: str) -> list[str]:
    """The nodes that read the image itself. They stay in float: a CT image's meaningful differences (a
    nodule's edge, a few HU over the window) are finer than int8's step over the input's range, and
    quantising the first convolution was measured to swing the demo classifier's probabilities by up to
    0.86, against 0.016 with it kept in float."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if input_name in n.input and n.name]


def convert(spec: ModelSpec, precision: str, cache: ArtifactCache, *, calibration: Path | None = None,
            force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """The ONNX to run at ``precision``: the shipped file for fp32, else a cached (or new) conversion."""
    if precision == "fp32":
        return spec.onnx_path
    kind = onnx_kind(precision)
    parts = source_key(spec, precision)
    planes = None
    if precision == "int8":
        if calibration is None:
            cached = None if force else cache.lookup(spec.name, kind, parts, ignore=("calibration_sha256",))
            if cached is not None:
                return cached.path
            raise EngineBuildError(spec.name, "int8 needs calibration images: pass --calibration DIR (DICOM files)")
        planes = calibration_planes(spec, calibration)
        parts["calibration_sha256"] = hashlib.sha256(planes.tobytes()).hexdigest()
    if not force:
        hit = cache.lookup(spec.name, kind, parts)
        if hit is not None:
            return hit.path
    if progress:
        progress(f"converting {spec.name} to {precision}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            if precision == "fp16":
                _to_fp16(spec.onnx_path, out)
            elif precision == "int8":
                assert planes is not None
                _to_int8(spec.onnx_path, out, spec, planes)
            else:
                raise EngineBuildError(spec.name, f"unknown precision {precision!r}")
        except EngineBuildError:
            raise
        except Exception as exc:
            raise EngineBuildError(spec.name, f"{precision} conversion failed: {exc}") from None
        entry: Entry = cache.store(spec.name, kind, parts, out.read_bytes(), "onnx")
    logs.event(log, logging.INFO, "precision.converted", model=spec.name, precision=precision)
    return entry.path


def cached_onnx(spec: ModelSpec, precision: str, cache: ArtifactCache) -> Path | None:
    """The converted ONNX for ``precision`` if one was built from the current model, else None."""
    if precision == "fp32":
        return spec.onnx_path
    entry = cache.lookup(spec.name, onnx_kind(precision), source_key(spec, precision), ignore=("calibration_sha256",))
    return entry.path if entry else None
