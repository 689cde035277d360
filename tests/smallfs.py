"""A small filesystem for disk-full tests: a size-limited tmpfs the test mounts.

Mounting needs CAP_SYS_ADMIN. As root the test mounts it itself. Otherwise the test runs itself again
(the same test id, in a child pytest) under ``unshare --user --map-root-user --mount``, where it may
mount a tmpfs in a mount namespace of its own; everything it starts (the daemon, SQLite) lives in that
namespace with it. If neither works the test fails with the reason: it never skips.
``EDGED_TEST_SMALLFS=unshare`` forces the second method (to test it as root).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, require_tool

METHOD = os.environ.get("EDGED_TEST_SMALLFS", "auto")
INSIDE = "EDGED_TEST_IN_USERNS"


def _can_mount(probe_dir: Path) -> str | None:
    """None if this process may mount a tmpfs, else why not."""
    if METHOD == "unshare" and not os.environ.get(INSIDE):
        return "EDGED_TEST_SMALLFS=unshare"
    probe_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([require_tool("mount"), "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe_dir)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return r.stderr.strip() or f"mount exited {r.returncode}"
    subprocess.run([require_tool("umount"), str(probe_dir)], capture_output=True, timeout=30)
    return None


def rerun_unprivileged(request: pytest.FixtureRequest, tmp_path: Path) -> bool:
    """True when this test already ran (and passed) in a child under unshare: the caller returns.
    False when this process can mount: the caller goes on. Fails when neither is possible."""
    why = _can_mount(tmp_path / "mount-probe")
    if why is None:
        return False
    if os.environ.get(INSIDE):
        pytest.fail(f"cannot mount a tmpfs even inside a user namespace: {why}")
    cmd = [require_tool("unshare"), "--user", "--map-root-user", "--mount", sys.executable, "-m", "pytest", "-q",
           "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'userns'}", request.node.nodeid]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                         env={**os.environ, INSIDE: "1", "EDGED_TEST_SMALLFS": "auto"})
    if "unshare:" in res.stderr and res.returncode != 0 and "passed" not in res.stdout:
        pytest.fail(f"cannot make a small filesystem: mounting a tmpfs failed ({why}) and so did"
                    f" unshare --user --mount ({res.stderr.strip()[-500:]}). Run as root, or allow unprivileged"
                    " user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0).")
    assert res.returncode == 0, f"under unshare --user --mount:\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
    assert " passed" in res.stdout, res.stdout[-2000:]
    return True


class SmallFs:
    """A tmpfs of ``size_bytes`` mounted at ``path`` for the ``with`` block (lazily unmounted after)."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size = size_bytes

    def __enter__(self) -> "SmallFs":
        self.path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([require_tool("mount"), "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs",
                            str(self.path)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs at {self.path}: {r.stderr.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([require_tool("umount"), "-l", str(self.path)], capture_output=True, timeout=30)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def write_ballast(path: Path, size: int) -> int:
    """Write up to ``size`` bytes of zeros to ``path`` (stops early, quietly, when the disk is full)."""
    chunk = b"\0" * (1 << 20)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while written < size:
            try:
                written += os.write(fd, chunk[: min(len(chunk), size - written)])
            except OSError:
                break
    finally:
        os.close(fd)
    return written
