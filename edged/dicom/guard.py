"""Bounds on what one DICOM peer can make the listener read, hold and wait for.

pynetdicom's Upper Layer reader (``DULServiceProvider._read_pdu_data``) trusts the peer: it reads a PDU's
6-byte header, then blocks (no timeout) until the announced length has arrived, buffering all of it, and
its DIMSE layer appends P-DATA fragments to the current message until one carries the last-fragment bit.
So one unauthenticated connection can announce a 4 GiB PDU and stream it into memory, stream fragments
without end, or send half a header and hold a thread and an association slot for as long as it likes.

:class:`GuardedDUL` replaces that one reader method. Before reading a PDU's body it checks the type and
length against the state of the association; while reading it enforces a deadline for the whole PDU (and
gives up at once if the association is being aborted locally); for a P-DATA-TF it counts the bytes of the
command and the data set being assembled. A violation is logged and counted
(``edged_protocol_violations_total{reason}``), the peer gets an A-ABORT through pynetdicom's own state
machine (an "invalid PDU" event), and the connection is closed without reading the rest. It also
overrides ``receive_pdu`` so that an acceptor waiting for its A-ASSOCIATE-RQ stops waiting when the
connection is gone, which frees its slot of ``max_associations`` at once instead of after ``acse_timeout``.

:meth:`Guard.install` swaps the class of the DUL pynetdicom has just built for an association (before its
thread starts), so every queue, timer and the state machine stay as pynetdicom made them.

Limits:

* A-ASSOCIATE-RQ, and any PDU before the association is established: :data:`MAX_ASSOCIATE_RQ` bytes
  (128 presentation contexts with ten transfer syntaxes each fit in under 40 KiB).
* P-DATA-TF: the maximum PDU length edged announced plus :data:`P_DATA_SLACK` (senders disagree on
  whether the PDV item headers count); with no announced maximum (0), the message limit plus slack.
* One DIMSE data set assembled from fragments: ``dicom.max_message_bytes``; one command set:
  :data:`MAX_COMMAND_BYTES`.
* One PDU, from its first byte to its last: ``dicom.network_timeout`` seconds.
* A-ASSOCIATE-AC/RJ (never sent to an acceptor), a second A-ASSOCIATE-RQ, anything but an
  A-ASSOCIATE-RQ first, and unknown PDU types: aborted at the header; a PDU pynetdicom cannot decode
  (an all-space AE title, say): aborted as pynetdicom would, and counted.

Written against pynetdicom 3.0 (``TESTED`` below, checked at import like :mod:`edged.dicom.contexts`):
on an upgrade check that ``_read_pdu_data`` still reads one PDU per call, decodes it with ``_decode_pdu``
and hands it on through ``event_queue`` and ``_recv_pdu``, and that ``RequestHandler._create_association``
still builds the association's DUL; then run tests/unit/test_guard.py and
tests/integration/test_protocol_abuse.py and widen ``TESTED``.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pynetdicom
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.transport import RequestHandler

from edged import logs

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.association import Association

    from edged.metrics import Metrics

TESTED = ("3.0.",)

if not str(pynetdicom.__version__).startswith(TESTED):  # pragma: no cover - guards an upgrade
    raise ImportError(
        f"edged.dicom.guard was written for pynetdicom {', '.join(TESTED)}x, found {pynetdicom.__version__}: "
        "check that DULServiceProvider._read_pdu_data is still the one place PDUs are read, then update TESTED")

log = logging.getLogger("edged.scp")

MAX_ASSOCIATE_RQ = 64 * 1024
P_DATA_SLACK = 64 * 1024
MAX_COMMAND_BYTES = 64 * 1024
_MAX_OTHER_PDU = 1024  # A-RELEASE-RQ/RP and A-ABORT are 4 bytes long

_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ, _P_DATA_TF = 1, 2, 3, 4
_KNOWN_TYPES = frozenset(range(1, 8))
_READ_CHUNK = 1 << 20
_POLL_SECONDS = 0.25  # while a PDU is incomplete, how often to check for a local abort

#: Fixed label values of ``edged_protocol_violations_total``.
VIOLATIONS = ("pdu_too_long", "message_too_long", "unknown_pdu", "unexpected_pdu", "invalid_pdu", "slow_pdu")


@dataclass(frozen=True)
class Limits:
    """What one association may make the listener buffer and wait for."""

    max_pdu: int  # the maximum PDU length edged announces (0: none announced)
    max_message_bytes: int
    pdu_seconds: float

    @property
    def max_p_data(self) -> int:
        return (self.max_pdu or self.max_message_bytes) + P_DATA_SLACK

    def pdu_problem(self, state: str, pdu_type: int, length: int) -> str | None:
        """The violation a PDU header shows in FSM ``state``, or None."""
        if pdu_type not in _KNOWN_TYPES:
            return "unknown_pdu"
        if state in ("Sta1", "Sta2"):  # awaiting the A-ASSOCIATE-RQ (Sta1 until "connection open" is handled)
            if pdu_type != _ASSOCIATE_RQ:
                return "unexpected_pdu"
            return "pdu_too_long" if length > MAX_ASSOCIATE_RQ else None
        if pdu_type in (_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ):
            return "unexpected_pdu"
        limit = self.max_p_data if pdu_type == _P_DATA_TF else _MAX_OTHER_PDU
        return "pdu_too_long" if length > limit else None


class Guard:
    """The limits and where violations are reported; one per listener, shared by its associations."""

    def __init__(self, limits: Limits, metrics: "Metrics | None" = None) -> None:
        self.limits = limits
        self.metrics = metrics

    def install(self, assoc: "Association") -> None:
        """Make ``assoc``'s (not yet started) DUL a :class:`GuardedDUL`, keeping its queues and timers."""
        dul = assoc.dul
        dul.__class__ = GuardedDUL
        assert isinstance(dul, GuardedDUL)
        dul.guard_setup(self)

    def violation(self, assoc: "Association", reason: str, **fields: Any) -> None:
        if self.metrics is not None:
            self.metrics.protocol_violations.labels(reason).inc()
        info = assoc.requestor.address_info
        peer = f"{info.address}:{info.port}" if info is not None else "-"
        logs.event(log, logging.WARNING, "protocol.violation", reason=reason, peer=peer, **fields)


