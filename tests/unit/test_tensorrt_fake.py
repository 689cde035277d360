"""The TensorRT backend and builder driven through success and failure paths with the fakes in tests/fakes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
from tinymodels import write_model

from edged.config import EnginesConfig
from edged.errors import BackendUnavailableError, EngineBuildError, EngineError
from edged.inference.build import PLAN_KIND, PlanBuilder, build_model
from edged.inference.cache import ArtifactCache
from edged.inference.onnxruntime import OnnxRuntimeEngine
from edged.inference.repository import load_model
from edged.inference.select import resolve_backend, start_engine
from edged.inference.tensorrt import TensorRTEngine

FAKES = Path(__file__).resolve().parents[1] / "fakes"


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    monkeypatch.syspath_prepend(str(FAKES))
    for mod in ("tensorrt", "pycuda", "pycuda.driver"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    import pycuda.driver as cuda
    import tensorrt as trt

    assert trt.__version__.endswith("+fake")
    yield trt, cuda
    trt.FAIL_BUILD = trt.FAIL_EXECUTE = False
    cuda.DEVICE_COUNT = 1
    for mod in ("tensorrt", "pycuda", "pycuda.driver"):
        sys.modules.pop(mod, None)


@pytest.fixture
def spec(tmp_path: Path):
    return load_model(write_model(tmp_path / "engines", max_batch=8))


def test_without_tensorrt_auto_falls_back_to_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    backend, reason, plans = resolve_backend("auto")
    assert backend == "onnxruntime" and plans is None and "tensorrt is not installed" in reason
    with pytest.raises(BackendUnavailableError):
        resolve_backend("tensorrt")


def test_auto_picks_tensorrt_when_present(fake_gpu) -> None:
    backend, reason, plans = resolve_backend("auto")
    assert backend == "tensorrt" and "Fake GPU 9000" in reason and "sm 8.9" in reason
    assert plans is not None
    plans.close()


def test_no_gpu_means_onnxruntime(fake_gpu) -> None:
    fake_gpu[1].DEVICE_COUNT = 0
    backend, reason, _ = resolve_backend("auto")
    assert backend == "onnxruntime" and "no CUDA device" in reason


def test_build_then_run_matches_onnxruntime(fake_gpu, spec, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    plans = PlanBuilder()
    result = build_model(spec, cache, plans=plans)
    assert result.plan is not None and result.plan.is_file() and result.note == "plan built"
    assert cache.state(spec.name, PLAN_KIND, plans.key(spec, spec.onnx_path, "fp32")) == "built"
    assert any(p.name.startswith("timing-") for p in cache.root.iterdir())
    again = build_model(spec, cache, plans=plans)
    assert again.note == "plan up to date" and again.plan == result.plan

    x = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)
    with OnnxRuntimeEngine(spec) as ref:
        want = ref.infer(x)["logit"]
    with TensorRTEngine(spec, result.plan) as engine:
        for n in (1, 3, 8):  # every batch size in the profile, buffers reused
            np.testing.assert_allclose(engine.infer(x[:n])["logit"], want[:n], rtol=1e-5, atol=1e-6)
        with pytest.raises(EngineError, match="outside 1..8"):
            engine.infer(np.zeros((9, 1, 32, 32), np.float32))
    plans.close()


def test_parser_errors_are_all_reported(fake_gpu, spec, tmp_path: Path) -> None:
    model = onnx.load(str(spec.onnx_path))
    model.graph.node[1].op_type = "UnsupportedRelu"
    model.graph.node[2].op_type = "UnsupportedPool"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    plans = PlanBuilder()
    with pytest.raises(EngineBuildError) as exc:
        plans.ensure(spec, bad, "fp32", ArtifactCache(tmp_path / "cache"))
    assert len(exc.value.details) == 2
    assert "UnsupportedRelu" in str(exc.value) and "UnsupportedPool" in str(exc.value)
    plans.close()


def test_build_failure_is_an_error_not_a_crash(fake_gpu, spec, tmp_path: Path) -> None:
    fake_gpu[0].FAIL_BUILD = True
    cache = ArtifactCache(tmp_path / "cache")
    plans = PlanBuilder()
    with pytest.raises(EngineBuildError, match="build failed") as exc:
        plans.ensure(spec, spec.onnx_path, "fp32", cache)
    assert any("requested by the test" in d for d in exc.value.details)
    assert cache.latest(spec.name, PLAN_KIND) is None  # nothing half-written
    plans.close()


def test_changed_key_rebuilds_and_logs(fake_gpu, spec, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    plans = PlanBuilder()
    first, built = plans.ensure(spec, spec.onnx_path, "fp32", cache)
    assert built
    fake_gpu[0].__version__ = "10.100.0+fake"  # TensorRT upgraded
    caplog.set_level("WARNING")
    second, built = plans.ensure(spec, spec.onnx_path, "fp32", cache)
    assert built and second.path != first.path
    assert any("plan.rebuild" in r.getMessage() for r in caplog.records)
    assert any("tensorrt" in str(getattr(r, "fields", {}).get("changed", "")) for r in caplog.records)
    plans.close()


def test_corrupt_plan_is_rebuilt_at_start(fake_gpu, spec, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    plans = PlanBuilder()
    entry, _ = plans.ensure(spec, spec.onnx_path, "fp32", cache)
    entry.path.write_bytes(b"garbage from another TensorRT")
    engine = start_engine(spec, "tensorrt", cache, EnginesConfig(), plans)
    try:
        assert engine.backend == "tensorrt" and engine.active
        assert engine.infer(np.zeros((2, 1, 32, 32), np.float32))["logit"].shape == (2, 1)
    finally:
        engine.deactivate()
        plans.close()


def test_execute_failure_and_input_shape_outside_profile(fake_gpu, spec, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    plans = PlanBuilder()
    entry, _ = plans.ensure(spec, spec.onnx_path, "fp32", cache)
    plans.close()
    fake_gpu[0].FAIL_EXECUTE = True
    with TensorRTEngine(spec, entry.path) as engine:
        with pytest.raises(EngineError, match="execute_async_v3 failed"):
            engine.infer(np.zeros((1, 1, 32, 32), np.float32))
    # A plan built for max_batch 8 does not serve a model now declaring 16.
    d = spec.directory
    (d / "model.toml").write_text((d / "model.toml").read_text().replace("max_batch = 8", "max_batch = 16"))
    with pytest.raises(EngineError, match="does not accept shape"):
        TensorRTEngine(load_model(d), entry.path).activate()


def test_plan_outputs_checked_against_model_toml(fake_gpu, spec, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    plans = PlanBuilder()
    entry, _ = plans.ensure(spec, spec.onnx_path, "fp32", cache)
    plans.close()
    d = spec.directory
    (d / "model.toml").write_text((d / "model.toml").read_text().replace('name = "logit"', 'name = "prob"'))
    with pytest.raises(EngineError) as exc:
        TensorRTEngine(load_model(d), entry.path).activate()
    assert exc.value.tensor == "prob"


def test_context_is_released_per_call(fake_gpu, spec, tmp_path: Path) -> None:
    """No pycuda.autoinit: the context is pushed around each call and popped after, on any thread."""
    import threading

    cuda = fake_gpu[1]
    cache = ArtifactCache(tmp_path / "cache")
    plans = PlanBuilder()
    entry, _ = plans.ensure(spec, spec.onnx_path, "fp32", cache)
    plans.close()
    engine = TensorRTEngine(spec, entry.path)
    engine.activate()
    assert cuda._stack() == []
    out: list = []
    t = threading.Thread(target=lambda: out.append(engine.infer(np.ones((2, 1, 32, 32), np.float32))))
    t.start()
    t.join()
    assert out and out[0]["logit"].shape == (2, 1)
    engine.deactivate()
    assert cuda.allocations == {} or all(len(a.buf) == 0 for a in cuda.allocations.values())
