"""What the listener answers to odd, broken and excess input, sent with a pynetdicom SCU."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import MRImageStorage, generate_uid
from support import EdgedProcess

from edged.dicom import scu, status

#: Statuses a C-STORE may legitimately get from edged for input it refuses.
FAILURES = {f"0x{code:04X}" for code in (status.DATASET_MISMATCH, status.CANNOT_DECODE, status.NO_SOP_INSTANCE_UID)}


def _send(edged: EdgedProcess, paths: list[Path]) -> list[tuple[Path, str]]:
    return list(scu.send_iter(paths, "127.0.0.1", edged.port, aec="EDGED", timeout=30))


def _variant(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of ``src`` with some elements changed (None deletes), file meta kept as it was."""
    ds = pydicom.dcmread(src)
    ds.file_meta.MediaStorageSOPInstanceUID = changes.pop("meta_uid", ds.file_meta.MediaStorageSOPInstanceUID)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=False)
    return dst


def test_every_pydicom_test_file_gets_a_proper_status(edged: EdgedProcess) -> None:
    files = [Path(f) for f in get_testdata_files() if Path(f).is_file()]
    assert len(files) > 100
    results = _send(edged, files)
    assert len(results) == len(files)
    outcomes = Counter(o for _, o in results)
    # Each file that reached edged got Success or one of its documented failure statuses.
    reached = {o for o in outcomes if o.startswith("0x")}
    assert reached <= {"0x0000"} | FAILURES, outcomes
    assert outcomes["0x0000"] >= 100, outcomes
    assert outcomes["no_response"] == 0, outcomes
    # What was acknowledged is in the journal, once per SOP Instance UID, with its file.
    rows = edged.rows()
    assert len(rows) == len({r["sop_instance_uid"] for r in rows})
    assert 0 < len(rows) <= outcomes["0x0000"]
    for r in rows:
        assert (edged.storage / r["path"]).is_file()
    assert scu.echo("127.0.0.1", edged.port, aec="EDGED") == status.SUCCESS
    assert edged.alive()


def test_max_pending_watermark(edged_factory, ct_series: list[Path]) -> None:
    edged = edged_factory(storage={"max_pending": 10}).start()
    results = _send(edged, ct_series[:11])
    assert [o for _, o in results] == ["0x0000"] * 10 + ["0xA700"]
    uids = {r["sop_instance_uid"] for r in edged.rows()}
    assert len(uids) == 10
    assert str(pydicom.dcmread(ct_series[10], stop_before_pixels=True).SOPInstanceUID) not in uids
    assert len(edged.spool_files()) == 10 and edged.temp_files() == []
    assert "resource=pending" in edged.log_text()


def test_disk_watermark(edged_factory, ct_series: list[Path]) -> None:
    edged = edged_factory(storage={"min_free_bytes": 1 << 62}).start()
    results = _send(edged, ct_series[:3])
    assert [o for _, o in results] == ["0xA700"] * 3
    assert edged.rows() == []
    assert edged.spool_files() == [] and edged.temp_files() == []
    assert "resource=disk" in edged.log_text()
    assert scu.echo("127.0.0.1", edged.port, aec="EDGED") == status.SUCCESS


def test_sop_class_not_matching_context_is_refused(edged: EdgedProcess, ct_series: list[Path], tmp_path: Path) -> None:
    # File meta (hence the presentation context) says CT; the dataset says MR.
    bad = _variant(ct_series[0], tmp_path / "mismatch.dcm", SOPClassUID=MRImageStorage)
    assert _send(edged, [bad]) == [(bad, "0xA900")]
    assert edged.rows() == []


def test_sop_instance_uid_not_matching_request_is_refused(edged: EdgedProcess, ct_series: list[Path], tmp_path: Path) -> None:
    bad = _variant(ct_series[0], tmp_path / "uid.dcm", meta_uid=generate_uid())
    assert _send(edged, [bad]) == [(bad, "0xA900")]
    assert edged.rows() == []


def test_missing_sop_instance_uid_is_refused(edged: EdgedProcess, ct_series: list[Path], tmp_path: Path) -> None:
    bad = _variant(ct_series[0], tmp_path / "nouid.dcm", SOPInstanceUID=None)
    good = ct_series[1]
    assert _send(edged, [bad, good]) == [(bad, "0xC220"), (good, "0x0000")]
    assert len(edged.rows()) == 1
    assert "reason=no_sop_instance_uid" in edged.log_text()


def test_undecodable_dataset_is_refused(edged: EdgedProcess, ct_series: list[Path], tmp_path: Path) -> None:
    src = ct_series[0].read_bytes()
    meta_end = 132 + 12 + int.from_bytes(src[140:144], "little")  # preamble + group length element + value
    # A valid file meta followed by an element that claims 0xFFFFFFF0 bytes of an explicit-VR UI value.
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(src[:meta_end] + b"\x08\x00\x18\x00UI\xf0\xff" + b"1.2.3" * 10)
    assert _send(edged, [bad]) == [(bad, "0xC210")]
    assert edged.rows() == []
    assert scu.echo("127.0.0.1", edged.port, aec="EDGED") == status.SUCCESS
