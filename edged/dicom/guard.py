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
thread starts), so every queue, timer and the state machine stay as pynetdicom made them. With a stream
sink (the listener's store handler) it installs :class:`edged.dicom.stream.StreamingDUL` instead, which
also writes plain C-STORE data sets to the spool as they arrive.

Reactors. pynetdicom's two per-association threads poll: the DUL loops on ``select(..., 0)`` and sleeps
1 ms whenever nothing happened, and the association's reactor sleeps 1 ms between looks at its queues.
Each idle association costs ~5% of a core here, and every PDU and every DIMSE message waits for the
next poll. The guarded DUL's :meth:`GuardedDUL.run_reactor` does the same turn of the loop but sleeps in
``select`` on the socket and an eventfd that its queues (``event_queue``, ``to_provider_queue``) signal
on ``put``; the association's ``_reactor_checkpoint`` is replaced by a :class:`_ReactorGate` that, in the
association's own thread, waits until ``dimse.msg_queue`` or ``to_user_queue`` gets something (or the
DUL stops, or the association is killed). Both still wake every :data:`_IDLE_WAIT` seconds for their
timers (ARTIM, the network idle timeout).

Limits:

* A-ASSOCIATE-RQ, and any PDU before the association is established: :data:`MAX_ASSOCIATE_RQ` bytes
  (128 presentation contexts with ten transfer syntaxes each fit in under 40 KiB).
* P-DATA-TF: the maximum PDU length edged announced plus :data:`P_DATA_SLACK` (senders disagree on
  whether the PDV item headers count); with no announced maximum (0), the message limit plus slack.
* One DIMSE data set assembled from fragments: ``dicom.max_message_bytes``; one command set:
  :data:`MAX_COMMAND_BYTES`.
* One PDU, from its first byte to its last: ``dicom.network_timeout`` seconds (counted as ``slow_pdu``);
  pynetdicom's idle timer (the same timeout between PDUs) is stopped meanwhile.
* A-ASSOCIATE-AC/RJ (never sent to an acceptor), a second A-ASSOCIATE-RQ, anything but an
  A-ASSOCIATE-RQ first, and unknown PDU types: aborted at the header; a PDU pynetdicom cannot decode
  (an all-space AE title, say): aborted as pynetdicom would, and counted.

