"""The ONNX Runtime backend on the CPU: edged's embedded default, and the reference for verify."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import EngineError
from edged.inference.base import Engine
from edged.inference.repository import ModelSpec

#: ONNX Runtime's type strings for the dtypes model.toml may name.
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec, *, onnx_path: Path | None = None, precision: str = "fp32",
                 intra_op_threads: int = 0, inter_op_threads: int = 1, spin_wait: bool = False) -> None:
        super().__init__(spec, precision)
        self.onnx_path = onnx_path or spec.onnx_path
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.spin_wait = spin_wait
        self._session: Any = None
        self._output_names: list[str] = []

    def activate(self) -> None:
        if self.active:
            return
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        spin = "1" if self.spin_wait else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(self.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(self.name, f"cannot load {self.onnx_path}: {exc}") from None
        self._check_io(session)
        self._session = session
        self._output_names = [o.name for o in self.spec.outputs]
        self.active = True

    def _check_io(self, session: Any) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        want = self.spec.input
        if want.name not in inputs or len(inputs) != 1:
            raise EngineError(self.name, f"model.onnx inputs are {sorted(inputs)}, model.toml says [{want.name!r}]",
                              tensor=want.name)
        got = inputs[want.name]
        if _ORT_TYPES.get(got.type) != np.dtype(want.dtype):
            raise EngineError(self.name, f"model.onnx has {got.type}, model.toml says {want.dtype}", tensor=want.name)
        dims = list(got.shape)
        if len(dims) != len(want.shape) or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], want.shape[1:])):
            raise EngineError(self.name, f"model.onnx shape {dims} does not match model.toml {want.shape}",
                              tensor=want.name)
        if isinstance(dims[0], int) and dims[0] != -1 and self.max_batch > 1:
            raise EngineError(self.name, f"model.onnx has a fixed batch of {dims[0]}; a dynamic batch axis is needed",
                              tensor=want.name)
        outputs = {o.name for o in session.get_outputs()}
        for out in self.spec.outputs:
            if out.name not in outputs:
                raise EngineError(self.name, f"model.onnx has no such output (it has {sorted(outputs)})",
                                  tensor=out.name)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = self.check_batch(batch)
        results = self._session.run(self._output_names, {self.spec.input.name: x})
        return {name: np.asarray(r, dtype=np.float32) for name, r in zip(self._output_names, results)}

    def deactivate(self) -> None:
        self._session = None
        self.active = False
