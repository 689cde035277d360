"""The streamed C-STORE path (edged/dicom/stream.py) against real senders, on 127.0.0.1.

* DCMTK storescu with several maximum PDU sizes and proposed transfer syntaxes: every image stored,
  the spool file exactly our preamble and File Meta followed by the data set's bytes as sent.
* The pydicom test corpus sent byte for byte (tests/rawscu.py), many transfer syntaxes and SOP classes:
  each answered Success or a documented failure, each Success stored exactly as sent.
* Hand-made PDU layouts: the command set and the data set in one PDU, the command split across PDUs,
  empty fragments, a C-ECHO between two C-STOREs on one association, a peer whose maximum PDU is too
  small for a one-PDV response (pynetdicom's path).
* Each stored data set times its steps (``edged_store_step_seconds``); duplicates do not.
* A message that never ends (A-ABORT, a closed connection, an A-RELEASE-RQ mid data set) or runs over
  ``max_message_bytes`` leaves no temp file and no journal row, and the daemon goes on serving.
* (Memory: tests/integration/test_receive_memory.py.)
"""

from __future__ import annotations

import struct
import sys
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import rawpdu as R
import rawscu
from pydicom.data import get_testdata_files
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import EdgedProcess, cached_pages, eventually, metrics_text, require_tool, run, sample

from edged.dicom import status
from edged.dicom.filemeta import encode_file_meta
from edged.metrics import STORE_STEPS
from edged.spool.store import Spool
from edged.synthetic import write_ct_series

CT = R.CT_IMAGE_STORAGE
EXPLICIT = str(ExplicitVRLittleEndian)


def split_file(raw: bytes) -> tuple[pydicom.Dataset, bytes]:
    """A Part 10 file's File Meta (as a dataset) and its data set's bytes as encoded."""
    assert raw[128:132] == b"DICM"
    end = 144 + int.from_bytes(raw[140:144], "little")
    meta = pydicom.dcmread(BytesIO(raw[:end])).file_meta  # the file meta and an empty data set
    return meta, raw[end:]


def assert_stored_exactly(edged: EdgedProcess, sop_class: str, uid: str, ts: str, data: bytes) -> None:
    rows = {r["sop_instance_uid"]: r for r in edged.rows()}
    assert uid in rows
    stored = (edged.storage / rows[uid]["path"]).read_bytes()
    assert stored == encode_file_meta(sop_class, uid, ts) + data
    assert rows[uid]["size_bytes"] == len(stored)


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("streamed"), 12, rows=128, columns=128)


# -- DCMTK storescu --------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "ts"), [
    (["--max-pdu", "4096"], None),
    (["--max-pdu", "16384", "-xe"], EXPLICIT),
    (["--max-pdu", "131072", "-xi"], "1.2.840.10008.1.2"),
    (["--max-pdu", "65536", "-xb"], None),  # big endian proposed first; edged may pick another
    (["--max-send-pdu", "4096"], None),  # small PDUs from the sender, whatever edged allows
])
def test_storescu_pdu_sizes_and_transfer_syntaxes(edged: EdgedProcess, slices: list[Path], options: list[str],
                                                  ts: str | None) -> None:
    res = run([require_tool("storescu"), *options, "-aec", "EDGED", "127.0.0.1", str(edged.port), *map(str, slices)])
    assert res.returncode == 0, res.stderr
    rows = {r["sop_instance_uid"]: r for r in edged.rows()}
    assert len(rows) == len(slices)
    for path in slices:
        original = pydicom.dcmread(path)
        row = rows[str(original.SOPInstanceUID)]
        stored = pydicom.dcmread(edged.storage / row["path"])
        assert stored == original and stored.PixelData == original.PixelData
        if ts is not None:
            assert row["transfer_syntax_uid"] == ts == stored.file_meta.TransferSyntaxUID
        if ts in (None, EXPLICIT):  # sent as the file holds it: stored byte for byte
            meta, data = split_file(path.read_bytes())
            assert_stored_exactly(edged, CT, str(original.SOPInstanceUID), EXPLICIT, data)
    assert edged.temp_files() == []
    assert f"stored={len(slices)}" in edged.log_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache residency is read with Linux mincore")
