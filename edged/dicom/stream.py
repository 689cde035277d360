"""Streamed C-STORE: a data set goes to the spool as its P-DATA fragments arrive, never whole in memory.

pynetdicom reads each P-DATA-TF PDU whole, hands it through its state machine to its DIMSE layer, which
appends every fragment to a ``BytesIO`` until the last one, decodes the command set with pydicom, queues
the message for the association's thread, which calls the C-STORE handler, which writes the bytes to
the spool. Per image that is the data set held whole in memory, copied several times, and two thread
hand-offs each paying a reactor's poll. With :func:`edged.dicom.guard` reading every PDU anyway,
:class:`StreamingDUL` (the guarded DUL with :meth:`~GuardedDUL._stream_p_data` and its reader
overridden) takes the common message off that path and does it in the DUL's own thread:

1. In an established association (Sta6) it reads a P-DATA-TF item by item; while a data set is being
   streamed, PDU after PDU as they arrive, going back to the reactor only when it would have something
   else to do or nothing is waiting. A command set is collected (it is small: bounded by the guard)
   until its last fragment.
2. The command is decoded directly (:func:`parse_store_command`). Only a plain C-STORE-RQ with a data
   set, on an accepted context whose abstract syntax is its Affected SOP Class and a storage class,
   with UIDs of digits and dots and a peer whose maximum PDU holds the one-PDV Success response, and
   only while pynetdicom has no message of its own in progress, is streamed. Everything else (C-ECHO,
   other services, odd commands, any association with a PDU/DIMSE event handler bound, a C-STORE
   handler other than the sink's) goes to pynetdicom exactly as before: the items are re-framed as a
   P-DATA-TF and decoded by pynetdicom.
3. A temp file is opened in the spool's ``tmp/`` (same filesystem as ``instances/``) and the preamble
   and File Meta (from the command's UIDs and the context's transfer syntax, as the in-memory path
   writes them) go first; then each data-set fragment is read from the socket into one reusable buffer
   (:data:`CHUNK` bytes) and written out; every :data:`WRITEBACK` bytes, while it is the only data set
   being written, the kernel is asked to start writing them to disk (:mod:`edged.spool.writeback`: a
   hint, the fsync below still decides). The guard's bound on the message (``max_message_bytes``) is
   checked at each fragment's header, before its bytes are read. Writing stops (the rest is read and
   dropped) on a write error, or when it would eat into ``storage.min_free_bytes``.
4. After the last fragment the sink (:meth:`edged.dicom.scp.StoreHandler.store_streamed`) reads the
   header (:func:`edged.dicom.header.read_header_at`: the data set's first :data:`HEAD` bytes, kept in
   memory as they were written, walked directly up to Pixel Data, or the file through pydicom where the
   walker gives up; when the write failed, from those first bytes alone), runs the same
   checks in the same order with the same statuses as the in-memory path, renames the file into place,
   fsyncs it, and commits it with the directory fsync and its journal row (group commit); only then
   does the response go out, from this thread: Success as a ready-made PDU
   (:func:`edged.dicom.fastdimse.store_success_command`), any other status through pynetdicom's DIMSE
   encoder. Nothing is acknowledged before its file, its directory entry and its row are durable.
   Then, for an instance no engine routes, the file's pages are let go from the page cache
   (:func:`edged.spool.writeback.drop_cached_path`), while the sender prepares its next message.
5. Anything that ends a message early (another PDU type, a violation, the connection closing, the
   association aborted, the reactor stopping) removes its temp file: no partial file, no row.

A fragment that does not continue the streamed message (a command fragment, another context) is a
protocol violation: the association is aborted (``invalid_pdu``), as for any PDU pynetdicom cannot
decode.

Written against pynetdicom 3.0 (``TESTED``, checked at import): on an upgrade check that
``DIMSEServiceProvider.message`` is still the message being assembled, that ``_accepted_cx`` maps
context IDs to accepted contexts, that ``ServiceClass.validate_status`` and ``uid_to_service_class``
still exist, and that in Sta6 a turn of ``DULServiceProvider.run_reactor`` with nothing queued still only
reads the next PDU once ``AssociationSocket.ready`` (what :meth:`StreamingDUL._next_pdu_waiting`
mirrors), then run tests/unit/test_stream.py and tests/integration/test_receive_streamed.py.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from edged.dicom.contexts import require_pynetdicom
from edged.dicom.fastdimse import store_success_command
from edged.dicom.filemeta import encode_file_meta
from edged.dicom.guard import GuardedDUL
from edged.spool.writeback import drop_cached_path, start_writeback

TESTED = ("3.0.",)
require_pynetdicom(__name__, TESTED, "check the internals its docstring lists")

log = logging.getLogger("edged.scp")

#: Bytes read from the socket per write to the spool (one buffer per association, reused).
CHUNK = 256 * 1024
#: Each time this many more bytes are in the temp file, their writeback to disk is started
#: (:func:`edged.spool.writeback.start_writeback`), so that the fsync after the last fragment has little
#: left to wait for; only while no other data set is being written (:data:`IN_FLIGHT`). Measured on ext4
#: with 513 KB slices: the fsync's wait ~2.7 -> ~1.7 ms, for ~0.25 ms more CPU per slice (more, smaller
#: writebacks). A sender waiting alone gains ~1 ms per image; with several associations at once their
#: waits overlap anyway, and the CPU is what they run short of.
WRITEBACK = 128 * 1024
#: The first bytes of each data set are also kept in memory: when writing it failed (a full disk), its
#: header is read from them, so that a duplicate still gets Success and a refusal its proper reason.
HEAD = 64 * 1024

_C_STORE_RQ = 0x0001
_NO_DATASET = 0x0101
_UID = re.compile(rb"[0-9.]{1,64}")
#: Command elements a C-STORE-RQ may carry (PS3.7 9.3.1.1); anything else: pynetdicom decides.
_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031})
#: With a handler bound to any of these, the association sees every message: pynetdicom's path.
_OBSERVED = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV,
             evt.EVT_DATA_SENT, evt.EVT_PDU_SENT, evt.EVT_DIMSE_SENT)


@dataclass(frozen=True)
class StoreCommand:
    """What a streamed C-STORE-RQ's command set says (UIDs without their padding)."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


