"""A requestor's DIMSE provider that leaves responses to the call waiting for them.

pynetdicom runs a reactor thread beside every association; when edged is the requestor (the outbox
delivering results, ``edged send``, ``edged echo``) that thread should only serve requests the peer
sends. ``send_c_store`` (and every other ``send_*``) pauses it with a handshake (clear an event, wait for
the reactor to say it is paused, send, block on the DIMSE queue for the response, set the event again)
that has a gap: when the event is set after one response and cleared for the next request before the
reactor thread has run, the reactor still sees its wait end, un-pauses and takes the next message off
the queue without blocking. If the peer has already answered the new request, that message is its
response: the reactor hands it to its request handler, which drops it, and the waiting call times out
after ``dimse_timeout`` although the peer answered (the peer then sees an idle association and, after
its network timeout, aborts it). The faster the peer answers and the busier the CPU, the likelier this
is: it showed up as a C-STORE "without a response" in the soak and the kill -9 tests once edged's own
listener answered within a few milliseconds.

:class:`ResponseKeepingDIMSE` overrides only ``get_msg``: a non-blocking get (the reactor's; the
waiting calls block) returns nothing while the message at the head of the queue is a response (a
primitive with a Status), so it stays for the call that waits for it. Requests from the peer are served
as before. :func:`install` switches an established association's provider to it; there are no new
fields. Written against pynetdicom 3.0 (checked at import with the contexts module's pin);
tests/unit/test_requestor.py checks the queue behaviour with pynetdicom's own primitives and the race
itself with a real association.

A second race, in negotiation: the calling thread sends the A-ASSOCIATE-RQ, waits for the connection to
be made, then checks that the socket is still connected before it reads the answer. A peer that rejects
at once (busy, or an AE title it does not know) sends its A-ASSOCIATE-RJ and closes; when the requestor's
DUL thread has already read that and closed its end before the calling thread looks, pynetdicom concludes
that the connection failed, "aborts" and leaves the rejection unread in its queue. The caller sees an
aborted association instead of a rejected one, so a permanent rejection is retried as if transient.
:func:`associate` reads the answer left behind and reports the rejection pynetdicom received.
"""

from __future__ import annotations

from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE

from edged.dicom import contexts  # noqa: F401 - imports the pynetdicom version check


def _is_response(primitive: Any) -> bool:
    return getattr(primitive, "Status", None) is not None


class ResponseKeepingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose non-blocking get never takes a response (see the module)."""

    def get_msg(self, block: bool = False) -> Any:
        if not block:
            q = self.msg_queue
            with q.mutex:
                if not q.queue or _is_response(q.queue[0][1]):
                    return None, None
        return super().get_msg(block)


def install(assoc: Any) -> Any:
    """Make ``assoc``'s DIMSE provider a :class:`ResponseKeepingDIMSE` (call right after it is established,
    before the first request is sent); returns ``assoc``."""
    dimse = getattr(assoc, "dimse", None)
    if isinstance(dimse, DIMSEServiceProvider) and not isinstance(dimse, ResponseKeepingDIMSE):
        dimse.__class__ = ResponseKeepingDIMSE
    return assoc


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """``ae.associate(host, port, **kwargs)``, with a rejection that came before pynetdicom looked reported
    as a rejection (see the module); an established association gets :func:`install`."""
    assoc = ae.associate(host, port, **kwargs)
    if assoc.is_established:
        return install(assoc)
    if not assoc.is_rejected:
        answer = _unread_rejection(assoc)
        if answer is not None:
            assoc.acceptor.primitive = answer
            assoc.is_aborted = False
            assoc.is_rejected = True
    return assoc


def _unread_rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE-RJ the peer sent and pynetdicom left in ``to_user_queue``, if any."""
    q = assoc.dul.to_user_queue
    with q.mutex:
        for item in q.queue:
            if isinstance(item, A_ASSOCIATE) and item.result in (0x01, 0x02):
                return item
    return None
