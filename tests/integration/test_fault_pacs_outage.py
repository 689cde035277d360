"""PACS outage for part of a run: Orthanc's process is stopped while series complete and stays down for
many more delivery attempts than ``max_attempts``; started again on the same port, it receives every
result and nothing is dead. About 30-40 s."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from faults import (CLASSIFIER, add_destination, edged_cli, orthanc_datasets, phantom_pool, stop_orthanc,
                    wait_all_delivered, write_small_series)
from orthanc import Orthanc
from support import PIPELINE, metric, metrics_text, storescu

MAX_ATTEMPTS = 3
OUTBOX = {"retry_base_seconds": 0.2, "retry_max_seconds": 0.5, "max_attempts": MAX_ATTEMPTS,
          "association_idle_seconds": 0.5}


@pytest.fixture
def orthanc(tmp_path: Path):
    o = Orthanc(tmp_path / "orthanc")
    yield o
    stop_orthanc(o)


@pytest.mark.timeout(900)
def test_pacs_outage_then_everything_delivered_none_dead(edged_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    pool = phantom_pool(4, seed=7)
    series = [write_small_series(tmp_path / "ct" / str(k), 100 + k, 20, pool) for k in range(4)]
    orthanc.start()
    edged = edged_factory(engines={"models": [CLASSIFIER]}, pipeline=PIPELINE, outbox=OUTBOX)
    add_destination(edged, orthanc)
    edged.start(timeout=180)
    storescu(edged, series[0])
    wait_all_delivered(edged, timeout=300)  # the PACS is up: the first report arrives

    stop_orthanc(orthanc)  # the PACS goes down (its process stops, its port closes)
    for files in series[1:]:
        storescu(edged, files)  # these series complete and are reported while it is down
    deadline = time.monotonic() + 300
    while True:
        rows = [json.loads(line) for line in edged_cli(edged, "outbox", "list", "--json").stdout.splitlines()]
        reports_done = edged.query("SELECT COUNT(*) n FROM jobs WHERE level = 'report' AND state = 'done'")[0]["n"]
        if reports_done == 4 and len(rows) == 3 and min(r["attempts"] for r in rows) > 3 * MAX_ATTEMPTS:
            break
        assert time.monotonic() < deadline, f"deliveries not retried while the PACS is down: {rows}"
        assert edged.alive(), edged.log_text()[-3000:]
        time.sleep(0.3)
    # Many more attempts than max_attempts, and still pending: a connection failure is transient.
    assert all(r["state"] == "pending" and "association failed" in r["last_error"] for r in rows), rows
    text = metrics_text(edged)
    assert metric(text, "edged_deliveries_total", destination="orthanc", result="failed") >= 3 * 3 * MAX_ATTEMPTS
    assert metric(text, "edged_deliveries_total", destination="orthanc", result="dead") == 0
    assert metric(text, "edged_deliveries", state="pending") == 3
    assert "failure=transient" in edged.log_text()

    orthanc.start()  # back, on the same port with the same storage
    wait_all_delivered(edged, timeout=300)
    states = [r["state"] for r in edged.query("SELECT state FROM deliveries")]
    assert states == ["delivered"] * 4
    assert edged_cli(edged, "outbox", "list", "--json").stdout == ""
    in_journal = {r["sop_instance_uid"] for r in edged.query("SELECT sop_instance_uid FROM results")}
    at_pacs = [str(d.SOPInstanceUID) for d in orthanc_datasets(orthanc)]
    assert sorted(at_pacs) == sorted(in_journal) and len(at_pacs) == 4
    assert metric(edged, "edged_deliveries_total", destination="orthanc", result="delivered") == 4