def test_a_slice_no_engine_reads_is_not_left_in_the_page_cache(edged: EdgedProcess, slices: list[Path]) -> None:
    # 128x128 slices: below the demo models' minimum size, so no engine routes them and nothing will read
    # their files soon; each leaves the page cache once durable, whole on disk.
    res = run([require_tool("storescu"), "-aec", "EDGED", "127.0.0.1", str(edged.port), *map(str, slices[:4])])
    assert res.returncode == 0, res.stderr
    rows = edged.rows()
    assert len(rows) == 4
    assert {r["state"] for r in rows} == {"done"}  # no engine routes them: nothing left to do on arrival
    # let go right after each response was sent: by now, or within moments
    eventually(lambda: [cached_pages(edged.storage / r["path"]) for r in rows] == [0] * 4, timeout=5,
               what="unrouted slices out of the page cache")
    for path in slices[:4]:
        original = pydicom.dcmread(path)
        stored = pydicom.dcmread(edged.storage / Spool.relpath_for(str(original.SOPInstanceUID)))
        assert stored == original and stored.PixelData == original.PixelData


def test_each_stored_slice_times_its_steps_from_command_to_response(edged: EdgedProcess,
                                                                     slices: list[Path]) -> None:
    # Six slices stored, then two of them again (duplicates: answered Success, nothing stored, no steps).
    t0 = time.perf_counter()
    for batch in (slices[:6], slices[:2]):
        res = run([require_tool("storescu"), "-aec", "EDGED", "127.0.0.1", str(edged.port), *map(str, batch)])
        assert res.returncode == 0, res.stderr
    wall = time.perf_counter() - t0
    text = metrics_text(edged)
    assert sample(text, "edged_instances_received_total", status="success") == 6
    assert sample(text, "edged_instances_received_total", status="duplicate") == 2
    sums = {}
    for step in STORE_STEPS:
        assert sample(text, "edged_store_step_seconds_count", step=step) == 6, step
        sums[step] = sample(text, "edged_store_step_seconds_sum", step=step)
        assert sums[step] is not None and sums[step] > 0, step
    # consecutive steps of each slice, so together no longer than the pushes that carried them
    assert sum(sums.values()) < wall
    assert sample(text, "edged_store_seconds_count") == 8  # edged_store_seconds: every data set answered


# -- the pydicom corpus, byte for byte ---------------------------------------------------------------

def corpus() -> list[tuple[Path, pydicom.Dataset, bytes]]:
    out = []
    for f in sorted(get_testdata_files()):
        if not Path(f).is_file():
            continue
        raw = Path(f).read_bytes()
        if len(raw) < 144 or raw[128:132] != b"DICM" or raw[132:138] != b"\x02\x00\x00\x00UL":
            continue
        try:
            meta, data = split_file(raw)
            sop_class, uid, ts = (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                                  str(meta.TransferSyntaxUID))
        except Exception:  # noqa: BLE001 - a broken file meta: not for this test
            continue
        if sop_class.startswith("1.2.840.10008.5.1.4.1.1.") and uid and ts.startswith("1.2.840.10008.1.2"):
            out.append((Path(f), meta, data))
    return out


