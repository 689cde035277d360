"""The pipeline end to end with the demo models: storescu -> edged -> findings in the journal."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from support import PIPELINE, EdgedProcess, findings, jobs, require_tool, run, storescu, wait_jobs, write_series

from edged.inference.onnxruntime import OnnxRuntimeEngine
from edged.inference.repository import Repository
from edged.pipeline.postprocess import activate
from edged.pipeline.preprocess import prepare_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models():
    return Repository(REPO / "engines").load()


def test_series_findings_match_the_engine_run_directly(edged_factory, tmp_path: Path, models) -> None:
    files = write_series(tmp_path / "ct", 12, seed=1)
    edged = edged_factory(pipeline=PIPELINE).start()
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)  # arrival order is not slice order
    storescu(edged, shuffled)
    wait_jobs(edged, total=12 + 1 + 2)  # instance jobs, the series job, a report per model
    rows = jobs(edged)
    assert [r["state"] for r in rows] == ["done"] * 15
    assert sum(r["level"] == "series" for r in rows) == 1 and sum(r["level"] == "report" for r in rows) == 2

    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    cls, seg = models["ct-nodule-cls"], models["lesion-seg"]
    found = findings(edged)
    with OnnxRuntimeEngine(cls) as engine:
        for f in (f for f in found if f["model"] == "ct-nodule-cls"):
            x = prepare_dataset(pydicom.dcmread(by_uid[f["sop_instance_uid"]]), cls.preprocess.spec())
            p = float(activate(engine.infer(x)["logit"], "sigmoid")[0, 0])
            assert abs(f["probability"] - p) < 1e-5
            assert bool(f["present"]) == (p >= 0.5)
    (s,) = [f for f in found if f["model"] == "lesion-seg"]
    sources = json.loads(s["sources"])
    assert sources == [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[::-1]]  # by z
    volume = np.stack([prepare_dataset(pydicom.dcmread(by_uid[u]), seg.preprocess.spec())[0] for u in sources])
    with OnnxRuntimeEngine(seg) as engine:
        out = np.concatenate([engine.infer(volume[i : i + 8])["mask_logit"] for i in range(0, len(volume), 8)])
    probs = activate(out, "sigmoid")[:, 0]
    assert bool(s["present"]) == bool((probs >= 0.5).any())
    m = json.loads(s["measurements"])
    assert m["planes"] == 12 and m["skipped_instances"] == 0
    if s["present"]:
        stored = np.load(edged.storage / s["mask_path"])["mask"]
        assert stored.shape == (12, 512, 512)
        expected = np.repeat(np.repeat(probs >= 0.5, 2, axis=1), 2, axis=2)
        np.testing.assert_array_equal(stored, expected)
        assert m["volume_mm3"] == pytest.approx(expected.sum() * (500 / 512) ** 2 * 2.5)
    status = json.loads(run([str(Path(__import__("sys").executable)), "-m", "edged", "status", "--json",
                             "--config", str(edged.config)], env=None).stdout)
    assert status["jobs"]["done"] == 15 and status["models"]["lesion-seg"]["done"] == 2
    assert status["instances"]["done"] == 12
    edged.stop()
    stats = [line for line in edged.log_text().splitlines() if "event=batcher.stats model=ct-nodule-cls" in line]
    assert stats and "inputs=12" in stats[-1]


def test_duplicate_slices_keep_the_rescan(edged_factory, tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 6, seed=2)
    rescan = pydicom.dcmread(files[2])
    rescan.SOPInstanceUID = rescan.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    rescan.AcquisitionNumber = 2
    dup = tmp_path / "rescan.dcm"
    rescan.save_as(dup, enforce_file_format=True)
    edged = edged_factory(pipeline=PIPELINE).start()
    storescu(edged, [dup, *files])
    wait_jobs(edged, total=7 + 1 + 2)
    (s,) = [f for f in findings(edged) if f["model"] == "lesion-seg"]
    sources = json.loads(s["sources"])
    assert len(sources) == 6 and str(rescan.SOPInstanceUID) in sources
    assert str(pydicom.dcmread(files[2], stop_before_pixels=True).SOPInstanceUID) not in sources


def test_corrupt_pixel_data_fails_only_its_own_job(edged_factory, tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 5, seed=3)
    rle = tmp_path / "rle.dcm"
    assert run([require_tool("dcmcrle"), str(files[1]), str(rle)]).returncode == 0
    ds = pydicom.dcmread(rle)
    frags = pydicom.encaps.generate_fragments(ds.PixelData)
    first = next(frags)
    garbage = b"\xff" * len(first)  # an RLE header announcing 255 segments: undecodable
    ds.PixelData = pydicom.encaps.encapsulate([garbage])
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    edged = edged_factory(pipeline=PIPELINE).start()
    storescu(edged, [files[0], bad, *files[2:]], "-xr")  # also propose RLE, so the file goes as it is
    wait_jobs(edged, total=5 + 1 + 2)
    bad_uid = str(ds.SOPInstanceUID)
    states = {(r["model"], r["sop_instance_uid"]): r for r in jobs(edged)}
    dead = states[("ct-nodule-cls", bad_uid)]
    assert dead["state"] == "dead" and dead["attempts"] == 2 and dead["last_error"]
    others = [r for k, r in states.items() if k != ("ct-nodule-cls", bad_uid)]
    assert all(r["state"] == "done" for r in others)
    (s,) = [f for f in findings(edged) if f["model"] == "lesion-seg"]
    assert json.loads(s["measurements"])["skipped_instances"] == 1
    assert "event=job.failed" in edged.log_text() and bad_uid not in edged.log_text()


def test_kill9_mid_inference_every_job_finishes_once(edged_factory, tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 40, seed=4)
    edged = edged_factory(pipeline=PIPELINE).start()
    storescu(edged, files)
    # The classifier's instance jobs keep pace with storescu, so the kill waits for the segmenter's series
    # job (hundreds of ms on 40 slices) to be running: a job the journal has as running when the process dies.
    deadline = time.monotonic() + 60
    while not any(r["state"] == "running" and r["level"] == "series" for r in jobs(edged)):
        assert time.monotonic() < deadline, "the series job never ran"
        time.sleep(0.005)
    edged.kill9()
    interrupted = [r["id"] for r in jobs(edged) if r["state"] == "running"]
    assert interrupted, "the series job finished between the look and the kill: nothing was interrupted"
    edged.start()
    wait_jobs(edged, total=40 + 1 + 2)
    rows = [r for r in jobs(edged) if r["level"] != "report"]
    assert all(r["state"] == "done" for r in jobs(edged))
    per_job: dict[int, int] = {}
    for f in findings(edged):
        per_job[f["job_id"]] = per_job.get(f["job_id"], 0) + 1
    assert sorted(per_job) == sorted(r["id"] for r in rows)
    assert set(per_job.values()) == {1}  # one label each: exactly one finding per job, no duplicates
    assert "event=jobs.recovered" in edged.log_text()  # the interrupted jobs were taken up again
