"""Group commit: many association threads share one directory fsync and one journal transaction, and
none returns before its own group is durable. Real SQLite journal and directory; ~1 s."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edged.errors import JournalError
from edged.spool.commit import GroupCommit, fsync_dir
from edged.spool.journal import InstanceRecord, Journal, Route

ROUTES = [Route("tiny-cls", "1", "instance")]


def rec(uid: str) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2",
                          series_instance_uid="1.2.3", modality="CT", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          size_bytes=10, calling_ae="CT01", path=f"spool/instances/{uid}.dcm")


def test_one_caller_commits_alone(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    gc = GroupCommit(j, tmp_path)
    try:
        assert gc.commit(rec("1.1"), ROUTES) is True
        assert j.has_instance("1.1") and j.pending == 1
        assert gc.commit(rec("1.1"), ROUTES) is False  # same UID: recorded once
        assert (gc.groups, gc.instances) == (2, 2)
    finally:
        gc.close()
        j.close()


def test_waiting_callers_share_one_group_and_none_returns_early(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    first_sync_started = threading.Event()
    release_first_sync = threading.Event()
    syncs: list[int] = []

    def sync_dir(path: Path) -> None:
        syncs.append(len(syncs))
        if len(syncs) == 1:  # hold the first group until every other caller has queued
            first_sync_started.set()
            assert release_first_sync.wait(10)
        fsync_dir(path)

    gc = GroupCommit(j, tmp_path, sync_dir=sync_dir)
    returned: list[str] = []

    def store(uid: str) -> None:
        assert gc.commit(rec(uid), ROUTES)
        assert j.has_instance(uid)  # durable in the journal before the caller may acknowledge
        returned.append(uid)

    try:
        t0 = threading.Thread(target=store, args=("2.0",))
        t0.start()
        assert first_sync_started.wait(10)
        others = [threading.Thread(target=store, args=(f"2.{i}",)) for i in range(1, 9)]
        for t in others:
            t.start()
        deadline = threading.Event()
        while len(gc._queue) < 8 and not deadline.wait(0.01):  # noqa: SLF001 - the queue is what is shared
            pass
        assert returned == []  # nobody acknowledged while their directory fsync had not happened
        release_first_sync.set()
        for t in [t0, *others]:
            t.join(10)
        assert sorted(returned) == sorted(f"2.{i}" for i in range(9))
        assert gc.groups == 2 and gc.instances == 9  # the first alone, the eight others in one group
        assert len(syncs) == 2
        assert j.pending == 9
    finally:
        release_first_sync.set()
        gc.close()
        j.close()


def test_directory_sync_failure_fails_the_group_and_records_nothing(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)

    def failing(path: Path) -> None:
        raise OSError(5, "Input/output error")

    gc = GroupCommit(j, tmp_path, sync_dir=failing)
    try:
        with pytest.raises(OSError):
            gc.commit(rec("3.1"), ROUTES)
        assert not j.has_instance("3.1")
    finally:
        gc.close()
        j.close()


def test_journal_failure_is_raised_to_the_caller(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    gc = GroupCommit(j, tmp_path)
    j.close()  # a closed journal: every commit must fail, not hang
    try:
        with pytest.raises(JournalError):
            gc.commit(rec("4.1"), ROUTES)
    finally:
        gc.close()


def test_one_bad_row_does_not_fail_its_group(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    release = threading.Event()
    started = threading.Event()

    def sync_dir(path: Path) -> None:
        if not started.is_set():
            started.set()
            assert release.wait(10)

    gc = GroupCommit(j, tmp_path, sync_dir=sync_dir)
    bad = InstanceRecord(**{**rec("5.bad").__dict__, "size_bytes": object()})  # type: ignore[arg-type] - SQLite cannot bind it
    results: dict[str, object] = {}

    def store(r: InstanceRecord) -> None:
        try:
            results[r.sop_instance_uid] = gc.commit(r, ROUTES)
        except JournalError as exc:
            results[r.sop_instance_uid] = exc

    try:
        t0 = threading.Thread(target=store, args=(rec("5.0"),))
        t0.start()
        assert started.wait(10)
        ts = [threading.Thread(target=store, args=(r,)) for r in (rec("5.1"), bad, rec("5.2"))]
        for t in ts:
            t.start()
        while len(gc._queue) < 3:  # noqa: SLF001
            threading.Event().wait(0.01)
        release.set()
        for t in [t0, *ts]:
            t.join(10)
        assert results["5.0"] is True and results["5.1"] is True and results["5.2"] is True
        assert isinstance(results["5.bad"], JournalError)
        assert j.has_instance("5.1") and j.has_instance("5.2") and not j.has_instance("5.bad")
    finally:
        release.set()
        gc.close()
        j.close()


def test_closed_committer_refuses(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    gc = GroupCommit(j, tmp_path)
    gc.close()
    try:
        with pytest.raises(JournalError):
            gc.commit(rec("6.1"), ROUTES)
        assert not j.has_instance("6.1")
    finally:
        j.close()


def test_a_lone_caller_commits_in_its_own_thread(tmp_path: Path) -> None:
    # No hand-off to another thread when nobody else is committing (one association's latency).
    j = Journal.open(tmp_path)
    threads: list[int] = []

    def sync_dir(path: Path) -> None:
        threads.append(threading.get_ident())
        fsync_dir(path)

    gc = GroupCommit(j, tmp_path, sync_dir=sync_dir)
    try:
        gc.commit(rec("7.1"), ROUTES)
        assert threads == [threading.get_ident()]
    finally:
        gc.close()
        j.close()