def test_pydicom_corpus_is_stored_byte_for_byte(edged: EdgedProcess) -> None:
    files = corpus()
    assert len(files) > 60
    outcomes: dict[int, int] = {}
    stored = 0
    seen: set[str] = set()
    for path, meta, data in files:
        sop_class, uid, ts = (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                              str(meta.TransferSyntaxUID))
        try:
            assoc = rawscu.associate(edged.port, "EDGED", "CORPUS", [(sop_class, ts)], 30)
        except rawscu.Aborted:
            continue  # a class or transfer syntax edged does not accept
        if ts not in assoc.contexts:
            assoc.release()
            continue
        code = assoc.store(sop_class, uid, ts, data, 1)
        assoc.release()
        outcomes[code] = outcomes.get(code, 0) + 1
        assert code in (status.SUCCESS, status.DATASET_MISMATCH, status.CANNOT_DECODE,
                        status.NO_SOP_INSTANCE_UID), (path.name, hex(code))
        if code == status.SUCCESS and uid not in seen:  # not a duplicate: this data set is the one stored
            seen.add(uid)
            assert_stored_exactly(edged, sop_class, uid, ts, data)
            stored += 1
    assert outcomes.get(status.SUCCESS, 0) >= 50, outcomes
    assert stored >= 50, (stored, outcomes)
    assert edged.temp_files() == []
    transfer_syntaxes = {r["transfer_syntax_uid"] for r in edged.rows()}
    assert len(transfer_syntaxes) >= 6, transfer_syntaxes
    assert edged.alive()


# -- hand-made PDU layouts ---------------------------------------------------------------------------

def raw_assoc(edged: EdgedProcess, ts: str = EXPLICIT, max_pdu: int = 16384):
    sock, answer = R.associate(edged.port, calling=b"RAW", max_pdu=max_pdu,
                               contexts=((1, CT, (ts,)), (3, R.VERIFICATION, (R.IMPLICIT_VR_LE,))))
    assert answer.pdu_type == R.ASSOCIATE_AC and answer.accepted_contexts() == {1: 0, 3: 0}
    return sock


def slice_data(path: Path) -> tuple[str, bytes]:
    meta, data = split_file(path.read_bytes())
    return str(meta.MediaStorageSOPInstanceUID), data


def fragmented_status(sock) -> int:
    """The Status of a response command set that may come in several PDUs."""
    command = b""
    while True:
        answer = R.read_pdu(sock)
        assert answer.pdu_type == R.P_DATA_TF, answer.name
        pos = 0
        while pos < len(answer.body):
            length, _, control = struct.unpack_from(">LBB", answer.body, pos)
            command += answer.body[pos + 6:pos + 4 + length]
            pos += 4 + length
        if control & R.LAST:
            break
    at = command.index(struct.pack("<HHI", 0, 0x0900, 2)) + 8
    return int(struct.unpack_from("<H", command, at)[0])


def release(sock) -> None:
    sock.sendall(R.release_rq())
    assert R.read_pdu(sock).pdu_type == R.RELEASE_RP
    sock.close()


def test_pdu_layouts_an_echo_between_and_a_peer_with_a_tiny_maximum_pdu(edged: EdgedProcess,
                                                                           slices: list[Path]) -> None:
    sock = raw_assoc(edged)
    uid1, data1 = slice_data(slices[0])
    uid2, data2 = slice_data(slices[1])
    # 1. Command set, an empty fragment and the whole data set in three PDVs of one PDU.
    half = len(data1) // 2
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq(uid1, 1)), R.pdv(1, 0, b""),
                          R.pdv(1, 0, data1[:half]), R.pdv(1, R.LAST, data1[half:])))
    assert R.read_pdu(sock).dimse_status() == status.SUCCESS
    # 2. A C-ECHO on the same association (pynetdicom's path).
    sock.sendall(R.p_data(R.pdv(3, R.COMMAND | R.LAST, R.echo_rq(2))))
    assert R.read_pdu(sock).dimse_status() == status.SUCCESS
    # 3. The command set split over two PDUs, then the data set in 1,000-byte PDUs.
    command = R.store_rq(uid2, 3)
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND, command[:20])))
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, command[20:])))
    pieces = [data2[i:i + 1000] for i in range(0, len(data2), 1000)]
    sock.sendall(b"".join(R.p_data(R.pdv(1, R.LAST if i == len(pieces) - 1 else 0, p)) for i, p in enumerate(pieces)))
    assert R.read_pdu(sock).dimse_status() == status.SUCCESS
    release(sock)
    # 4. A peer whose maximum PDU cannot hold the response in one PDV: pynetdicom's path, which fragments it.
    uid3, data3 = slice_data(slices[2])
    sock = raw_assoc(edged, max_pdu=64)
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq(uid3, 5)), R.pdv(1, R.LAST, data3)))
    assert fragmented_status(sock) == status.SUCCESS
    release(sock)
    assert_stored_exactly(edged, CT, uid1, EXPLICIT, data1)
    assert_stored_exactly(edged, CT, uid2, EXPLICIT, data2)
    assert_stored_exactly(edged, CT, uid3, EXPLICIT, data3)
    assert edged.temp_files() == []


