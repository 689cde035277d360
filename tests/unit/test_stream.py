"""edged.dicom.stream on its own: the direct command-set decoder agrees with pynetdicom's encoder and
passes anything unusual to pynetdicom; a data set being written keeps its head and its budget, and goes
away when abandoned. The streamed path against real senders: tests/integration/test_receive_streamed.py."""

from __future__ import annotations

import os
from io import BytesIO
import struct
from pathlib import Path

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from edged.dicom.stream import HEAD, Incoming, StoreCommand, parse_store_command
from edged.spool.store import Spool

CT = "1.2.840.10008.5.1.4.1.1.2"


def encoded(primitive: object) -> bytes:
    """The command set pynetdicom sends for ``primitive`` (one PDV's worth, fragments joined)."""
    msg = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    msg.primitive_to_message(primitive)
    out = b""
    for pdata in msg.encode_msg(1, 0):
        for _, pdv in pdata.presentation_data_value_list:
            if pdv[0] & 0x01:
                out += pdv[1:]
    return out


def store_rq(message_id: int = 7, uid: str = "1.2.3.4.5", **extra: object) -> C_STORE:
    p = C_STORE()
    p.MessageID = message_id
    p.AffectedSOPClassUID = CT
    p.AffectedSOPInstanceUID = uid
    p.Priority = 2
    p.DataSet = BytesIO(b"\x08\x00\x16\x00")  # any data set: the command says one follows
    for k, v in extra.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize("message_id", [1, 2, 65535])
@pytest.mark.parametrize("uid", ["1.2.3.4.5", "1.2.3.4", "2.25.339616765227826917913542389473929581238"])
def test_a_store_request_decodes_as_pynetdicom_encoded_it(message_id: int, uid: str) -> None:
    assert parse_store_command(encoded(store_rq(message_id, uid))) == StoreCommand(message_id, CT, uid)


def test_move_originator_fields_are_allowed() -> None:
    raw = encoded(store_rq(MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3))
    assert parse_store_command(raw) == StoreCommand(7, CT, "1.2.3.4.5")


def test_a_command_without_a_data_set_or_of_another_service_is_not_streamed() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert parse_store_command(encoded(echo)) is None
    raw = bytearray(encoded(store_rq()))
    at = raw.index(struct.pack("<HHI", 0, 0x0800, 2)) + 8
    raw[at:at + 2] = struct.pack("<H", 0x0101)  # "no data set"
    assert parse_store_command(bytes(raw)) is None


@pytest.mark.parametrize("mangle", [
    lambda raw: raw[:-3],  # truncated
    lambda raw: raw + struct.pack("<HHI", 0, 0x0901, 0),  # an element a C-STORE-RQ does not have
    lambda raw: raw.replace(b"1.2.3.4.5", b"1.2.3.4a"),  # not a UID of digits and dots
    lambda raw: raw[:8] + struct.pack("<I", 1) + raw[12:],  # wrong group length
    lambda raw: raw.replace(struct.pack("<HHI", 0, 0x0100, 2) + b"\x01\x00",
                            struct.pack("<HHI", 0, 0x0100, 2) + b"\x01\x80"),  # a C-STORE-RSP
])
def test_anything_unusual_goes_to_pynetdicom(mangle) -> None:
    raw = encoded(store_rq())
    assert parse_store_command(raw) is not None
    assert parse_store_command(mangle(raw)) is None


def incoming(spool: Spool, min_free: int = 0) -> Incoming:
    inc = Incoming(1, CT, "1.2.840.10008.1.2.1", StoreCommand(1, CT, "1.2.3"), b"", spool, cpu0=0.0)
    inc.open(b"M" * 200, min_free)
    return inc


