"""The guarded Upper Layer reader on its own: a real pynetdicom acceptor association over a socket pair,
its reader called directly (the daemon-level attacks are in tests/integration/test_protocol_abuse.py)."""

from __future__ import annotations

import queue
import socket
import sys
from pathlib import Path
from typing import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from edged.dicom.guard import MAX_ASSOCIATE_RQ, MAX_COMMAND_BYTES, P_DATA_SLACK, Guard, GuardedDUL, Limits
from edged.metrics import Metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rawpdu as R  # noqa: E402

LIMITS = Limits(max_pdu=16384, max_message_bytes=1 << 20, pdu_seconds=0.5)


@pytest.mark.parametrize(("state", "pdu_type", "length", "problem"), [
    ("Sta2", 1, 200, None),
    ("Sta1", 1, 200, None),  # the first PDU can be read before "connection open" is processed
    ("Sta2", 1, MAX_ASSOCIATE_RQ + 1, "pdu_too_long"),
    ("Sta2", 4, 10, "unexpected_pdu"),
    ("Sta2", 0x99, 10, "unknown_pdu"),
    ("Sta6", 1, 200, "unexpected_pdu"),  # a second A-ASSOCIATE-RQ
    ("Sta6", 2, 200, "unexpected_pdu"),
    ("Sta6", 4, 16384 + P_DATA_SLACK, None),
    ("Sta6", 4, 16384 + P_DATA_SLACK + 1, "pdu_too_long"),
    ("Sta6", 5, 4, None),
    ("Sta6", 7, 1 << 20, "pdu_too_long"),
    ("Sta6", 0, 4, "unknown_pdu"),
])
def test_header_checks(state: str, pdu_type: int, length: int, problem: str | None) -> None:
    assert LIMITS.pdu_problem(state, pdu_type, length) == problem


def test_no_announced_maximum_bounds_p_data_by_the_message_limit() -> None:
    limits = Limits(max_pdu=0, max_message_bytes=1 << 20, pdu_seconds=1)
    assert limits.pdu_problem("Sta6", 4, (1 << 20) + P_DATA_SLACK) is None
    assert limits.pdu_problem("Sta6", 4, (1 << 20) + P_DATA_SLACK + 1) == "pdu_too_long"


@pytest.fixture
def wired() -> Iterator[tuple[GuardedDUL, socket.socket, Metrics]]:
    """An acceptor association's guarded DUL reading from one end of a socket pair (``peer`` is the other)."""
    ours, peer = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
    metrics = Metrics()
    Guard(LIMITS, metrics).install(assoc)
    dul = assoc.dul
    assert isinstance(dul, GuardedDUL)
    assert dul.event_queue.get_nowait() == "Evt5"  # connection open, queued before the guard was installed
    try:
        yield dul, peer, metrics
    finally:
        peer.close()
        ours.close()


def _events(dul: GuardedDUL) -> list[str]:
    out = []
    while True:
        try:
            out.append(dul.event_queue.get_nowait())
        except queue.Empty:
            return out


def _count(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("edged_protocol_violations_total", {"reason": reason}) or 0.0


def test_a_well_formed_pdu_goes_through(wired) -> None:
    dul, peer, metrics = wired
    peer.sendall(R.associate_rq())
    dul._read_pdu_data()
    assert _events(dul) == ["Evt6"]
    assert dul._recv_pdu.get_nowait().calling_ae_title == "RAWPDU"


def test_an_oversized_header_is_aborted_before_its_body_is_read(wired) -> None:
    dul, peer, metrics = wired
    peer.sendall(R.header(R.ASSOCIATE_RQ, 0xFFFFFFF0) + b"\x00" * 1000)
    dul._read_pdu_data()
    assert _events(dul) == ["Evt19"]  # invalid PDU: the state machine sends A-ABORT
    assert _count(metrics, "pdu_too_long") == 1
    dul._read_pdu_data()  # whatever comes next is not read: the connection is closed
    assert _events(dul) == ["Evt17"]
    assert dul.socket is not None and dul.socket.socket is None
    try:
        assert peer.recv(10) == b""
    except ConnectionResetError:  # closed with the attacker's bytes unread
        pass


def test_half_a_pdu_is_cut_off_at_the_deadline(wired) -> None:
    dul, peer, metrics = wired
    peer.sendall(R.header(R.RELEASE_RQ, 4)[:3])
    dul._read_pdu_data()
    assert _events(dul) == ["Evt17"]
    assert _count(metrics, "slow_pdu") == 1


def test_fragments_are_counted_per_message(wired) -> None:
    dul, peer, metrics = wired
    chunk = R.pdv(1, 0, b"\x00" * 4000)
    body = R.p_data(*[chunk] * 3)[6:]
    for _ in range(87):  # 87 x 12,000 bytes: just under 1 MiB, no last fragment yet
        assert dul._count_fragments(bytearray(body)) is None
    assert dul._count_fragments(bytearray(R.p_data(R.pdv(1, 0x02, b"\x00" * 4000))[6:])) is None  # last: reset
    assert dul._dataset_bytes == 0
    for _ in range(87):
        assert dul._count_fragments(bytearray(body)) is None
    assert dul._count_fragments(bytearray(body)) == "message_too_long"


def test_command_fragments_are_bounded_too(wired) -> None:
    dul, _, _ = wired
    command = bytearray(R.p_data(R.pdv(1, R.COMMAND, b"\x00" * (MAX_COMMAND_BYTES // 2)))[6:])
    assert dul._count_fragments(command) is None
    assert dul._count_fragments(command) is None
    assert dul._count_fragments(command) == "message_too_long"


def test_an_undecodable_pdu_is_aborted_and_counted(wired) -> None:
    dul, peer, metrics = wired
    peer.sendall(R.associate_rq(calling=b" " * 16))
    dul._read_pdu_data()
    assert _events(dul) == ["Evt19"]
    assert _count(metrics, "invalid_pdu") == 1


def test_the_reactor_is_woken_by_its_queues_and_by_kill(wired) -> None:
    """The DUL sleeps in select on the socket and an eventfd; whatever is queued for it sets the eventfd."""
    import select

    dul, _, _ = wired
    fd = dul._wakeup.fd
    dul._wakeup.clear()
    assert select.select([fd], [], [], 0)[0] == []
    dul.to_provider_queue.put("primitive")
    assert select.select([fd], [], [], 0)[0] == [fd]
    dul._wakeup.clear()
    dul.event_queue.put("Evt17")
    assert select.select([fd], [], [], 0)[0] == [fd]
    dul._wakeup.clear()
    dul.kill_dul()
    assert select.select([fd], [], [], 0)[0] == [fd]
    dul._wakeup.close()
    dul._wakeup.set()  # after close: harmless


def test_the_association_gate_keeps_the_checkpoint_semantics(wired) -> None:
    """pynetdicom pauses its reactor with _reactor_checkpoint.clear()/set(); the gate passes those through,
    and its queues wake the association's thread."""
    dul, _, _ = wired
    gate = dul.assoc._reactor_checkpoint
    assert gate.is_set()
    gate.clear()
    assert not gate.is_set() and not gate.wait(0.01)
    gate.set()
    assert gate.is_set() and gate.wait(0.01)  # not the association's thread: never waits for work
    gate.work.clear()
    dul.assoc.dimse.msg_queue.put((1, None))
    assert gate.work.is_set()
    gate.work.clear()
    dul.to_user_queue.put("A-RELEASE")
    assert gate.work.is_set()
