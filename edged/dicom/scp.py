"""The DICOM listener: Verification and Storage SCP on pynetdicom.

The C-STORE handler persists and answers, nothing more: the dataset's bytes as received (with file
meta) go to a temp file in the spool, renamed to their final name and fsynced; then the directory is
fsynced and the instance committed to the journal (both shared by every association committing at that
moment: :mod:`edged.spool.commit`), and only then is Success (0x0000) returned. It never
decodes pixel data, never runs a model and never talks to the PACS.

Two ways in, one set of checks (:meth:`StoreHandler._checked`: header, UIDs, duplicate, resources, in
that order, with the same statuses, logs, metrics and audit records):

* **Streamed** (the usual way, :mod:`edged.dicom.stream`): the association's DUL thread writes a plain
  C-STORE's data set to a spool temp file as its fragments arrive and calls
  :meth:`StoreHandler.store_streamed` after the last one; the header is read from the head of that file.
  ``edged_store_seconds`` then times the work after the last fragment (header, checks, rename, fsync,
  commit); the ``receive`` CPU counter includes the writes done while the data set arrived; and for
  each data set stored, ``edged_store_step_seconds`` times each step from its command set to its
  response (:meth:`StoreHandler.answered`): where an association's time goes, the sender's or the disk's.
* **In memory** (:meth:`StoreHandler.on_store`, bound to ``EVT_C_STORE``): whatever pynetdicom assembles
  itself (a peer whose maximum PDU cannot hold a one-PDV response, odd command sets, an association
  with PDU/DIMSE event handlers bound).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import encode_file_meta as pynetdicom_encode_file_meta
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from edged import logs
from edged.audit import AuditLog
from edged.config import DicomConfig
from edged.dicom import fastdimse, status
from edged.dicom.contexts import SharedContexts
from edged.dicom.filemeta import encode_file_meta
from edged.dicom.guard import Guard, Limits
from edged.dicom.server import ListeningServer, start_server
from edged.dicom.stream import Incoming
from edged.dicom.header import Header, HeaderError, read_header, read_header_at, read_header_head
from edged.errors import EdgedError, JournalError, OutOfResourcesError
from edged.metrics import STORE_STEPS, Metrics
from edged.pipeline.router import Router
from edged.spool.commit import GroupCommit
from edged.spool.journal import InstanceRecord, Journal, Route
from edged.spool.store import Spool

log = logging.getLogger("edged.scp")

#: Transfer syntaxes accepted for every storage SOP class, in order of preference.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

_PREAMBLE = b"\x00" * 128 + b"DICM"
_UID_LOCK_STRIPES = 64


@dataclass
class _AssocStats:
    """Per-association counters for the one log line written when it ends."""

    number: int
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0


def _failure(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class StoreHandler:
    """Event handlers for the listener. Shared by all association threads."""

    def __init__(self, spool: Spool, journal: Journal, cfg: DicomConfig, *, min_free_bytes: int,
                 max_pending: int, metrics: Metrics, router: Router | None = None,
                 on_stored: Callable[[], None] | None = None, audit: AuditLog | None = None) -> None:
        self.router = router
        self.audit = audit
        self.on_stored = on_stored
        self.spool = spool
        self.journal = journal
        self.cfg = cfg
        self.min_free_bytes = min_free_bytes
        self.max_pending = max_pending
        self.metrics = metrics
        self._steps = [metrics.store_step_seconds.labels(step) for step in STORE_STEPS]
        self._uid_locks = [threading.Lock() for _ in range(_UID_LOCK_STRIPES)]
        self._assoc_seq = 0
        self._seq_lock = threading.Lock()
        self._stats: weakref.WeakKeyDictionary[Any, _AssocStats] = weakref.WeakKeyDictionary()
        self.committer = GroupCommit(journal, spool.instances)

    def close(self) -> None:
        """Refuse further commits (after the listener has stopped; later stores answer 0xA700)."""
        self.committer.close()

    # -- association events ----------------------------------------------------------------------

    def _stats_for(self, assoc: Any) -> _AssocStats:
        stats = self._stats.get(assoc)
        if stats is None:
            with self._seq_lock:
                self._assoc_seq += 1
                stats = self._stats.setdefault(assoc, _AssocStats(self._assoc_seq))
        return stats

    @staticmethod
    def _peer(assoc: Any) -> str:
        return f"{assoc.requestor.address}:{assoc.requestor.port}"

    def on_established(self, event: evt.Event) -> None:
        fastdimse.install(event.assoc)
        self.metrics.associations.labels("accepted").inc()
        stats = self._stats_for(event.assoc)
        logs.event(log, logging.DEBUG, "association.established", assoc=stats.number,
                   peer=self._peer(event.assoc), calling_ae=event.assoc.requestor.ae_title,
                   called_ae=event.assoc.acceptor.ae_title)

    #: (result source, diagnostic) of the A-ASSOCIATE-RJ pynetdicom sent -> reason label (PS3.8 9.3.4).
    _REJECT_REASONS = {(1, 3): "calling_ae", (1, 7): "called_ae", (3, 1): "busy", (3, 2): "busy"}

    def on_rejected(self, event: evt.Event) -> None:
        # The label comes from the rejection actually sent, not from recounting: pynetdicom's busy check
        # wins over an AE title mismatch, and by now another association may have ended.
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        called = assoc.requestor.primitive.called_ae_title if assoc.requestor.primitive else ""
        sent = assoc.acceptor.primitive
        key = (sent.result_source, sent.diagnostic) if sent is not None else None
        reason = self._REJECT_REASONS.get(key, "other") if key is not None else "other"
        self.metrics.associations.labels(f"rejected:{reason}").inc()
        logs.event(log, logging.WARNING, "association.rejected", reason=reason, peer=self._peer(assoc),
                   calling_ae=calling, called_ae=called)

    def _on_end(self, event: evt.Event, how: str) -> None:
        stats = self._stats.pop(event.assoc, None)
        if stats is None:  # ended before it was established (e.g. rejected)
            return
        if self.audit is not None:
            self.audit.write("association.closed", how=how, assoc=stats.number, peer=self._peer(event.assoc),
                             calling_ae=event.assoc.requestor.ae_title, called_ae=event.assoc.acceptor.ae_title,
                             stored=stats.stored, duplicates=stats.duplicates, failed=stats.failed, bytes=stats.bytes)
        logs.event(log, logging.INFO if how == "released" else logging.WARNING, f"association.{how}",
                   assoc=stats.number, peer=self._peer(event.assoc), calling_ae=event.assoc.requestor.ae_title,
                   called_ae=event.assoc.acceptor.ae_title, stored=stats.stored,
                   duplicates=stats.duplicates, failed=stats.failed, bytes=stats.bytes,
                   seconds=time.monotonic() - stats.started)

    def on_released(self, event: evt.Event) -> None:
        self._on_end(event, "released")

    def on_aborted(self, event: evt.Event) -> None:
        self._on_end(event, "aborted")

    def on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    # -- C-STORE -----------------------------------------------------------------------------------

    def _fail(self, stats: _AssocStats, code: int, comment: str, **fields: Any) -> Dataset:
        stats.failed += 1
        name = status.NAMES[code]
        self.metrics.instances_received.labels(name).inc()
        logs.event(log, logging.WARNING, "store.failed", assoc=stats.number, status=f"0x{code:04X}",
                   reason=name, detail=comment, **fields)
        return _failure(code, comment)

    def on_store(self, event: evt.Event) -> int | Dataset:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._store(event)
        finally:
            self.metrics.store_seconds.observe(time.perf_counter() - t0)
            self.metrics.add_cpu("-", "receive", c0)

    def _store(self, event: evt.Event) -> int | Dataset:
        stats = self._stats_for(event.assoc)
        context = event.context
        sop_class = str(context.abstract_syntax)
        stream: memoryview = event.request.DataSet.getbuffer()
        try:
            return self._store_stream(event, stats, stream, sop_class)
        finally:
            stream.release()

    def _store_stream(self, event: evt.Event, stats: _AssocStats, stream: memoryview, sop_class: str) -> int | Dataset:
        ts = str(event.context.transfer_syntax)
        request_instance = str(event.request.AffectedSOPInstanceUID or "").strip("\x00 ")
        return self._checked(stats, sop_class, request_instance, lambda: read_header(stream, ts), len(stream),
                             lambda header: self._persist(event, stats, stream, header, ts))

    def _checked(self, stats: _AssocStats, sop_class: str, request_instance: str, read: Callable[[], Header],
                 size: int, persist: Callable[[Header], int | Dataset], *, on_disk: int = 0,
                 write_failure: Callable[[], Dataset | None] | None = None) -> int | Dataset:
        """The checks every received dataset goes through, in order, then ``persist``.

        ``size``: the dataset's bytes; ``on_disk``: how many of them are already written to the spool (a
        streamed dataset), so that the free-space check sees the disk as it was before they were.
        ``write_failure``: for a streamed dataset whose writing failed, its refusal when the header cannot
        be read (the failed write is what went wrong).
        """
        try:
            header = read()
        except HeaderError as exc:
            header, refusal = None, (status.CANNOT_DECODE, exc.reason)
        else:
            refusal = self._header_refusal(header, sop_class, request_instance)
        if refusal is not None:
            # A streamed data set whose writing failed has only its head on disk: what went wrong is the write.
            failed = write_failure() if write_failure is not None else None
            if failed is not None:
                return failed
            return self._fail(stats, *refusal, sop_class=sop_class)
        assert header is not None

        uid = header.sop_instance_uid
        with self._uid_locks[hash(uid) % _UID_LOCK_STRIPES]:
            try:
                if self.journal.has_instance(uid):
                    stats.duplicates += 1
                    self.metrics.instances_received.labels("duplicate").inc()
                    if self.audit is not None:
                        self.audit.write("instance.duplicate", ref=self.audit.ref(uid), assoc=stats.number)
                    return status.SUCCESS
                self._check_resources(size - on_disk)
            except OutOfResourcesError as exc:
                return self._fail(stats, status.OUT_OF_RESOURCES, exc.reason, resource=exc.resource)
            except JournalError:
                return self._fail(stats, status.OUT_OF_RESOURCES, "journal unavailable", resource="journal")
            return persist(header)

    @staticmethod
    def _header_refusal(header: Header, sop_class: str, request_instance: str) -> tuple[int, str] | None:
        if not header.sop_instance_uid:
            return status.NO_SOP_INSTANCE_UID, "dataset has no SOP Instance UID"
        if header.sop_class_uid != sop_class:
            return status.DATASET_MISMATCH, "SOP Class UID differs from the presentation context"
        if header.sop_instance_uid != request_instance:
            return status.DATASET_MISMATCH, "SOP Instance UID differs from the C-STORE request"
        return None

    def _check_resources(self, size: int) -> None:
        if self.journal.pending >= self.max_pending:
            raise OutOfResourcesError("pending", "too many instances waiting to be processed")
        if self.spool.free_bytes() - size < self.min_free_bytes:
            raise OutOfResourcesError("disk", "free disk space below the configured minimum")

    def _persist(self, event: evt.Event, stats: _AssocStats, stream: memoryview, header: Any, ts: str) -> int | Dataset:
        try:
            meta = encode_file_meta(str(event.request.AffectedSOPClassUID), header.sop_instance_uid, ts)
        except UnicodeEncodeError:  # not a valid UID, but stored as received: pydicom's encoder copes
            meta = _PREAMBLE + pynetdicom_encode_file_meta(event.file_meta)
        relpath = self.spool.relpath_for(header.sop_instance_uid)
        size = len(meta) + len(stream)
        routes = self._routes(header)
        try:
            self.spool.write_placed(relpath, meta, stream, keep_cached=bool(routes))
        except OSError as exc:
            return self._fail(stats, status.OUT_OF_RESOURCES, "spool write failed",
                              resource="disk", errno=exc.errno)
        return self._record(event.assoc, stats, header, ts, relpath, size, routes)

    def _routes(self, header: Header) -> list[Route]:
        """The engines that will read this instance. None: once durable, its file's pages may leave the
        page cache (:mod:`edged.spool.writeback`; the streamed path lets them go after its response, the
        in-memory path when it places the file); some: the pipeline reads it soon, so they stay."""
        return self.router.route(header) if self.router is not None else []

    def _record(self, assoc: Any, stats: _AssocStats, header: Header, ts: str, relpath: str, size: int,
                routes: list[Route]) -> int | Dataset:
        """Commit a placed (fsynced) file's journal row with its directory; Success, or the file goes."""
        record = InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            transfer_syntax_uid=ts,
            size_bytes=size,
            calling_ae=assoc.requestor.ae_title,
            path=relpath,
            expected_count=header.images_in_acquisition,
        )
        try:
            # The directory fsync and the journal row, shared with every association committing now.
            self.committer.commit(record, routes)
        except OSError as exc:
            self.spool.remove(relpath)
            return self._fail(stats, status.OUT_OF_RESOURCES, "spool directory sync failed",
                              resource="disk", errno=exc.errno)
        except JournalError:
            # Not acknowledged, so not kept: the spool never holds a file the journal doesn't know.
            self.spool.remove(relpath)
            return self._fail(stats, status.OUT_OF_RESOURCES, "journal unavailable", resource="journal")
        stats.stored += 1
        stats.bytes += size
        if self.audit is not None:
            self.audit.write("instance.stored", ref=self.audit.ref(header.sop_instance_uid), assoc=stats.number,
                             sop_class=header.sop_class_uid, modality=header.modality, bytes=size,
                             routed=[r.model for r in routes])
        self.metrics.instances_received.labels("success").inc()
        self.metrics.bytes_received.inc(size)
        if self.on_stored is not None and routes:
            self.on_stored()
        return status.SUCCESS

    # -- C-STORE, streamed (edged.dicom.stream) -----------------------------------------------------

    def answered(self, inc: Incoming, sent: float) -> None:
        """A streamed data set's response went out at ``sent``: if it was stored (not a duplicate, not
        refused), observe its steps (``edged_store_step_seconds``)."""
        if not inc.t_committed:
            return
        ends = (inc.t_command, inc.t_last, inc.t_checked, inc.t_placed, inc.t_committed, sent)
        for child, start, end in zip(self._steps, ends, ends[1:]):
            child.observe(end - start)

    def store_streamed(self, assoc: Any, incoming: Incoming) -> int | Dataset:
        """What :meth:`on_store` does, for a data set the DUL has written to a temp file as it arrived
        (:mod:`edged.dicom.stream`): the same checks in the same order, then the file is renamed into
        place and fsynced, and committed. The temp file is always consumed (placed or removed)."""
        t0 = time.perf_counter()
        try:
            return self._store_streamed(assoc, incoming)
        finally:
            incoming.abandon()
            self.metrics.store_seconds.observe(time.perf_counter() - t0)
            self.metrics.add_cpu("-", "receive", incoming.cpu0)

    def _store_streamed(self, assoc: Any, inc: Incoming) -> int | Dataset:
        stats = self._stats_for(assoc)

        def read() -> Header:
            if inc.failed:  # only the head is known for sure
                return read_header_head(bytes(inc.head), inc.size - inc.meta_len, inc.transfer_syntax)
            try:
                return read_header_at(inc.fd, inc.meta_len, inc.written, inc.transfer_syntax, head=inc.head)
            except (OSError, ValueError):
                raise HeaderError("spooled dataset could not be read") from None

        def write_failure() -> Dataset | None:
            if inc.error is not None or inc.fd < 0:
                return self._fail(stats, status.OUT_OF_RESOURCES, "spool write failed", resource="disk",
                                  errno=inc.error.errno if inc.error is not None else None)
            if inc.over_budget:
                return self._fail(stats, status.OUT_OF_RESOURCES, "free disk space below the configured minimum",
                                  resource="disk")
            return None

        def persist(header: Header) -> int | Dataset:
            failed = write_failure()
            if failed is not None:
                return failed
            relpath = self.spool.relpath_for(header.sop_instance_uid)
            routes = self._routes(header)
            fd, tmp = inc.take()
            inc.t_checked = time.perf_counter()
            try:
                final = self.spool.place(fd, tmp, relpath)
            except OSError as exc:
                return self._fail(stats, status.OUT_OF_RESOURCES, "spool write failed",
                                  resource="disk", errno=exc.errno)
            inc.t_placed = time.perf_counter()
            if not routes:  # nothing reads it soon: its pages go once the response is out
                inc.uncache = final
            result = self._record(assoc, stats, header, inc.transfer_syntax, relpath, inc.size, routes)
            if isinstance(result, int) and result == status.SUCCESS:
                inc.t_committed = time.perf_counter()
            return result

        failed = inc.failed
        return self._checked(stats, inc.abstract_syntax, inc.command.sop_instance_uid, read, inc.size - inc.meta_len,
                             persist, on_disk=inc.written,
                             write_failure=write_failure if failed else None)


