"""Orthanc (Debian's package) as the real PACS in tests, listening on 127.0.0.1 only, with its REST API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from support import require_tool

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_shim(workdir: Path) -> Path:
    """Compile tests/loopback_bind.c (Orthanc 1.10 has no bind-address setting)."""
    out = workdir / "loopback_bind.so"
    if not out.exists():
        subprocess.run([require_tool("cc"), "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "loopback_bind.c"),
                        "-ldl"], check=True, capture_output=True, timeout=120)
    return out


class Orthanc:
    def __init__(self, workdir: Path, aet: str = "ORTHANC") -> None:
        self.workdir = workdir
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "db").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "edged-test", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "Plugins": [], "StableAge": 1,
            "ConcurrentJobs": 1, "HttpThreadsCount": 4,
        }))
        self.log = workdir / "orthanc.log"

    def start(self, timeout: float = 30.0) -> "Orthanc":
        shim = loopback_shim(self.workdir)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([require_tool("Orthanc"), str(self.config)], stdout=log, stderr=log,
                                         # Orthanc's DICOM side is Debian's DCMTK: Nagle off, as for storescp
                                         env={**os.environ, "LD_PRELOAD": str(shim), "TCP_NODELAY": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None:
                    raise AssertionError(f"Orthanc exited: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)
        raise AssertionError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def file(self, orthanc_id: str) -> bytes:
        return bytes(self.get(f"/instances/{orthanc_id}/file"))
