"""Helpers for the fault-injection tests (tests/integration/test_fault_*.py): an edged with a real
Orthanc destination, a pusher that remembers what was acknowledged, small synthetic CT, SR parsing."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pydicom
from orthanc import Orthanc
from support import EdgedProcess

from edged.dicom import scu
from edged.errors import DicomNetworkError
from edged.synthetic import chest_phantom, ct_slice

#: The classifier needs at least 256x256; at this size an SR per 250-slice series stays cheap.
SIZE = 256
CLASSIFIER = "ct-nodule-cls"
PROBABILITY = "122157"  # DCM "Probability"
IMAGE_LIBRARY = "111028"  # DCM "Image Library"


def write_small_series(folder: Path, series: int, count: int, pool: list[np.ndarray]) -> list[Path]:
    """``count`` 256x256 CT slices of a new series, pixel data drawn from ``pool`` (phantoms are slow to make)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = pydicom.uid.generate_uid(entropy_srcs=["edged-faults-study", str(series)])
    series_uid = pydicom.uid.generate_uid(entropy_srcs=["edged-faults-series", str(series)])
    paths = []
    for i in range(count):
        ds = ct_slice(i, study_uid=study, series_uid=series_uid, rows=SIZE, columns=SIZE, slice_thickness=2.5,
                      hu=pool[(i * 7 + series) % len(pool)])
        p = folder / f"s{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def phantom_pool(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [chest_phantom(rng, size=SIZE, nodules=1 if i % 3 == 0 else 0)[0] for i in range(n)]


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's data set, after the preamble and the file meta group (whose length it gives)."""
    assert data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Pusher(threading.Thread):
    """Sends file groups (one association each, as a scanner sends series) until done or the connection
    dies; remembers every file answered with Success (0x0000), and every other answer."""

    def __init__(self, port: int, groups: Iterable[list[Path]]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.groups = list(groups)
        self.acked: list[Path] = []
        self.other: list[tuple[Path, str]] = []
        self.broken = False

    def run(self) -> None:
        try:
            for files in self.groups:
                for path, outcome in scu.send_iter(files, "127.0.0.1", self.port, aec="EDGED", timeout=60):
                    if outcome == "0x0000":
                        self.acked.append(path)
                    else:
                        self.other.append((path, outcome))
        except (DicomNetworkError, OSError, RuntimeError):
            self.broken = True  # the daemon was killed under us


def stop_orthanc(o: Orthanc) -> None:
    """Orthanc.stop, patient with a loaded machine (SIGKILL and a long wait if SIGTERM was not enough)."""
    try:
        o.stop()
    except subprocess.TimeoutExpired:
        assert o.proc is not None
        o.proc.kill()
        o.proc.wait(60)


def add_destination(edged: EdgedProcess, o: Orthanc) -> None:
    with edged.config.open("a") as f:  # [[destinations]] is an array of tables
        f.write("\n[[destinations]]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in
            {"name": "orthanc", "ae_title": o.aet, "host": "127.0.0.1", "port": o.dicom_port}.items()))


def edged_cli(edged: EdgedProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edged", *args, "--config", str(edged.config)],
                          capture_output=True, text=True, timeout=180)


def status(edged: EdgedProcess) -> dict[str, Any]:
    out = edged_cli(edged, "status", "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def wait_all_delivered(edged: EdgedProcess, timeout: float) -> None:
    """Until every job has finished and every result has been delivered (none pending)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        jobs = edged.query("SELECT state, COUNT(*) n FROM jobs GROUP BY state")
        last = {r["state"]: r["n"] for r in jobs}
        unfinished = sum(n for s, n in last.items() if s not in ("done", "dead"))
        open_series = edged.query("SELECT COUNT(*) n FROM series WHERE state = 'open'")[0]["n"]
        pending = edged.query("SELECT COUNT(*) n FROM deliveries WHERE state = 'pending'")[0]["n"]
        results = edged.query("SELECT COUNT(*) n FROM results")[0]["n"]
        delivered = edged.query("SELECT COUNT(*) n FROM deliveries WHERE state != 'pending'")[0]["n"]
        if not unfinished and not open_series and not pending and results and delivered >= results:
            return
        assert edged.alive(), edged.log_text()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"not all delivered: jobs {last}\n{edged.log_text()[-2000:]}")


def orthanc_datasets(o: Orthanc) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(o.file(i))) for i in o.instances()]


def evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}


def probability_refs(sr: pydicom.Dataset) -> list[str]:
    """SOP Instance UIDs referenced by the SR's per-image Probability measurements (NUM items with an
    IMAGE reference inside), one entry per measurement."""
    out: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == IMAGE_LIBRARY:
                continue  # only image references there (hundreds): slow to walk, no measurements
            if (item.get("ValueType") == "NUM" and name and name[0].CodeValue == PROBABILITY
                    and "ContentSequence" in item):
                for sub in item.ContentSequence:
                    if sub.get("ValueType") == "IMAGE":
                        out.extend(str(r.ReferencedSOPInstanceUID) for r in sub.ReferencedSOPSequence)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out
