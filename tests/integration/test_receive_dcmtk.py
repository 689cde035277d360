"""The listener against DCMTK's storescu and echoscu (the scanner's side), on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from support import EdgedProcess, dcmtk_env, eventually, require_tool, run


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_stored_identical(edged: EdgedProcess, sent: list[Path]) -> None:
    """Every sent file is in the journal, and the spool file holds the same dataset and pixels."""
    rows = {r["sop_instance_uid"]: r for r in edged.rows()}
    assert len(rows) == len(sent)
    for path in sent:
        original = pydicom.dcmread(path)
        row = rows[str(original.SOPInstanceUID)]
        assert row["state"] == "received"
        assert row["sop_class_uid"] == original.SOPClassUID
        assert row["series_instance_uid"] == original.SeriesInstanceUID
        assert row["modality"] == "CT"
        stored = pydicom.dcmread(edged.storage / row["path"])
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert stored == original  # every element, value for value
        assert stored.PixelData == original.PixelData
    assert len(edged.spool_files()) == len(sent)
    assert edged.temp_files() == []


def test_storescu_200_slices_one_association(edged: EdgedProcess, ct_series: list[Path]) -> None:
    storescu = require_tool("storescu")
    res = run([storescu, "-aec", "EDGED", "127.0.0.1", str(edged.port), *map(str, ct_series)])
    assert res.returncode == 0, res.stderr
    assert_stored_identical(edged, ct_series)
    assert "stored=200" in edged.log_text()


def test_four_concurrent_storescu_50_each(edged: EdgedProcess, ct_series: list[Path]) -> None:
    storescu = require_tool("storescu")
    parts = [ct_series[i::4][:50] for i in range(4)]
    procs = [
        subprocess.Popen([storescu, "-aec", "EDGED", "127.0.0.1", str(edged.port), *map(str, part)],
                         env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for part in parts
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert_stored_identical(edged, [f for part in parts for f in part])


def test_resend_is_idempotent(edged: EdgedProcess, ct_series: list[Path]) -> None:
    storescu = require_tool("storescu")
    files = [str(p) for p in ct_series[:5]]
    for _ in range(2):
        res = run([storescu, "-aec", "EDGED", "127.0.0.1", str(edged.port), *files])
        assert res.returncode == 0, res.stderr
    assert len(edged.rows()) == 5
    assert len(edged.spool_files()) == 5
    eventually(lambda: "duplicates=5" in edged.log_text(), what="the second association's summary line")


def test_echoscu_succeeds(edged: EdgedProcess) -> None:
    res = run([require_tool("echoscu"), "-aec", "EDGED", "127.0.0.1", str(edged.port)])
    assert res.returncode == 0, res.stderr


def test_wrong_called_ae_is_rejected(edged: EdgedProcess) -> None:
    res = run([require_tool("echoscu"), "-aec", "NOTEDGED", "127.0.0.1", str(edged.port)])
    assert res.returncode != 0
    assert "Called AE Title Not Recognized" in res.stderr + res.stdout
    eventually(lambda: "event=association.rejected reason=called_ae" in edged.log_text(), what="the rejection's log line")


def test_calling_ae_allowlist(edged_factory) -> None:
    edged = edged_factory(dicom={"allowed_calling_aes": ["CT01", "MR02"]}).start()
    echoscu = require_tool("echoscu")
    denied = run([echoscu, "-aet", "INTRUDER", "-aec", "EDGED", "127.0.0.1", str(edged.port)])
    assert denied.returncode != 0
    assert "Calling AE Title Not Recognized" in denied.stderr + denied.stdout
    allowed = run([echoscu, "-aet", "MR02", "-aec", "EDGED", "127.0.0.1", str(edged.port)])
    assert allowed.returncode == 0, allowed.stderr
    eventually(lambda: "reason=calling_ae" in edged.log_text(), what="the rejection's log line")


def test_logs_carry_no_patient_data(edged: EdgedProcess, ct_series: list[Path]) -> None:
    run([require_tool("storescu"), "-aec", "EDGED", "127.0.0.1", str(edged.port), *map(str, ct_series[:20])])
    assert len(edged.rows()) == 20
    edged.stop()
    log = edged.log_text()
    ds = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
    for secret in (str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                   *(_uid(p) for p in ct_series[:20])):
        assert secret not in log
    assert "event=association.released" in log


def test_sigterm_lets_the_running_push_finish(edged_factory, ct_series: list[Path]) -> None:
    """SIGTERM during a push: the listener stops accepting, the running association completes (within
    a shutdown timeout that leaves a loaded machine ample time for the rest of the 100 slices)."""
    edged = edged_factory(daemon={"shutdown_timeout": 60.0}).start()
    storescu = require_tool("storescu")
    push = subprocess.Popen([storescu, "-aec", "EDGED", "127.0.0.1", str(edged.port), *map(str, ct_series[:100])],
                            env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not edged.rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert edged.stop(timeout=90) == 0
    _, err = push.communicate(timeout=60)
    assert push.returncode == 0, err.decode()
    assert len(edged.rows()) == 100
    assert "event=shutdown.complete" in edged.log_text()
    later = run([require_tool("echoscu"), "-aec", "EDGED", "127.0.0.1", str(edged.port)])
    assert later.returncode != 0  # nothing listens any more


def test_second_signal_skips_the_graceful_wait(edged_factory) -> None:
    """An idle association would hold shutdown for shutdown_timeout; a second SIGTERM ends it at once."""
    edged = edged_factory(daemon={"shutdown_timeout": 300.0}).start()
    ae = AE()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", edged.port, ae_title="EDGED")
    assert assoc.is_established
    try:
        assert edged.proc is not None
        edged.proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            edged.proc.wait(2)  # still waiting for the open association
        edged.proc.send_signal(signal.SIGTERM)
        assert edged.proc.wait(60) == 0
        assert "event=shutdown.aborted_associations count=1" in edged.log_text()
    finally:
        assoc.abort()
