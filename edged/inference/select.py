"""Choosing a backend and bringing up a model's engine on it.

``[engines] backend = "auto"`` picks TensorRT when tensorrt, pycuda and a GPU are all present, and ONNX
Runtime on the CPU otherwise; :func:`resolve_backend` says which and why, for the start-up log.
``backend = "triton"`` sends every model's batches to the ``[triton]`` server (never chosen by auto).
"""

from __future__ import annotations

import logging

from edged import logs
from edged.config import EnginesConfig, TritonConfig
from edged.errors import BackendUnavailableError, EngineError
from edged.inference import precision as precision_mod
from edged.inference.base import Engine
from edged.inference.build import PlanBuilder
from edged.inference.cache import ArtifactCache
from edged.inference.onnxruntime import OnnxRuntimeEngine
from edged.inference.repository import ModelSpec
from edged.inference.tensorrt import PlanDeserializeError, TensorRTEngine

log = logging.getLogger("edged.engines")

BACKENDS = ("onnxruntime", "tensorrt", "triton")


def resolve_backend(requested: str, gpu_index: int = 0) -> tuple[str, str, PlanBuilder | None]:
    """(backend, reason, plan builder for tensorrt). Raises BackendUnavailableError if tensorrt was required."""
    if requested == "onnxruntime":
        return "onnxruntime", "configured", None
    if requested == "triton":
        return "triton", "configured", None
    try:
        plans = PlanBuilder(gpu_index)
    except BackendUnavailableError as exc:
        if requested == "tensorrt":
            raise
        return "onnxruntime", f"auto: {exc.reason}", None
    info = plans.gpu_info
    return "tensorrt", f"{info.name} (sm {info.compute_capability}), TensorRT {plans.trt.__version__}", plans


def start_engine(spec: ModelSpec, backend: str, cache: ArtifactCache, cfg: EnginesConfig,
                 plans: PlanBuilder | None = None, precision: str | None = None,
                 triton: TritonConfig | None = None) -> Engine:
    """An activated engine for ``spec`` on ``backend`` (building what is missing or stale)."""
    if backend == "triton":
        from edged.inference.triton import TritonEngine

        remote = TritonEngine(spec, triton or TritonConfig())
        remote.activate()
        return remote
    prec = precision or spec.tensorrt.precision
    if prec == "int8":
        onnx = precision_mod.cached_onnx(spec, prec, cache)
        if onnx is None:
            raise EngineError(spec.name, f"no int8 ONNX built from the current model.onnx: run "
                                         f"'edged engines build {spec.name} --precision int8 --calibration DIR'")
    else:
        onnx = precision_mod.convert(spec, prec, cache)
    engine: Engine
    if backend == "onnxruntime":
        engine = OnnxRuntimeEngine(spec, onnx_path=onnx, precision=prec, intra_op_threads=cfg.intra_op_threads,
                                   inter_op_threads=cfg.inter_op_threads, spin_wait=cfg.spin_wait)
        engine.activate()
        return engine
    if plans is None:
        raise EngineError(spec.name, "tensorrt backend requested without a plan builder")
    entry, _ = plans.ensure(spec, onnx, prec, cache)
    engine = TensorRTEngine(spec, entry.path, precision=prec)
    try:
        engine.activate()
    except PlanDeserializeError as exc:
        logs.event(log, logging.WARNING, "plan.rebuild", model=spec.name, reason="deserialize failed")
        log.debug("deserialize failure: %s", exc)
        cache.discard(spec.name, "plan")
        entry, _ = plans.ensure(spec, onnx, prec, cache, force=True)
        engine = TensorRTEngine(spec, entry.path, precision=prec)
        engine.activate()
    return engine
