"""Resident memory while receiving: 2,000 images pushed over one association must not grow the daemon,
and one data set far larger than a PDU must not be held in memory while it arrives.

Each received dataset is written to the spool and dropped once acknowledged, so the daemon's resident
set after 2,000 images should be what it was after the first 200 (warm: every code path, SQLite's
page cache and the WAL index already in use). The bound, 8 MiB, is a leak of ~4.6 KB per image (about
half of each 64x64 16-bit image, ~9 KB as sent), so keeping any part of every dataset fails it, while
SQLite's page cache (2 MiB by default) and CPython's allocator arenas stay inside it (measured growth
here: 1.4 MiB). No model runs (empty engines dir): the receive path
alone. Costs ~30-60 s on 2 cores (2,000 fsynced images); long, and marked so in its name.

A data set is streamed to the spool as its fragments arrive (edged/dicom/stream.py): a 96 MiB one sent in
16 KiB PDUs raises the daemon's peak RSS (VmHWM, reset just before) by well under a quarter of its size
(measured: 0.6 MiB; the in-memory path this replaced: 193 MiB, the data set twice).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from edged.synthetic import write_ct_series

from support import EdgedProcess, dcmtk_env, require_tool, run

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


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_large_data_set_is_not_held_in_memory(edged_factory, tmp_path: Path) -> None:
    """A 96 MiB data set in 16 KiB PDUs: the daemon's peak RSS grows by far less than the data set (the
    in-memory path held all of it, twice: pynetdicom's BytesIO and the copy it hands the handler)."""
    big = write_ct_series(tmp_path / "big", 1, rows=4096, columns=4096)[0]  # 32 MiB of pixels
    ds = pydicom.dcmread(big)
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3  # 96 MiB
    ds.save_as(big, enforce_file_format=True)
    size_mib = big.stat().st_size / 2**20
    (tmp_path / "no-models").mkdir()
    edged = edged_factory(engines={"dir": str(tmp_path / "no-models")}).start()
    assert edged.proc is not None
    res = run([require_tool("echoscu"), "-aec", "EDGED", "127.0.0.1", str(edged.port)])  # warm
    assert res.returncode == 0
    Path(f"/proc/{edged.proc.pid}/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = peak_rss_mib(edged.proc.pid)
    res = run([require_tool("storescu"), "--max-pdu", "16384", "-aec", "EDGED", "127.0.0.1", str(edged.port), str(big)],
              timeout=300)
    assert res.returncode == 0, res.stderr
    grew = peak_rss_mib(edged.proc.pid) - before
    assert len(edged.rows()) == 1 and edged.temp_files() == []
    assert grew < size_mib / 4, f"peak RSS grew {grew:.1f} MiB receiving a {size_mib:.0f} MiB data set"
    print(f"peak RSS grew {grew:.1f} MiB receiving a {size_mib:.0f} MiB data set")
