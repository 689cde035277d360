from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from tinymodels import write_model

from edged.inference.onnxruntime import OnnxRuntimeEngine
from edged.inference.repository import load_model
from edged.pipeline.batcher import Batcher, Request


def _run(engine, batcher, tensors):
    results: dict[int, object] = {}
    done = threading.Event()
    lock = threading.Lock()

    def cb(i):
        def f(out, err):
            with lock:
                results[i] = err if err is not None else out["logit"]
                if len(results) == len(tensors):
                    done.set()
        return f

    for i, t in enumerate(tensors):
        batcher.submit(Request(t, cb(i)))
    assert done.wait(30)
    return results


def test_groups_requests_and_splits_outputs(tmp_path: Path) -> None:
    spec = load_model(write_model(tmp_path, max_batch=8))
    x = np.random.default_rng(0).random((20, 1, 32, 32), dtype=np.float32)
    with OnnxRuntimeEngine(spec) as engine:
        want = engine.infer(x[:8])["logit"]
        b = Batcher(engine, 8, max_delay_ms=200, queue_size=64)
        b.start()
        got = _run(engine, b, list(x))
        b.stop()
    for i in range(8):
        np.testing.assert_allclose(got[i], want[i : i + 1], rtol=1e-5, atol=1e-6)
    assert sum(n * c for n, c in b.batch_sizes.items()) == 20
    assert max(b.batch_sizes) > 1  # requests queued together were batched
    assert max(b.batch_sizes) <= 8


def test_one_bad_input_fails_only_itself(tmp_path: Path) -> None:
    spec = load_model(write_model(tmp_path, max_batch=8))
    good = np.zeros((1, 32, 32), np.float32)
    bad = np.zeros((1, 16, 16), np.float32)  # wrong shape: the stacked batch fails, then each runs alone
    with OnnxRuntimeEngine(spec) as engine:
        b = Batcher(engine, 8, max_delay_ms=100, queue_size=64)
        b.start()
        results = _run(engine, b, [good, good, bad, good])
        b.stop()
    assert isinstance(results[2], Exception)
    assert all(isinstance(results[i], np.ndarray) for i in (0, 1, 3))


class _SlowEngine(OnnxRuntimeEngine):
    """A real ONNX Runtime engine that records how many batches run at once (as a remote server would)."""

    max_in_flight = 3

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.running = 0
        self.most = 0
        self.entered = 0
        self.gate = threading.Barrier(3, timeout=10)
        self.lock = threading.Lock()

    def infer(self, batch):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.entered += 1
            first = self.entered <= 3
        try:
            if first:
                try:
                    self.gate.wait()  # the first batches meet here only if three threads run them together
                except threading.BrokenBarrierError:
                    pass
            return super().infer(batch)
        finally:
            with self.lock:
                self.running -= 1


def test_engine_taking_several_batches_gets_that_many_threads(tmp_path: Path) -> None:
    spec = load_model(write_model(tmp_path, max_batch=2))
    x = np.random.default_rng(1).random((12, 1, 32, 32), dtype=np.float32)
    with _SlowEngine(spec) as engine:
        want = OnnxRuntimeEngine.infer(engine, x[:2])["logit"]
        b = Batcher(engine, 2, max_delay_ms=0, queue_size=64)
        b.start()
        got = _run(engine, b, list(x))
        b.stop()
    assert engine.most == 3
    assert sum(n * c for n, c in b.batch_sizes.items()) == 12
    np.testing.assert_allclose(got[0], want[0:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1:2], rtol=1e-5, atol=1e-6)
