"""Results end to end: storescu -> edged (demo models) -> SR + SEG -> Orthanc, a real PACS."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from orthanc import Orthanc
from support import PIPELINE, EdgedProcess, jobs, require_tool, run, storescu, write_series

from edged.dicom.uids import result_uids

OUTBOX = {"retry_base_seconds": 0.2, "retry_max_seconds": 1.0, "max_attempts": 4, "association_idle_seconds": 1.0}


@pytest.fixture
def orthanc(tmp_path: Path):
    o = Orthanc(tmp_path / "orthanc")
    yield o
    o.stop()


def destination(o: Orthanc, **extra: object) -> dict:
    return {"name": "orthanc", "ae_title": o.aet, "host": "127.0.0.1", "port": o.dicom_port, **extra}


def make_edged(edged_factory, o: Orthanc, name: str = "edged", outbox: dict | None = None, **dest: object) -> EdgedProcess:
    e = edged_factory(name, pipeline=PIPELINE, outbox={**OUTBOX, **(outbox or {})})
    with e.config.open("a") as f:  # [[destinations]] is an array of tables
        f.write("\n[[destinations]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in destination(o, **dest).items()))
    return e


def deliveries(edged: EdgedProcess) -> dict:
    out = subprocess.run([sys.executable, "-m", "edged", "status", "--json", "--config", str(edged.config)],
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)["deliveries"]


def wait_delivered(edged: EdgedProcess, n: int, timeout: float = 120) -> None:
    """Until at least ``n`` deliveries are delivered, every job (reports included) has finished and every
    result is delivered: a report still being written has no delivery yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = deliveries(edged)
        finished = all(r["state"] in ("done", "dead") for r in jobs(edged))
        results = len(edged.query("SELECT id FROM results"))
        if d["delivered"] >= max(n, results) and d["pending"] == 0 and finished:
            return
        assert edged.alive(), edged.log_text()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"not delivered: {deliveries(edged)}\n{edged.log_text()[-2000:]}")


def orthanc_objects(o: Orthanc) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(o.file(i))) for i in o.instances()]