def _tls_context(cfg: DicomConfig) -> ssl.SSLContext | None:
    tls = cfg.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.ca is not None:
            ctx.load_verify_locations(str(tls.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise EdgedError(f"dicom.tls: cannot load certificate, key or CA: {exc}") from None
    return ctx


def tune_libraries() -> None:
    """Turn off library work whose only output edged drops (process-wide; called by :class:`Listener`).

    * pynetdicom's default handlers describe every PDU and DIMSE message for its loggers, which edged keeps
      at ERROR (:func:`edged.logs.setup`). Associations bind them when created.
    * pydicom validates every value it reads (each UID against a regular expression, several times per
      UID in an A-ASSOCIATE-RQ) only to *warn* about it (``reading_validation_mode`` WARN), and those
      warnings are dropped too. Validation never refuses anything at that level, so IGNORE changes no
      outcome; pynetdicom's own checks of UIDs in PDUs (``_config.VALIDATORS``) still run.
    """
    _config.LOG_HANDLER_LEVEL = "none"
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def build_ae(cfg: DicomConfig) -> AE:
    """An application entity supporting Verification and every storage SOP class."""
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = cfg.max_pdu
    ae.acse_timeout = cfg.acse_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    ae.network_timeout = cfg.network_timeout
    ae.require_called_aet = True
    ae.require_calling_aet = list(cfg.allowed_calling_aes)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


class Listener:
    """The listening DICOM server. :meth:`start` binds; :meth:`stop` shuts down in order."""

    def __init__(self, cfg: DicomConfig, handler: StoreHandler) -> None:
        tune_libraries()
        self.cfg = cfg
        self.handler = handler
        self.ae = build_ae(cfg)
        self._server: ListeningServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise EdgedError("listener not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        h = self.handler
        handlers = [
            (evt.EVT_C_ECHO, h.on_echo),
            (evt.EVT_C_STORE, h.on_store),
            (evt.EVT_ESTABLISHED, h.on_established),
            (evt.EVT_REJECTED, h.on_rejected),
            (evt.EVT_RELEASED, h.on_released),
            (evt.EVT_ABORTED, h.on_aborted),
        ]
        try:
            self._server = start_server(
                self.ae, (self.cfg.host, self.cfg.port), evt_handlers=handlers, ssl_context=_tls_context(self.cfg),
                contexts=SharedContexts(self.ae.supported_contexts), handshake_timeout=self.cfg.acse_timeout,
                guard=Guard(Limits(self.cfg.max_pdu, self.cfg.max_message_bytes, self.cfg.network_timeout),
                            self.handler.metrics, stream=self.handler),
            )
        except OSError as exc:
            raise EdgedError(
                f"dicom: cannot listen on {self.cfg.host}:{self.cfg.port}: {exc.strerror or exc}"
            ) from None

    @property
    def bound(self) -> bool:
        return self._server is not None and self._server.socket is not None and self._server.socket.fileno() >= 0

    def active(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop_accepting(self) -> None:
        """Close the listening socket; established associations go on."""
        if self._server is not None:
            self._server.shutdown()

    def abort_all(self) -> int:
        if self._server is None:
            return 0
        assocs = list(self._server.active_associations)
        for a in assocs:
            a.abort()
        return len(assocs)
