"""kill -9 at random (seeded) moments during a 2,000-image push with results flowing to a real PACS.

LONG: about 2-3 minutes on 2 cores (2,000 slices received, classified, reported and delivered, with four
restarts). Set EDGED_FAULT_SEED to replay a run; the seed is printed on failure.

Re-sent images and series completion (why this test is deterministic whatever the kill moments):
a scanner whose association broke re-sends the whole series. Images edged had already stored are
answered Success again and change nothing (same SOP Instance UID: idempotent; the series is not touched).
Only images edged never acknowledged are new. If the series had completed meanwhile (its quiet period
passed while edged was down or restarting), the first new image re-opens it and its generation goes up:
a new report for the new generation (new SR instance UID, same SR series, superseding the previous one),
never a second report for the same generation. So the test does not try to avoid re-opening; it accounts
generations: for every series, exactly one SR per generation 0..G at the PACS (G from the journal), and
the latest one covers every image of the series.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from faults import (CLASSIFIER, Pusher, add_destination, dataset_bytes, evidence_uids, orthanc_datasets,
                    phantom_pool, probability_refs, sop_uid, stop_orthanc, wait_all_delivered, write_small_series)
from orthanc import Orthanc
from support import PIPELINE, EdgedProcess

from edged.dicom.uids import result_uids

SERIES = 8
PER_SERIES = 250  # 2,000 images
#: Long enough that a sender slowed by a busy machine rarely pauses this long inside a series (each
#: such pause would close the series and make one more generation: correct, but a report more to write).
QUIET = 5.0
OUTBOX = {"retry_base_seconds": 0.2, "retry_max_seconds": 1.0, "association_idle_seconds": 1.0}


@pytest.fixture
def orthanc(tmp_path: Path):
    o = Orthanc(tmp_path / "orthanc")
    yield o
    stop_orthanc(o)


def _wait_for(edged: EdgedProcess, what: str, cond: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert edged.alive(), edged.log_text()[-3000:]
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_kill9_during_2000_image_push_with_results_flowing(edged_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    seed = int(os.environ.get("EDGED_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    pool = phantom_pool(12, seed=5)
    series = [write_small_series(tmp_path / "ct" / str(k), k, PER_SERIES, pool) for k in range(SERIES)]
    every = [p for s in series for p in s]
    t0 = time.monotonic()
    orthanc.start()
    edged = edged_factory(engines={"models": [CLASSIFIER]}, outbox=OUTBOX,
                          pipeline={**PIPELINE, "max_attempts": 3, "series_quiet_seconds": QUIET})
    add_destination(edged, orthanc)
    edged.start(timeout=180)
    acked: set[Path] = set()
    kills: list[str] = []

    def unfinished(groups: list[list[Path]]) -> list[list[Path]]:
        """The series a scanner re-sends: those with an image it never saw acknowledged."""
        return [g for g in groups if not set(g) <= acked]

    def push_and_kill(groups: list[list[Path]], kill_after: int) -> None:
        pusher = Pusher(edged.port, groups)
        pusher.start()
        _wait_for(edged, f"{kill_after} acknowledgements",
                  lambda: len(pusher.acked) >= kill_after or not pusher.is_alive())
        assert pusher.is_alive(), f"seed {seed}: the push ended before the kill"
        time.sleep(rng.uniform(0, 0.02))  # land anywhere inside the next C-STORE
        edged.kill9()
        kills.append("receive")
        pusher.join(30)
        acked.update(pusher.acked)
        edged.start(timeout=180)

    def kill_when(what: str, cond: Callable[[], bool]) -> None:
        _wait_for(edged, what, cond)
        time.sleep(rng.uniform(0, 0.05))
        edged.kill9()
        kills.append(what)
        edged.start(timeout=180)

    def reports_running() -> bool:
        return bool(edged.query("SELECT 1 FROM jobs WHERE level = 'report' AND state = 'running' LIMIT 1"))

    def results_in_flight() -> bool:
        return bool(edged.query("SELECT 1 FROM jobs WHERE level = 'report' AND state = 'running'"
                                " UNION ALL SELECT 1 FROM deliveries WHERE state = 'pending' LIMIT 1"))

    try:
        # 1: the first four series, killed during receive (earlier series' reports may be on their way).
        push_and_kill(series[:4], rng.randrange(150, 900))
        # 2: re-send what was interrupted, then the other four series; killed during receive again.
        push_and_kill(unfinished(series[:4]) + series[4:], rng.randrange(100, 1000))
        # 3: re-send the rest; nothing is killed during this push.
        final = Pusher(edged.port, unfinished(series))
        final.start()
        final.join(600)
        assert not final.is_alive(), "the last push did not finish"
        acked.update(final.acked)
        assert not final.broken and not final.other, f"seed {seed}: {final.other[:3]}"
        # 4, 5: killed while a report is being written, then while results are written or delivered.
        kill_when("report", reports_running)
        kill_when("result in flight", results_in_flight)
        wait_all_delivered(edged, timeout=600)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}, kills {kills}: {exc}") from None
    elapsed = time.monotonic() - t0
    print(f"\nkill9 fault test: seed {seed}, {len(kills)} kills {kills}, {len(every)} images, {elapsed:.0f} s")

    # Every image was acknowledged once the scanner re-sent, and every acknowledged image is in the journal
    # with the bytes that were sent (the spool keeps the dataset as received).
    assert acked == set(every), f"seed {seed}"
    rows = {r["sop_instance_uid"]: r for r in edged.rows()}
    uid_of = {p: sop_uid(p) for p in every}
    assert set(rows) == set(uid_of.values())
    for p in every:
        assert dataset_bytes((edged.storage / rows[uid_of[p]]["path"]).read_bytes()) == dataset_bytes(p.read_bytes())
    assert edged.temp_files() == []

    # Exactly one instance job and one finding per image (one label), none dead.
    jobs = edged.query("SELECT * FROM jobs")
    assert {j["state"] for j in jobs} == {"done"}, f"seed {seed}: {Counter(j['state'] for j in jobs)}"
    per_image = Counter(j["sop_instance_uid"] for j in jobs if j["level"] == "instance")
    assert set(per_image) == set(uid_of.values()) and set(per_image.values()) == {1}
    found = edged.query("SELECT j.sop_instance_uid, j.series_instance_uid, f.label, f.present FROM findings f"
                        " JOIN jobs j ON j.id = f.job_id WHERE j.level = 'instance'")
    assert Counter((f["sop_instance_uid"], f["label"]) for f in found) == {(u, "lung nodule"): 1 for u in per_image}

    # At the PACS: for every series exactly one SR per generation, the journal's results and no others.
    srs = [d for d in orthanc_datasets(orthanc) if d.Modality == "SR"]
    by_uid = Counter(str(d.SOPInstanceUID) for d in srs)
    assert set(by_uid.values()) == {1}
    journal_results = Counter((r["series_instance_uid"], r["generation"])
                              for r in edged.query("SELECT * FROM results WHERE kind = 'sr'"))
    assert set(journal_results.values()) == {1}, "two reports for one generation"
    deliveries = Counter(r["state"] for r in edged.query("SELECT state FROM deliveries"))
    assert deliveries == {"delivered": len(journal_results)}
    sr_by_uid = {str(d.SOPInstanceUID): d for d in srs}
    generations = []
    for files in series:
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        (g,) = [r["generation"] for r in edged.query(
            f"SELECT generation FROM series WHERE series_instance_uid = '{series_uid}'")]
        generations.append(g)
        expected = [result_uids(series_uid, CLASSIFIER, "1.0.0", n).sr_instance for n in range(g + 1)]
        assert all(u in sr_by_uid for u in expected), f"seed {seed}: a generation's SR is missing at the PACS"
        assert [int(sr_by_uid[u].InstanceNumber) for u in expected] == list(range(1, g + 2))
        # The latest report covers every image of its series, with one probability per positive image.
        latest = sr_by_uid[expected[-1]]
        uids = {uid_of[p] for p in files}
        assert uids <= evidence_uids(latest)
        positives = {f["sop_instance_uid"] for f in found if f["series_instance_uid"] == series_uid and f["present"]}
        refs = Counter(probability_refs(latest))
        assert set(refs) == positives and set(refs.values()) <= {1}
    assert len(srs) == sum(g + 1 for g in generations)  # nothing else arrived
    print(f"kill9 fault test: generations per series {generations}, {len(srs)} SRs at the PACS")