def test_refusals_are_answered_on_the_streamed_path(edged: EdgedProcess, slices: list[Path]) -> None:
    sock = raw_assoc(edged)
    uid, data = slice_data(slices[3])
    # The request names another instance than the data set holds.
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq(generate_uid(), 1)), R.pdv(1, R.LAST, data)))
    assert R.read_pdu(sock).dimse_status() == status.DATASET_MISMATCH
    # A data set cut short inside its header, and one with no SOP Instance UID.
    cut = data.index(uid.encode()) + 5  # in the middle of the SOP Instance UID's value
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq(uid, 2)), R.pdv(1, R.LAST, data[:cut])))
    assert R.read_pdu(sock).dimse_status() == status.CANNOT_DECODE
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq(uid, 5)), R.pdv(1, R.LAST, b"\xff" * 10)))
    assert R.read_pdu(sock).dimse_status() == status.NO_SOP_INSTANCE_UID
    # Then the real thing, twice: stored once, the second a duplicate (Success).
    for message_id in (3, 4):
        sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq(uid, message_id)), R.pdv(1, R.LAST, data)))
        assert R.read_pdu(sock).dimse_status() == status.SUCCESS
    release(sock)
    assert [r["sop_instance_uid"] for r in edged.rows()] == [uid]
    assert edged.temp_files() == [] and len(edged.spool_files()) == 1
    eventually(lambda: "stored=1 duplicates=1 failed=3" in edged.log_text(), what="the association's summary line")


@pytest.mark.parametrize("ending", ["abort", "close", "release"])
def test_a_data_set_cut_off_leaves_no_temp_file_and_no_row(edged: EdgedProcess, slices: list[Path],
                                                           ending: str) -> None:
    sock = raw_assoc(edged)
    uid, data = slice_data(slices[4])
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq(uid, 1)), R.pdv(1, 0, data[:5000])))
    eventually(lambda: len(edged.temp_files()) == 1)  # being written as it arrives
    if ending == "abort":
        sock.sendall(R.abort())
    elif ending == "release":
        sock.sendall(R.release_rq())
        R.read_pdu(sock)
    sock.close()
    eventually(lambda: edged.temp_files() == [])
    assert edged.rows() == [] and edged.spool_files() == []
    res = run([require_tool("storescu"), "-aec", "EDGED", "127.0.0.1", str(edged.port), str(slices[4])])
    assert res.returncode == 0, res.stderr
    assert [r["sop_instance_uid"] for r in edged.rows()] == [uid]


def test_a_data_set_over_the_message_limit_is_aborted_mid_stream(edged_factory, slices: list[Path]) -> None:
    edged = edged_factory(dicom={"max_message_bytes": 1 << 20}).start()
    sock = raw_assoc(edged)
    uid, _ = slice_data(slices[5])
    sock.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq(uid, 1))))
    sent = 0
    answers: list[R.Answer] = []
    try:
        while sent < 4 << 20:
            sock.sendall(R.p_data(R.pdv(1, 0, b"\x00" * 16000)))
            sent += 16000
    except (BrokenPipeError, ConnectionResetError):
        pass
    answers = R.read_until_end(sock)
    sock.close()
    assert answers[0].pdu_type == R.ABORT, [a.name for a in answers]
    assert "reason=message_too_long" in edged.log_text()
    eventually(lambda: edged.temp_files() == [])
    assert edged.rows() == [] and edged.spool_files() == []
    res = run([require_tool("storescu"), "-aec", "EDGED", "127.0.0.1", str(edged.port), str(slices[5])])
    assert res.returncode == 0, res.stderr
