"""A real Triton Inference Server in tests: PyTriton's bundled tritonserver on 127.0.0.1, CPU only.

It runs from its own environment (scripts/install-triton-server: Debian's python3, numpy < 2), found at
``$EDGED_TRITON_PYTHON`` or ``.venv-triton/bin/python``; tests/triton/serve_models.py serves edged's demo
models through ONNX Runtime inside PyTriton inference functions, with Triton's dynamic batcher. The server
runs in its own process group (PyTriton starts tritonserver as a child), killed whole at stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from orthanc import free_port

REPO = Path(__file__).resolve().parents[1]
SERVE = Path(__file__).parent / "triton" / "serve_models.py"


def triton_python() -> str:
    path = os.environ.get("EDGED_TRITON_PYTHON") or str(REPO / ".venv-triton" / "bin" / "python")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} not found: run scripts/install-triton-server (scripts/install-test-deps does)")
    return path


class TritonServer:
    def __init__(self, workdir: Path, models: list[str], mismatch: dict[str, str] | None = None,
                 engines: Path = REPO / "engines") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.models = models
        self.mismatch = mismatch or {}
        self.engines = engines
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log = workdir / "triton.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, timeout: float = 180.0) -> "TritonServer":
        cmd = [triton_python(), str(SERVE), "--engines", str(self.engines), "--grpc-port", str(self.grpc_port),
               "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port),
               "--workspace", str(self.workdir / f"workspace-{self.starts}")]
        for m in self.models:
            cmd += ["--model", m]
        for name, model in self.mismatch.items():
            cmd += ["--mismatch", f"{name}:{model}"]
        self.starts += 1
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count("TRITON READY") >= self.starts:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"triton exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"triton not ready within {timeout} s:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the whole process group (tritonserver included); SIGKILL if it lingers."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # tritonserver may outlive the python parent
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.proc = None

    def statistics(self, model: str) -> dict[str, Any]:
        """Triton's statistics extension for ``model`` (HTTP), as JSON."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url)
        try:
            stats = client.get_inference_statistics(model)
        finally:
            client.close()
        (entry,) = [s for s in stats["model_stats"] if s["name"] == model]
        return entry
