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
import urllib.request
from pathlib import Path
from typing import Any, Callable

from edged.synthetic import chest_phantom, ct_slice

import numpy as np
import pytest
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"event=listening host=\S+ port=(\d+)")
HTTP_LISTENING = re.compile(r"event=http.listening host=\S+ port=(\d+)")


def part10_dataset(raw: bytes) -> tuple[bytes, str] | None:
    """A Part 10 file's data set (the bytes after its File Meta) and its transfer syntax UID, as a C-STORE
    would carry them; None for anything without a readable preamble and File Meta."""
    import io

    import pydicom

    if len(raw) < 144 or raw[128:132] != b"DICM":
        return None
    end = 144 + int.from_bytes(raw[140:144], "little")
    try:
        ts = str(pydicom.dcmread(io.BytesIO(raw[:end])).file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - no usable file meta
        return None
    return raw[end:], ts


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

    def start(self, timeout: float = 120.0, env: dict[str, str] | None = None) -> "EdgedProcess":
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

    def query(self, sql: str) -> list[sqlite3.Row]:
        """Rows from the daemon's journal (a separate read connection; WAL lets the daemon go on)."""
        conn = sqlite3.connect(self.storage / "journal.sqlite3")
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def rows(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM instances ORDER BY id")

    def spool_files(self) -> list[Path]:
        return sorted((self.storage / "spool" / "instances").iterdir())

    def temp_files(self) -> list[Path]:
        return sorted((self.storage / "spool" / "tmp").iterdir())


def run(cmd: list[str], timeout: float = 120.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", dcmtk_env()), **kw)


#: Pipeline settings for tests: series complete after 5 s of quiet (on a loaded 2-core machine one
#: storescu can pause over a second between two slices, which would complete a series early and open a
#: second generation of it); quick retries.
PIPELINE = {"series_quiet_seconds": 5.0, "max_attempts": 2, "retry_seconds": 0.2, "poll_seconds": 0.1}


def write_series(folder: Path, count: int, seed: int = 0, series: str = "1") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study = generate_uid(entropy_srcs=["edged-test-study", str(seed)])
    series_uid = generate_uid(entropy_srcs=["edged-test-series", str(seed), series])
    paths = []
    for i in range(count):
        hu, _ = chest_phantom(rng, nodules=1 if i % 4 == 0 else 0)
        ds = ct_slice(i, study_uid=study, series_uid=series_uid, hu=hu, slice_thickness=2.5)
        p = folder / f"s{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def jobs(edged: EdgedProcess) -> list[sqlite3.Row]:
    return edged.query("SELECT * FROM jobs ORDER BY id")


def findings(edged: EdgedProcess) -> list[sqlite3.Row]:
    return edged.query("SELECT f.*, j.level, j.sop_instance_uid, j.sources FROM findings f"
                       " JOIN jobs j ON j.id = f.job_id ORDER BY f.id")


def wait_jobs(edged: EdgedProcess, total: int, finished: tuple = ("done", "dead"), timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = jobs(edged)
        if len(rows) >= total and all(r["state"] in finished for r in rows):
            return
        assert edged.alive(), edged.log_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"jobs not finished: {[(r['model'], r['state']) for r in jobs(edged)]}")


def storescu(edged: EdgedProcess, files: list[Path], *options: str) -> None:
    """DCMTK storescu of ``files`` into edged, one association; must succeed."""
    res = run([require_tool("storescu"), *options, "-aec", "EDGED", "127.0.0.1", str(edged.port), *map(str, files)])
    assert res.returncode == 0, res.stderr




def eventually(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds. For what the daemon records just *after* the peer got its answer:
    pynetdicom sends the A-RELEASE-RP or A-ASSOCIATE-RJ before it fires the event whose handler logs and
    counts it, so a check made the moment the peer returns can come too early."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f} s"
        time.sleep(0.02)


def metrics_text(edged: EdgedProcess) -> str:
    """One scrape of the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{edged.http_port}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in the Prometheus text ``text`` (labels in any order); None if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            got = head[len(name):].strip("{}")
            if ",".join(sorted(got.split(","))) == want or (not want and not got):
                return float(value)
    return None


def metric(source: EdgedProcess | str, name: str, **labels: str) -> float:
    """One sample from the daemon's /metrics (scraped now) or from the text of one scrape; 0 when that
    label set has not been seen yet."""
    value = sample(source if isinstance(source, str) else metrics_text(source), name, **labels)
    return 0.0 if value is None else value


def cached_pages(path: Path) -> int:
    """How many of ``path``'s pages are in the page cache now (Linux ``mincore``)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        start = ctypes.c_char.from_buffer(mm)  # a private mapping: mincore reports the file's cached pages
        try:
            if libc.mincore(ctypes.addressof(start), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start
    return sum(b & 1 for b in vec)
