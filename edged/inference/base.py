"""The one engine interface every backend implements (activate / input spec / infer / deactivate).

As in Triton and Polygraphy, building an engine (inference/build.py) is separate from running it. An
engine is created inactive; :meth:`Engine.activate` allocates everything it needs once (sessions,
pinned and device buffers for ``max_batch``, streams); :meth:`Engine.infer` runs one batch of at most
``max_batch`` inputs and returns one array per output, first axis the batch; :meth:`Engine.deactivate`
frees it all. Engines are used as context managers in tools and tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from edged.errors import EngineError
from edged.inference.repository import ModelSpec


@dataclass(frozen=True)
class TensorSpec:
    """An input's name, shape at max batch, and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


class Engine(ABC):
    #: Short fixed name, used in logs and metric labels: "onnxruntime", "tensorrt", "triton".
    backend: str = ""
    #: Batches the batcher may have in flight at once (a remote server takes several; local engines one).
    max_in_flight: int = 1

    def __init__(self, spec: ModelSpec, precision: str = "fp32") -> None:
        self.spec = spec
        self.precision = precision
        self.max_batch = spec.batching.max_batch
        self.active = False

    @property
    def name(self) -> str:
        return self.spec.name

    def input_spec(self) -> TensorSpec:
        return TensorSpec(self.spec.input.name, self.spec.input_shape(self.max_batch), np.dtype(self.spec.input.dtype))

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """Validate a batch against the input spec; returns it as a C-contiguous array of the right dtype."""
        if not self.active:
            raise EngineError(self.name, "infer() called on an inactive engine (call activate() first)")
        want = self.spec.input_shape(batch.shape[0] if batch.ndim else 0)
        if batch.ndim != len(want) or tuple(batch.shape[1:]) != want[1:]:
            raise EngineError(self.name, f"input shape {tuple(batch.shape)} does not match {('N', *want[1:])}",
                              tensor=self.spec.input.name)
        if not 1 <= batch.shape[0] <= self.max_batch:
            raise EngineError(self.name, f"batch of {batch.shape[0]} outside 1..{self.max_batch}",
                              tensor=self.spec.input.name)
        return np.ascontiguousarray(batch, dtype=self.spec.input.dtype)

    def health(self) -> str | None:
        """For /readyz: None when the engine can run batches now, else why not (remote engines)."""
        return None if self.active else "inactive"

    @abstractmethod
    def activate(self) -> None: ...

    @abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def deactivate(self) -> None: ...

    def __enter__(self) -> "Engine":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()
