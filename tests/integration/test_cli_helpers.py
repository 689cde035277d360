"""``edged echo``, ``edged send`` and ``edged status`` against a running daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import EdgedProcess


def edged_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True, timeout=120)


def test_echo(edged: EdgedProcess) -> None:
    ok = edged_cli("echo", "127.0.0.1", str(edged.port), "--aec", "EDGED")
    assert ok.returncode == 0 and "0x0000" in ok.stdout
    rejected = edged_cli("echo", "127.0.0.1", str(edged.port), "--aec", "SOMEONE")
    assert rejected.returncode == 1 and "rejected" in rejected.stderr


def test_echo_nobody_listening() -> None:
    out = edged_cli("echo", "127.0.0.1", "1", "--timeout", "5")
    assert out.returncode == 1
    assert "127.0.0.1:1" in out.stderr


def test_send_folder_and_status(edged: EdgedProcess, ct_series: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for p in ct_series[:6]:
        (folder / "sub" / p.name).write_bytes(p.read_bytes())
    (folder / "notes.txt").write_text("not DICOM")
    out = edged_cli("send", str(folder), "--to", f"127.0.0.1:{edged.port}", "--aec", "EDGED")
    assert out.returncode == 1  # one file was not DICOM
    assert "sent 7 file(s)" in out.stdout
    assert "0x0000  6" in out.stdout and "unreadable  1" in out.stdout

    status = edged_cli("status", "--config", str(edged.config), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["instances"]["received"] == 6
    plain = edged_cli("status", "--config", str(edged.config))
    assert "instances: 6" in plain.stdout

    again = edged_cli("send", *map(str, ct_series[:6]), "--to", f"127.0.0.1:{edged.port}", "--aec", "EDGED")
    assert again.returncode == 0 and "0x0000  6" in again.stdout
    assert json.loads(edged_cli("status", "--config", str(edged.config), "--json").stdout)["instances"]["received"] == 6


def test_send_bad_destination_is_a_usage_error() -> None:
    out = edged_cli("send", "x.dcm", "--to", "nohostport")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
