"""Job lifecycle in the journal: claim with a lease, finish once, fail and retry, die, recover, series."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from edged.spool.journal import FindingRecord, InstanceRecord, JobResult, Journal, Route, list_deliveries, read_counts

CLS = Route("cls", "1", "instance")
SEG = Route("seg", "1", "series")


def rec(uid: str, series: str = "9.1", expected: int | None = None) -> InstanceRecord:
    return InstanceRecord(uid, "1.2.840.10008.5.1.4.1.1.2", "9", series, "CT", "1.2.840.10008.1.2.1", 1, "CT01",
                          f"spool/instances/{uid}.dcm", expected_count=expected)


@pytest.fixture
def j(tmp_path: Path):
    journal = Journal.open(tmp_path)
    yield journal
    journal.close()


def finding() -> list[FindingRecord]:
    return [FindingRecord("nodule", True, 0.9, {"threshold": 0.5})]


def test_instance_job_runs_once(j: Journal) -> None:
    j.add_instance(rec("1"), [CLS])
    (job,) = j.claim_jobs("cls", 10, 60, "tok-a")
    assert job.attempts == 1 and job.level == "instance"
    assert j.claim_jobs("cls", 10, 60, "tok-b") == []  # leased: nobody else gets it
    assert j.finish_jobs([JobResult(job, finding(), ["1"])]) == [job.id]
    assert j.finish_jobs([JobResult(job, finding(), ["1"])]) == []  # never completed twice
    assert len(j.findings()) == 1
    assert j.pending == 0


def test_expired_lease_returns_to_pending_and_stale_worker_cannot_finish(j: Journal) -> None:
    j.add_instance(rec("1"), [CLS])
    (old,) = j.claim_jobs("cls", 1, lease_seconds=0.01, token="tok-a")
    time.sleep(0.05)
    assert j.recover_jobs() == 1
    (new,) = j.claim_jobs("cls", 1, 60, "tok-b")
    assert new.id == old.id and new.attempts == 2
    assert j.finish_jobs([JobResult(old, finding(), ["1"])]) == []  # the first attempt lost its lease
    assert j.finish_jobs([JobResult(new, finding(), ["1"])]) == [new.id]
    assert len(j.findings()) == 1


def test_failure_retries_then_dies(j: Journal) -> None:
    j.add_instance(rec("1"), [CLS])
    (job,) = j.claim_jobs("cls", 1, 60, "t")
    assert j.fail_job(job, "ValueError: bad pixels", max_attempts=2, retry_delay=0.0) == "failed"
    (job2,) = j.claim_jobs("cls", 1, 60, "t")
    assert job2.attempts == 2
    assert j.fail_job(job2, "ValueError: bad pixels", max_attempts=2, retry_delay=0.0) == "dead"
    assert j.claim_jobs("cls", 1, 60, "t") == []
    assert j.pending == 0  # a dead job finishes its instance
    counts = read_counts(j.path.parent)
    assert counts["jobs"]["dead"] == 1 and counts["models"]["cls"]["dead"] == 1


def test_failed_job_waits_for_its_retry_delay(j: Journal) -> None:
    j.add_instance(rec("1"), [CLS])
    (job,) = j.claim_jobs("cls", 1, 60, "t")
    j.fail_job(job, "x", max_attempts=3, retry_delay=3600)
    assert j.claim_jobs("cls", 1, 60, "t") == []
    assert len(j.claim_jobs("cls", 1, 60, "t", now=time.time() + 3601)) == 1


def test_start_up_recovers_every_running_job(j: Journal) -> None:
    for i in range(3):
        j.add_instance(rec(str(i)), [CLS])
    j.claim_jobs("cls", 3, 3600, "crashed")
    assert j.recover_jobs(all_running=True) == 3
    assert len(j.claim_jobs("cls", 10, 60, "new")) == 3


def test_series_job_after_quiet_period_and_reopen(j: Journal) -> None:
    for i in range(3):
        j.add_instance(rec(str(i)), [CLS, SEG])
    now = time.time()
    assert j.complete_series(quiet_seconds=10, now=now) == []  # still arriving
    # the series job, and a report job per model (cls, seg)
    assert j.complete_series(quiet_seconds=10, now=now + 11) == [("9.1", 3)]
    (sjob,) = j.claim_jobs("seg", 5, 60, "t")
    assert sjob.level == "series" and sjob.generation == 0
    j.finish_jobs([JobResult(sjob, finding(), ["0", "1", "2"])])
    # A late instance reopens the series: a new job, next generation.
    j.add_instance(rec("3"), [CLS, SEG])
    assert j.complete_series(quiet_seconds=10, now=time.time() + 11) == [("9.1", 3)]
    (again,) = j.claim_jobs("seg", 5, 60, "t")
    assert again.generation == 1 and again.id != sjob.id


def test_expected_count_completes_at_once(j: Journal) -> None:
    for i in range(4):
        j.add_instance(rec(str(i), expected=4), [SEG])
    assert j.complete_series(quiet_seconds=3600) == [("9.1", 2)]  # series job + report job


def test_instances_stay_pending_until_their_series_job_is_done(j: Journal) -> None:
    j.add_instance(rec("1"), [CLS, SEG])
    (job,) = j.claim_jobs("cls", 1, 60, "t")
    j.finish_jobs([JobResult(job, finding(), ["1"])])
    assert j.pending == 1  # the series job still needs the file
    j.complete_series(quiet_seconds=0, now=time.time() + 1)
    (sjob,) = j.claim_jobs("seg", 1, 60, "t")
    j.finish_jobs([JobResult(sjob, finding(), ["1"])])
    assert j.pending == 0


def test_status_reports_oldest_pending_age(j: Journal) -> None:
    j.add_instance(rec("1"), [CLS])
    counts = read_counts(j.path.parent)
    assert counts["jobs"]["pending"] == 1
    assert counts["oldest_pending_job_seconds"] is not None and counts["oldest_pending_job_seconds"] >= 0


def test_report_waits_for_the_models_jobs_on_the_series(j: Journal) -> None:
    for i in range(2):
        j.add_instance(rec(str(i)), [CLS])
    j.complete_series(quiet_seconds=0, now=time.time() + 1)
    assert j.claim_jobs(None, 5, 60, "t", reports=True) == []  # instance jobs still pending
    for job in j.claim_jobs("cls", 5, 60, "t"):
        assert job.level == "instance"  # inference lanes never take report jobs
        j.finish_jobs([JobResult(job, finding(), [job.sop_instance_uid])])
    (report,) = j.claim_jobs(None, 5, 60, "t", reports=True)
    assert report.level == "report" and report.model == "cls"


def _report_done(j: Journal, destinations: list[str]) -> None:
    j.add_instance(rec("1"), [CLS])
    (job,) = j.claim_jobs("cls", 1, 60, "t")
    j.finish_jobs([JobResult(job, finding(), ["1"])])
    j.complete_series(quiet_seconds=0, now=time.time() + 1)
    (report,) = j.claim_jobs(None, 1, 60, "t", reports=True)
    from edged.spool.journal import ResultRecord

    assert j.finish_report(report, [ResultRecord("sr", "1.2.840.10008.5.1.4.1.1.88.34", "9.9.9", "spool/results/x.dcm")],
                           destinations)


def test_retention_waits_for_every_delivery(j: Journal) -> None:
    _report_done(j, ["pacs", "archive"])
    later = time.time() + 3600
    assert j.purge(older_than=later) == ([], [], [])  # nothing delivered yet
    (first,) = j.due_deliveries("pacs", 10)
    j.delivered(first.id, "0x0000")
    assert j.purge(older_than=later) == ([], [], [])  # one destination still waiting
    (second,) = j.due_deliveries("archive", 10)
    j.delivered(second.id, "0x0000")
    assert j.purge(older_than=time.time() - 3600) == ([], [], [])  # retention not passed yet
    assert j.purge(older_than=later) == (["spool/instances/1.dcm"], ["spool/results/x.dcm"], [])
    assert "spool/instances/1.dcm" not in j.instance_paths()  # reconcile will not call it missing


def test_history_of_a_purged_series_is_forgotten_after_its_time(j: Journal) -> None:
    _report_done(j, ["pacs"])
    j.add_instance(rec("2", series="9.2"), [CLS])  # another series, still being worked on
    assert j.forget(older_than=time.time() + 3600) == 0  # nothing purged yet: nothing forgotten
    (d,) = j.due_deliveries("pacs", 10)
    j.delivered(d.id, "0x0000")
    j.purge(older_than=time.time() + 3600)
    assert j.forget(older_than=time.time() - 3600) == 0  # its history time has not passed
    assert j.forget(older_than=time.time() + 3600) == 1
    assert j.findings() == [] and not j.has_instance("1")
    assert list_deliveries(j.path.parent) == []
    assert j.has_instance("2") and j.pending == 1  # the other series is untouched
    j.add_instance(rec("1"), [CLS])  # sent again after it was forgotten: a new instance with a new job
    assert len(j.claim_jobs("cls", 10, 60, "t")) == 2


def test_masks_go_with_the_last_instance_of_their_series(j: Journal) -> None:
    seg = Route("seg", "1", "series")
    j.add_instance(rec("1"), [seg])
    j.complete_series(quiet_seconds=0, now=time.time() + 1)
    (job,) = j.claim_jobs("seg", 1, 60, "t")
    j.finish_jobs([JobResult(job, [FindingRecord("lesion", True, 0.9, {}, "spool/masks/m.npz")], ["1"])])
    (report,) = j.claim_jobs(None, 1, 60, "t", reports=True)
    from edged.spool.journal import ResultRecord

    j.finish_report(report, [ResultRecord("seg", "1.2.840.10008.5.1.4.1.1.66.4", "9.9.8", "spool/results/s.dcm")],
                    ["pacs"])
    (d,) = j.due_deliveries("pacs", 10)
    j.delivered(d.id, "0x0000")
    assert j.purge(older_than=time.time() + 3600) == (["spool/instances/1.dcm"], ["spool/results/s.dcm"],
                                                      ["spool/masks/m.npz"])
    assert j.mask_paths() == set()


def test_nothing_is_purged_without_a_destination(j: Journal) -> None:
    _report_done(j, [])
    assert j.purge(older_than=time.time() + 3600) == ([], [], [])


def test_next_series_due_is_the_earliest_open_series_end_of_quiet(j: Journal) -> None:
    assert j.next_series_due(2.0) is None
    j.add_instance(dataclasses.replace(rec("1", series="a"), received_at=100.0), [SEG])
    j.add_instance(dataclasses.replace(rec("2", series="b"), received_at=50.0), [SEG])
    assert j.next_series_due(2.0) == 52.0
    j.complete_series(2.0, now=60.0)  # b is complete, a still open
    assert j.next_series_due(2.0) == 102.0


def test_claims_take_each_runnable_job_once_and_nothing_when_none_is(j: Journal) -> None:
    assert j.claim_jobs("cls", 5, 60, "tok") == []
    assert j.claim_jobs(None, 5, 60, "tok", reports=True) == []
    for uid in ("1", "2", "3"):
        j.add_instance(rec(uid), [CLS])
    first = j.claim_jobs("cls", 2, 60, "tok")
    second = j.claim_jobs("cls", 5, 60, "tok")
    assert [x.sop_instance_uid for x in first + second] == ["1", "2", "3"]
    assert j.claim_jobs("cls", 5, 60, "tok") == []


@pytest.mark.parametrize("reports", [False, True])
def test_a_claim_searches_only_runnable_jobs_not_the_history(j: Journal, reports: bool) -> None:
    # The journal keeps days of finished jobs: claiming (on every stored instance) must find the runnable
    # ones through the (state, model, id) index, not by reading every job the model ever had.
    j.add_instance(rec("1"), [CLS])
    statements: list[str] = []
    conn = j._c()
    conn.set_trace_callback(statements.append)
    try:
        j.claim_jobs(None if reports else "cls", 4, 60, "tok", reports=reports)
    finally:
        conn.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "FROM jobs r" in s]
    assert selects
    for sql in selects:
        plan = " | ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "USING INDEX jobs_state" in plan, plan
