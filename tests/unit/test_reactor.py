"""The acceptor association's reactor (edged/dicom/reactor.py) against a raw client on 127.0.0.1: it answers
each request without pynetdicom's 1 ms sleep per turn, and still ends an association the way pynetdicom's
loop does (release, abort, network timeout)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pynetdicom.association
from pynetdicom import evt
from pynetdicom.pdu_primitives import A_RELEASE

from edged.config import DicomConfig
from edged.dicom.contexts import SharedContexts
from edged.dicom.guard import Guard, Limits
from edged.dicom import reactor
from edged.dicom.reactor import AcceptorAssociation
from edged.dicom.scp import build_ae
from edged.dicom.server import start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rawpdu as R  # noqa: E402


class _Timeline:
    """Stands in for the ``time`` module inside pynetdicom.association, and wraps the reactor's
    ``_serve_request``: the order in which the reactor served messages and slept."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def sleep(self, seconds: float) -> None:
        if sys._getframe(1).f_code.co_name == "_run_reactor":
            self.steps.append("sleep")
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


Listener = tuple[int, list[tuple[str, type]], _Timeline]


@contextlib.contextmanager
def _listener(monkeypatch: pytest.MonkeyPatch, on_echo: Callable[[Any], int] | None = None) -> Iterator[Listener]:
    """edged's server (guard installed), network_timeout 0.5 s, with EVT_RELEASED/EVT_ABORTED recorded:
    (port, events, timeline)."""
    timeline = _Timeline()
    monkeypatch.setattr(pynetdicom.association, "time", timeline)
    monkeypatch.setattr(reactor, "time", timeline)
    serve = AcceptorAssociation._serve_request

    def serving(self: AcceptorAssociation, msg: Any, context_id: int) -> None:
        timeline.steps.append("serve")
        serve(self, msg, context_id)

    monkeypatch.setattr(AcceptorAssociation, "_serve_request", serving)
    events: list[tuple[str, type]] = []

    def record(name: str) -> Callable[[Any], None]:
        def handler(event: Any) -> None:
            events.append((name, type(event.assoc)))
        return handler

    handlers = [(evt.EVT_RELEASED, record("released")), (evt.EVT_ABORTED, record("aborted"))]
    if on_echo is not None:
        handlers.append((evt.EVT_C_ECHO, on_echo))
    ae = build_ae(DicomConfig(network_timeout=0.5))
    server = start_server(ae, ("127.0.0.1", 0), ssl_context=None, evt_handlers=handlers,
                          contexts=SharedContexts(ae.supported_contexts), handshake_timeout=5.0,
                          guard=Guard(Limits(0, 1 << 20, 5.0)))
    try:
        yield server.server_address[1], events, timeline
    finally:
        server.shutdown()


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    with _listener(monkeypatch) as served:
        yield served


def _wait_for(events: list[tuple[str, type]], n: int = 1) -> None:
    deadline = time.monotonic() + 10
    while len(events) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_each_request_is_looked_for_right_after_the_previous_answer(listener) -> None:
    """pynetdicom's loop sleeps 1 ms after every message it serves; this one goes straight back to its gate."""
    port, events, timeline = listener
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
    assert timeline.steps.count("serve") == 3
    assert all(step == "serve" or prev != "serve" for prev, step in zip(timeline.steps, timeline.steps[1:]))


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


def _echoes_then_waits_for_the_timeout(port: int, echoes: int) -> None:
    """Associate, send ``echoes`` C-ECHOs (each answered Success), then say nothing: edged must abort
    the association after its network_timeout (0.5 s) and close."""
    sock, answer = R.associate(port)
    try:
        assert answer.pdu_type == R.ASSOCIATE_AC
        for message_id in range(1, echoes + 1):
            sock.sendall(R.p_data(R.pdv(1, 0x03, R.echo_rq(message_id))))
            assert R.read_pdu(sock).dimse_status() == 0x0000
        answers = R.read_until_end(sock, timeout=10)
        assert [a.name for a in answers][-2:] == ["A-ABORT", "closed"]
    finally:
        sock.close()


def test_a_silent_peer_is_aborted_after_the_network_timeout(listener) -> None:
    port, events, _ = listener
    _echoes_then_waits_for_the_timeout(port, 0)
    _wait_for(events)
    assert events == [("aborted", AcceptorAssociation)]


def test_a_turn_with_nothing_to_take_sleeps_instead_of_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something queued for the association that no check consumes (here a stray A-RELEASE confirmation,
    put there by the C-ECHO handler) keeps waking the reactor: each such turn sleeps, as pynetdicom's do,
    until the network timeout ends the association."""
    def on_echo(event: Any) -> int:
        stray = A_RELEASE()
        stray.result = "affirmative"
        event.assoc.dul.to_user_queue.put(stray)
        return 0x0000

    with _listener(monkeypatch, on_echo) as (port, events, timeline):
        _echoes_then_waits_for_the_timeout(port, 1)
        _wait_for(events)
    assert events == [("aborted", AcceptorAssociation)]
    assert timeline.steps[0] == "serve" and timeline.steps.count("sleep") >= 10
