"""``edged engines export-triton DIR``: edged's models as a Triton model repository.

For each model: ``DIR/<name>/config.pbtxt`` and ``DIR/<name>/<version>/model.onnx`` (the ONNX at the
model's precision, from the cache when converted), or ``model.plan`` where a TensorRT plan of the model
was built on this machine. Name and version follow ``[triton]`` (the mapping edged uses to call the
server), so daemons pointed at a server loaded from this repository find their models. The config gives
``max_batch_size`` and ``dynamic_batching`` from model.toml ``[batching]``, the input and outputs with
their dims (without the batch axis), and an instance group. The text is Triton's ModelConfig protobuf
in text format; the tests parse it with the definition tritonclient ships.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from edged import logs
from edged.config import TritonConfig
from edged.errors import EngineError
from edged.inference import precision as precision_mod
from edged.inference.build import PLAN_KIND
from edged.inference.cache import ArtifactCache
from edged.inference.repository import ModelSpec, sha256_file

log = logging.getLogger("edged.export")

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
_ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


@dataclass(frozen=True)
class Exported:
    model: str
    served: str
    version: str
    artifact: Path
    config: Path


def preferred_sizes(max_batch: int) -> list[int]:
    """Triton's preferred batch sizes: max_batch and its halves down to 4 (or max_batch alone)."""
    sizes = []
    n = max_batch
    while n >= 4 or not sizes:
        sizes.append(n)
        if n % 2:
            break
        n //= 2
    return sorted(set(sizes))


def _output_dims(spec: ModelSpec, onnx_path: Path) -> dict[str, tuple[str, list[int]]]:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    found: dict[str, tuple[str, list[int]]] = {}
    for out in graph.output:
        t = out.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        found[out.name] = (_ONNX_TYPES.get(t.elem_type, "TYPE_FP32"), dims[1:])
    for o in spec.outputs:
        if o.name not in found:
            raise EngineError(spec.name, f"model.onnx has no such output (it has {sorted(found)})", tensor=o.name)
    return found


def config_pbtxt(spec: ModelSpec, served: str, platform: str, outputs: dict[str, tuple[str, list[int]]],
                 kind: str) -> str:
    b = spec.batching

    def dims(values: list[int]) -> str:
        return "[ " + ", ".join(str(v) for v in values) + " ]"

    lines = [
        f"# Written by edged engines export-triton from {spec.name} {spec.version} (model.toml).",
        f'name: "{served}"',
        f'platform: "{platform}"',
        f"max_batch_size: {b.max_batch}",
        "input [",
        "  {",
        f'    name: "{spec.input.name}"',
        f"    data_type: {_TYPES[spec.input.dtype]}",
        f"    dims: {dims(list(spec.input.shape[1:]))}",
        "  }",
        "]",
        "output [",
    ]
    for i, o in enumerate(spec.outputs):
        dtype, odims = outputs[o.name]
        lines += ["  {", f'    name: "{o.name}"', f"    data_type: {dtype}", f"    dims: {dims(odims)}",
                  "  }" + ("," if i < len(spec.outputs) - 1 else "")]
    lines += [
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {dims(preferred_sizes(b.max_batch))}",
        f"  max_queue_delay_microseconds: {int(round(b.max_delay_ms * 1000))}",
        "}",
        "instance_group [",
        "  {",
        "    count: 1",
        f"    kind: {kind}",
        "  }",
        "]",
        "",
    ]
    return "\n".join(lines)


def export_model(spec: ModelSpec, out_dir: Path, cache: ArtifactCache, triton: TritonConfig) -> Exported:
    served, version = triton.mapping(spec.name, spec.version)
    version = version or "1"
    prec = spec.tensorrt.precision
    onnx_path = precision_mod.cached_onnx(spec, prec, cache) if prec != "fp32" else spec.onnx_path
    if onnx_path is None:
        raise EngineError(spec.name, f"no {prec} ONNX built yet: run 'edged engines build {spec.name}' first")
    plan = cache.latest(spec.name, PLAN_KIND)
    if plan is not None and plan.parts.get("onnx_sha256") not in (None, sha256_file(onnx_path)):
        plan = None  # a plan of an older model.onnx
    model_dir = out_dir / served
    version_dir = model_dir / version
    version_dir.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        artifact = version_dir / "model.plan"
        shutil.copyfile(plan.path, artifact)
        platform, kind = "tensorrt_plan", "KIND_GPU"
    else:
        artifact = version_dir / "model.onnx"
        shutil.copyfile(onnx_path, artifact)
        platform, kind = "onnxruntime_onnx", "KIND_AUTO"
    config = model_dir / "config.pbtxt"
    config.write_text(config_pbtxt(spec, served, platform, _output_dims(spec, onnx_path), kind))
    logs.event(log, logging.INFO, "export.model", model=spec.name, served=served, version=version,
               artifact=artifact.name)
    return Exported(spec.name, served, version, artifact, config)