def test_results_arrive_reference_their_sources_and_validate(edged_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 8, seed=11)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    orthanc.start()
    edged = make_edged(edged_factory, orthanc).start()
    storescu(edged, files)
    wait_delivered(edged, 2)
    objs = orthanc_objects(orthanc)
    srs = [o for o in objs if o.Modality == "SR"]
    segs = [o for o in objs if o.Modality == "SEG"]
    assert len(srs) == 2 and len(segs) <= 1
    assert deliveries(edged)["delivered"] == len(objs)

    series_uid = str(sources[0].SeriesInstanceUID)
    source_uids = {str(s.SOPInstanceUID) for s in sources}
    for sr in srs:
        model = "ct-nodule-cls" if "ct-nodule-cls" in sr.SeriesDescription else "lesion-seg"
        uids = result_uids(series_uid, model, "1.0.0", 0)
        assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == (uids.sr_instance, uids.sr_series)  # deterministic
        assert sr.SeriesDescription == f"edged {model} 1.0.0"
        assert sr.PatientID == sources[0].PatientID and sr.StudyInstanceUID == sources[0].StudyInstanceUID
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
        evidence = {str(item.ReferencedSOPInstanceUID)
                    for study in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
        assert source_uids <= evidence
        if model == "lesion-seg" and segs:
            assert segs[0].SOPInstanceUID in evidence  # the SR references its SEG
            assert segs[0].SOPInstanceUID == uids.seg_instance
    for seg in segs:
        refs = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
        assert refs <= source_uids and refs
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"

    log = edged.log_text()
    assert not any(uid in log for uid in source_uids | {series_uid, str(sources[0].PatientID)})

    # The audit trail: JSON lines, every stored instance and delivered result, referenced by a keyed hash.
    audit_text = (edged.storage / "audit.jsonl").read_text()
    assert not any(uid in audit_text for uid in source_uids | {s.SOPInstanceUID for s in srs})
    records = [json.loads(line) for line in audit_text.splitlines()]
    events = [r["event"] for r in records]
    assert events.count("instance.stored") == len(files) and "association.closed" in events
    assert events.count("result.delivered") == len(objs)
    key = (edged.storage / "audit.key").read_bytes()
    stored_refs = {r["ref"] for r in records if r["event"] == "instance.stored"}
    assert stored_refs == {hmac.new(key, u.encode(), hashlib.sha256).hexdigest()[:24] for u in source_uids}

    dciodvfy = require_tool("dciodvfy")
    for i, ds in enumerate(objs):
        path = tmp_path / f"result{i}.dcm"
        ds.save_as(path)
        out = run([dciodvfy, str(path)])
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{ds.Modality}: {errors}"


def test_pacs_outage_then_everything_delivered(edged_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 4, seed=12)
    # Orthanc not started yet: the PACS is down. Retries keep going (no dead letters) until it is back.
    edged = make_edged(edged_factory, orthanc, outbox={"max_attempts": 1000}).start()
    storescu(edged, files)
    deadline = time.monotonic() + 60
    while "event=delivery.failed" not in edged.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "event=delivery.failed" in edged.log_text()
    assert deliveries(edged)["delivered"] == 0
    orthanc.start()
    wait_delivered(edged, 2)
    assert deliveries(edged)["dead"] == 0
    assert len(orthanc.instances()) == deliveries(edged)["delivered"]


def test_kill9_during_delivery_then_exactly_one_per_uid(edged_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    orthanc.start()
    edged = make_edged(edged_factory, orthanc).start()
    for k in range(3):  # three series: several results in flight
        storescu(edged, write_series(tmp_path / f"ct{k}", 3, seed=20 + k, series=str(k)))
    deadline = time.monotonic() + 60
    while deliveries(edged)["delivered"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    edged.kill9()
    edged.start()
    wait_delivered(edged, 6)
    result_uids_in_journal = {r[0] for r in edged.query("SELECT sop_instance_uid FROM results")}
    in_orthanc = [orthanc.tags(i)["SOPInstanceUID"] for i in orthanc.instances()]
    assert sorted(in_orthanc) == sorted(result_uids_in_journal)  # one per result UID, none extra


def test_refusing_destination_goes_dead_then_retry_delivers(edged_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    orthanc.start()
    edged = make_edged(edged_factory, orthanc, ae_title="WRONGAE")
    edged.start()
    storescu(edged, write_series(tmp_path / "ct", 3, seed=30))
    deadline = time.monotonic() + 90
    while deliveries(edged)["dead"] < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert deliveries(edged)["dead"] >= 2 and deliveries(edged)["delivered"] == 0
    listed = subprocess.run([sys.executable, "-m", "edged", "outbox", "list", "--dead", "--json", "--config",
                             str(edged.config)], capture_output=True, text=True, timeout=60)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    # Dead after max_attempts, every one refused for good. (Orthanc rejects and closes at once; stock
    # pynetdicom sometimes read that as "association failed", transient: edged.dicom.requestor.associate.)
    assert rows and all(r["state"] == "dead" and r["attempts"] == OUTBOX["max_attempts"] for r in rows)
    assert all("association rejected (permanent)" in r["last_error"] for r in rows)
    # The operator fixes the AE title and restarts, then retries the dead deliveries.
    edged.stop()
    edged.config.write_text(edged.config.read_text().replace('"WRONGAE"', f'"{orthanc.aet}"'))
    edged.start()
    retry = subprocess.run([sys.executable, "-m", "edged", "outbox", "retry", "--all-dead", "--config",
                            str(edged.config)], capture_output=True, text=True, timeout=60)
    assert retry.returncode == 0 and "queued again" in retry.stdout
    wait_delivered(edged, len(rows))
    assert len(orthanc.instances()) == len(rows)
    assert all(r["state"] == "done" for r in jobs(edged))