Written against pynetdicom 3.0 (``TESTED`` below, checked at import like :mod:`edged.dicom.contexts`):
on an upgrade check that ``_read_pdu_data`` still reads one PDU per call, decodes it with ``_decode_pdu``
and hands it on through ``event_queue`` and ``_recv_pdu``, and that ``RequestHandler._create_association``
still builds the association's DUL; that ``DULServiceProvider.run_reactor`` is still the loop
:meth:`GuardedDUL._reactor` mirrors (and the thread's ``_target``), that ``Association._run_reactor``
still passes through ``_reactor_checkpoint.wait()`` on each turn and that the queues named above are
still the only ways work reaches either thread; then run tests/unit/test_guard.py and
tests/integration/test_protocol_abuse.py and widen ``TESTED``.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.transport import RequestHandler
from pynetdicom.utils import make_target

from edged import logs
from edged.dicom.contexts import require_pynetdicom
from edged.dicom.negotiation import AcceptMemo, RequestMemo
from edged.dicom.reactor import AcceptorAssociation

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.association import Association

    from edged.metrics import Metrics

TESTED = ("3.0.",)
require_pynetdicom(__name__, TESTED, "check that DULServiceProvider._read_pdu_data is still the one place PDUs are read")

log = logging.getLogger("edged.scp")

MAX_ASSOCIATE_RQ = 64 * 1024
P_DATA_SLACK = 64 * 1024
MAX_COMMAND_BYTES = 64 * 1024
_MAX_OTHER_PDU = 1024  # A-RELEASE-RQ/RP and A-ABORT are 4 bytes long

_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ, _P_DATA_TF = 1, 2, 3, 4
_KNOWN_TYPES = frozenset(range(1, 8))
_READ_CHUNK = 1 << 20
_POLL_SECONDS = 0.25  # while a PDU is incomplete, how often to check for a local abort
#: The longest the reactor sleeps with nothing to do: its timers (ARTIM) are checked at least this often.
_IDLE_WAIT = 0.05

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

    def __init__(self, limits: Limits, metrics: "Metrics | None" = None, stream: Any = None) -> None:
        self.limits = limits
        self.metrics = metrics
        #: Where C-STORE data sets are streamed (:class:`edged.dicom.stream.StreamSink`); None: pynetdicom
        #: assembles every message as before.
        self.stream = stream
        #: A-ASSOCIATE-RQs this listener has decoded (:mod:`edged.dicom.negotiation`).
        self.requests = RequestMemo()
        #: A-ASSOCIATE-ACs this listener has encoded (:mod:`edged.dicom.negotiation`).
        self.accepts = AcceptMemo()

    def install(self, assoc: "Association") -> None:
        """Make ``assoc``'s (not yet started) DUL a :class:`GuardedDUL` (a streaming one when ``stream``
        is set), keeping its queues and timers, and ``assoc`` an :class:`~edged.dicom.reactor.AcceptorAssociation`
        (its reactor without pynetdicom's 1 ms sleep per turn)."""
        dul = assoc.dul
        if self.stream is not None:
            from edged.dicom.stream import StreamingDUL  # stream imports this module

            dul.__class__ = StreamingDUL
        else:
            dul.__class__ = GuardedDUL
        assert isinstance(dul, GuardedDUL)
        dul.guard_setup(self)  # gives the association its gate, which the reactor below waits at
        assoc.__class__ = AcceptorAssociation

    def violation(self, assoc: "Association", reason: str, **fields: Any) -> None:
        if self.metrics is not None:
            self.metrics.protocol_violations.labels(reason).inc()
        info = assoc.requestor.address_info
        peer = f"{info.address}:{info.port}" if info is not None else "-"
        logs.event(log, logging.WARNING, "protocol.violation", reason=reason, peer=peer, **fields)


class _Closed(Exception):
    pass


class _Wakeup:
    """An eventfd that wakes the reactor's ``select``; safe to set after it is closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fd: int = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def set(self) -> None:
        with self._lock:
            if self.fd >= 0:
                try:
                    os.eventfd_write(self.fd, 1)
                except OSError:
                    pass

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except OSError:  # BlockingIOError: not set
            pass

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __del__(self) -> None:  # a DUL whose thread never ran
        self.close()


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A ``queue.Queue`` whose ``put`` wakes a reactor (set as the class of pynetdicom's own queues)."""

    _wakeup: "_Wakeup | threading.Event"

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wakeup.set()


class _TooSlow(Exception):
    pass


class _ReactorGate:
    """Stands in for ``Association._reactor_checkpoint`` (a ``threading.Event``) so that the association's
    reactor sleeps while it has nothing to do.

    pynetdicom's acceptor reactor (``Association._run_reactor``) sleeps 1 ms and then looks at its queues,
    a thousand times a second for as long as the association lasts; each turn passes through
    ``_reactor_checkpoint.wait()``. Here that wait, in the association's own thread, also waits (at most
    :data:`_IDLE_WAIT`, so its timers are still checked) until something is queued for it: a DIMSE
    message (``dimse.msg_queue``), an A-RELEASE or A-ABORT from the DUL (``dul.to_user_queue``), the DUL
    stopping, or a kill. ``set``/``clear``/``is_set`` keep the pause semantics pynetdicom uses.
    """

    def __init__(self, assoc: "Association") -> None:
        self._assoc = assoc
        self._pause: threading.Event = assoc._reactor_checkpoint
        self.work = threading.Event()

    def set(self) -> None:
        self._pause.set()
        self.work.set()

    def clear(self) -> None:
        self._pause.clear()

    def is_set(self) -> bool:
        return self._pause.is_set()

    def _pending(self) -> bool:
        assoc = self._assoc
        dul = assoc.dul
        return bool(assoc._kill or assoc.dimse.msg_queue.qsize() or dul.to_user_queue.qsize()
                    or not dul.is_alive() or dul.idle_timer_expired())

    def wait(self, timeout: float | None = None) -> bool:
        ok = self._pause.wait(timeout)
        if ok and threading.current_thread() is self._assoc:
            self.work.clear()
            if not self._pending():
                self.work.wait(_IDLE_WAIT)
        return ok


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
        # pynetdicom bound its own run_reactor as the thread's target when it built the DUL.
        self._target = make_target(self.run_reactor)
        self._wakeup = _Wakeup()
        for q in (self.event_queue, self.to_provider_queue):
            q.__class__ = _WakingQueue
            q._wakeup = self._wakeup  # type: ignore[attr-defined]
        assoc = self.assoc
        gate = _ReactorGate(assoc)
        self._gate = gate
        assoc._reactor_checkpoint = gate  # type: ignore[assignment]
        for q in (self.to_user_queue, assoc.dimse.msg_queue):
            q.__class__ = _WakingQueue
            q._wakeup = gate.work  # type: ignore[attr-defined]

    # -- the reactor -------------------------------------------------------------------------------

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop, waiting in ``select`` instead of polling.

        Stock pynetdicom polls the socket (``select`` with no timeout) and its queues every millisecond,
        sleeping in between: an idle association costs CPU, and every PDU that arrives waits for the
        next poll. Here the thread sleeps until the socket is readable, something is queued for it
        (``event_queue``, ``to_provider_queue``: :class:`_WakingQueue`), it is told to stop
        (:meth:`kill_dul`, :meth:`stop_dul`) or :data:`_IDLE_WAIT` has passed (the ARTIM timer).
        Each turn of the loop does what pynetdicom's does, in the same order.
        """
        try:
            self._reactor()
        finally:
            self._reactor_done()

    def _reactor(self) -> None:
        self._idle_timer.start()
        assert self.socket is not None
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # as pynetdicom: bypass the state machine, send an A-ABORT, stop
                log.error("exception in the DUL reactor, aborting the association: %s", type(exc).__name__)
                log.debug("DUL reactor exception", exc_info=True)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                try:
                    self.socket.send(abort_pdu.encode())
                except Exception:  # noqa: BLE001 - the connection may be gone already
                    pass
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait()
                continue
            self.state_machine.do_action(event)

    def _wait(self) -> None:
        """Sleep until the socket is readable, the reactor is woken, or :data:`_IDLE_WAIT` has passed."""
        wakeup = self._wakeup
        wakeup.clear()
        if self._kill_thread or self.event_queue.qsize() or self.to_provider_queue.qsize():
            return
        timeout = _IDLE_WAIT
        if self.artim_timer._start_time is not None and self.artim_timer._end_time is None:
            timeout = max(0.0, min(timeout, self.artim_timer.remaining))
        fds = [wakeup.fd]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and self.socket._is_connected:  # type: ignore[union-attr]
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return
            try:
                fileno = sock.fileno()
            except (OSError, ValueError):
                fileno = -1
            if fileno >= 0:
                fds.append(fileno)
        try:
            select.select(fds, [], [], timeout)
        except (OSError, ValueError):  # the socket closed under us: pynetdicom's checks notice it next turn
            time.sleep(self._run_loop_delay)

    def _reactor_done(self) -> None:
        """Called once when the reactor stops (in its thread): release what it holds."""
        self._interrupt()
        self._wakeup.close()
        self._gate.work.set()  # the association's reactor notices at once that the DUL has stopped

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wakeup.set()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wakeup.set()
            while self.is_alive():
                time.sleep(self._run_loop_delay)
            return True
        return False

    # -- the reader --------------------------------------------------------------------------------

    def _read_pdu_data(self) -> None:
        assert self.socket is not None
        if self._tripped:
            # An A-ABORT has gone out for a violation: drop the rest of what the peer sends by closing
            # (pynetdicom's close queues "transport closed", which ends the association).
            self.socket.close()
            return
        limits = self._guard.limits
        deadline = time.monotonic() + limits.pdu_seconds
        # A PDU has begun: its deadline, not pynetdicom's idle timer (network_timeout since the last
        # complete PDU, which ran before this one began and so would expire first), bounds it from here;
        # the reactor restarts the idle timer once it is read. Otherwise the association thread aborts
        # a stalled PDU as "idle" just before its deadline, and the violation goes uncounted.
        self._idle_timer.stop()
        try:
            head = bytearray(6)
            self._recv_into(memoryview(head), deadline)
            pdu_type, _, length = struct.unpack(">BBL", head)
            state = self.state_machine.current_state
            problem = limits.pdu_problem(state, pdu_type, length)
            if problem is not None:
                self._trip(problem, pdu_type=f"0x{pdu_type:02X}", length=length)
                return
            if pdu_type == _P_DATA_TF and state == "Sta6" and self._stream_p_data(length, deadline):
                return
            self._interrupt()  # a message being streamed (if any) ends unfinished
            data = bytearray(6 + length)  # the whole PDU: its body is read in place after the header
            data[:6] = head
            with memoryview(data) as view:
                self._recv_into(view[6:], deadline)
        except _Closed:
            self._interrupt()
            self.event_queue.put("Evt17")  # transport connection closed
            return
        except _TooSlow:
            self._interrupt()
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

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """pynetdicom's, with an A-ASSOCIATE-RQ decoded through the listener's :class:`RequestMemo`."""
        if bytestream[:1] != b"\x01":
            return super()._decode_pdu(bytestream)
        data = bytes(bytestream)
        evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": data})  # as pynetdicom: before decoding
        pdu = self._guard.requests.decode(data)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt6"  # A-ASSOCIATE-RQ PDU received

    def _stream_p_data(self, length: int, deadline: float) -> bool:
        """Read a P-DATA-TF body (``length`` bytes) another way; False: pynetdicom's way (the default)."""
        return False

    def _interrupt(self) -> None:
        """The message being streamed, if any, will not be finished (another PDU, a violation, the
        connection gone): subclasses drop what they hold for it."""

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
        self._interrupt()
        self._guard.violation(self.assoc, reason, state=self.state_machine.current_state, **fields)
        self._tripped = True
        self.event_queue.put("Evt19")  # unrecognised or invalid PDU: the state machine sends A-ABORT

    def _recv_into(self, view: memoryview, deadline: float) -> None:
        """Fill ``view`` from the socket by ``deadline``; give up early if the association is being aborted
        here (stock pynetdicom would sit in ``recv`` and never send that A-ABORT).

        A plain (blocking) socket is read with ``MSG_DONTWAIT`` and waited on with ``poll`` only when
        nothing is there, so its blocking mode is never changed; a TLS socket (no flags allowed, and
        data may wait in its buffer unseen by ``poll``) with ``settimeout`` around each ``recv``."""
        assert self.socket is not None
        sock = self.socket.socket
        if sock is None:
            raise _Closed
        if isinstance(sock, ssl.SSLSocket) or sock.gettimeout() is not None:
            return self._recv_into_timed(sock, view, deadline)
        n, got = len(view), 0
        poller = None
        monotonic = time.monotonic
        try:
            while got < n:
                if monotonic() >= deadline:
                    raise _TooSlow
                if self._aborting():
                    raise _Closed
                try:
                    k = sock.recv_into(view[got:], min(n - got, _READ_CHUNK), socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    if poller is None:
                        poller = select.poll()
                        poller.register(sock, select.POLLIN | select.POLLPRI)
                    remaining = deadline - monotonic()
                    if remaining > 0:
                        poller.poll(max(1, int(min(remaining, _POLL_SECONDS) * 1000)))
                    continue
                if k == 0:
                    raise _Closed
                got += k
        except OSError:
            raise _Closed from None
        except ValueError:  # the socket was closed under us
            raise _Closed from None

    def _recv_into_timed(self, sock: socket.socket, view: memoryview, deadline: float) -> None:
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
        pending = self.to_provider_queue.queue
        return bool(pending) and any(isinstance(p, (A_ABORT, A_P_ABORT)) for p in list(pending))

    def _count_fragments(self, body: bytearray, pos: int = 0) -> str | None:
        """Add the fragments of the P-DATA-TF items in ``body[pos:]`` to the command and data set being
        assembled."""
        while pos + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, pos)
            if item_length < 2 or pos + 4 + item_length > len(body):
                return None  # malformed: pynetdicom's decoder rejects it
            problem = self._count_fragment(body[pos + 5], item_length - 2)
            if problem is not None:
                return problem
            pos += 4 + item_length
        return None

    def _count_fragment(self, control: int, size: int) -> str | None:
        """Add one fragment (its message control header and value size) to the message being assembled."""
        if control & 0x01:
            self._command_bytes += size
            if self._command_bytes > MAX_COMMAND_BYTES:
                return "message_too_long"
            if control & 0x02:
                self._command_bytes = 0
        else:
            self._dataset_bytes += size
            if self._dataset_bytes > self._guard.limits.max_message_bytes:
                return "message_too_long"
            if control & 0x02:
                self._dataset_bytes = 0
        return None


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's per-connection handler, with the server's :class:`Guard` installed on each association."""

    def _create_association(self) -> "Association":
        assoc = super()._create_association()
        guard: Guard | None = getattr(self.server, "guard", None)
        if guard is not None:
            guard.install(assoc)
        return assoc
