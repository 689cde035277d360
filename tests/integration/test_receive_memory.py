"""Resident memory while receiving: 2,000 images pushed over one association must not grow the daemon.

Each received dataset is written to the spool and dropped once acknowledged, so the daemon's resident
set after 2,000 images should be what it was after the first 200 (warm: every code path, SQLite's
page cache and the WAL index already in use). The bound, 8 MiB, is a leak of ~4.6 KB per image (about
half of each 64x64 16-bit image, ~9 KB as sent), so keeping any part of every dataset fails it, while
SQLite's page cache (2 MiB by default) and CPython's allocator arenas stay inside it (measured growth
here: 1.4 MiB). No model runs (empty engines dir): the receive path
alone. Costs ~30-60 s on 2 cores (2,000 fsynced images); long, and marked so in its name.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from edged.synthetic import write_ct_series

from support import EdgedProcess, dcmtk_env, require_tool

IMAGES = 2000
WARM = 200
BOUND_BYTES = 8 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def push(edged: EdgedProcess, folder: Path, names: list[str]) -> None:
    res = subprocess.run([require_tool("storescu"), "-aec", "EDGED", "127.0.0.1", str(edged.port), *names],
                         cwd=folder, env=dcmtk_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]


def test_long_rss_stays_flat_over_2000_images(edged_factory, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "small", IMAGES, rows=64, columns=64)
    names = [f.name for f in files]
    (tmp_path / "no-models").mkdir()
    edged = edged_factory(engines={"dir": str(tmp_path / "no-models")}).start()
    assert edged.proc is not None
    push(edged, files[0].parent, names[:WARM])
    warm = rss_bytes(edged.proc.pid)
    push(edged, files[0].parent, names[WARM:])
    after = rss_bytes(edged.proc.pid)
    assert len(edged.rows()) == IMAGES
    assert len(edged.spool_files()) == IMAGES
    assert after - warm <= BOUND_BYTES, f"RSS grew {(after - warm) / 2**20:.1f} MiB over {IMAGES - WARM} images"
    print(f"RSS warm {warm / 2**20:.1f} MiB, after {IMAGES} images {after / 2**20:.1f} MiB")
