"""Disk full: edged's storage (spool and journal) on a small tmpfs the test makes (see tests/smallfs.py).

Below ``min_free_bytes`` edged answers 0xA700; with the watermark at 0 the write itself hits ENOSPC and
edged answers a failure, never Success, leaving no partial file and no journal row. Nothing acknowledged
is lost, the daemon keeps answering, and it stores again once space returns. About 20-30 s in all.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom
import pytest
from faults import dataset_bytes, phantom_pool, write_small_series
from smallfs import SmallFs, free_bytes, rerun_unprivileged, write_ballast
from support import EdgedProcess, eventually, metric, require_tool, run

from edged.dicom import scu
from edged.errors import JournalError
from edged.spool.journal import InstanceRecord, Journal, Route

MIB = 1 << 20


PAGE = 4096  # tmpfs allocates whole pages


def straddling_file(src: Path, dst: Path) -> tuple[Path, int]:
    """A copy of ``src`` (new SOP Instance UID) whose data set ends 64 bytes short of a page boundary, so
    that ``k`` free pages pass edged's free-space check (data set <= free) while the file (file meta
    added) needs ``k + 1``: the write itself runs out of space. Returns the file and ``k``."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    comment = 0
    for _ in range(3):
        ds.ImageComments = "x" * comment
        ds.save_as(dst, enforce_file_format=True)
        length = len(dataset_bytes(dst.read_bytes()))
        if length % PAGE == PAGE - 64:
            return dst, (length + 64) // PAGE
        comment += (PAGE - 64 - length % PAGE) % PAGE
    raise AssertionError("could not size the file")


def send(edged: EdgedProcess, files: list[Path]) -> list[str]:
    return [o for _, o in scu.send_iter(files, "127.0.0.1", edged.port, aec="EDGED", timeout=60)]


def start_on(fs: SmallFs, edged: EdgedProcess) -> Path:
    edged.start(timeout=120)
    return edged.storage


def assert_kept(edged: EdgedProcess, acked: list[Path]) -> None:
    """Every acknowledged file is in the journal and byte-identical in the spool; nothing else is there."""
    rows = {r["sop_instance_uid"]: r for r in edged.rows()}
    for p in acked:
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        assert uid in rows, f"acknowledged {p.name} is not in the journal"
        assert dataset_bytes((edged.storage / rows[uid]["path"]).read_bytes()) == dataset_bytes(p.read_bytes())
    assert len(rows) == len(acked)
    assert edged.temp_files() == []
    assert {p.relative_to(edged.storage).as_posix() for p in edged.spool_files()} == {r["path"] for r in rows.values()}


def audit_closed(storage: Path) -> int:
    """Associations the audit log has closed (whole lines only)."""
    lines = (storage / "audit.jsonl").read_text().split("\n")[:-1]
    return sum(json.loads(line)["event"] == "association.closed" for line in lines)


def assert_serving(edged: EdgedProcess) -> None:
    assert edged.alive(), edged.log_text()[-3000:]
    echo = run([require_tool("echoscu"), "-aec", "EDGED", "127.0.0.1", str(edged.port)])
    assert echo.returncode == 0, echo.stderr


def make(edged_factory, tmp_path: Path, name: str, min_free: int) -> EdgedProcess:
    (tmp_path / "no-models").mkdir(exist_ok=True)  # receive only: this is about the spool and the journal
    return edged_factory(name, storage={"min_free_bytes": min_free}, engines={"dir": str(tmp_path / "no-models")})


