"""systemd/edged.service: the directives operators rely on, and systemd-analyze verify where available."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "edged.service"

REQUIRED = [
    "Type=notify", "WatchdogSec=", "Restart=on-failure", "User=edged", "StateDirectory=edged",
    "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
    "ReadWritePaths=/var/lib/edged", "RestrictAddressFamilies=", "DeviceAllow=/dev/nvidiactl",
]


def test_unit_has_the_hardening_and_lifecycle_directives() -> None:
    text = UNIT.read_text()
    lines = [line.strip() for line in text.splitlines()]
    for directive in REQUIRED:
        assert any(line.startswith(directive) for line in lines), directive
    timeout = int(next(line for line in lines if line.startswith("TimeoutStopSec=")).split("=")[1])
    assert timeout > 30  # longer than edged's default shutdown_timeout, so the graceful stop can finish


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    edged = Path(sys.executable).parent / "edged"
    unit = tmp_path / "edged.service"
    unit.write_text(UNIT.read_text().replace("/opt/edged/.venv/bin/edged", str(edged)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "edged.service" in line and "user" not in line.lower()]  # the edged user exists only on the box
    assert out.returncode == 0 or not problems, out.stdout + out.stderr
    assert problems == [], problems
