from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from edged.errors import JournalClosedError, JournalError
from edged.spool.journal import JOURNAL_NAME, SCHEMA_VERSION, InstanceRecord, Journal, Route, read_counts

ROUTES = [Route("tiny-cls", "1", "instance")]


def rec(uid: str, series: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2",
                          series_instance_uid=series, modality="CT", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          size_bytes=10, calling_ae="CT01", path=f"spool/instances/{uid}.dcm")


def test_creates_wal_journal_at_current_schema(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.close()
    conn = sqlite3.connect(tmp_path / JOURNAL_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_same_uid_twice_is_one_row(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    assert j.add_instance(rec("1.1"), ROUTES) is True
    assert j.add_instance(rec("1.1"), ROUTES) is False
    assert j.pending == 1
    assert j.has_instance("1.1") and not j.has_instance("1.2")
    j.close()


def test_state_survives_reopen(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    for i in range(5):
        j.add_instance(rec(f"1.{i}"), ROUTES)
    j.close()
    j2 = Journal.open(tmp_path)
    assert j2.pending == 5
    assert len(list(j2.iter_instances())) == 5
    j2.close()
    assert read_counts(tmp_path)["instances"]["received"] == 5


def test_concurrent_writers(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    threads = [threading.Thread(target=lambda k=k: [j.add_instance(rec(f"{k}.{i}"), ROUTES) for i in range(50)]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert j.pending == 200
    j.close()


def test_mark_missing_stops_counting_as_pending(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.add_instance(rec("1.1"), ROUTES)
    j.add_instance(rec("1.2"), ROUTES)
    assert j.mark_missing(["spool/instances/1.1.dcm"]) == 1
    assert j.pending == 1
    j.close()
    assert read_counts(tmp_path)["instances"]["missing"] == 1


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.close()
    j.close()  # idempotent
    with pytest.raises(JournalClosedError):
        j.add_instance(rec("1.1"), ROUTES)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Journal.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / JOURNAL_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(JournalError, match="newer"):
        Journal.open(tmp_path)


def test_status_without_journal_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="no journal"):
        read_counts(tmp_path)


def test_unrouted_instance_is_done_at_once(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.add_instance(rec("1.1"))
    assert j.pending == 0
    j.close()
    assert read_counts(tmp_path)["instances"]["done"] == 1
