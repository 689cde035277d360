"""Type=notify: READY=1 once the listener is bound, WATCHDOG=1 while running, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from support import require_tool, run


def test_notify_protocol(edged_factory, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    try:
        edged = edged_factory().start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        # READY=1 means the listener answers.
        assert run([require_tool("echoscu"), "-aec", "EDGED", "127.0.0.1", str(edged.port)]).returncode == 0
        deadline = time.monotonic() + 5
        while not any(m == "WATCHDOG=1" for m in messages) and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert "WATCHDOG=1" in messages
        assert edged.stop() == 0
        sock.settimeout(0.5)
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in messages
    finally:
        sock.close()