def test_a_data_set_is_written_with_its_head_kept_and_abandoned_without_a_trace(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    inc = incoming(spool)
    data = os.urandom(3 * HEAD)
    for i in range(0, len(data), 10000):
        inc.write(memoryview(data)[i:i + 10000])
    assert not inc.failed and inc.size == inc.written == 200 + len(data)
    assert bytes(inc.head) == data[:HEAD]
    assert inc.tmp is not None and inc.tmp.read_bytes() == b"M" * 200 + data
    inc.abandon()
    assert list(spool.tmp.iterdir()) == []
    inc.abandon()  # twice is harmless


def test_writeback_is_started_behind_the_writes_and_never_past_them(tmp_path: Path, monkeypatch) -> None:
    """Every WRITEBACK bytes written, the kernel is asked to start writing them out: ranges in order,
    none past what was written, none after a failed write (the fsync before Success decides anyway), and
    only while no other data set is being written."""
    from edged.dicom import stream

    started: list[tuple[int, int]] = []
    monkeypatch.setattr(stream, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    spool = Spool(tmp_path)
    inc = incoming(spool)
    data = os.urandom(5 * stream.WRITEBACK + 1234)
    for i in range(0, len(data), 50000):
        inc.write(memoryview(data)[i:i + 50000])
        assert sum(length for _, length in started) <= inc.written
    assert started and all(length >= stream.WRITEBACK for _, length in started)
    assert [offset for offset, _ in started] == [sum(n for _, n in started[:k]) for k in range(len(started))]
    assert inc.written - sum(length for _, length in started) < stream.WRITEBACK
    assert inc.tmp is not None and inc.tmp.read_bytes() == b"M" * 200 + data
    inc.abandon()

    started.clear()
    other = incoming(spool)  # another data set arriving meanwhile: no writeback for either
    inc = incoming(spool)
    for i in range(0, len(data), 50000):
        inc.write(memoryview(data)[i:i + 50000])
        other.write(memoryview(data)[i:i + 50000])
    assert started == []
    other.abandon()
    inc.write(memoryview(data)[:stream.WRITEBACK])  # alone again
    assert started == [(0, inc.written)]
    fd, tmp = inc.take()
    spool.abandon(fd, tmp)
    assert stream.IN_FLIGHT.count == 0

    started.clear()
    inc = incoming(spool, min_free=spool.free_bytes() - 1000)  # the second write goes over the reserve
    inc.write(memoryview(b"x" * 999))
    inc.write(memoryview(b"x" * (2 * stream.WRITEBACK)))
    assert inc.failed and started == []
    inc.abandon()
    assert stream.IN_FLIGHT.count == 0


def test_starting_writeback_is_only_a_hint(tmp_path: Path) -> None:
    """A file's bytes are unchanged by it, and a descriptor it cannot use is no error."""
    from edged.spool.writeback import start_writeback

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"abc" * 100000)
        start_writeback(fd, 0, 300000)
        start_writeback(fd, 100, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    start_writeback(fd, 0, 10)  # closed
    start_writeback(-1, 0, 10)
    assert path.read_bytes() == b"abc" * 100000


def test_writing_stops_where_the_free_space_reserve_begins(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    inc = incoming(spool, min_free=spool.free_bytes() - 1000)  # room for 1,000 bytes of data set
    inc.write(memoryview(b"x" * 999))
    assert not inc.failed
    inc.write(memoryview(b"x" * 2))
    assert inc.failed and inc.over_budget and inc.written == 200 + 999 and inc.size == 200 + 1001
    inc.abandon()
    assert list(spool.tmp.iterdir()) == []


def test_a_place_renames_fsyncs_and_closes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    inc = incoming(spool)
    inc.write(memoryview(b"data"))
    fd, tmp = inc.take()
    final = spool.place(fd, tmp, "spool/instances/x.dcm")
    assert final.read_bytes() == b"M" * 200 + b"data"
    assert list(spool.tmp.iterdir()) == []
    inc.abandon()  # no longer its file: nothing happens
    assert final.exists()
    with pytest.raises(OSError):
        os.fstat(fd)
