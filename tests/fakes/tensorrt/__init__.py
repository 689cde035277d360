"""Fake ``tensorrt`` (10.x API subset edged uses). A "plan" is a JSON header plus the ONNX bytes;
execution runs that ONNX with ONNX Runtime on the fake device buffers, in stream order."""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from pycuda import driver as _cuda  # the fake: shared device memory and streams

__version__ = "10.99.0+fake"
FAIL_BUILD = False
FAIL_EXECUTE = False
_MAGIC = b"FAKEPLAN1\n"


class ILogger:
    class Severity(IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity: "ILogger.Severity", msg: str) -> None:  # pragma: no cover - overridden
        pass


Logger = ILogger


class NetworkDefinitionCreationFlag(IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class MemoryPoolType(IntEnum):
    WORKSPACE = 0


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32}
_FROM_ONNX = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF}


def nptype(dtype: DataType) -> Any:
    return _NP[dtype]


class _ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node -1 (parse): INVALID_GRAPH: {self._desc}"


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        self.onnx: bytes | None = None
        self.inputs: dict[str, tuple[DataType, list[int]]] = {}
        self.outputs: dict[str, tuple[DataType, list[int]]] = {}


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self.network = network
        self.logger = logger
        self.errors: list[_ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> _ParserError:
        return self.errors[i]

    def parse(self, data: bytes, path: str | None = None) -> bool:
        self.errors = []
        try:
            model = onnx.load_from_string(data)
        except Exception as exc:
            self.errors.append(_ParserError(f"cannot parse ONNX: {exc}"))
            return False
        for node in model.graph.node:  # like TensorRT, report every unsupported node, not just the first
            if node.op_type.startswith("Unsupported"):
                self.errors.append(_ParserError(f"no importer registered for op: {node.op_type}"))
        if self.errors:
            return False
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            self.errors.append(_ParserError(f"invalid model: {exc}"))
            return False

        def info(v: Any) -> tuple[DataType, list[int]]:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            return _FROM_ONNX[t.elem_type], dims

        inits = {i.name for i in model.graph.initializer}
        self.network.inputs = {v.name: info(v) for v in model.graph.input if v.name not in inits}
        self.network.outputs = {v.name: info(v) for v in model.graph.output}
        self.network.onnx = data
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        mins, opts, maxs = tuple(min), tuple(opt), tuple(max)
        if not all(a <= b <= c for a, b, c in zip(mins, opts, maxs)):
            raise ValueError("profile shapes must satisfy min <= opt <= max")
        self.shapes[name] = (mins, opts, maxs)


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data or b"FAKETC"

    def serialize(self) -> bytes:
        return self.data + b"."


class IBuilderConfig:
    def __init__(self) -> None:
        self.workspace = 0
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.workspace = size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> ITimingCache:
        return ITimingCache(bytes(data))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not cache.data.startswith(b"FAKETC"):
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        return self.timing_cache or ITimingCache(b"")


class Builder:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        def fail(msg: str) -> None:
            self.logger.log(ILogger.Severity.ERROR, msg)

        if FAIL_BUILD:
            fail("[fake] builder failure requested by the test")
            return None
        if not network.strongly_typed:
            fail("[fake] edged must build strongly typed networks")
            return None
        if network.onnx is None or not config.profiles:
            fail("Network has dynamic or shape inputs, but no optimization profile has been defined.")
            return None
        profile = config.profiles[0]
        for name in network.inputs:
            if name not in profile.shapes:
                fail(f"no profile shape for input {name}")
                return None
        header = {"inputs": {k: [int(v[0]), v[1]] for k, v in network.inputs.items()},
                  "outputs": {k: [int(v[0]), v[1]] for k, v in network.outputs.items()},
                  "profile": {k: [list(s) for s in v] for k, v in profile.shapes.items()}}
        return _MAGIC + json.dumps(header).encode() + b"\n" + network.onnx


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> "ICudaEngine | None":
        if not data.startswith(_MAGIC):
            self.logger.log(ILogger.Severity.ERROR, "Serialization assertion failed: magic tag mismatch")
            return None
        head, _, body = data[len(_MAGIC):].partition(b"\n")
        return ICudaEngine(json.loads(head), body)


class ICudaEngine:
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes) -> None:
        self.header = header
        self.onnx = onnx_bytes
        self.names = list(header["inputs"]) + list(header["outputs"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        if name in self.header["inputs"]:
            return TensorIOMode.INPUT
        return TensorIOMode.OUTPUT if name in self.header["outputs"] else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        table = self.header["inputs"] if name in self.header["inputs"] else self.header["outputs"]
        return DataType(table[name][0])

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.session = ort.InferenceSession(engine.onnx, providers=["CPUExecutionProvider"])
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        prof = self.engine.header["profile"].get(name)
        shape = tuple(int(d) for d in shape)
        if prof is None or len(shape) != len(prof[0]):
            return False
        if not all(lo <= d <= hi for lo, d, hi in zip(prof[0], shape, prof[2])):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.header["inputs"]:
            return self.shapes.get(name, tuple(self.engine.header["inputs"][name][1]))
        feeds = {n: np.zeros(s, nptype(self.engine.get_tensor_dtype(n))) for n, s in self.shapes.items()}
        return tuple(self.session.run([name], feeds)[0].shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.names:
            return False
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if FAIL_EXECUTE:
            return False
        stream = _cuda.streams.get(stream_handle)
        if stream is None or any(n not in self.addresses for n in self.engine.names):
            return False
        inputs = {n: self.shapes[n] for n in self.engine.header["inputs"]}

        def op() -> None:
            feeds = {}
            for n, shape in inputs.items():
                dt = np.dtype(nptype(self.engine.get_tensor_dtype(n)))
                count = int(np.prod(shape))
                raw = bytes(_cuda.allocations[self.addresses[n]].buf[: count * dt.itemsize])
                feeds[n] = np.frombuffer(raw, dtype=dt).reshape(shape)
            names = list(self.engine.header["outputs"])
            for n, value in zip(names, self.session.run(names, feeds)):
                data = np.ascontiguousarray(value).tobytes()
                _cuda.allocations[self.addresses[n]].buf[: len(data)] = data

        stream.enqueue(op)
        return True