def parse_store_command(raw: bytes) -> StoreCommand | None:
    """A C-STORE-RQ command set with a data set, decoded directly; None for anything else or anything
    unusual (then pynetdicom decodes it)."""
    fields: dict[int, bytes] = {}
    pos, n = 0, len(raw)
    while pos < n:
        if pos + 8 > n:
            return None
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if group != 0 or elem not in _STORE_RQ_ELEMENTS or elem in fields or pos + length > n:
            return None
        fields[elem] = bytes(raw[pos:pos + length])
        pos += length

    def us(elem: int) -> int | None:
        v = fields.get(elem)
        return struct.unpack("<H", v)[0] if v is not None and len(v) == 2 else None

    def ui(elem: int) -> str | None:
        v = fields.get(elem)
        if v is None:
            return None
        v = v.rstrip(b"\x00 ")
        return v.decode("ascii") if _UID.fullmatch(v) else None

    group_length = fields.get(0x0000)
    if group_length is not None and (len(group_length) != 4 or struct.unpack("<I", group_length)[0] != n - 12):
        return None
    if us(0x0100) != _C_STORE_RQ or us(0x0700) is None:
        return None
    data_set_type = us(0x0800)
    if data_set_type is None or data_set_type == _NO_DATASET:
        return None
    message_id, sop_class, sop_instance = us(0x0110), ui(0x0002), ui(0x1000)
    if message_id is None or sop_class is None or sop_instance is None:
        return None
    return StoreCommand(message_id, sop_class, sop_instance)


