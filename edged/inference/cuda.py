"""The CUDA layer of the TensorRT backend, on pycuda: device, pinned buffers, one stream per engine.

pycuda is imported lazily (edged installs and runs without it) and never through ``pycuda.autoinit``:
the device's primary context is retained explicitly and pushed around every use, so any thread (the
batcher's, a CLI's) can drive an engine. Every pycuda call that fails raises ``pycuda.driver.Error``;
:func:`checked` turns that into an :class:`~edged.errors.EngineError` naming the operation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from edged.errors import BackendUnavailableError, EngineError


def load_pycuda() -> Any:
    """``pycuda.driver``, initialised; BackendUnavailableError when pycuda or a GPU is missing."""
    try:
        import pycuda.driver as cuda  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BackendUnavailableError("(all)", f"pycuda is not installed ({exc}); install edged[gpu]") from None
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:
        raise BackendUnavailableError("(all)", f"CUDA driver unavailable: {exc}") from None
    if count < 1:
        raise BackendUnavailableError("(all)", "no CUDA device found")
    return cuda


@contextlib.contextmanager
def checked(model: str, operation: str, cuda: Any) -> Iterator[None]:
    """Turn a pycuda failure inside the block into an EngineError naming ``operation``."""
    try:
        yield
    except cuda.Error as exc:
        raise EngineError(model, f"CUDA {operation} failed: {exc}") from None


@dataclass(frozen=True)
class GpuInfo:
    """What a built plan depends on: GPU name, compute capability, CUDA driver version."""

    name: str
    compute_capability: str
    driver_version: str


class Gpu:
    """One CUDA device and its retained primary context."""

    def __init__(self, cuda: Any, index: int = 0) -> None:
        self.cuda = cuda
        self.device = cuda.Device(index)
        self._context = self.device.retain_primary_context()

    def info(self) -> GpuInfo:
        major, minor = self.device.compute_capability()
        return GpuInfo(str(self.device.name()), f"{major}.{minor}", str(self.cuda.get_driver_version()))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the device's context current on this thread for the block."""
        self._context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def release(self) -> None:
        if self._context is not None:
            self._context.detach()
            self._context = None


class PinnedBuffer:
    """A tensor's page-locked host array and device allocation, both sized for max batch, allocated once.

    Transfers move only the first ``rows`` entries of the batch axis, asynchronously on a stream.
    """

    def __init__(self, cuda: Any, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.cuda = cuda
        self.name = name
        self.shape = shape
        self.host = cuda.pagelocked_empty(shape, dtype)
        self.device = cuda.mem_alloc(max(self.host.nbytes, 1))
        self.row_bytes = self.host.nbytes // shape[0] if shape[0] else 0

    @property
    def address(self) -> int:
        return int(self.device)

    def upload(self, rows: int, stream: Any) -> None:
        self.cuda.memcpy_htod_async(self.device, self.host[:rows], stream)

    def download(self, rows: int, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(self.host[:rows], self.device, stream)

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
            self.device = None
        self.host = None
