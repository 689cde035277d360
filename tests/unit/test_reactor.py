"""The acceptor association's reactor (edged/dicom/reactor.py) against a raw client on 127.0.0.1: it answers
each request without pynetdicom's 1 ms sleep per turn, and still ends an association the way pynetdicom's
loop does (release, abort, network timeout)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pynetdicom.association
from pynetdicom import evt

from edged.config import DicomConfig
from edged.dicom.contexts import SharedContexts
from edged.dicom.guard import Guard, Limits
from edged.dicom.reactor import AcceptorAssociation
from edged.dicom.scp import build_ae
from edged.dicom.server import start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rawpdu as R  # noqa: E402


class _SleepRecorder:
    """Stands in for the ``time`` module inside pynetdicom.association: records which function slept."""

    def __init__(self) -> None:
        self.callers: list[str] = []

    def sleep(self, seconds: float) -> None:
        self.callers.append(sys._getframe(1).f_code.co_name)
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, list[tuple[str, type]], _SleepRecorder]]:
    """edged's server (guard installed) with EVT_RELEASED/EVT_ABORTED recorded: (port, events, sleeps)."""
    sleeps = _SleepRecorder()
    monkeypatch.setattr(pynetdicom.association, "time", sleeps)
    events: list[tuple[str, type]] = []
    ended = threading.Event()

    def record(name: str) -> Any:
        def handler(event: Any) -> None:
            events.append((name, type(event.assoc)))
            ended.set()
        return handler

    cfg = DicomConfig(network_timeout=0.5)
    ae = build_ae(cfg)
    server = start_server(ae, ("127.0.0.1", 0), ssl_context=None,
                          evt_handlers=[(evt.EVT_RELEASED, record("released")), (evt.EVT_ABORTED, record("aborted"))],
                          contexts=SharedContexts(ae.supported_contexts), handshake_timeout=5.0,
                          guard=Guard(Limits(0, 1 << 20, 5.0)))
    try:
        yield server.server_address[1], events, sleeps
    finally:
        server.shutdown()


def _wait_for(events: list[tuple[str, type]], n: int = 1) -> None:
    deadline = time.monotonic() + 10
    while len(events) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_echo_then_release_answered_without_the_reactor_sleeping(listener) -> None:
    port, events, sleeps = listener
    sock, answer = R.associate(port)
    try:
        assert answer.pdu_type == R.ASSOCIATE_AC
        for message_id in (1, 2, 3):  # each request right after the previous answer
            sock.sendall(R.p_data(R.pdv(1, 0x03, R.echo_rq(message_id))))
            assert R.read_pdu(sock).dimse_status() == 0x0000
        sock.sendall(R.release_rq())
        assert R.read_pdu(sock).pdu_type == R.RELEASE_RP
    finally:
        sock.close()
    _wait_for(events)
    assert events == [("released", AcceptorAssociation)]
    assert "_run_reactor" not in sleeps.callers  # pynetdicom's loop sleeps 1 ms at every turn


def test_an_abort_from_the_peer_ends_the_association(listener) -> None:
    port, events, _ = listener
    sock, answer = R.associate(port)
    try:
        assert answer.pdu_type == R.ASSOCIATE_AC
        sock.sendall(R.abort())
        assert R.read_pdu(sock).closed
    finally:
        sock.close()
    _wait_for(events)
    assert events == [("aborted", AcceptorAssociation)]


def test_a_silent_peer_is_aborted_after_the_network_timeout(listener) -> None:
    port, events, _ = listener
    sock, answer = R.associate(port)
    try:
        assert answer.pdu_type == R.ASSOCIATE_AC
        answers = R.read_until_end(sock, timeout=10)  # network_timeout is 0.5 s
        assert [a.name for a in answers][-2:] == ["A-ABORT", "closed"]
    finally:
        sock.close()
    _wait_for(events)
    assert events == [("aborted", AcceptorAssociation)]