class _Closed(Exception):
    pass


class _TooSlow(Exception):
    pass


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with a bounded reader (see the module's docstring)."""

    _guard: Guard
    _tripped: bool
    _command_bytes: int
    _dataset_bytes: int

    def guard_setup(self, guard: Guard) -> None:
        self._guard = guard
        self._tripped = False
        self._command_bytes = 0
        self._dataset_bytes = 0

    def _read_pdu_data(self) -> None:
        assert self.socket is not None
        if self._tripped:
            # An A-ABORT has gone out for a violation: drop the rest of what the peer sends by closing
            # (pynetdicom's close queues "transport closed", which ends the association).
            self.socket.close()
            return
        limits = self._guard.limits
        deadline = time.monotonic() + limits.pdu_seconds
        try:
            head = bytearray(6)
            self._recv_into(memoryview(head), deadline)
            pdu_type, _, length = struct.unpack(">BBL", head)
            problem = limits.pdu_problem(self.state_machine.current_state, pdu_type, length)
            if problem is not None:
                self._trip(problem, pdu_type=f"0x{pdu_type:02X}", length=length)
                return
            data = bytearray(6 + length)  # the whole PDU: its body is read in place after the header
            data[:6] = head
            with memoryview(data) as view:
                self._recv_into(view[6:], deadline)
        except _Closed:
            self.event_queue.put("Evt17")  # transport connection closed
            return
        except _TooSlow:
            self._guard.violation(self.assoc, "slow_pdu", seconds=limits.pdu_seconds)
            self.event_queue.put("Evt17")
            return
        if pdu_type == _P_DATA_TF:
            problem = self._count_fragments(data, 6)
            if problem is not None:
                self._trip(problem, max_message_bytes=limits.max_message_bytes)
                return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:  # e.g. an all-space AE title; pynetdicom's answer too: "invalid PDU"
            self._trip("invalid_pdu", pdu_type=f"0x{pdu_type:02X}", error=type(exc).__name__,
                       detail=str(exc)[:120])
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        """pynetdicom's, except that a wait ends as soon as the connection is gone.

        The acceptor waits ``acse_timeout`` for the A-ASSOCIATE-RQ; when the request was aborted (an
        unknown PDU, a bad AE title, a bound exceeded) nothing is ever queued for it, and stock pynetdicom
        keeps the association, and so a slot of ``max_associations``, until that timeout.
        """
        if not wait:
            return super().receive_pdu(wait=False)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.01 if end is None else max(0.0, min(0.01, end - time.monotonic()))
            primitive = super().receive_pdu(wait=True, timeout=step)
            if primitive is not None:
                return primitive
            if self._connection_gone() or (end is not None and time.monotonic() >= end):
                return super().receive_pdu(wait=False)

    def _connection_gone(self) -> bool:
        sock = self.socket
        return sock is None or sock.socket is None or not sock._is_connected

    def _trip(self, reason: str, **fields: Any) -> None:
        self._guard.violation(self.assoc, reason, state=self.state_machine.current_state, **fields)
        self._tripped = True
        self.event_queue.put("Evt19")  # unrecognised or invalid PDU: the state machine sends A-ABORT

    def _recv_into(self, view: memoryview, deadline: float) -> None:
        """Fill ``view`` from the socket by ``deadline``; give up early if the association is being aborted
        here (stock pynetdicom would sit in ``recv`` and never send that A-ABORT)."""
        assert self.socket is not None
        sock = self.socket.socket
        if sock is None:
            raise _Closed
        n, got = len(view), 0
        try:
            while got < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _TooSlow
                if self._aborting():
                    raise _Closed
                sock.settimeout(min(remaining, _POLL_SECONDS))
                try:
                    k = sock.recv_into(view[got:], min(n - got, _READ_CHUNK))
                except (socket.timeout, TimeoutError):
                    continue
                if k == 0:
                    raise _Closed
                got += k
        except OSError:
            raise _Closed from None
        except ValueError:  # the socket was closed under us
            raise _Closed from None
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass

    def _aborting(self) -> bool:
        if self._kill_thread:
            return True
        pending = list(self.to_provider_queue.queue)
        return any(isinstance(p, (A_ABORT, A_P_ABORT)) for p in pending)

    def _count_fragments(self, body: bytearray, pos: int = 0) -> str | None:
        """Add the fragments of the P-DATA-TF items in ``body[pos:]`` to the command and data set being
        assembled."""
        limit = self._guard.limits.max_message_bytes
        while pos + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, pos)
            if item_length < 2 or pos + 4 + item_length > len(body):
                return None  # malformed: pynetdicom's decoder rejects it
            control = body[pos + 5]
            size = item_length - 2
            if control & 0x01:
                self._command_bytes += size
                if self._command_bytes > MAX_COMMAND_BYTES:
                    return "message_too_long"
                if control & 0x02:
                    self._command_bytes = 0
            else:
                self._dataset_bytes += size
                if self._dataset_bytes > limit:
                    return "message_too_long"
                if control & 0x02:
                    self._dataset_bytes = 0
            pos += 4 + item_length
        return None


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's per-connection handler, with the server's :class:`Guard` installed on each association."""

    def _create_association(self) -> "Association":
        assoc = super()._create_association()
        guard: Guard | None = getattr(self.server, "guard", None)
        if guard is not None:
            guard.install(assoc)
        return assoc
