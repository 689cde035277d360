"""[triton] configuration, Triton metadata checks and ``edged engines export-triton`` (no server needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from edged import config as config_mod
from edged.errors import ConfigError, EngineError
from edged.inference.repository import Repository
from edged.inference.triton import check_metadata

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models():
    return Repository(REPO / "engines").load()


def _load(tmp_path: Path, text: str) -> config_mod.Config:
    path = tmp_path / "edged.toml"
    path.write_text(text)
    return config_mod.load(path)


def test_triton_table_defaults_and_mapping(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[engines]\nbackend = "triton"\n[triton]\nurl = "triton.local:8001"\n'
                          '[[triton.models]]\nmodel = "lesion-seg"\nname = "seg"\nversion = "7"\n')
    assert cfg.engines.backend == "triton" and cfg.triton.protocol == "grpc"
    assert cfg.triton.mapping("lesion-seg", "1.0.0") == ("seg", "7")
    assert cfg.triton.mapping("ct-nodule-cls", "2.1.0") == ("ct-nodule-cls", "2")
    assert cfg.triton.mapping("x", "beta") == ("x", "")  # no number: Triton's latest version
    shown = config_mod.to_toml(cfg)
    assert '[[triton.models]]\nmodel = "lesion-seg"\nname = "seg"\nversion = "7"' in shown
    assert config_mod.from_mapping(config_mod.tomllib.loads(shown)) == cfg  # the shown config loads back


@pytest.mark.parametrize("text, key", [
    ('[triton]\nurl = "http://h:8000"\n', "triton.url"),
    ('[triton]\nurl = "h"\n', "triton.url"),
    ('[triton]\nprotocol = "rest"\n', "triton.protocol"),
    ('[triton]\nmax_in_flight = 0\n', "triton.max_in_flight"),
    ('[triton]\ntimeout = 3\n', "triton.timeout"),
    ('[[triton.models]]\nmodel = "a"\nversion = "1.0"\n', "triton.models[0].version"),
    ('[[triton.models]]\nname = "a"\n', "triton.models[0].model"),
    ('[[triton.models]]\nmodel = "a"\n[[triton.models]]\nmodel = "a"\n', "triton.models[1].model"),
    ('[triton.tls]\nca = "ca.pem"\n', "triton.tls.ca"),
])
def test_triton_config_errors_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert err.value.key == key
    assert str(tmp_path / "edged.toml") in str(err.value)


def test_tls_files_need_enabled(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, '[triton.tls]\nca = "ca.pem"\n')
    assert err.value.key == "triton.tls.enabled"
    assert _load(tmp_path, '[triton.tls]\nenabled = true\nca = "ca.pem"\n').triton.tls.ca == tmp_path / "ca.pem"


def _metadata(**changes):
    md = {"name": "m", "inputs": [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "256", "256"]}],
          "outputs": [{"name": "logit", "datatype": "FP32", "shape": ["-1", "1"]}]}
    for k, v in changes.items():
        md[k] = v
    return md


def test_metadata_check_accepts_the_served_model(models) -> None:
    check_metadata(models["ct-nodule-cls"], "m", _metadata())


@pytest.mark.parametrize("changes, tensor, words", [
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 256, 256]}]}, "image", "['pixels']"),
    ({"inputs": [{"name": "image", "datatype": "INT16", "shape": [-1, 1, 256, 256]}]}, "image", "INT16"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 128, 128]}]}, "image", "[-1, 1, 128, 128]"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 256, 256]}]}, "image", "batch axis"),
    ({"outputs": [{"name": "prob", "datatype": "FP32", "shape": [-1, 1]}]}, "logit", "['prob']"),
    ({"outputs": [{"name": "logit", "datatype": "FP32", "shape": [1]}]}, "logit", "no dynamic batch axis"),
])
def test_metadata_mismatch_names_model_and_tensor(models, changes, tensor: str, words: str) -> None:
    with pytest.raises(EngineError) as err:
        check_metadata(models["ct-nodule-cls"], "served-name", _metadata(**changes))
    assert err.value.model == "ct-nodule-cls" and err.value.tensor == tensor
    assert words in str(err.value) and "'served-name'" in str(err.value)
    assert "\n" not in str(err.value)


def test_export_triton_writes_configs_that_parse_and_agree(tmp_path: Path, models) -> None:
    cfg = tmp_path / "edged.toml"
    cfg.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n'
                   '[[triton.models]]\nmodel = "lesion-seg"\nname = "edged-lesion-seg"\nversion = "3"\n')
    out = tmp_path / "repo"
    res = subprocess.run([sys.executable, "-m", "edged", "engines", "export-triton", str(out), "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ct-nodule-cls", "edged-lesion-seg"]
    for name, spec in models.items():
        served, version = ("edged-lesion-seg", "3") if name == "lesion-seg" else (name, "1")
        parsed = text_format.Parse((out / served / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert parsed.name == served and parsed.platform == "onnxruntime_onnx"
        assert parsed.max_batch_size == spec.batching.max_batch
        assert parsed.dynamic_batching.max_queue_delay_microseconds == int(spec.batching.max_delay_ms * 1000)
        assert parsed.dynamic_batching.preferred_batch_size[-1] == spec.batching.max_batch
        assert all(1 <= s <= spec.batching.max_batch for s in parsed.dynamic_batching.preferred_batch_size)
        (inp,) = parsed.input
        assert inp.name == spec.input.name and list(inp.dims) == spec.input.shape[1:]
        assert inp.data_type == model_config_pb2.TYPE_FP32
        graph = onnx.load(str(spec.onnx_path)).graph
        onnx_dims = {o.name: [d.dim_value or -1 for d in o.type.tensor_type.shape.dim][1:] for o in graph.output}
        assert [o.name for o in parsed.output] == [o.name for o in spec.outputs]
        for o in parsed.output:
            assert list(o.dims) == onnx_dims[o.name] and o.data_type == model_config_pb2.TYPE_FP32
        assert len(parsed.instance_group) == 1 and parsed.instance_group[0].count >= 1
        assert (out / served / version / "model.onnx").read_bytes() == spec.onnx_path.read_bytes()
    one = tmp_path / "one"
    res = subprocess.run([sys.executable, "-m", "edged", "engines", "export-triton", str(one), "ct-nodule-cls",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and [p.name for p in one.iterdir()] == ["ct-nodule-cls"]
