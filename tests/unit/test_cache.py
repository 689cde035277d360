from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import write_model

from edged.inference.build import plan_key
from edged.inference.cache import ArtifactCache
from edged.inference.cuda import GpuInfo
from edged.inference.repository import load_model

GPU = GpuInfo("NVIDIA RTX A4000", "8.6", "13000")


def test_plan_key_changes_with_each_part(tmp_path: Path) -> None:
    spec = load_model(write_model(tmp_path))
    base = plan_key(spec, "a" * 64, "fp16", "10.13.0", GPU)
    variants = [
        plan_key(spec, "b" * 64, "fp16", "10.13.0", GPU),
        plan_key(spec, "a" * 64, "int8", "10.13.0", GPU),
        plan_key(spec, "a" * 64, "fp16", "11.0.0", GPU),
        plan_key(spec, "a" * 64, "fp16", "10.13.0", GpuInfo("NVIDIA L4", "8.6", "13000")),
        plan_key(spec, "a" * 64, "fp16", "10.13.0", GpuInfo("NVIDIA RTX A4000", "8.9", "13000")),
        plan_key(spec, "a" * 64, "fp16", "10.13.0", GpuInfo("NVIDIA RTX A4000", "8.6", "12080")),
    ]
    d = tmp_path / "tiny-cls"
    (d / "model.toml").write_text((d / "model.toml").read_text().replace("max_batch = 8", "max_batch = 4"))
    variants.append(plan_key(load_model(d), "a" * 64, "fp16", "10.13.0", GPU))
    (d / "model.toml").write_text((d / "model.toml").read_text() + "\n[tensorrt]\nworkspace_mb = 64\n")
    variants.append(plan_key(load_model(d), "a" * 64, "fp16", "10.13.0", GPU))
    for v in variants:
        assert v != base
    assert len({tuple(sorted(v.items())) for v in variants}) == len(variants)


def test_states_built_stale_missing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    key = {"onnx_sha256": "a", "tensorrt": "10"}
    assert cache.state("m", "plan", key) == "missing"
    entry = cache.store("m", "plan", key, b"PLAN", "plan")
    assert entry.path.read_bytes() == b"PLAN"
    assert cache.state("m", "plan", key) == "built"
    newer = {**key, "tensorrt": "11"}
    assert cache.state("m", "plan", newer) == "stale"
    assert cache.changed_parts("m", "plan", newer) == ["tensorrt"]
    assert cache.lookup("m", "plan", newer, ignore=("tensorrt",)) is not None
    cache.discard("m", "plan")
    assert cache.state("m", "plan", key) == "missing"
    assert not entry.path.exists()


def test_corrupt_manifest_is_missing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.store("m", "plan", {"k": "v"}, b"x", "plan")
    (tmp_path / "m" / "plan.json").write_text("{not json")
    assert cache.state("m", "plan", {"k": "v"}) == "missing"
