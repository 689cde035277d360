"""``edged engines list | build | verify | bench`` on the shipped demo models, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.inference.cache import ArtifactCache
from edged.inference.precision import calibration_planes
from edged.inference.repository import Repository
from edged.pipeline.preprocess import prepare_slice
from edged.synthetic import chest_phantom, ct_slice

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("engines-cli")
    (d / "edged.toml").write_text(f'[storage]\ndir = "{d / "data"}"\n[engines]\ndir = "{REPO / "engines"}"\n')
    return d


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """24 phantom slices written as CT DICOM files, and the HU images they hold."""
    d = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(2026)
    hus = []
    for i in range(24):
        hu, _ = chest_phantom(rng, nodules=i % 3)
        hus.append(hu)
        ct_slice(i, study_uid="1.2.3", series_uid="1.2.3.4", hu=hu).save_as(d / f"cal{i:03d}.dcm",
                                                                             enforce_file_format=True)
    (d / "README.txt").write_text("not DICOM: skipped")
    return d, hus


def edged(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edged", *args, "--config", str(workdir / "edged.toml")],
                          capture_output=True, text=True, timeout=600)


def test_list_shows_models_and_backend(workdir: Path) -> None:
    out = edged(workdir, "engines", "list")
    assert out.returncode == 0, out.stderr
    assert "backend: onnxruntime (auto: tensorrt is not installed" in out.stdout
    for name in ("ct-nodule-cls", "lesion-seg"):
        line = next(line for line in out.stdout.splitlines() if line.startswith(name))
        assert "1.0.0" in line and "onnx built" in line


def test_calibration_uses_inference_preprocessing(calibration) -> None:
    folder, hus = calibration
    spec = Repository(REPO / "engines").load(["ct-nodule-cls"])["ct-nodule-cls"]
    planes = calibration_planes(spec, folder)
    expected = [prepare_slice(np.clip(hu + 1024, 0, 65535).astype(np.uint16), spec.preprocess.spec(),
                              slope=1.0, intercept=-1024.0) for hu in hus]
    assert planes.shape == (24, 1, 256, 256)
    np.testing.assert_array_equal(planes[:, 0], np.stack(expected))


def test_int8_needs_calibration(workdir: Path) -> None:
    out = edged(workdir, "engines", "build", "ct-nodule-cls", "--precision", "int8", "--force")
    assert out.returncode == 1
    assert "--calibration DIR" in out.stderr


def test_build_int8_and_fp16_then_verify_and_bench(workdir: Path, calibration) -> None:
    folder, _ = calibration
    out = edged(workdir, "engines", "build", "--precision", "int8", "--calibration", str(folder))
    assert out.returncode == 0, out.stderr
    assert "TensorRT: no" in out.stdout
    assert out.stdout.count("int8 no TensorRT here: ONNX ready for ONNX Runtime") == 2
    cache = ArtifactCache(workdir / "data" / "engines")
    entry = cache.latest("ct-nodule-cls", "onnx-int8")
    assert entry is not None and entry.parts["precision"] == "int8" and "calibration_sha256" in entry.parts

    again = edged(workdir, "engines", "build", "ct-nodule-cls", "--precision", "int8", "--calibration", str(folder))
    assert again.returncode == 0
    assert cache.latest("ct-nodule-cls", "onnx-int8") == entry  # same inputs: cached, not redone

    assert edged(workdir, "engines", "build", "--precision", "fp16").returncode == 0
    for model in ("ct-nodule-cls", "lesion-seg"):
        for prec in ("fp16", "int8"):
            v = edged(workdir, "engines", "verify", model, "--precision", prec, "--batch", "8")
            assert v.returncode == 0, v.stdout + v.stderr
            assert "ok" in v.stdout and "MISMATCH" not in v.stdout

    bench = edged(workdir, "engines", "bench", "ct-nodule-cls", "--batch", "1", "4", "--seconds", "0.3", "--json")
    assert bench.returncode == 0, bench.stderr
    rows = [json.loads(line) for line in bench.stdout.splitlines()]
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["images_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)


def test_bench_refuses_batch_above_max(workdir: Path) -> None:
    out = edged(workdir, "engines", "bench", "lesion-seg", "--batch", "64", "--seconds", "0.1")
    assert out.returncode == 1 and "outside 1..max_batch" in out.stderr


def test_unknown_model(workdir: Path) -> None:
    out = edged(workdir, "engines", "verify", "no-such-model")
    assert out.returncode == 2 and "no such model: no-such-model" in out.stderr
