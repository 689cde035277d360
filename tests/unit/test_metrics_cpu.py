"""CPU-time metrics: edged_stage_cpu_seconds_total and edged_native_threads_cpu_seconds (~2 s in all).

Each test builds its own registry (Metrics(CollectorRegistry())), so nothing leaks between tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client import CollectorRegistry
from tinymodels import classifier_onnx, write_model

from edged.config import PipelineConfig
from edged.inference.onnxruntime import OnnxRuntimeEngine
from edged.inference.repository import load_model
from edged.metrics import Metrics, native_threads_cpu_seconds
from edged.pipeline.batcher import Request
from edged.pipeline.scheduler import ModelLane


def _burn(seconds: float) -> None:
    """Keep this thread on the CPU for ``seconds`` of its own CPU time."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def _cpu(m: Metrics, model: str, stage: str) -> float:
    return m.registry.get_sample_value("edged_stage_cpu_seconds_total", {"model": model, "stage": stage}) or 0.0


def test_add_cpu_counts_the_threads_cpu_time_not_wall_time() -> None:
    m = Metrics(CollectorRegistry())
    c0 = time.thread_time()
    _burn(0.05)
    m.add_cpu("tiny", "preprocess", c0)
    busy = _cpu(m, "tiny", "preprocess")
    assert busy >= 0.05

    c0 = time.thread_time()
    time.sleep(0.2)  # wall time, no CPU
    m.add_cpu("tiny", "delivery", c0)
    assert _cpu(m, "tiny", "delivery") < 0.05
    assert _cpu(m, "tiny", "preprocess") == busy  # stages are counted apart


def test_add_cpu_ignores_other_threads_work() -> None:
    m = Metrics(CollectorRegistry())
    other = threading.Thread(target=_burn, args=(0.2,))
    c0 = time.thread_time()
    other.start()
    other.join()  # this thread only waited
    m.add_cpu("-", "receive", c0)
    assert _cpu(m, "-", "receive") < 0.1


class _SlowEngine(OnnxRuntimeEngine):
    """The real ONNX Runtime engine, plus a known amount of CPU per batch on the calling thread."""

    per_batch = 0.02
    batches = 0

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        _burn(self.per_batch)
        self.batches += 1
        return super().infer(batch)


def test_model_lane_counts_the_batcher_threads_cpu_as_inference(tmp_path: Path) -> None:
    spec = load_model(write_model(tmp_path, max_batch=4))
    m = Metrics(CollectorRegistry())
    with _SlowEngine(spec) as engine:
        lane = ModelLane(spec, engine, PipelineConfig(), m)
        lane.batcher.start()
        done = threading.Semaphore(0)
        try:
            for x in np.random.default_rng(0).random((10, 1, 32, 32), dtype=np.float32):
                lane.batcher.submit(Request(x, lambda out, err: done.release()))
            for _ in range(10):
                assert done.acquire(timeout=30)
        finally:
            lane.batcher.stop()
            lane.pool.shutdown()
    inference = _cpu(m, spec.name, "inference")
    assert engine.batches >= 3  # 10 inputs, at most 4 per batch
    assert inference >= engine.batches * 0.02  # every batch's CPU on the batcher thread is counted
    assert _cpu(m, spec.name, "preprocess") == 0.0


def _native_threads_check() -> None:
    """The checks of the test below; run in a fresh interpreter, where the only native threads are the
    ones started here (in pytest's process, pools left by earlier tests' sessions may still be spinning)."""
    before = native_threads_cpu_seconds()
    assert before is not None  # Linux: /proc/self/task is there
    worker = threading.Thread(target=_burn, args=(0.3,))
    worker.start()
    worker.join()
    # join() returns when the Python thread is done; the OS thread may still be exiting, and would then be
    # seen as a thread Python did not start. Wait until it is gone from /proc.
    gone = time.monotonic() + 10
    while Path(f"/proc/self/task/{worker.native_id}").exists() and time.monotonic() < gone:
        time.sleep(0.001)
    after_python = native_threads_cpu_seconds()
    assert after_python is not None and after_python - before < 0.15  # a Python thread's CPU is not counted

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2  # one pool thread beside the caller
    session = ort.InferenceSession(classifier_onnx(size=256).SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((16, 1, 256, 256), dtype=np.float32)
    start = native_threads_cpu_seconds()
    for _ in range(20):
        session.run(None, {"image": x})
    end = native_threads_cpu_seconds()
    assert start is not None and end is not None and end > start  # ONNX Runtime's pool thread did work

    exported = Metrics(CollectorRegistry()).registry.get_sample_value("edged_native_threads_cpu_seconds")
    assert exported is not None and exported >= end


def test_native_threads_cpu_is_the_engine_pool_not_python_threads() -> None:
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(Path(__file__).parent)])}
    proc = subprocess.run([sys.executable, "-c", "import test_metrics_cpu as t; t._native_threads_check()"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
