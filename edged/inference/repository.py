"""The model repository: ``engines/<name>/model.toml`` + ``model.onnx`` + ``README.md``.

model.toml is validated at load like the daemon's configuration: an unknown key, a wrong type or a
value out of range raises :class:`~edged.errors.ModelConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.errors import ModelConfigError
from edged.pipeline.preprocess import PreprocessSpec
from edged.schema import Builder, in_range, meta, non_empty, one_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODEL_TOML = "model.toml"
MODEL_ONNX = "model.onnx"
PRECISIONS = ("fp32", "fp16", "int8")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _model_name(value: Any) -> str | None:
    return None if _NAME.match(value) else "must be 1-64 of a-z 0-9 . _ - (starting with a letter or digit)"


def _regex(value: Any) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    return None


def _pair(what: str) -> Any:
    def check(value: list[float]) -> str | None:
        return None if len(value) == 2 else f"must be [{what}]"

    return check


def _size(value: list[int]) -> str | None:
    if len(value) != 2 or any(v < 1 for v in value):
        return "must be [rows, columns], both >= 1"
    return None


def _shape(value: list[int]) -> str | None:
    if len(value) < 2 or value[0] != -1 or any(v < 1 for v in value[1:]):
        return "must start with -1 (the dynamic batch axis) followed by positive sizes, e.g. [-1, 1, 256, 256]"
    return None


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 Table 8.8-1, Code Sequence Macro): e.g. SCT 786838002 "Pulmonary nodule"."""

    value: str = field(metadata=meta(non_empty))
    scheme: str = field(metadata=meta(non_empty))
    meaning: str = field(metadata=meta(non_empty))


@dataclass(frozen=True)
class Accepts:
    """``[accepts]``: which instances the model runs on. Empty lists accept anything."""

    modalities: list[str] = field(default_factory=list)
    sop_class_uids: list[str] = field(default_factory=list)
    body_parts: list[str] = field(default_factory=list)
    series_description: str | None = field(default=None, metadata=meta(_regex))
    min_rows: int = field(default=0, metadata=meta(in_range(0)))
    min_columns: int = field(default=0, metadata=meta(in_range(0)))


@dataclass(frozen=True)
class InputSpec:
    """``[input]``: the one input tensor."""

    name: str = field(metadata=meta(non_empty))
    shape: list[int] = field(metadata=meta(_shape))
    dtype: str = field(default="float32", metadata=meta(one_of("float32")))


@dataclass(frozen=True)
class Preprocess:
    """``[preprocess]``: see :mod:`edged.pipeline.preprocess`."""

    size: list[int] = field(metadata=meta(_size))
    modality_lut: bool = True
    window: list[float] | None = field(default=None, metadata=meta(_pair("center, width")))
    percentile: list[float] | None = field(default=None, metadata=meta(_pair("low, high")))
    spacing: list[float] | None = field(default=None, metadata=meta(_pair("row mm, column mm")))
    mean: float = 0.0
    std: float = field(default=1.0, metadata=meta(in_range(1e-9)))

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(
            size=(self.size[0], self.size[1]),
            modality_lut=self.modality_lut,
            window=(self.window[0], self.window[1]) if self.window else None,
            percentile=(self.percentile[0], self.percentile[1]) if self.percentile else None,
            mean=self.mean,
            std=self.std,
        )


@dataclass(frozen=True)
class Label:
    """One finding the model reports. ``channel``: index along the output's class axis."""

    name: str = field(metadata=meta(non_empty))
    code: Code
    category: Code | None = None
    threshold: float = field(default=0.5, metadata=meta(in_range(0.0, 1.0)))
    channel: int = field(default=0, metadata=meta(in_range(0)))


@dataclass(frozen=True)
class Output:
    """``[[outputs]]``: an output tensor; ``activation`` turns it into probabilities."""

    name: str = field(metadata=meta(non_empty))
    activation: str = field(default="sigmoid", metadata=meta(one_of("none", "sigmoid", "softmax")))
    labels: list[Label] = field(default_factory=list)


@dataclass(frozen=True)
class Batching:
    max_batch: int = field(default=8, metadata=meta(in_range(1, 1024)))
    max_delay_ms: float = field(default=10.0, metadata=meta(in_range(0, 10000)))


@dataclass(frozen=True)
class TensorRTOptions:
    precision: str = field(default="fp32", metadata=meta(one_of(*PRECISIONS)))
    workspace_mb: int = field(default=1024, metadata=meta(in_range(16, 1 << 20)))


@dataclass(frozen=True)
class ModelSpec:
    """A model as model.toml describes it; ``directory`` and ``onnx_path`` are filled at load."""

    name: str = field(metadata=meta(_model_name))
    version: str = field(metadata=meta(non_empty))
    task: str = field(metadata=meta(one_of("classification", "segmentation")))
    input: InputSpec
    preprocess: Preprocess
    outputs: list[Output]
    level: str = field(default="instance", metadata=meta(one_of("instance", "series")))
    description: str = ""
    accepts: Accepts = field(default_factory=Accepts)
    batching: Batching = field(default_factory=Batching)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    directory: Path = field(default=Path("."), metadata={"internal": True})

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_ONNX

    @property
    def toml_path(self) -> Path:
        return self.directory / MODEL_TOML

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.input.shape[1:])

    def onnx_sha256(self) -> str:
        return sha256_file(self.onnx_path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cross_check(spec: ModelSpec, err: Any) -> None:
    if spec.name != spec.directory.name:
        raise err("name", f"must match the folder name {spec.directory.name!r}")
    if spec.preprocess.window and spec.preprocess.percentile:
        raise err("preprocess.percentile", "set either preprocess.window or preprocess.percentile, not both")
    if list(spec.input.shape[-2:]) != list(spec.preprocess.size):
        raise err("preprocess.size", f"must equal the last two input dimensions {spec.input.shape[-2:]}")
    if not spec.outputs:
        raise err("outputs", "at least one [[outputs]] table is required")
    for i, out in enumerate(spec.outputs):
        if not out.labels:
            raise err(f"outputs[{i}].labels", "at least one label is required")
        if spec.task == "segmentation":
            for j, label in enumerate(out.labels):
                if label.category is None:
                    raise err(f"outputs[{i}].labels[{j}].category",
                              "segmentation labels need a segmented property category code")
    if not spec.onnx_path.is_file():
        raise err("(model.onnx)", f"file not found: {spec.onnx_path}")


def load_model(directory: Path) -> ModelSpec:
    """Load and validate ``directory/model.toml``."""
    path = directory / MODEL_TOML

    def err(key: str, reason: str) -> ModelConfigError:
        return ModelConfigError(path, key, reason)

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise err("(file)", f"cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise err("(file)", f"not valid TOML: {exc}") from None
    spec = Builder(err, directory).build(ModelSpec, data)
    spec = dataclasses.replace(spec, directory=directory.resolve())
    _cross_check(spec, err)
    return spec


class Repository:
    """The models under one engines directory (every subfolder with a model.toml)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MODEL_TOML).is_file())

    def load(self, names: list[str] | None = None) -> dict[str, ModelSpec]:
        """Load the named models (all when ``names`` is empty or None); unknown names are an error."""
        available = self.names()
        wanted = list(names) if names else available
        missing = [n for n in wanted if n not in available]
        if missing:
            raise ModelConfigError(self.root, "(models)",
                                   f"no such model: {', '.join(missing)} (available: {', '.join(available) or 'none'})")
        return {n: load_model(self.root / n) for n in wanted}