def test_watermark_answers_out_of_resources_and_recovers(edged_factory, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    if rerun_unprivileged(request, tmp_path):
        return
    files = write_small_series(tmp_path / "ct", 200, 40, phantom_pool(3, seed=9))
    size = files[0].stat().st_size
    edged = make(edged_factory, tmp_path, "watermark", 8 * MIB)
    with SmallFs(edged.storage, 40 * MIB) as fs:
        storage = start_on(fs, edged)
        ballast = storage / "ballast"
        write_ballast(ballast, free_bytes(storage) - 8 * MIB - 12 * size)  # room for about a dozen images
        outcomes = send(edged, files)
        acked = [p for p, o in zip(files, outcomes) if o == "0x0000"]
        first_refused = outcomes.index("0xA700")
        assert 0 < first_refused and outcomes[first_refused:] == ["0xA700"] * (len(files) - first_refused), outcomes
        assert len(acked) == first_refused
        assert "event=store.failed" in edged.log_text() and "resource=disk" in edged.log_text()
        assert_kept(edged, acked)
        assert_serving(edged)

        ballast.unlink()  # space returns; the scanner sends the series again
        assert send(edged, files) == ["0x0000"] * len(files)
        assert_kept(edged, files)
        assert_serving(edged)
        edged.stop()


def test_enospc_on_write_is_a_failure_not_success_and_recovers(edged_factory, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    if rerun_unprivileged(request, tmp_path):
        return
    files = write_small_series(tmp_path / "ct", 201, 24, phantom_pool(3, seed=10))
    size = files[0].stat().st_size
    edged = make(edged_factory, tmp_path, "enospc", 0)  # no watermark: the write itself runs out of space
    with SmallFs(edged.storage, 16 * MIB) as fs:
        storage = start_on(fs, edged)
        ballast = storage / "ballast"
        write_ballast(ballast, free_bytes(storage) - 5 * size)
        outcomes = send(edged, files)
        assert set(outcomes) == {"0x0000", "0xA700"}, outcomes
        acked = [p for p, o in zip(files, outcomes) if o == "0x0000"]
        # (refused by the free-space check, the journal's SQLITE_FULL or ENOSPC: whichever comes first)
        assert_kept(edged, acked)  # no partial file, no row for what was refused
        assert_serving(edged)

        # Room for the data set but not for the whole file: the check passes, the write hits ENOSPC.
        straddler, pages = straddling_file(files[0], tmp_path / "straddler.dcm")
        ballast.unlink()
        # The last association's audit line is written just after its release: let it land before measuring.
        eventually(lambda: audit_closed(storage) >= metric(edged, "edged_associations_total", result="accepted"),
                   what="an audit record for every association")
        write_ballast(ballast, free_bytes(storage) - pages * PAGE)
        assert free_bytes(storage) == pages * PAGE
        assert send(edged, [straddler]) == ["0xA700"]
        assert 'detail="spool write failed" resource=disk errno=28' in edged.log_text()  # ENOSPC
        assert_kept(edged, acked)  # no partial file (the temp file is removed), no journal row
        assert_serving(edged)

        # Completely full: not a byte left for a file or the journal's WAL.
        write_ballast(storage / "ballast2", free_bytes(storage) + MIB)
        assert free_bytes(storage) == 0
        assert send(edged, files) == [("0x0000" if p in acked else "0xA700") for p in files]  # stored ones: dup
        for _ in range(20):  # more audit lines than the audit log's last page has room for: dropped, not
            assert send(edged, acked) == ["0x0000"] * len(acked)  # a failure answered for a stored image
        assert "event=audit.write_failed" in edged.log_text()
        assert_kept(edged, acked)
        assert_serving(edged)

        ballast.unlink()
        (storage / "ballast2").unlink()
        assert send(edged, [*files, straddler]) == ["0x0000"] * (len(files) + 1)
        assert_kept(edged, [*files, straddler])
        assert_serving(edged)
        assert "event=audit.write_resumed" in edged.log_text()
        records = [json.loads(line) for line in (storage / "audit.jsonl").read_text().splitlines()]  # no partial line
        assert sum(r["event"] == "instance.stored" for r in records) == len(files) + 1
        assert edged.stop() == 0


def _record(i: int) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.826.0.1.3680043.10.2", series_instance_uid=f"1.2.826.0.1.3680043.10.3.{i % 7}",
        modality="CT", transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1000, calling_ae="TEST",
        path=f"spool/instances/{i:040d}.dcm")


def test_journal_on_a_full_filesystem(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """SQLite itself on ENOSPC (the journal shares the spool's filesystem): 'database or disk is full' as
    a JournalError, every committed row kept, reads still work, and writes work again (no transaction
    left open) once space returns."""
    if rerun_unprivileged(request, tmp_path):
        return
    route = [Route("ct-nodule-cls", "1.0.0", "instance")]
    with SmallFs(tmp_path / "small", 2 * MIB) as fs:
        journal = Journal.open(fs.path)
        ballast = fs.path / "ballast"
        write_ballast(ballast, free_bytes(fs.path) - 192 * 1024)  # a little room: the journal fills the rest
        stored: list[str] = []
        errors: list[str] = []
        i = 0
        while len(errors) < 3 and i < 100_000:  # the first failure, then two more tries on the full disk
            try:
                journal.add_instance(_record(i), route)
                stored.append(_record(i).sop_instance_uid)
            except JournalError as exc:
                errors.append(str(exc))
            i += 1
        assert stored and len(errors) == 3
        assert all("database or disk is full" in e for e in errors), errors
        assert journal.has_instance(stored[-1]) and journal.pending == len(stored)
        ballast.unlink()
        assert journal.add_instance(_record(i), route)  # no transaction was left open
        journal.close()
        journal = Journal.open(fs.path)
        assert journal.pending == len(stored) + 1
        journal.close()
        conn = sqlite3.connect(fs.path / "journal.sqlite3")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            have = {r[0] for r in conn.execute("SELECT sop_instance_uid FROM instances")}
            assert have == {*stored, _record(i).sop_instance_uid}
            assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == len(have)
        finally:
            conn.close()
