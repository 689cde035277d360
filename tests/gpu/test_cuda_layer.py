"""edged's pinned-buffer and stream layer (inference/cuda.py) on a real GPU with real pycuda."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edged.errors import EngineError
from edged.inference.cuda import Gpu, PinnedBuffer, checked

pytestmark = pytest.mark.gpu

SCALE_KERNEL = """
__global__ void scale(const float *x, float *y, float k, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = k * x[i];
}
"""


def test_device_info(cuda) -> None:
    gpu = Gpu(cuda)
    info = gpu.info()
    assert info.name and "." in info.compute_capability and int(info.driver_version) > 0
    gpu.release()


def test_pinned_round_trip_through_a_kernel_in_stream_order(cuda) -> None:
    """upload -> kernel -> download queued on one stream give the right answer after synchronize,
    for the full max batch and for a partial batch, with buffers allocated once."""
    from pycuda.compiler import SourceModule  # type: ignore[import-not-found]

    gpu = Gpu(cuda)
    max_batch, shape = 16, (1, 64, 64)
    with gpu.active():
        module = SourceModule(SCALE_KERNEL)
        scale = module.get_function("scale")
        x = PinnedBuffer(cuda, "x", (max_batch, *shape), np.dtype(np.float32))
        y = PinnedBuffer(cuda, "y", (max_batch, *shape), np.dtype(np.float32))
        stream = cuda.Stream()
        rng = np.random.default_rng(0)
        for rows in (max_batch, 3, 1, max_batch):
            data = rng.random((rows, *shape), dtype=np.float32)
            x.host[:rows] = data
            y.host[:] = -1
            x.upload(rows, stream)
            n = rows * int(np.prod(shape))
            scale(x.device, y.device, np.float32(2.5), np.int32(n), block=(256, 1, 1),
                  grid=((n + 255) // 256, 1), stream=stream)
            y.download(rows, stream)
            stream.synchronize()
            np.testing.assert_allclose(y.host[:rows], 2.5 * data, rtol=1e-6)
            if rows < max_batch:
                assert (y.host[rows:] == -1).all()  # only the batch's rows moved
        x.free()
        y.free()
    gpu.release()


def test_context_pushed_per_call_from_any_thread(cuda) -> None:
    gpu = Gpu(cuda)
    with gpu.active():
        buf = PinnedBuffer(cuda, "b", (4, 8), np.dtype(np.float32))
        stream = cuda.Stream()
    results: list[np.ndarray] = []

    def worker() -> None:
        with gpu.active():
            buf.host[:] = 7.0
            buf.upload(4, stream)
            buf.host[:] = 0.0
            stream.synchronize()
            buf.download(4, stream)
            stream.synchronize()
            results.append(np.array(buf.host))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert results and (results[0] == 7.0).all()
    with gpu.active():
        buf.free()
    gpu.release()


def test_cuda_errors_become_engine_errors(cuda) -> None:
    gpu = Gpu(cuda)
    with gpu.active():
        with pytest.raises(EngineError, match="CUDA allocation failed"):
            with checked("m", "allocation", cuda):
                cuda.mem_alloc(1 << 60)  # far beyond any GPU
    gpu.release()
