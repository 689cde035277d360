"""Operator tools over engines: verify against the CPU reference, and bench throughput and latency."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edged.inference.base import Engine
from edged.inference.repository import ModelSpec
from edged.pipeline.postprocess import activate, dice
from edged.pipeline.preprocess import prepare_slice
from edged.synthetic import chest_phantom

#: How far a backend/precision may stray from ONNX Runtime fp32 on the CPU: largest absolute difference
#: of a probability (classification), smallest Dice of thresholded masks (segmentation).
TOLERANCE = {
    "fp32": {"max_abs_prob": 1e-4, "min_dice": 0.999},
    "fp16": {"max_abs_prob": 1e-2, "min_dice": 0.98},
    "int8": {"max_abs_prob": 5e-2, "min_dice": 0.95},
}


def reference_batch(spec: ModelSpec, n: int, seed: int = 1234) -> np.ndarray:
    """``n`` synthetic chest phantoms (half with nodules), preprocessed as at inference."""
    rng = np.random.default_rng(seed)
    pre = spec.preprocess.spec()
    planes = []
    for i in range(n):
        hu, _ = chest_phantom(rng, nodules=i % 2 + (i % 3 == 0))
        stored = np.clip(hu + 1024, 0, 65535).astype(np.uint16)
        planes.append(prepare_slice(stored, pre, slope=1.0, intercept=-1024.0))
    return np.stack(planes)[:, None].astype(np.float32)


@dataclass(frozen=True)
class Comparison:
    output: str
    metric: str
    value: float
    limit: float
    ok: bool


def compare(spec: ModelSpec, candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray],
            precision: str) -> list[Comparison]:
    """Compare two engines' outputs for the same batch within :data:`TOLERANCE` for ``precision``."""
    tol = TOLERANCE[precision]
    results = []
    for out in spec.outputs:
        p = activate(candidate[out.name], out.activation)
        r = activate(reference[out.name], out.activation)
        if spec.task == "segmentation":
            worst = 1.0
            for label in out.labels:
                for i in range(p.shape[0]):
                    worst = min(worst, dice(p[i, label.channel] >= label.threshold, r[i, label.channel] >= label.threshold))
            results.append(Comparison(out.name, "min Dice", worst, tol["min_dice"], worst >= tol["min_dice"]))
        else:
            diff = float(np.max(np.abs(p - r))) if p.size else 0.0
            results.append(Comparison(out.name, "max |Δp|", diff, tol["max_abs_prob"], diff <= tol["max_abs_prob"]))
    return results


def run_batches(engine: Engine, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Run a batch of any size through an engine in chunks of at most max_batch."""
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(batch), engine.max_batch):
        for name, arr in engine.infer(batch[i : i + engine.max_batch]).items():
            parts.setdefault(name, []).append(arr)
    return {k: np.concatenate(v) for k, v in parts.items()}


@dataclass(frozen=True)
class BenchResult:
    batch: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    runs: int


def bench(engine: Engine, batch_size: int, seconds: float, warmup: int = 3) -> BenchResult:
    """Run ``batch_size`` inputs repeatedly for about ``seconds``; latency is per batch."""
    x = reference_batch(engine.spec, min(batch_size, 8))
    x = np.concatenate([x] * (batch_size // len(x) + 1))[:batch_size]
    for _ in range(warmup):
        engine.infer(x)
    latencies = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        engine.infer(x)
        latencies.append(time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds and len(latencies) >= 5:
            break
    total = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return BenchResult(batch_size, batch_size * len(latencies) / total, float(np.percentile(ms, 50)),
                       float(np.percentile(ms, 99)), len(latencies))
