"""edged.dicom.requestor: a requestor's reactor thread no longer takes the response a send_* call waits for,
and a rejection that arrives before pynetdicom looks is reported as a rejection.

The race needs the reactor thread to run at one exact moment; these tests make that moment happen on
purpose instead of waiting for it: the reactor is paused the way pynetdicom pauses it, a C-ECHO goes to a
real peer (a pynetdicom acceptor on 127.0.0.1), and once its response is queued the reactor's own step
(a non-blocking get_msg) is taken, as the reactor does when the race hits.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from edged.dicom import requestor
from edged.dicom.scu import echo


@pytest.fixture
def peer() -> Iterator[int]:
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def _paused_echo(port: int, keep_responses: bool) -> tuple[Any, Any]:
    """Send a C-ECHO with the reactor paused, wait until its response is queued, then do the reactor's
    step; returns (what the reactor got, what the waiting call then gets)."""
    ae = AE(ae_title="EDGED")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="PEER")
    assert assoc.is_established
    if keep_responses:
        requestor.install(assoc)
    try:
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        rq = C_ECHO()
        rq.MessageID = 7
        rq.AffectedSOPClassUID = Verification
        assoc.dimse.send_msg(rq, assoc.accepted_contexts[0].context_id)
        deadline = time.monotonic() + 10
        while assoc.dimse.peek_msg()[1] is None:
            assert time.monotonic() < deadline, "the peer never answered"
            time.sleep(0.001)
        reactor_got = assoc.dimse.get_msg(block=False)[1]  # the reactor's step, at the worst moment
        waiter_got = assoc.dimse.get_msg(block=True)[1]  # send_c_echo's wait
        return reactor_got, waiter_got
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()


def test_stock_pynetdicom_loses_the_response_to_its_reactor(peer: int) -> None:
    reactor_got, waiter_got = _paused_echo(peer, keep_responses=False)
    assert isinstance(reactor_got, C_ECHO) and reactor_got.Status == 0x0000  # taken by the wrong thread
    assert waiter_got is None  # the call times out although the peer answered


def test_response_stays_for_the_waiting_call(peer: int) -> None:
    reactor_got, waiter_got = _paused_echo(peer, keep_responses=True)
    assert reactor_got is None
    assert isinstance(waiter_got, C_ECHO) and waiter_got.Status == 0x0000 and waiter_got.MessageIDBeingRespondedTo == 7


def test_requests_from_the_peer_are_still_served_by_the_reactor() -> None:
    class Provider(requestor.ResponseKeepingDIMSE):
        dimse_timeout = 0.1  # pynetdicom's reads the association's; none here

    dimse = object.__new__(Provider)
    dimse.msg_queue = queue.Queue()
    rq = C_STORE()
    rq.MessageID = 1
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.Status = 0x0000
    dimse.msg_queue.put((1, rq))
    dimse.msg_queue.put((1, rsp))
    assert dimse.get_msg(block=False) == (1, rq)  # a request: the reactor takes it
    assert dimse.get_msg(block=False) == (None, None)  # a response: left on the queue
    assert dimse.get_msg(block=True) == (1, rsp)
    assert dimse.get_msg(block=False) == (None, None)  # empty


def test_edged_echo_uses_it(peer: int) -> None:
    assert echo("127.0.0.1", peer, aec="PEER", timeout=5) == 0x0000


@pytest.fixture
def picky_peer() -> Iterator[int]:
    """A peer that rejects (permanent, called AE title not recognised) every association not called PEER."""
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def _late(assoc_event: Any) -> None:
    """Bound to EVT_REQUESTED, which pynetdicom triggers in the calling thread right after it queues the
    A-ASSOCIATE-RQ: the calling thread looks only once the peer has answered and closed, as on a busy CPU."""
    time.sleep(0.3)


def _requestor_ae() -> AE:
    ae = AE(ae_title="EDGED")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    return ae


def test_stock_pynetdicom_reports_a_quick_rejection_as_an_abort(picky_peer: int) -> None:
    assoc = _requestor_ae().associate("127.0.0.1", picky_peer, ae_title="NOTPEER",
                                      evt_handlers=[(evt.EVT_REQUESTED, _late)])
    assert assoc.is_aborted and not assoc.is_rejected  # the peer rejected; pynetdicom says "aborted"


def test_a_quick_rejection_is_reported_as_the_rejection_it_was(picky_peer: int) -> None:
    assoc = requestor.associate(_requestor_ae(), "127.0.0.1", picky_peer, ae_title="NOTPEER",
                                evt_handlers=[(evt.EVT_REQUESTED, _late)])
    assert assoc.is_rejected and not assoc.is_aborted and not assoc.is_established
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)  # permanent: called AE title


def test_associate_still_establishes_and_installs(picky_peer: int) -> None:
    assoc = requestor.associate(_requestor_ae(), "127.0.0.1", picky_peer, ae_title="PEER",
                                evt_handlers=[(evt.EVT_REQUESTED, _late)])
    try:
        assert assoc.is_established and isinstance(assoc.dimse, requestor.ResponseKeepingDIMSE)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_a_peer_that_is_not_there_is_neither_rejected_nor_established() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ae = _requestor_ae()
    ae.connection_timeout = 2
    assoc = requestor.associate(ae, "127.0.0.1", port, ae_title="PEER")
    assert not assoc.is_rejected and not assoc.is_established