class StreamSink(Protocol):
    """Where :class:`StreamingDUL` puts data sets: :class:`edged.dicom.scp.StoreHandler`."""

    spool: Any  # edged.spool.store.Spool
    min_free_bytes: int

    def store_streamed(self, assoc: Any, incoming: "Incoming") -> Any: ...  # status (int) or Dataset

    def answered(self, incoming: "Incoming", sent: float) -> None: ...  # the response went out at ``sent``

    def on_store(self, event: Any) -> Any: ...  # the C-STORE handler the listener binds


class _InFlight:
    """How many data sets are being written to spool temp files at this moment (every association)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n


IN_FLIGHT = _InFlight()


@dataclass(eq=False)
class Incoming:
    """One data set being written to a temp file as it arrives."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    command: StoreCommand
    success: bytes  # the encoded Success command set for this request
    spool: Any
    cpu0: float  # thread CPU time when the command was complete
    fd: int = -1
    tmp: Path | None = None
    meta_len: int = 0
    size: int = 0  # bytes of the file as received: preamble + File Meta + data set
    written: int = 0  # of which on disk
    written_back: int = 0  # of which writeback has been started (:data:`WRITEBACK`)
    #: Most bytes that may be written: the data set must leave ``min_free_bytes`` free, as the in-memory
    #: path checks before it writes (the preamble and File Meta are not counted, there as here).
    budget: int = 0
    error: OSError | None = None
    over_budget: bool = False
    head: bytearray = field(default_factory=bytearray)  # the data set's first HEAD bytes
    #: Set by the sink for a file it placed that nothing will read soon: its pages are let go from the
    #: page cache once the response has been sent (:func:`edged.spool.writeback.drop_cached_path`).
    uncache: Path | None = None
    #: ``time.perf_counter()`` at each step's end (0.0: not reached): the command set complete, the last
    #: fragment written, the checks passed, the file placed and fsynced, committed; the sink sets the
    #: last three, and reports them once the response is out (``edged_store_step_seconds``).
    t_command: float = 0.0
    t_last: float = 0.0
    t_checked: float = 0.0
    t_placed: float = 0.0
    t_committed: float = 0.0

    @property
    def failed(self) -> bool:
        """Whether the file on disk is not the whole message (a write failed or would have eaten into the
        free-space reserve)."""
        return self.fd < 0 or self.error is not None or self.over_budget

    def open(self, meta: bytes, min_free_bytes: int) -> None:
        try:
            self.budget = self.spool.free_bytes() - min_free_bytes + len(meta)
            self.fd, self.tmp = self.spool.open_temp()
            IN_FLIGHT.add(1)
        except OSError as exc:
            self.error = exc
        self.meta_len = len(meta)
        self._put(memoryview(meta))

    def write(self, data: memoryview) -> None:
        """Append a data-set fragment."""
        if len(self.head) < HEAD:
            self.head += data[:HEAD - len(self.head)]
        self._put(data)

    def _put(self, data: memoryview) -> None:
        n = len(data)
        self.size += n
        if self.fd < 0 or self.error is not None or self.over_budget:
            return
        if self.written + n > self.budget:
            self.over_budget = True
            return
        try:
            while data:
                k = os.write(self.fd, data)
                data = data[k:]
                self.written += k
        except OSError as exc:
            self.error = exc
            return
        if self.written - self.written_back >= WRITEBACK and IN_FLIGHT.count <= 1:
            start_writeback(self.fd, self.written_back, self.written - self.written_back)
            self.written_back = self.written

    def take(self) -> tuple[int, Path]:
        """The temp file's descriptor and path, now the caller's to place or remove."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            IN_FLIGHT.add(-1)
        assert self.tmp is not None
        return fd, self.tmp

    def abandon(self) -> None:
        """Close and remove the temp file, if it is still this object's."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            IN_FLIGHT.add(-1)
            assert self.tmp is not None
            self.spool.abandon(fd, self.tmp)


