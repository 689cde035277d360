"""Building engines, kept apart from running them.

``build_model`` first applies the precision to the ONNX (inference/precision.py, works anywhere), then,
where TensorRT and a GPU are present, parses that ONNX with TensorRT's OnnxParser (every parser error
reported), builds a strongly typed network with one optimisation profile for batch 1..max_batch and a
persisted timing cache, and caches the serialized plan keyed by everything it depends on
(:func:`plan_key`). A changed key means a rebuild, never a stale plan.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edged import logs
from edged.errors import BackendUnavailableError, EngineBuildError
from edged.inference import precision as precision_mod
from edged.inference.cache import ArtifactCache, Entry
from edged.inference.cuda import Gpu, GpuInfo, load_pycuda
from edged.inference.repository import ModelSpec, sha256_file
from edged.inference.tensorrt import TrtLogger, load_tensorrt

log = logging.getLogger("edged.build")

PLAN_KIND = "plan"
Progress = Callable[[str], None]


def plan_key(spec: ModelSpec, onnx_sha256: str, precision: str, trt_version: str, gpu: GpuInfo) -> dict[str, str]:
    """Everything a serialized plan depends on; any change means rebuild."""
    return {
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "tensorrt": trt_version,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "cuda_driver": gpu.driver_version,
        "max_batch": str(spec.batching.max_batch),
        "input_shape": "x".join(str(d) for d in spec.input.shape[1:]),
        "workspace_mb": str(spec.tensorrt.workspace_mb),
    }


@dataclass(frozen=True)
class BuildResult:
    model: str
    precision: str
    onnx: Path
    plan: Path | None
    seconds: float
    note: str


def _timing_cache_path(cache: ArtifactCache, trt_version: str, gpu: GpuInfo) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in f"{gpu.name}-{gpu.compute_capability}-{trt_version}")
    return cache.root / f"timing-{safe}.cache"


def build_plan(spec: ModelSpec, onnx_path: Path, trt: Any, timing_cache: Path) -> bytes:
    """Parse and build; returns the serialized plan. Raises EngineBuildError with every message."""
    logger = TrtLogger(trt)
    builder = trt.Builder(logger.trt_logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger.trt_logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(spec.name, f"TensorRT could not parse {onnx_path.name}", errors or logger.messages)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.tensorrt.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input.name, spec.input_shape(1), spec.input_shape(max(1, spec.batching.max_batch // 2)),
                      spec.input_shape(spec.batching.max_batch))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    tcache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(tcache, False):
        tcache = config.create_timing_cache(b"")  # a cache from another TensorRT: start afresh
        config.set_timing_cache(tcache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(spec.name, "TensorRT build failed", logger.messages)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


class PlanBuilder:
    """TensorRT and the GPU, loaded once for a run of builds. Raises BackendUnavailableError if absent."""

    def __init__(self, gpu_index: int = 0) -> None:
        self.trt = load_tensorrt()
        cuda = load_pycuda()
        self.gpu = Gpu(cuda, gpu_index)
        self.gpu_info = self.gpu.info()

    def key(self, spec: ModelSpec, onnx_path: Path, precision: str) -> dict[str, str]:
        return plan_key(spec, sha256_file(onnx_path), precision, str(self.trt.__version__), self.gpu_info)

    def ensure(self, spec: ModelSpec, onnx_path: Path, precision: str, cache: ArtifactCache, *,
               force: bool = False) -> tuple[Entry, bool]:
        """The cached plan for the current key, building it if missing or stale; (entry, built_now)."""
        key = self.key(spec, onnx_path, precision)
        if not force:
            hit = cache.lookup(spec.name, PLAN_KIND, key)
            if hit is not None:
                return hit, False
        changed = cache.changed_parts(spec.name, PLAN_KIND, key)
        if changed:
            logs.event(log, logging.WARNING, "plan.rebuild", model=spec.name, reason="key changed",
                       changed=",".join(changed))
        with self.gpu.active():
            data = build_plan(spec, onnx_path, self.trt, _timing_cache_path(cache, key["tensorrt"], self.gpu_info))
        entry = cache.store(spec.name, PLAN_KIND, key, data, "plan")
        logs.event(log, logging.INFO, "plan.built", model=spec.name, precision=precision, bytes=len(data))
        return entry, True

    def close(self) -> None:
        self.gpu.release()


def build_model(spec: ModelSpec, cache: ArtifactCache, *, precision: str | None = None,
                calibration: Path | None = None, force: bool = False, plans: PlanBuilder | None = None,
                progress: Progress | None = None) -> BuildResult:
    """Convert the ONNX to ``precision`` and, when ``plans`` is given (TensorRT present), build the plan."""
    t0 = time.monotonic()
    prec = precision or spec.tensorrt.precision
    onnx = precision_mod.convert(spec, prec, cache, calibration=calibration, force=force, progress=progress)
    if plans is None:
        return BuildResult(spec.name, prec, onnx, None, time.monotonic() - t0,
                           "no TensorRT here: ONNX ready for ONNX Runtime")
    if progress:
        progress(f"building TensorRT plan for {spec.name} ({prec}, batch 1..{spec.batching.max_batch})")
    entry, built = plans.ensure(spec, onnx, prec, cache, force=force)
    return BuildResult(spec.name, prec, onnx, entry.path, time.monotonic() - t0,
                       "plan built" if built else "plan up to date")


def try_plan_builder(gpu_index: int = 0) -> tuple[PlanBuilder | None, str]:
    """A PlanBuilder, or None and the reason TensorRT can't be used here."""
    try:
        return PlanBuilder(gpu_index), ""
    except BackendUnavailableError as exc:
        return None, exc.reason
