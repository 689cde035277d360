"""kill -9 during a push: everything the sender saw acknowledged survives, and spool and journal agree."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pydicom
from faults import Pusher
from support import EdgedProcess

from edged.dicom import scu


def assert_consistent(edged: EdgedProcess, acked: list[Path]) -> None:
    rows = {r["sop_instance_uid"]: r for r in edged.rows()}
    for path in acked:
        original = pydicom.dcmread(path)
        row = rows.get(str(original.SOPInstanceUID))
        assert row is not None, f"acknowledged {path.name} missing from the journal"
        assert pydicom.dcmread(edged.storage / row["path"]) == original
    assert edged.temp_files() == []
    on_disk = {p.relative_to(edged.storage).as_posix() for p in edged.spool_files()}
    assert on_disk == {r["path"] for r in rows.values()}


def test_kill9_during_push_loses_nothing_acknowledged(edged_factory, ct_series: list[Path]) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    edged = edged_factory().start()
    acked_total: set[Path] = set()
    for round_ in range(3):
        # Each round pushes new files (and re-sends the previous round's), killed mid-push.
        pusher = Pusher(edged.port, [ct_series[: 60 * (round_ + 1)]])
        pusher.start()
        kill_after = len(acked_total) + rng.randrange(5, 40)
        deadline = time.monotonic() + 60
        while len(pusher.acked) < kill_after and pusher.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))  # land anywhere inside the next C-STORE
        edged.kill9()
        pusher.join(30)
        acked_total.update(pusher.acked)
        edged.start()  # reconciles the spool with the journal at start
        assert len(acked_total) >= kill_after, f"seed {seed}: push did not progress"
        assert_consistent(edged, sorted(acked_total))
        assert "event=spool.reconciled" in edged.log_text()
    # The sender re-sends everything: each instance ends up stored exactly once.
    results = list(scu.send_iter(ct_series, "127.0.0.1", edged.port, aec="EDGED"))
    assert {o for _, o in results} == {"0x0000"}
    assert len(edged.rows()) == len(ct_series)
    assert_consistent(edged, ct_series)
