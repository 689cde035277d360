from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import write_model

from edged.errors import ModelConfigError
from edged.inference.repository import Repository, load_model


def test_loads_a_valid_model(tmp_path: Path) -> None:
    spec = load_model(write_model(tmp_path))
    assert spec.name == "tiny-cls" and spec.task == "classification" and spec.level == "instance"
    assert spec.input_shape(4) == (4, 1, 32, 32)
    assert spec.outputs[0].labels[0].code.value == "27925004"
    assert spec.preprocess.spec().window == (-600.0, 1500.0)


@pytest.mark.parametrize(
    "edit, key, fragment",
    [
        (lambda t: t.replace('task = "classification"', 'task = "detection"'), "task", "one of"),
        (lambda t: t.replace('version = "0.1"\n', ""), "version", "required"),
        (lambda t: t + "\n[extra]\nx = 1\n", "extra", "unknown key"),
        (lambda t: t.replace("shape = [-1, 1, 32, 32]", "shape = [1, 1, 32, 32]"), "input.shape", "dynamic batch"),
        (lambda t: t.replace("size = [32, 32]", "size = [64, 64]"), "preprocess.size", "last two input"),
        (lambda t: t.replace("window = [-600.0, 1500.0]", "window = [-600.0]"), "preprocess.window", "center, width"),
        (lambda t: t.replace("window = [-600.0, 1500.0]", "window = [-600.0, 1500.0]\npercentile = [1.0, 99.0]"),
         "preprocess.percentile", "not both"),
        (lambda t: t.replace("threshold = 0.5", "threshold = 1.5"), "outputs[0].labels[0].threshold", "<= 1.0"),
        (lambda t: t.replace('scheme = "SCT", ', ""), "outputs[0].labels[0].code.scheme", "required"),
        (lambda t: t.replace("max_batch = 8", "max_batch = 0"), "batching.max_batch", ">= 1"),
        (lambda t: t.replace('name = "tiny-cls"', 'name = "other"'), "name", "folder name"),
        (lambda t: t + '\n[tensorrt]\nprecision = "int4"\n', "tensorrt.precision", "one of"),
        (lambda t: t.replace("min_rows = 32", 'min_rows = "32"'), "accepts.min_rows", "integer"),
        (lambda t: t.replace('modalities = ["CT"]', 'modalities = ["CT"]\nseries_description = "(unclosed"'),
         "accepts.series_description", "regular expression"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, edit, key: str, fragment: str) -> None:
    d = write_model(tmp_path)
    (d / "model.toml").write_text(edit((d / "model.toml").read_text()))
    with pytest.raises(ModelConfigError) as exc:
        load_model(d)
    assert exc.value.key == key, exc.value
    assert fragment in exc.value.reason
    assert exc.value.path == str(d / "model.toml")


def test_segmentation_labels_need_a_category(tmp_path: Path) -> None:
    d = write_model(tmp_path, "tiny-seg", task="segmentation")
    text = (d / "model.toml").read_text()
    (d / "model.toml").write_text("\n".join(line for line in text.splitlines() if not line.startswith("category")))
    with pytest.raises(ModelConfigError) as exc:
        load_model(d)
    assert exc.value.key == "outputs[0].labels[0].category"


def test_missing_onnx(tmp_path: Path) -> None:
    d = write_model(tmp_path)
    (d / "model.onnx").unlink()
    with pytest.raises(ModelConfigError, match="model.onnx"):
        load_model(d)


def test_repository_lists_and_refuses_unknown(tmp_path: Path) -> None:
    write_model(tmp_path, "a-cls")
    write_model(tmp_path, "b-seg", task="segmentation")
    (tmp_path / "not-a-model").mkdir()
    repo = Repository(tmp_path)
    assert repo.names() == ["a-cls", "b-seg"]
    assert set(repo.load()) == {"a-cls", "b-seg"}
    with pytest.raises(ModelConfigError, match="no such model: nope"):
        repo.load(["nope"])


def test_shipped_models_load() -> None:
    root = Path(__file__).resolve().parents[2] / "engines"
    repo = Repository(root)
    for name, spec in repo.load().items():
        assert spec.onnx_path.stat().st_size < 10 * 2**20
        assert (spec.directory / "README.md").is_file()
