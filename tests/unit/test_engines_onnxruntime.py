from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tinymodels import write_model

from edged.errors import EngineError
from edged.inference.onnxruntime import OnnxRuntimeEngine
from edged.inference.repository import load_model


@pytest.fixture
def cls_spec(tmp_path: Path):
    return load_model(write_model(tmp_path, max_batch=8))


def test_equals_a_direct_onnxruntime_session(cls_spec) -> None:
    x = np.random.default_rng(0).random((5, 1, 32, 32), dtype=np.float32)
    direct = ort.InferenceSession(str(cls_spec.onnx_path), providers=["CPUExecutionProvider"])
    want = direct.run(["logit"], {"image": x})[0]
    with OnnxRuntimeEngine(cls_spec) as engine:
        got = engine.infer(x)["logit"]
    np.testing.assert_array_equal(got, want)


def test_batch_of_n_equals_n_single_runs(cls_spec) -> None:
    x = np.random.default_rng(1).random((8, 1, 32, 32), dtype=np.float32)
    with OnnxRuntimeEngine(cls_spec) as engine:
        batched = engine.infer(x)["logit"]
        single = np.concatenate([engine.infer(x[i : i + 1])["logit"] for i in range(len(x))])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def test_input_checks(cls_spec) -> None:
    engine = OnnxRuntimeEngine(cls_spec)
    with pytest.raises(EngineError, match="inactive"):
        engine.infer(np.zeros((1, 1, 32, 32), np.float32))
    engine.activate()
    with pytest.raises(EngineError, match="does not match") as exc:
        engine.infer(np.zeros((1, 1, 16, 16), np.float32))
    assert exc.value.tensor == "image"
    with pytest.raises(EngineError, match="outside 1..8"):
        engine.infer(np.zeros((9, 1, 32, 32), np.float32))
    engine.deactivate()
    assert not engine.active


def test_model_toml_and_onnx_disagree(tmp_path: Path) -> None:
    d = write_model(tmp_path)
    toml = (d / "model.toml").read_text().replace('name = "logit"', 'name = "probability"')
    (d / "model.toml").write_text(toml)
    with pytest.raises(EngineError) as exc:
        OnnxRuntimeEngine(load_model(d)).activate()
    assert exc.value.tensor == "probability" and "no such output" in exc.value.reason


def test_input_name_mismatch(tmp_path: Path) -> None:
    d = write_model(tmp_path)
    (d / "model.toml").write_text((d / "model.toml").read_text().replace('name = "image"', 'name = "pixels"'))
    with pytest.raises(EngineError) as exc:
        OnnxRuntimeEngine(load_model(d)).activate()
    assert exc.value.tensor == "pixels"


def _spinning(engine: OnnxRuntimeEngine) -> tuple[str, str]:
    opts = engine._session.get_session_options()
    return (opts.get_session_config_entry("session.intra_op.allow_spinning"),
            opts.get_session_config_entry("session.inter_op.allow_spinning"))


def test_pool_threads_sleep_while_waiting_unless_spin_wait_is_set(cls_spec, tmp_path: Path) -> None:
    """ONNX Runtime's idle pool threads spin by default, taking cores the listener needs; edged turns that
    off unless [engines] spin_wait = true, and the setting reaches the session start_engine makes."""
    from edged.config import EnginesConfig
    from edged.inference.cache import ArtifactCache
    from edged.inference.select import start_engine

    assert EnginesConfig().spin_wait is False
    for spin_wait, expected in ((False, ("0", "0")), (True, ("1", "1"))):
        engine = start_engine(cls_spec, "onnxruntime", ArtifactCache(tmp_path / f"cache-{spin_wait}"),
                              EnginesConfig(intra_op_threads=2, spin_wait=spin_wait), precision="fp32")
        try:
            assert _spinning(engine) == expected
            assert engine.infer(np.zeros((2, 1, 32, 32), np.float32))["logit"].shape[0] == 2
        finally:
            engine.deactivate()
