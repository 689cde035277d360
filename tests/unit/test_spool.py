from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support import cached_pages

from edged.spool.store import Spool


def test_write_commit_roundtrip(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    rel = spool.relpath_for("1.2.3.4")
    tmp = spool.write_temp(b"head", memoryview(b"-body" * 1000))
    assert tmp.parent == spool.tmp
    final = spool.commit(tmp, rel)
    assert final.read_bytes() == b"head" + b"-body" * 1000
    assert not tmp.exists()


def test_names_are_safe_and_carry_no_uid(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for uid in ("1.2.3", "../../etc/passwd", "1.2.3\x00 ", "\u00e9"):
        rel = spool.relpath_for(uid)
        assert rel.startswith("spool/instances/") and rel.endswith(".dcm")
        assert "/" not in rel[len("spool/instances/"):]
        assert uid.strip() not in rel or uid == ""
    assert spool.relpath_for("1.2.3") != spool.relpath_for("1.2.4")


def test_reconcile_removes_leftovers_and_reports_missing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.relpath_for("1.1")
    spool.commit(spool.write_temp(b"kept"), kept)
    unrecorded = spool.relpath_for("1.2")
    spool.commit(spool.write_temp(b"never acknowledged"), unrecorded)
    spool.write_temp(b"half written")
    gone = spool.relpath_for("1.3")
    report = spool.reconcile({kept, gone})
    assert report.removed_temp == 1
    assert report.removed_unrecorded == 1
    assert report.missing == [gone]
    assert (tmp_path / kept).read_bytes() == b"kept"
    assert not (tmp_path / unrecorded).exists()
    assert list(spool.tmp.iterdir()) == []


def test_write_placed_puts_the_bytes_under_their_final_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    rel = spool.relpath_for("2.1")
    final = spool.write_placed(rel, b"head", memoryview(b"-body" * 1000))
    assert final == tmp_path / rel
    assert final.read_bytes() == b"head" + b"-body" * 1000
    assert list(spool.tmp.iterdir()) == []


def test_write_placed_leaves_nothing_when_it_fails(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(OSError):
        spool.write_placed("spool/no-such-dir/x.dcm", b"data")
    assert list(spool.tmp.iterdir()) == []
    assert not (tmp_path / "spool/no-such-dir").exists()


def test_placed_file_without_journal_row_is_removed_at_reconcile(tmp_path: Path) -> None:
    # A crash between placing a file and committing its journal row: never acknowledged, so removed.
    spool = Spool(tmp_path)
    rel = spool.relpath_for("2.2")
    spool.write_placed(rel, b"not acknowledged")
    report = Spool(tmp_path).reconcile(set())
    assert report.removed_unrecorded == 1
    assert not (tmp_path / rel).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache residency is read with Linux mincore")
def test_a_file_nothing_reads_soon_leaves_the_page_cache_once_durable(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    body = memoryview(os.urandom(256 * 1024))
    kept = spool.write_placed(spool.relpath_for("3.1"), b"head", body)
    dropped = spool.write_placed(spool.relpath_for("3.2"), b"head", body, keep_cached=False)
    assert cached_pages(kept) > 0  # an engine will read it: still cached
    assert cached_pages(dropped) == 0
    assert dropped.read_bytes() == b"head" + bytes(body)  # advice only: the bytes are all there
