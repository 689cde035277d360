"""Real TensorRT: build, verify and bench both demo models (wherever tensorrt and a GPU exist)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
MODELS = ["ct-nodule-cls", "lesion-seg"]


def edged(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "edged.toml"
    cfg.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n[engines]\nbackend = "tensorrt"\n')
    return subprocess.run([sys.executable, "-m", "edged", *args, "--config", str(cfg)], capture_output=True,
                          text=True, timeout=1800, cwd=REPO)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_verify_bench(tensorrt_available, tmp_path: Path, precision: str) -> None:
    built = edged(tmp_path, "engines", "build", *MODELS, "--precision", precision)
    assert built.returncode == 0, built.stderr
    assert built.stdout.count("plan built") == len(MODELS)
    listed = edged(tmp_path, "engines", "list")
    assert "backend: tensorrt" in listed.stdout
    for model in MODELS:
        verified = edged(tmp_path, "engines", "verify", model, "--precision", precision)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        bench = edged(tmp_path, "engines", "bench", model, "--precision", precision, "--batch", "1", "8",
                      "--seconds", "2")
        assert bench.returncode == 0, bench.stderr
