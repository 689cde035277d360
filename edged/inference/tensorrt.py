"""The TensorRT backend: runs a serialized plan built by inference/build.py.

Activation deserializes the plan, checks its tensors against model.toml, allocates pinned host and
device buffers for ``max_batch`` once, binds their addresses and creates the engine's one CUDA stream.
Each batch: copy in (async), ``set_input_shape``, ``execute_async_v3``, copy out (async), synchronize.
tensorrt and pycuda are imported only here and in build.py, lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import BackendUnavailableError, EngineError
from edged.inference.base import Engine
from edged.inference.cuda import Gpu, PinnedBuffer, checked, load_pycuda
from edged.inference.repository import ModelSpec

log = logging.getLogger("edged.tensorrt")


def load_tensorrt() -> Any:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BackendUnavailableError("(all)", f"tensorrt is not installed ({exc}); install edged[gpu]") from None
    return trt


class TrtLogger:
    """Collects TensorRT's messages (warnings and errors) so failures can be reported whole."""

    def __init__(self, trt: Any) -> None:
        self.messages: list[str] = []
        parent = trt.ILogger
        keep = {parent.Severity.INTERNAL_ERROR, parent.Severity.ERROR, parent.Severity.WARNING}

        class _Logger(parent):  # type: ignore[misc, valid-type]
            def __init__(inner) -> None:
                parent.__init__(inner)

            def log(inner, severity: Any, msg: str) -> None:
                if severity in keep:
                    self.messages.append(str(msg))
                    log.debug("tensorrt: %s", msg)

        self.trt_logger = _Logger()


class PlanDeserializeError(EngineError):
    """The cached plan did not deserialize (other TensorRT, corrupt file): it must be rebuilt."""


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def __init__(self, spec: ModelSpec, plan_path: Path, *, precision: str = "fp32", gpu_index: int = 0) -> None:
        super().__init__(spec, precision)
        self.plan_path = plan_path
        self.gpu_index = gpu_index
        self._trt: Any = None
        self._cuda: Any = None
        self._gpu: Gpu | None = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._input: PinnedBuffer | None = None
        self._outputs: dict[str, PinnedBuffer] = {}

    def activate(self) -> None:
        if self.active:
            return
        trt = self._trt = load_tensorrt()
        cuda = self._cuda = load_pycuda()
        self._gpu = Gpu(cuda, self.gpu_index)
        try:
            with self._gpu.active():
                self._activate(trt, cuda)
        except BaseException:
            self._release()
            raise
        self.active = True

    def _activate(self, trt: Any, cuda: Any) -> None:
        logger = TrtLogger(trt)
        runtime = trt.Runtime(logger.trt_logger)
        engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            raise PlanDeserializeError(self.name, "plan did not deserialize: " + "; ".join(logger.messages[-3:]))
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        want_in = self.spec.input.name
        if inputs != [want_in]:
            raise EngineError(self.name, f"plan inputs are {inputs}, model.toml says [{want_in!r}]", tensor=want_in)
        in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(want_in)))
        if in_dtype != np.dtype(self.spec.input.dtype):
            raise EngineError(self.name, f"plan input is {in_dtype}, model.toml says {self.spec.input.dtype}",
                              tensor=want_in)
        context = engine.create_execution_context()
        if context is None:
            raise EngineError(self.name, "could not create an execution context: " + "; ".join(logger.messages[-3:]))
        self._context = context
        max_shape = self.spec.input_shape(self.max_batch)
        if not context.set_input_shape(want_in, max_shape):
            raise EngineError(self.name, f"plan does not accept shape {max_shape} (built for another max_batch?)",
                              tensor=want_in)
        with checked(self.name, "buffer allocation", cuda):
            self._input = PinnedBuffer(cuda, want_in, max_shape, in_dtype)
            for out in self.spec.outputs:
                if out.name not in names or out.name in inputs:
                    raise EngineError(self.name, f"plan has no such output (it has {names})", tensor=out.name)
                shape = tuple(int(d) for d in context.get_tensor_shape(out.name))
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(out.name)))
                self._outputs[out.name] = PinnedBuffer(cuda, out.name, shape, dtype)
            self._stream = cuda.Stream()
        for buf in (self._input, *self._outputs.values()):
            if not context.set_tensor_address(buf.name, buf.address):
                raise EngineError(self.name, "set_tensor_address failed", tensor=buf.name)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = self.check_batch(batch)
        n = x.shape[0]
        assert self._gpu is not None and self._input is not None
        cuda = self._cuda
        with self._gpu.active(), checked(self.name, "inference", cuda):
            self._input.host[:n] = x
            self._input.upload(n, self._stream)
            if not self._context.set_input_shape(self._input.name, x.shape):
                raise EngineError(self.name, f"set_input_shape{tuple(x.shape)} refused", tensor=self._input.name)
            if not self._context.execute_async_v3(self._stream.handle):
                raise EngineError(self.name, "execute_async_v3 failed")
            for buf in self._outputs.values():
                buf.download(n, self._stream)
            self._stream.synchronize()
            return {name: np.array(buf.host[:n], dtype=np.float32) for name, buf in self._outputs.items()}

    def _release(self) -> None:
        if self._gpu is not None:
            with self._gpu.active():
                for buf in (self._input, *self._outputs.values()):
                    if buf is not None:
                        buf.free()
                self._context = None
                self._engine = None
                self._stream = None
            self._gpu.release()
        self._input = None
        self._outputs = {}
        self._gpu = None

    def deactivate(self) -> None:
        self._release()
        self.active = False
