"""The pipeline's writer: one job whose findings cannot be recorded does not hold back the others."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edged.config import PipelineConfig
from edged.metrics import Metrics
from edged.pipeline.scheduler import Pipeline
from edged.spool.journal import FindingRecord, InstanceRecord, JobResult, Journal, Route
from edged.spool.store import Spool

CLS = Route("cls", "1", "instance")


def _rec(uid: str) -> InstanceRecord:
    return InstanceRecord(uid, "1.2.840.10008.5.1.4.1.1.2", "9", "9.1", "CT", "1.2.840.10008.1.2.1", 1, "CT01",
                          f"spool/instances/{uid}.dcm")


def test_a_bad_record_fails_its_job_only(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)
    try:
        for uid in ("1", "2", "3"):
            journal.add_instance(_rec(uid), [CLS])
        jobs = journal.claim_jobs("cls", 10, 60, "tok")
        assert len(jobs) == 3
        pipeline = Pipeline(journal, Spool(tmp_path), {}, {}, PipelineConfig(max_attempts=1), Metrics())
        good = [FindingRecord("nodule", True, 0.9, {"threshold": 0.5})]
        bad = [FindingRecord("nodule", True, 0.9, {"threshold": object()})]  # not JSON: the insert fails
        pipeline._commit([(JobResult(jobs[0], good, ["1"]), []), (JobResult(jobs[1], bad, ["2"]), []),
                          (JobResult(jobs[2], good, ["3"]), [])])
        states = {r["sop_instance_uid"]: r for r in journal.findings()}
        assert set(states) == {"1", "3"}  # the good jobs' findings are recorded
        with sqlite3.connect(tmp_path / "journal.sqlite3") as db:
            rows = dict(db.execute("SELECT sop_instance_uid, state FROM jobs").fetchall())
            error = db.execute("SELECT last_error FROM jobs WHERE sop_instance_uid = '2'").fetchone()[0]
        assert rows == {"1": "done", "2": "dead", "3": "done"}  # the bad one is dead with a reason, not running
        assert "could not be recorded" in error
    finally:
        journal.close()


def test_a_series_completes_at_the_end_of_its_quiet_period_not_at_the_next_poll(tmp_path: Path) -> None:
    # poll_seconds is long; the control loop still completes the series once it has been quiet.
    import time

    journal = Journal.open(tmp_path)
    pipeline = Pipeline(journal, Spool(tmp_path), {}, {}, PipelineConfig(poll_seconds=60, series_quiet_seconds=0.2),
                        Metrics())
    try:
        pipeline.start()
        journal.add_instance(_rec("1"), [Route("seg", "1", "series")])
        pipeline.notify()
        deadline = time.monotonic() + 30  # far below the 60 s poll interval
        while time.monotonic() < deadline:
            with sqlite3.connect(tmp_path / "journal.sqlite3") as db:
                if db.execute("SELECT state FROM series").fetchone()[0] == "complete":
                    break
            time.sleep(0.05)
        with sqlite3.connect(tmp_path / "journal.sqlite3") as db:
            assert db.execute("SELECT state FROM series").fetchone()[0] == "complete"
            assert db.execute("SELECT COUNT(*) FROM jobs WHERE level = 'series'").fetchone()[0] == 1
    finally:
        pipeline.stop(1)
        journal.close()
