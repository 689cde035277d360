"""Helpers for tests that run the real daemon and real DICOM peers on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"event=listening host=\S+ port=(\d+)")
HTTP_LISTENING = re.compile(r"event=http.listening host=\S+ port=(\d+)")


def require_tool(name: str) -> str:
    """A peer program from the system, never pynetdicom's same-named scripts in the virtualenv's bin."""
    venv_bin = os.path.realpath(Path(sys.prefix) / "bin")
    dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if os.path.realpath(d) != venv_bin]
    path = shutil.which(name, path=os.pathsep.join(dirs))
    if path is None:
        pytest.fail(f"{name} not found: run scripts/install-test-deps (scripts/test does) first")
    return path


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def dcmtk_env() -> dict[str, str]:
    """DCMTK peers with Nagle off (Debian's build leaves it on: ~40 ms stall per message)."""
    return {**os.environ, "TCP_NODELAY": "1"}


class EdgedProcess:
    """``edged serve`` in a subprocess with its own storage dir, listening on 127.0.0.1."""

    def __init__(self, workdir: Path, **overrides: dict[str, Any]) -> None:
        self.workdir = workdir
        self.storage = workdir / "data"
        sections: dict[str, dict[str, Any]] = {
            "dicom": {"host": "127.0.0.1", "port": 0},
            "http": {"host": "127.0.0.1", "port": 0},
            "storage": {"dir": str(self.storage), "min_free_bytes": 0},
            "daemon": {"shutdown_timeout": 10.0},
        }
        for name, table in overrides.items():
            sections.setdefault(name, {}).update(table)
        self.config = write_config(workdir / "edged.toml", sections)
        self.log_path = workdir / "edged.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port = 0
        self.starts = 0

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> "EdgedProcess":
        self.starts += 1
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edged", "serve", "--config", str(self.config)],
            stdout=log, stderr=log, cwd=self.workdir, env={**os.environ, **(env or {})},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.findall(self.log_text())
            if len(found) >= self.starts:
                self.port = int(found[-1])
                self.http_port = int(HTTP_LISTENING.findall(self.log_text())[-1])
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"edged exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise AssertionError(f"edged did not start listening within {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("edged did not stop within its shutdown timeout")

    def rows(self) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.storage / "journal.sqlite3")
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute("SELECT * FROM instances ORDER BY id").fetchall()
        finally:
            conn.close()

    def spool_files(self) -> list[Path]:
        return sorted((self.storage / "spool" / "instances").iterdir())

    def temp_files(self) -> list[Path]:
        return sorted((self.storage / "spool" / "tmp").iterdir())


def run(cmd: list[str], timeout: float = 120.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", dcmtk_env()), **kw)