class StreamingDUL(GuardedDUL):
    """The guarded DUL, streaming plain C-STOREs to the spool (see the module's docstring)."""

    _sink: StreamSink
    _msg: Incoming | None
    _cmd: list[tuple[int, int, bytes]]
    _streams: bool | None

    def guard_setup(self, guard: Any) -> None:
        super().guard_setup(guard)
        self._sink = guard.stream
        self._msg = None
        self._cmd = []
        self._streams = None
        self._head = bytearray(6)
        self._chunk: memoryview | None = None

    def _read_pdu_data(self) -> None:
        """One PDU, as the guarded DUL reads it; then, while a data set is being streamed, the next ones
        too, each as soon as it is waiting, without a turn of the reactor in between: that turn would find
        nothing queued and the socket readable (:meth:`_next_pdu_waiting` checks just that), and read it."""
        super()._read_pdu_data()
        while self._msg is not None and self._next_pdu_waiting():
            self._idle_timer.restart()  # as the reactor does after each transport event
            super()._read_pdu_data()

    def _next_pdu_waiting(self) -> bool:
        """Whether the reactor's next turn would only read the next PDU: nothing for it to do (no event,
        nothing from the association, not stopping, no timer expired) and data waiting on the socket
        (pynetdicom's own check, which queues "connection closed" where the socket has failed)."""
        return not (self._kill_thread or self._tripped or self.event_queue.qsize() or self.to_provider_queue.qsize()
                    or self.artim_timer.expired) and self.socket is not None and self.socket.ready

    def _streaming(self) -> bool:
        """Whether this association streams (decided at its first P-DATA, when its handlers are bound)."""
        if self._streams is None:
            assoc = self.assoc
            handler = assoc.get_handlers(evt.EVT_C_STORE)
            fn = handler[0] if isinstance(handler, tuple) else None
            ours = getattr(fn, "__self__", None) is self._sink and getattr(fn, "__name__", "") == "on_store"
            self._streams = ours and not any(assoc.get_handlers(e) for e in _OBSERVED)
        return self._streams

    def _stream_p_data(self, length: int, deadline: float) -> bool:
        if not self._streaming():
            return False
        # pynetdicom is assembling a message of its own: what follows is its, until it has finished.
        busy = self._msg is None and not self._cmd and (
            self.assoc.dimse.message is not None or self._recv_pdu.qsize() > 0)
        forward: list[tuple[int, int, bytes]] = []
        head = memoryview(self._head)
        remaining = length
        while remaining:
            if remaining < 6:
                return self._bad("PDV item header runs past the end of the PDU")
            self._recv_into(head, deadline)
            item_length, context_id, control = struct.unpack(">LBB", self._head)
            if item_length < 2 or item_length + 4 > remaining:
                return self._bad("PDV item runs past the end of the PDU")
            remaining -= 4 + item_length
            size = item_length - 2
            problem = self._count_fragment(control, size)
            if problem is not None:
                self._trip(problem, max_message_bytes=self._guard.limits.max_message_bytes)
                return True
            msg = self._msg
            if msg is not None:
                if control & 0x01 or context_id != msg.context_id:
                    return self._bad("fragment does not continue the data set being received")
                self._to_file(msg, size, deadline)
                if control & 0x02:
                    self._msg = None
                    self._finish(msg)
                continue
            value = self._recv_bytes(size, deadline)
            if busy or forward or not control & 0x01:
                forward.append((context_id, control, value))
                continue
            self._cmd.append((context_id, control, value))
            if control & 0x02:
                items, self._cmd = self._cmd, []
                self._msg = self._start(items)
                if self._msg is None:
                    forward.extend(items)
        if forward:
            self._forward(forward)
        return True

    def _bad(self, detail: str) -> bool:
        self._trip("invalid_pdu", pdu_type="0x04", detail=detail)
        return True

    def _recv_bytes(self, size: int, deadline: float) -> bytes:
        data = bytearray(size)
        if size:
            self._recv_into(memoryview(data), deadline)
        return bytes(data)

    def _to_file(self, msg: Incoming, size: int, deadline: float) -> None:
        if self._chunk is None:
            self._chunk = memoryview(bytearray(CHUNK))
        chunk = self._chunk
        while size:
            n = min(size, CHUNK)
            view = chunk[:n]
            self._recv_into(view, deadline)
            msg.write(view)
            size -= n

    def _start(self, items: list[tuple[int, int, bytes]]) -> Incoming | None:
        """An :class:`Incoming` for a complete command set that is a C-STORE to stream, else None."""
        context_id = items[0][0]
        if any(item[0] != context_id for item in items):
            return None
        command = parse_store_command(b"".join(item[2] for item in items))
        if command is None:
            return None
        assoc = self.assoc
        cx = assoc._accepted_cx.get(context_id)
        if cx is None or cx.abstract_syntax != command.sop_class_uid or not cx.transfer_syntax:
            return None
        if _config.UNRESTRICTED_STORAGE_SERVICE or command.sop_class_uid in assoc.acceptor.accepted_common_extended:
            return None
        if uid_to_service_class(command.sop_class_uid) is not StorageServiceClass:
            return None
        success = store_success_command(command.message_id, command.sop_class_uid, command.sop_instance_uid)
        peer_max = int(getattr(assoc.requestor, "maximum_length", 0) or 0)
        if peer_max and len(success) + 6 > peer_max:
            return None
        ts = str(cx.transfer_syntax[0])
        try:
            meta = encode_file_meta(command.sop_class_uid, command.sop_instance_uid, ts)
        except UnicodeEncodeError:
            return None
        msg = Incoming(context_id, command.sop_class_uid, ts, command, success, self._sink.spool,
                       cpu0=time.thread_time(), t_command=time.perf_counter())
        msg.open(meta, self._sink.min_free_bytes)
        return msg

    def _finish(self, msg: Incoming) -> None:
        """The data set is complete: store it, then answer; then let go of its cached pages if the sink
        asked (off the path the sender waits on)."""
        msg.t_last = time.perf_counter()
        try:
            if self._store_and_answer(msg):
                self._sink.answered(msg, time.perf_counter())
        finally:
            if msg.uncache is not None:
                drop_cached_path(msg.uncache)

    def _store_and_answer(self, msg: Incoming) -> bool:
        """Store the data set and send (or queue) its response; False if the association was aborted
        meanwhile (nothing to answer)."""
        try:
            result = self._sink.store_streamed(self.assoc, msg)
        except Exception:  # as pynetdicom: a handler that raises answers 0xC211
            log.exception("streamed C-STORE failed")
            msg.abandon()
            result = 0xC211
        if self.state_machine.current_state != "Sta6":
            return False  # aborted meanwhile: nothing to answer
        if isinstance(result, int) and result == 0x0000 and not self.to_provider_queue.qsize():
            # Control header 0x03: command set, last fragment. One PDV, one PDU (checked in _start).
            pdv = struct.pack(">LBB", len(msg.success) + 2, msg.context_id, 0x03) + msg.success
            assert self.socket is not None
            self.socket.send(struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv)
            return True
        rsp = C_STORE()
        rsp.MessageID = msg.command.message_id
        rsp.MessageIDBeingRespondedTo = msg.command.message_id
        rsp.AffectedSOPInstanceUID = msg.command.sop_instance_uid
        rsp.AffectedSOPClassUID = msg.command.sop_class_uid
        rsp = StorageServiceClass(self.assoc).validate_status(result, rsp)
        self.assoc.dimse.send_msg(rsp, msg.context_id)  # queued: the reactor sends it next
        return True

    def _forward(self, items: list[tuple[int, int, bytes]]) -> None:
        """Hand PDV items to pynetdicom as one P-DATA-TF, as if it had read them itself."""
        body = b"".join(struct.pack(">LBB", len(value) + 2, cx, control) + value for cx, control, value in items)
        try:
            pdu, event = self._decode_pdu(bytearray(struct.pack(">BBL", 0x04, 0x00, len(body)) + body))
        except Exception as exc:  # noqa: BLE001 - as the guard: "invalid PDU"
            self._trip("invalid_pdu", pdu_type="0x04", error=type(exc).__name__, detail=str(exc)[:120])
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _interrupt(self) -> None:
        msg, self._msg = self._msg, None
        self._cmd = []
        if msg is not None:
            msg.abandon()
