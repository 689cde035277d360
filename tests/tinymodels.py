"""Tiny ONNX models (built with onnx.helper, random fixed weights) and model.toml files for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 32


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr.astype(np.float32), name)


def classifier_onnx(seed: int = 0, size: int = SIZE) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["logit"], transB=1),
    ]
    inits = [_init("w1", rng.normal(0, 0.5, (4, 1, 3, 3))), _init("b1", rng.normal(0, 0.1, (4,))),
             _init("w2", rng.normal(0, 1.0, (1, 4))), _init("b2", np.zeros(1))]
    graph = helper.make_graph(
        nodes, "tiny-cls",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch", 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def segmenter_onnx(seed: int = 0, size: int = SIZE) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["mask_logit"]),
    ]
    inits = [_init("w1", rng.normal(0, 0.5, (4, 1, 3, 3))), _init("b1", rng.normal(0, 0.1, (4,))),
             _init("w2", rng.normal(0, 1.0, (1, 4, 1, 1))), _init("b2", np.array([-0.5]))]
    graph = helper.make_graph(
        nodes, "tiny-seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("mask_logit", TensorProto.FLOAT, ["batch", 1, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CLASSIFIER_TOML = """\
name = "{name}"
version = "0.1"
task = "classification"
level = "instance"

[accepts]
modalities = ["CT"]
min_rows = 32
min_columns = 32

[input]
name = "image"
shape = [-1, 1, {size}, {size}]

[preprocess]
size = [{size}, {size}]
window = [-600.0, 1500.0]

[[outputs]]
name = "logit"
activation = "sigmoid"

[[outputs.labels]]
name = "nodule"
code = {{ value = "27925004", scheme = "SCT", meaning = "Nodule" }}
threshold = 0.5

[batching]
max_batch = {max_batch}
"""

SEGMENTER_TOML = """\
name = "{name}"
version = "0.1"
task = "segmentation"

[input]
name = "image"
shape = [-1, 1, {size}, {size}]

[preprocess]
size = [{size}, {size}]
window = [-600.0, 1500.0]

[[outputs]]
name = "mask_logit"

[[outputs.labels]]
name = "lesion"
code = {{ value = "52988006", scheme = "SCT", meaning = "Lesion" }}
category = {{ value = "49755003", scheme = "SCT", meaning = "Morphologically abnormal structure" }}

[batching]
max_batch = {max_batch}
"""


def write_model(root: Path, name: str = "tiny-cls", task: str = "classification", max_batch: int = 8,
                toml: str | None = None, **fmt: Any) -> Path:
    """engines/<name>/ with model.toml and model.onnx; returns the folder."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    model = classifier_onnx() if task == "classification" else segmenter_onnx()
    onnx.save(model, str(d / "model.onnx"))
    template = toml or (CLASSIFIER_TOML if task == "classification" else SEGMENTER_TOML)
    (d / "model.toml").write_text(template.format(name=name, size=SIZE, max_batch=max_batch, **fmt))
    return d
